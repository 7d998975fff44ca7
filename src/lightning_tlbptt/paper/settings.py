"""The paper's setting for each dataset (Guo et al. 2023, Table 1, Table 2's pairing, section 3.3), in one table.

Every other place that needs a paper value reads it from :data:`DATASETS`: the Table 2 builders take their
default input, width and neuron from the dataset the paper trains them on, the data modules their default ``T``,
``dt`` and batch size, :func:`~lightning_tlbptt.paper.classifier.paper_setting` the model's hyperparameters.
The data module classes are named, not imported, so that reading a setting loads no dataset library.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lightning_tlbptt.paper.neuron import PaperNeuron

if TYPE_CHECKING:
    from torch import nn

    from lightning_tlbptt.paper.data.base import ClassificationDataModule

__all__ = ["DATASETS", "DatasetSpec", "build_datamodule", "dataset_spec"]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset with the paper's setting for it.

    Table 1 gives ranges for some hyperparameters (the paper tuned within them); they are kept as
    ranges, and ``neuron`` takes the middle of the threshold range.

    Attributes:
        name: key of :data:`DATASETS`.
        datamodule_class: name of the data module class in :mod:`lightning_tlbptt.paper.data`.
        model: key of :data:`lightning_tlbptt.paper.models.MODELS` (Table 2 pairing).
        num_classes: classes.
        in_channels: ``C`` of the input (2 polarities for event data).
        input_size: ``(H, W)`` the model sees.
        n_steps: ``T``, time steps per sample.
        batch_size: Table 1 batch size.
        dt_ms: frame window of event recordings (section 3.3.2); ``None`` for static images and
            for Tiny-ES-ImageNet, which is stored as time steps already.
        neuron: leaky constant ``tau_p``, middle of the ``u_th`` range, ``a = 0.5``.
        u_th_range, lr_range, dropout_range: Table 1 ranges.
        lr_batch_size: the batch Table 1's learning rates are for: its column's batch size (EMNIST's 1,024 for the
            offline stand-ins that take EMNIST's column, whose own batch is 128).
        recipe_lr: the learning rate at ``lr_batch_size`` that the default recipe scales to the batch
            (:func:`~lightning_tlbptt.paper.classifier.paper_setting`): 0.4 in EMNIST's column (inside its 0.2-0.5,
            the accuracy study's value, ``docs/results.md``), the lower end of the range elsewhere (not measured
            here).
        momentum: SGD momentum; ``None`` where the paper uses Adam.
        loss: ``"mse"`` between one-hot targets and output firing rates (Eq. 3), or ``"ce"``.
        static: static images, repeated over ``n_steps`` by the model (direct encoding, section 3.3.1); event
            data carry their own ``T``.
        note: where the setting departs from, or is not given by, the paper.
    """

    name: str
    datamodule_class: str
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
    lr_batch_size: int
    recipe_lr: float
    static: bool = False
    note: str = ""

    @property
    def datamodule(self) -> type[ClassificationDataModule]:
        """The data module class (imports :mod:`lightning_tlbptt.paper.data`, which needs the ``[paper]`` extra)."""
        return getattr(importlib.import_module("lightning_tlbptt.paper.data"), self.datamodule_class)

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
        from lightning_tlbptt.paper.models import build_model

        kwargs = {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "neuron": self.neuron,
        }
        return build_model(self.model, **{**kwargs, **overrides})


# What each dataset is and which Table 2 network the paper trains on it. Table 1 names the column of Table 1 the
# dataset takes (the offline stand-ins, not in the paper, take EMNIST's); None: its own.
# fmt: off
#                      data module                 model       classes  C  (H, W)      T    batch  dt_ms  Table 1
_DATA: dict[str, tuple[Any, ...]] = {
    "mnist5k":          ("MNIST5kDataModule",        "lenet1",   10,      1, (28, 28),   20,  128,   None,  "emnist"),
    "event_mnist":      ("EventMNISTDataModule",     "lenet1",   10,      2, (34, 34),   20,  128,   15.0,  "emnist"),
    "emnist":           ("EMNISTDataModule",         "lenet1",   47,      1, (28, 28),   20,  1024,  None,  None),
    "dvs_gesture":      ("DVSGestureDataModule",     "lenet2",   11,      2, (128, 128), 60,  32,    20.0,  None),
    "cifar10":          ("CIFAR10DataModule",        "alexnet",  10,      3, (32, 32),   10,  128,   None,  None),
    "cifar10_dvs":      ("CIFAR10DVSDataModule",     "alexnet",  10,      2, (32, 32),   100, 128,   5.0,   None),
    "n_caltech101":     ("NCaltech101DataModule",    "vgg11",    101,     2, (48, 64),   60,  128,   5.0,   None),
    "tiny_es_imagenet": ("TinyESImageNetDataModule", "resnet18", 200,     2, (64, 64),   8,   512,   None,  None),
}

