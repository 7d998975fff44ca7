"""The local target follows the user's task: any integer label dtype, one-hot or soft targets, binary one-output
heads, and modules without labels (a label-free local loss, or an error that names both ways out)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from spikingjelly.activation_based import functional, layer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tlbptt import TruncatedLocalBPTT
from lightning_tlbptt.checks import local_target

from snn_fixtures import conv_net, event_batches, lif

CPU = torch.device("cpu")


def test_integer_labels_of_any_dtype_and_per_class_targets() -> None:
    y = torch.tensor([0, 3, 1], dtype=torch.uint8)
    assert local_target((None, y), 0, 4, None, CPU).dtype == torch.long
    soft = torch.softmax(torch.randn(3, 4), -1)
    assert torch.equal(local_target((None, soft), 0, 4, None, CPU), soft)
    binary = local_target((None, torch.tensor([True, False])), 0, 1, None, CPU)
    assert binary.shape == (2, 1) and binary.dtype == torch.float32
    with pytest.raises(ValueError, match=r"one output \(a binary head\).*0/1 labels"):
        local_target((None, torch.tensor([0, 2])), 0, 1, None, CPU)
    with pytest.raises(ValueError, match=r"float32 vector.*class indices in \[0, 4\)"):
        local_target((None, torch.rand(3)), 0, 4, None, CPU)


def test_a_batch_without_labels_names_target_and_a_label_free_loss() -> None:
    with pytest.raises(ValueError, match=r"target=lambda batch.*label-free|loss=lambda out_seq, target"):
        local_target((torch.zeros(2),), 0, 4, None, CPU)
    assert local_target((torch.zeros(2),), 0, 4, lambda batch: None, CPU, label_free=True) is None


class _Unlabelled(L.LightningModule):
    """A self-supervised-style module: its batches hold no labels; its loss is a firing-rate target."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        functional.reset_net(self.net)
        return (self.net(x.transpose(0, 1)).mean() - 0.2) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _unlabelled() -> DataLoader:
    return DataLoader(TensorDataset(event_batches(n=8, T=4).dataset.tensors[0]), batch_size=4)


def test_a_module_without_labels_trains_with_a_label_free_local_loss(make_trainer: Any) -> None:
    def rate_target(out_seq: torch.Tensor, target: None) -> torch.Tensor:
        assert target is None
        return (out_seq.mean() - 0.2) ** 2

    module = _Unlabelled()
    before = [p.detach().clone() for p in module.parameters()]
    strategy = TruncatedLocalBPTT(k=2, n=1, loss=rate_target, target=lambda batch: None)
    make_trainer(strategy=strategy).fit(module, _unlabelled())
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    with pytest.raises(ValueError, match=r"need the batch's target.*loss=lambda out_seq, target"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1)).fit(_Unlabelled(), _unlabelled())


def test_a_binary_one_output_head_trains_its_blocks(make_trainer: Any) -> None:
    class Binary(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(
                layer.Flatten(step_mode="m"),
                layer.Linear(64, 16, step_mode="m"),
                lif(),
                layer.Linear(16, 16, step_mode="m"),
                lif(),
                layer.Linear(16, 1, step_mode="m"),
            )

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            functional.reset_net(self.net)
            logit = self.net(x.transpose(0, 1)).mean(0).squeeze(-1)
            return nn.functional.binary_cross_entropy_with_logits(logit, y.float())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.5)

    for loss in ("mse", "ce"):
        module = Binary()
        before = [p.detach().clone() for p in module.parameters()]
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1, loss=loss)).fit(
            module, event_batches(n=8, T=4, num_classes=2)
        )
        assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True)), loss
