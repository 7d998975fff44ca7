"""The paper's dataset settings (Table 1, Table 2, section 3.3) and the project's offline stand-ins."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from lightning_tlbptt.data.base import ClassificationDataModule
from lightning_tlbptt.data.event_mnist import EventMNISTDataModule
from lightning_tlbptt.data.neuromorphic import (
    CIFAR10DVSDataModule,
    DVSGestureDataModule,
    NCaltech101DataModule,
    TinyESImageNetDataModule,
)
from lightning_tlbptt.data.static import CIFAR10DataModule, EMNISTDataModule, MNIST5kDataModule
from lightning_tlbptt.models import PaperNeuron, build_model

__all__ = ["DATASETS", "DatasetSpec", "build_datamodule"]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset with the paper's setting for it.

    Table 1 gives ranges for some hyperparameters (the paper tuned within them); they are kept as
    ranges, and ``neuron`` takes the middle of the threshold range.

    Attributes:
        name: registry key.
        datamodule: the data module class.
        model: key of :data:`lightning_tlbptt.models.MODELS` (Table 2 pairing).
        num_classes: classes.
        in_channels: ``C`` of the input (2 polarities for event data).
        input_size: ``(H, W)`` the model sees.
        n_steps: ``T``, time steps per sample.
        batch_size: Table 1 batch size.
        dt_ms: frame window of event recordings (section 3.3.2); ``None`` for static images and
            for Tiny-ES-ImageNet, which is stored as time steps already.
        neuron: leaky constant ``tau_p``, middle of the ``u_th`` range, ``a = 0.5``.
        u_th_range, lr_range, dropout_range: Table 1 ranges.
        momentum: SGD momentum; ``None`` where the paper uses Adam.
        loss: ``"mse"`` between one-hot targets and output firing rates (Eq. 3), or ``"ce"``.
        note: where the setting departs from, or is not given by, the paper.
    """

    name: str
    datamodule: type[ClassificationDataModule]
    model: str
    num_classes: int
    in_channels: int
    input_size: tuple[int, int]
    n_steps: int
    batch_size: int
    dt_ms: float | None
    neuron: PaperNeuron
    u_th_range: tuple[float, float]
    lr_range: tuple[float, float]
    dropout_range: tuple[float, float]
    momentum: float | None
    loss: Literal["mse", "ce"]
    note: str = ""

    @property
    def optimizer(self) -> Literal["sgd", "adam"]:
        return "adam" if self.momentum is None else "sgd"

    def make_datamodule(self, data_dir: str | Path | None = None, **overrides: Any) -> ClassificationDataModule:
        """The data module with this setting's batch size, T, dt and input size, then ``overrides``."""
        accepted = inspect.signature(self.datamodule).parameters
        setting = {
            "batch_size": self.batch_size,
            "n_steps": self.n_steps,
            "dt_ms": self.dt_ms,
            "input_size": self.input_size,
        }
        kwargs = {k: v for k, v in setting.items() if k in accepted and v is not None}
        return self.datamodule(data_dir, **{**kwargs, **overrides})

    def make_model(self, **overrides: Any) -> nn.Sequential:
        """The Table 2 network sized for this dataset, with this setting's neuron, then ``overrides``."""
        kwargs = {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "neuron": self.neuron,
        }
        return build_model(self.model, **{**kwargs, **overrides})


