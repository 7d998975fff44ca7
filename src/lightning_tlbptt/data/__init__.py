"""Data modules for the paper's datasets and the project's offline stand-ins.

Batches are ``(x, y)`` with ``y`` a ``LongTensor [B]``; ``x`` is ``[B, C, H, W]`` in [0, 1] for
static images and ``[B, T, 2, H, W]`` binary event frames for event data. :data:`DATASETS` holds
each dataset's paper setting (Table 1).
"""

from lightning_tlbptt.data.base import ClassificationDataModule, stratified_split
from lightning_tlbptt.data.event_mnist import EventMNIST, EventMNISTDataModule, SaccadeSimulator
from lightning_tlbptt.data.framing import EventFrames, events_to_frames
from lightning_tlbptt.data.neuromorphic import (
    CIFAR10DVSDataModule,
    DVSGestureDataModule,
    EventDataModule,
    NCaltech101DataModule,
    TinyESImageNetDataModule,
)
from lightning_tlbptt.data.registry import DATASETS, DatasetSpec, build_datamodule
from lightning_tlbptt.data.static import (
    CIFAR10DataModule,
    EMNISTDataModule,
    MNIST5kDataModule,
    load_mnist5k,
)

__all__ = [
    "DATASETS",
    "CIFAR10DVSDataModule",
    "CIFAR10DataModule",
    "ClassificationDataModule",
    "DVSGestureDataModule",
    "DatasetSpec",
    "EMNISTDataModule",
    "EventDataModule",
    "EventFrames",
    "EventMNIST",
    "EventMNISTDataModule",
    "MNIST5kDataModule",
    "NCaltech101DataModule",
    "SaccadeSimulator",
    "TinyESImageNetDataModule",
    "build_datamodule",
    "events_to_frames",
    "load_mnist5k",
    "stratified_split",
]
