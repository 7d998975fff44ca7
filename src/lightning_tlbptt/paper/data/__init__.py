"""Data modules for the paper's datasets and the project's offline stand-ins.

Batches are ``(x, y)`` with ``y`` a ``LongTensor [B]``; ``x`` is ``[B, C, H, W]`` in [0, 1] for
static images and ``[B, T, 2, H, W]`` binary event frames for event data. Each module's default batch size,
``T`` and ``dt`` are its dataset's paper setting (:data:`~lightning_tlbptt.paper.settings.DATASETS`, Table 1).
"""

from lightning_tlbptt.paper.data.base import ClassificationDataModule, stratified_split
from lightning_tlbptt.paper.data.event_mnist import EventMNIST, EventMNISTDataModule, SaccadeSimulator
from lightning_tlbptt.paper.data.framing import EventFrames, events_to_frames
from lightning_tlbptt.paper.data.neuromorphic import (
    CIFAR10DVSDataModule,
    DVSGestureDataModule,
    EventDataModule,
    NCaltech101DataModule,
    TinyESImageNetDataModule,
)
from lightning_tlbptt.paper.data.static import (
    CIFAR10DataModule,
    EMNISTDataModule,
    MNIST5kDataModule,
    load_mnist5k,
)

__all__ = [
    "CIFAR10DVSDataModule",
    "CIFAR10DataModule",
    "ClassificationDataModule",
    "DVSGestureDataModule",
    "EMNISTDataModule",
    "EventDataModule",
    "EventFrames",
    "EventMNIST",
    "EventMNISTDataModule",
    "MNIST5kDataModule",
    "NCaltech101DataModule",
    "SaccadeSimulator",
    "TinyESImageNetDataModule",
    "events_to_frames",
    "load_mnist5k",
    "stratified_split",
]