_EMNIST_COLUMN = {
    "neuron": PaperNeuron(tau_p=0.9, u_th=0.5),
    "u_th_range": (0.4, 0.6),
    "lr_range": (0.2, 0.5),
    "dropout_range": (0.0, 0.0),
    "momentum": 0.9,
    "loss": "mse",
}

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            name="mnist5k",
            datamodule=MNIST5kDataModule,
            model="lenet1",
            num_classes=10,
            in_channels=1,
            input_size=(28, 28),
            n_steps=20,
            batch_size=128,
            dt_ms=None,
            **_EMNIST_COLUMN,
            note="Offline stand-in for EMNIST, not in the paper: Table 1's EMNIST column, batch 128 "
            "for a 4,000-digit training set.",
        ),
        DatasetSpec(
            name="event_mnist",
            datamodule=EventMNISTDataModule,
            model="lenet1",
            num_classes=10,
            in_channels=2,
            input_size=(34, 34),
            n_steps=20,
            batch_size=128,
            dt_ms=15.0,
            **_EMNIST_COLUMN,
            note="Offline event-data stand-in, not in the paper: simulated saccades over MNIST-5k, "
            "300 ms in 20 windows of 15 ms, Table 1's EMNIST column, batch 128.",
        ),
        DatasetSpec(
            name="emnist",
            datamodule=EMNISTDataModule,
            model="lenet1",
            num_classes=47,
            in_channels=1,
            input_size=(28, 28),
            n_steps=20,
            batch_size=1024,
            dt_ms=None,
            **_EMNIST_COLUMN,
        ),
        DatasetSpec(
            name="dvs_gesture",
            datamodule=DVSGestureDataModule,
            model="lenet2",
            num_classes=11,
            in_channels=2,
            input_size=(128, 128),
            n_steps=60,
            batch_size=32,
            dt_ms=20.0,
            neuron=PaperNeuron(tau_p=0.3, u_th=0.35),
            u_th_range=(0.2, 0.5),
            lr_range=(0.005, 0.2),
            dropout_range=(0.0, 0.2),
            momentum=0.9,
            loss="mse",
        ),
        DatasetSpec(
            name="cifar10",
            datamodule=CIFAR10DataModule,
            model="alexnet",
            num_classes=10,
            in_channels=3,
            input_size=(32, 32),
            n_steps=10,
            batch_size=128,
            dt_ms=None,
            neuron=PaperNeuron(tau_p=0.8, u_th=0.4),
            u_th_range=(0.3, 0.5),
            lr_range=(0.1, 0.2),
            dropout_range=(0.0, 0.15),
            momentum=0.9,
            loss="mse",
        ),
        DatasetSpec(
            name="cifar10_dvs",
            datamodule=CIFAR10DVSDataModule,
            model="alexnet",
            num_classes=10,
            in_channels=2,
            input_size=(32, 32),
            n_steps=100,
            batch_size=128,
            dt_ms=5.0,
            neuron=PaperNeuron(tau_p=0.8, u_th=0.45),
            u_th_range=(0.3, 0.6),
            lr_range=(0.1, 0.5),
            dropout_range=(0.0, 0.2),
            momentum=0.9,
            loss="mse",
            note="Input size not given by the paper: the 128x128 recordings are downsampled to 32x32, "
            "the size of the CIFAR10 images they were recorded from, so that AlexNet is the CIFAR10 one "
            "(at 128x128 its first FC alone would have 1.07 billion weights).",
        ),
        DatasetSpec(
            name="n_caltech101",
            datamodule=NCaltech101DataModule,
            model="vgg11",
            num_classes=101,
            in_channels=2,
            input_size=(48, 64),
            n_steps=60,
            batch_size=128,
            dt_ms=5.0,
            neuron=PaperNeuron(tau_p=0.5, u_th=0.5),
            u_th_range=(0.5, 0.5),
            lr_range=(1e-4, 5e-4),
            dropout_range=(0.0, 0.3),
            momentum=None,
            loss="ce",
            note="Input size not given by the paper: the 240x180 grid is downsampled to 64x48.",
        ),
        DatasetSpec(
            name="tiny_es_imagenet",
            datamodule=TinyESImageNetDataModule,
            model="resnet18",
            num_classes=200,
            in_channels=2,
            input_size=(64, 64),
            n_steps=8,
            batch_size=512,
            dt_ms=None,
            neuron=PaperNeuron(tau_p=0.5, u_th=0.65),
            u_th_range=(0.5, 0.8),
            lr_range=(1e-4, 1e-3),
            dropout_range=(0.0, 0.0),
            momentum=None,
            loss="ce",
            note="The paper's Tiny-ES-ImageNet is not published; see TinyESImageNetDataModule for the layout.",
        ),
    ]
}


def build_datamodule(name: str, data_dir: str | Path | None = None, **overrides: Any) -> ClassificationDataModule:
    """The data module of :data:`DATASETS` entry ``name`` with its paper setting, then ``overrides``."""
    try:
        spec = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available datasets: {', '.join(sorted(DATASETS))}") from None
    return spec.make_datamodule(data_dir, **overrides)
