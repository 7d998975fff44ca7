"""Temporally-truncated local BPTT (Guo et al., 2023) for SpikingJelly networks, as a Lightning strategy.

>>> from lightning import Trainer
>>> from lightning_tlbptt import TruncatedLocalBPTT
>>> trainer = Trainer(strategy=TruncatedLocalBPTT(k=5, n=2))  # doctest: +SKIP
"""

from lightning_tlbptt.callbacks import CostMonitor, MemoryMonitor, OpCounterMonitor, SpikeDensityMonitor
from lightning_tlbptt.classifiers import LocalClassifier
from lightning_tlbptt.costs import CostEstimate, CostRatios, estimate, figure_of_merit
from lightning_tlbptt.layout import to_time_major
from lightning_tlbptt.losses import rate_cross_entropy, rate_mse
from lightning_tlbptt.memory import SavedTensorsMeter
from lightning_tlbptt.models import MODELS, PaperNeuron, build_model
from lightning_tlbptt.module import SpikingClassifier
from lightning_tlbptt.paper import PaperClassifier
from lightning_tlbptt.partitioning import Partition, PartitionError, find_network, observe, partition
from lightning_tlbptt.strategy import TruncatedLocalBPTT, strip_local_classifiers

__all__ = [
    "MODELS",
    "CostEstimate",
    "CostMonitor",
    "CostRatios",
    "LocalClassifier",
    "MemoryMonitor",
    "OpCounterMonitor",
    "PaperClassifier",
    "PaperNeuron",
    "Partition",
    "PartitionError",
    "SavedTensorsMeter",
    "SpikeDensityMonitor",
    "SpikingClassifier",
    "TruncatedLocalBPTT",
    "build_model",
    "estimate",
    "figure_of_merit",
    "find_network",
    "observe",
    "partition",
    "rate_cross_entropy",
    "rate_mse",
    "strip_local_classifiers",
    "to_time_major",
]

__version__ = "0.2.0"
