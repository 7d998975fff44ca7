"""Temporally-truncated local BPTT (Guo et al., 2023) for SpikingJelly networks, as a Lightning strategy.

>>> from lightning import Trainer
>>> from lightning_tlbptt import TruncatedLocalBPTT
>>> trainer = Trainer(strategy=TruncatedLocalBPTT(k=5, n=2))  # doctest: +SKIP

Importing the package loads the core only (the strategy and what it needs: torch, Lightning, SpikingJelly,
torchmetrics). Measurement (:mod:`lightning_tlbptt.measure`: ``CostMonitor``, ``estimate``, ...) and the paper's
reproduction (:mod:`lightning_tlbptt.paper`: ``PaperClassifier``, ``build_model``, ...) are exported here too but
load on first use; the paper's data and the applications (the ``tlbptt`` package) need the ``[paper]`` extra. See
docs/layout.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_tlbptt.checkpointing import strip_local_classifiers
from lightning_tlbptt.classifiers import LocalClassifier
from lightning_tlbptt.ddp import TruncatedLocalBPTTDDP
from lightning_tlbptt.layout import to_time_major
from lightning_tlbptt.losses import rate_cross_entropy, rate_mse
from lightning_tlbptt.memory import SavedTensorsMeter
from lightning_tlbptt.module import SpikingClassifier
from lightning_tlbptt.output_window import OutputWindow
from lightning_tlbptt.partitioning import Partition, PartitionError, find_network, observe
from lightning_tlbptt.strategy import TruncatedLocalBPTT

_LAZY = {
    "CostMonitor": "lightning_tlbptt.measure.callbacks",
    "MemoryMonitor": "lightning_tlbptt.measure.callbacks",
    "OpCounterMonitor": "lightning_tlbptt.measure.callbacks",
    "SpikeDensityMonitor": "lightning_tlbptt.measure.callbacks",
    "CostEstimate": "lightning_tlbptt.measure.costs",
    "CostRatios": "lightning_tlbptt.measure.costs",
    "estimate": "lightning_tlbptt.measure.costs",
    "figure_of_merit": "lightning_tlbptt.measure.costs",
    "MODELS": "lightning_tlbptt.paper.models",
    "build_model": "lightning_tlbptt.paper.models",
    "PaperNeuron": "lightning_tlbptt.paper.neuron",
    "PaperClassifier": "lightning_tlbptt.paper.classifier",
}


def __getattr__(name: str) -> Any:
    # PEP 562: measurement and the paper's reproduction load when first asked for, not with the strategy
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_tlbptt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "MODELS",
    "CostEstimate",
    "CostMonitor",
    "CostRatios",
    "LocalClassifier",
    "MemoryMonitor",
    "OpCounterMonitor",
    "OutputWindow",
    "PaperClassifier",
    "PaperNeuron",
    "Partition",
    "PartitionError",
    "SavedTensorsMeter",
    "SpikeDensityMonitor",
    "SpikingClassifier",
    "TruncatedLocalBPTT",
    "TruncatedLocalBPTTDDP",
    "build_model",
    "estimate",
    "figure_of_merit",
    "find_network",
    "observe",
    "rate_cross_entropy",
    "rate_mse",
    "strip_local_classifiers",
    "to_time_major",
]

__version__ = "0.2.0"
