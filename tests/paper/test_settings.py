"""DATASETS: the paper's Table 1 settings, consistent with the data modules and models."""

from __future__ import annotations

import pytest
import torch

from lightning_tlbptt.paper import DATASETS, build_datamodule
from lightning_tlbptt.paper.data import EventDataModule

# Table 1 (batch size, T), section 3.3.2 (dt) and the output widths of Table 2.
PAPER = {
    "emnist": (1024, 20, None, 47, "lenet1", 0.9),
    "dvs_gesture": (32, 60, 20.0, 11, "lenet2", 0.3),
    "cifar10": (128, 10, None, 10, "alexnet", 0.8),
    "cifar10_dvs": (128, 100, 5.0, 10, "alexnet", 0.8),
    "n_caltech101": (128, 60, 5.0, 101, "vgg11", 0.5),
    "tiny_es_imagenet": (512, 8, None, 200, "resnet18", 0.5),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_settings(name: str):
    spec = DATASETS[name]
    assert (spec.batch_size, spec.n_steps, spec.dt_ms, spec.num_classes, spec.model, spec.neuron.tau_p) == PAPER[name]
    low, high = spec.u_th_range
    assert low <= spec.neuron.u_th <= high and spec.neuron.a == 0.5
    assert (spec.loss, spec.optimizer) == (("ce", "adam") if spec.model in ("vgg11", "resnet18") else ("mse", "sgd"))


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_datamodule_and_model_agree_with_spec(tmp_path, name: str):
    spec = DATASETS[name]
    dm = spec.make_datamodule(tmp_path)  # constructing reads no files
    assert (dm.num_classes, dm.in_channels, dm.input_size, dm.batch_size) == (
        spec.num_classes,
        spec.in_channels,
        spec.input_size,
        spec.batch_size,
    )
    if isinstance(dm, EventDataModule):
        assert (dm.n_steps, dm.dt_ms) == (spec.n_steps, spec.dt_ms)
    assert spec.static == (dm.n_steps is None)  # static images leave T to the model
    if spec.model in ("alexnet", "vgg11", "resnet18"):
        return  # built at their paper sizes in tests/paper/test_models.py; too slow to build twice here
    net = spec.make_model()
    out = net(torch.zeros(2, 1, spec.in_channels, *spec.input_size))
    assert out.shape == (2, 1, spec.num_classes)


def test_overrides_and_unknown_names():
    dm = build_datamodule("mnist5k", batch_size=7)
    assert dm.batch_size == 7
    with pytest.raises(ValueError, match=r"available datasets: .*mnist5k"):
        build_datamodule("imagenet")
