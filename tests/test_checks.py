"""The checks made while training: the local target follows the user's task (any integer label dtype, one-hot or
soft targets, binary one-output heads, modules without labels), silent outputs are reported with the fix that
applies, and an optimizer that takes most of a batch is named with its levers."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import pytest
import torch
from spikingjelly.activation_based import functional, layer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tlbptt import SpikingClassifier, TruncatedLocalBPTT
from lightning_tlbptt.checks import SilenceCheck, local_target

from snn_fixtures import conv_net, event_batches, lif

CPU = torch.device("cpu")
HIDDEN_GAIN = 4.0  # hidden layers that fire (x nn.Linear's default init)


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


def test_a_learning_rate_far_too_high_is_reported_within_the_first_epoch(make_trainer: Any) -> None:
    """The output falls silent within a few steps; the epoch (32 optimizer steps) ends long before silent_steps=200,
    and the warning comes at its end."""

    class TooFast(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = conv_net()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            functional.reset_net(self.net)
            return nn.functional.mse_loss(self.net(x.transpose(0, 1)).mean(0), nn.functional.one_hot(y, 4).float())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=500.0)

    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1))
    with pytest.warns(UserWarning, match=r"has not spiked for \d+ optimizer steps in a row") as record:
        trainer.fit(TooFast(), event_batches(n=64, T=4, batch_size=4))
    assert trainer.global_step == 32 < 200
    assert any("learning rate" in str(w.message) or "fired" in str(w.message) for w in record)


def _deep_net() -> nn.Sequential:
    """Layers of SpikingJelly's default LIF (threshold 1): the hidden ones fire, a default-init readout of them does
    not."""
    torch.manual_seed(0)
    from spikingjelly.activation_based import neuron, surrogate

    def node() -> neuron.LIFNode:
        return neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), step_mode="m")

    net = nn.Sequential(
        layer.Flatten(step_mode="m"),
        layer.Linear(64, 64, step_mode="m"),
        node(),
        layer.Linear(64, 64, step_mode="m"),
        node(),
        layer.Linear(64, 4, step_mode="m"),
        node(),
    )
    with torch.no_grad():  # the hidden layers fire; a readout of them with nn.Linear's default init does not
        for i in (1, 3):
            net[i].weight.mul_(HIDDEN_GAIN)
    return net


class _Recorder(L.Callback):
    """Whether each local readout fired in the first batch (installed at the first chunk's backward, so it sees the
    second chunk's forward)."""

    def __init__(self) -> None:
        self.fired: dict[int, bool] = {}
        self.installed = False

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self.installed:
            return
        self.installed = True
        for i, classifier in enumerate(trainer.strategy.local_classifiers):

            def hook(_: nn.Module, args: Any, out: torch.Tensor, i: int = i) -> None:
                if trainer.global_step < 2:  # the first batch's chunks
                    self.fired[i] = self.fired.get(i, False) or bool(out.detach().any())

            classifier.neuron.register_forward_hook(hook)


@pytest.mark.parametrize("kind", ["trainable", "random"])
def test_local_readouts_start_inside_the_window_and_fire_in_the_first_batch(make_trainer: Any, kind: str) -> None:
    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _deep_net()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            functional.reset_net(self.net)
            return nn.functional.cross_entropy(self.net(x.transpose(0, 1)).mean(0), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    fired = {}
    for balance in (False, True):
        recorder = _Recorder()
        strategy = TruncatedLocalBPTT(k=2, n=1, classifier=kind, balance_readouts=balance, silent_steps=None)
        make_trainer(strategy=strategy, limit_train_batches=1, callbacks=[recorder]).fit(
            Module(), event_batches(n=16, T=4, batch_size=8)
        )
        fired[balance] = recorder.fired
    assert fired[True] and all(fired[True].values()), fired
    assert not all(fired[False].values()), "the default init already fires: the test shows nothing"


def _silence_after_firing(check: SilenceCheck, who: str, steps: int) -> None:
    for step, spikes in enumerate([torch.ones(1, 1, 3)] + [torch.zeros(1, 1, 3)] * steps):
        check.note(who, spikes)
        keys, flags = check.take_flags()
        check.record(keys, [f.tolist() for f in flags], step)


@pytest.mark.parametrize(("kind", "advice"), [("random", "classifier='trainable'"), ("trainable", "lower it")])
def test_a_readout_pushed_out_of_the_window_gets_the_advice_for_its_kind(kind: str, advice: str) -> None:
    with pytest.warns(UserWarning, match=r"local classifier of block 0 has not spiked for 2") as record:
        _silence_after_firing(SilenceCheck(2, 2, classifier=kind), "the local classifier of block 0", 2)
    assert advice in str(record[0].message)
    assert "your output layer" not in str(record[0].message)  # not a layer the user owns


class _SlowSGD(torch.optim.SGD):
    """An optimizer whose own work (outside the closure) takes 50 ms a step: most of these tiny batches."""

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        time.sleep(0.05)
        return loss


@pytest.mark.parametrize("step_every", ["chunk", "batch"])
def test_an_optimizer_that_takes_most_of_a_batch_is_named_with_its_levers(
    make_trainer: Any, caplog: pytest.LogCaptureFixture, step_every: str
) -> None:
    class Slow(SpikingClassifier):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _SlowSGD(self.parameters(), lr=0.1)

    with caplog.at_level(logging.INFO):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1, step_every=step_every), limit_train_batches=3).fit(
            Slow(conv_net(), lr_step_epochs=0), event_batches(n=24, T=4)
        )
    said = [r.getMessage() for r in caplog.records if "the optimizer's" in r.getMessage()]
    assert len(said) == 1, said  # once, at the second batch
    steps = 2 if step_every == "chunk" else 1
    assert f"the optimizer's {steps} step(s) took" in said[0] and "of batch 1" in said[0]
    assert "_SlowSGD(..., fused=True)" in said[0]
    assert ("step_every='batch'" in said[0]) == (step_every == "chunk")
    assert ("T / k times fewer steps: give it the learning rate" in said[0]) == (step_every == "chunk")

    caplog.clear()
    with caplog.at_level(logging.INFO):  # a fast optimizer is not mentioned
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1), limit_train_batches=3).fit(
            SpikingClassifier(conv_net(), lr_step_epochs=0), event_batches(n=24, T=4)
        )
    assert not [r for r in caplog.records if "the optimizer's" in r.getMessage()]