# Table 1's hyperparameters; the neuron's u_th is the middle of the u_th range.
#                      tau_p  u_th  u_th range   lr range      dropout range  momentum  loss
_TABLE_1: dict[str, tuple[Any, ...]] = {
    "emnist":           (0.9,  0.5,  (0.4, 0.6), (0.2, 0.5),   (0.0, 0.0),    0.9,      "mse"),
    "dvs_gesture":      (0.3,  0.35, (0.2, 0.5), (0.005, 0.2), (0.0, 0.2),    0.9,      "mse"),
    "cifar10":          (0.8,  0.4,  (0.3, 0.5), (0.1, 0.2),   (0.0, 0.15),   0.9,      "mse"),
    "cifar10_dvs":      (0.8,  0.45, (0.3, 0.6), (0.1, 0.5),   (0.0, 0.2),    0.9,      "mse"),
    "n_caltech101":     (0.5,  0.5,  (0.5, 0.5), (1e-4, 5e-4), (0.0, 0.3),    None,     "ce"),
    "tiny_es_imagenet": (0.5,  0.65, (0.5, 0.8), (1e-4, 1e-3), (0.0, 0.0),    None,     "ce"),
}
# fmt: on

# The learning rate the accuracy study trained with (docs/results.md: lr 0.05 at batch 128 = 0.4 at batch 1,024); the
# columns it did not measure take the lower end of their range.
_RECIPE_LR = {"emnist": 0.4}

_STATIC = ("mnist5k", "emnist", "cifar10")  # image datasets; the others are event recordings

_NOTES = {
    "mnist5k": "Offline stand-in for EMNIST, not in the paper: Table 1's EMNIST column, batch 128 for a 4,000-digit "
    "training set.",
    "event_mnist": "Offline event-data stand-in, not in the paper: simulated saccades over MNIST-5k, 300 ms in 20 "
    "windows of 15 ms, Table 1's EMNIST column, batch 128.",
    "cifar10_dvs": "Input size not given by the paper: the 128x128 recordings are downsampled to 32x32, the size of "
    "the CIFAR10 images they were recorded from, so that AlexNet is the CIFAR10 one (at 128x128 its first FC alone "
    "would have 1.07 billion weights).",
    "n_caltech101": "Input size not given by the paper: the 240x180 grid is downsampled to 64x48.",
    "tiny_es_imagenet": "The paper's Tiny-ES-ImageNet is not published; see TinyESImageNetDataModule for the layout.",
}


def _row(name: str) -> DatasetSpec:
    datamodule, model, classes, channels, size, steps, batch, dt_ms, column = _DATA[name]
    tau_p, u_th, u_th_range, lr_range, dropout_range, momentum, loss = _TABLE_1[column or name]
    lr_batch_size = _DATA[column][6] if column else batch  # the batch of the column's own dataset
    return DatasetSpec(
        name=name,
        datamodule_class=datamodule,
        model=model,
        num_classes=classes,
        in_channels=channels,
        input_size=size,
        n_steps=steps,
        batch_size=batch,
        dt_ms=dt_ms,
        neuron=PaperNeuron(tau_p=tau_p, u_th=u_th),
        u_th_range=u_th_range,
        lr_range=lr_range,
        dropout_range=dropout_range,
        momentum=momentum,
        loss=loss,
        lr_batch_size=lr_batch_size,
        recipe_lr=_RECIPE_LR.get(column or name, lr_range[0]),
        static=name in _STATIC,
        note=_NOTES.get(name, ""),
    )


DATASETS: dict[str, DatasetSpec] = {name: _row(name) for name in _DATA}
"""Every dataset's paper setting, by name."""


def dataset_spec(name: str) -> DatasetSpec:
    """:data:`DATASETS` entry ``name``, or a ``ValueError`` listing the names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available datasets: {', '.join(sorted(DATASETS))}") from None


def build_datamodule(name: str, data_dir: str | Path | None = None, **overrides: Any) -> ClassificationDataModule:
    """The data module of :data:`DATASETS` entry ``name`` with its paper setting, then ``overrides``."""
    return dataset_spec(name).make_datamodule(data_dir, **overrides)
