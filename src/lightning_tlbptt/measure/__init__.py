"""Measurement beside the core: the paper's cost model and the callbacks that measure and model training cost.

* :mod:`~lightning_tlbptt.measure.costs`: the paper's analytic cost model (Eqs. 8-18), over the strategy's own
  layers, blocks, chunks and local classifiers;
* :mod:`~lightning_tlbptt.measure.callbacks`: :class:`MemoryMonitor`, :class:`SpikeDensityMonitor`,
  :class:`CostMonitor`, :class:`OpCounterMonitor`, which read the strategy's public interface only.

It uses the core (and its dependencies), never the paper's reproduction nor the applications.
"""

from lightning_tlbptt.measure.callbacks import CostMonitor, MemoryMonitor, OpCounterMonitor, SpikeDensityMonitor
from lightning_tlbptt.measure.costs import (
    CostEstimate,
    CostRatios,
    CostRow,
    LayerShape,
    NetworkProfile,
    estimate,
    figure_of_merit,
    profile,
)

__all__ = [
    "CostEstimate",
    "CostMonitor",
    "CostRatios",
    "CostRow",
    "LayerShape",
    "MemoryMonitor",
    "NetworkProfile",
    "OpCounterMonitor",
    "SpikeDensityMonitor",
    "estimate",
    "figure_of_merit",
    "profile",
]
