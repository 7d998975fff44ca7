"""PaperClassifier: a Table 2 network from plain values, rebuilt from its hyperparameters, its output layer balanced
from one batch when training starts; paper_setting with the learning rate scaled to the batch."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tlbptt import TruncatedLocalBPTT
from lightning_tlbptt.classifiers import threshold_input
from lightning_tlbptt.output_window import output_layer
from lightning_tlbptt.paper import DATASETS, MODELS, PaperClassifier, paper_setting


@pytest.mark.parametrize("name", sorted(MODELS))
def test_paper_classifier_builds_every_model(name: str) -> None:
    model = PaperClassifier(model=name, in_channels=2, num_classes=7, input_size=(32, 32), T=2)
    out = model(torch.rand(1, 2, 32, 32))
    assert out.shape == (2, 1, 7)
    assert model.hparams.model == name and model.hparams.loss == "mse"


def test_hyperparameters_rebuild_the_same_classifier() -> None:
    """Every argument is saved, SpikingClassifier's defaults included, so that a checkpoint rebuilds the model."""
    model = PaperClassifier(**paper_setting("cifar10"))
    assert model.hparams.lr_step_epochs == 20 and model.hparams.optimizer == "sgd" and model.hparams.T == 10
    again = PaperClassifier(**model.hparams)
    assert dict(again.hparams) == dict(model.hparams)
    assert [p.shape for p in again.parameters()] == [p.shape for p in model.parameters()]
    with pytest.raises(ValueError, match="loss by name"):
        PaperClassifier(loss=torch.nn.functional.mse_loss)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_paper_setting_is_the_table(name: str) -> None:
    spec, setting = DATASETS[name], paper_setting(name)
    assert (setting["model"], setting["num_classes"], setting["tau_p"]) == (
        spec.model,
        spec.num_classes,
        spec.neuron.tau_p,
    )
    assert setting["dropout"] == spec.dropout_range[0]
    assert (setting["T"] is None) == (name not in ("mnist5k", "emnist", "cifar10"))
    # the recipe's learning rate, scaled from Table 1's batch to the dataset's; the paper's raw value on request
    assert setting["lr"] == pytest.approx(spec.recipe_lr * spec.batch_size / spec.lr_batch_size)
    assert spec.lr_range[0] <= spec.recipe_lr <= spec.lr_range[1]
    assert paper_setting(name, scale_lr=False)["lr"] == spec.lr_range[0]
    assert paper_setting(name, batch_size=2 * spec.batch_size)["lr"] == pytest.approx(2 * setting["lr"])


def test_the_study_learning_rate_is_the_default_on_the_offline_data() -> None:
    # docs/results.md: 0.4 at Table 1's EMNIST batch of 1,024, scaled to batch 128
    assert paper_setting("mnist5k")["lr"] == pytest.approx(0.05) == paper_setting("event_mnist")["lr"]
    with pytest.raises(ValueError, match=r"batch_size must be a positive int.*0"):
        paper_setting("mnist5k", batch_size=0)


# --- the output layer balanced from one batch ---------------------------------------------------------------------


def digits(n: int = 16) -> DataLoader:
    """Static 28x28 images in [0, 1] with 10 labels, in a fixed order (the first batch is the first 8)."""
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 10), batch_size=8)


def fit(model: PaperClassifier, strategy: str | TruncatedLocalBPTT = "auto") -> None:
    L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, strategy=strategy, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(model, digits())  # fmt: skip


def mean_output_input(model: PaperClassifier) -> torch.Tensor:
    """The output neurons' mean input over the first batch, evaluated as the balance does."""
    linear, _ = output_layer(model.net)
    seen = []
    handle = linear.register_forward_hook(lambda _m, _a, out: seen.append(out))
    model.eval()
    with torch.no_grad():
        model(next(iter(digits()))[0])
    handle.remove()
    return seen[0].flatten(0, -2).mean(0)


@pytest.mark.parametrize("strategy", ["auto", "tlbptt"])
def test_the_output_layer_starts_at_threshold_on_the_first_batch(strategy: str) -> None:
    # lr 0: the weights stay as the balance left them, so the first batch's mean input can be checked after fit
    model = PaperClassifier(T=4, tau_p=0.9, u_th=0.5, lr=0.0, lr_step_epochs=0)
    before = output_layer(model.net)[0].bias.detach().clone()
    fit(model, TruncatedLocalBPTT(k=2, n=2) if strategy == "tlbptt" else "auto")
    assert bool(model.output_balanced)
    linear, node = output_layer(model.net)
    assert threshold_input(node) == pytest.approx(0.5 * (1 - 0.9))
    assert not torch.equal(linear.bias.detach(), before)
    torch.testing.assert_close(mean_output_input(model), torch.full((10,), 0.05), atol=1e-5, rtol=0)


def test_a_resumed_or_old_checkpoint_is_not_balanced_again() -> None:
    model = PaperClassifier(T=4, lr=0.0, lr_step_epochs=0)
    fit(model)
    state = model.state_dict()
    assert state["output_balanced"].item() is True
    resumed = PaperClassifier(T=4, lr=0.0, lr_step_epochs=0)
    resumed.load_state_dict(state)
    torch.manual_seed(1)
    fit(resumed)
    # an output silent on the batch moves by its rounding only: it was balanced on that very batch
    torch.testing.assert_close(resumed.state_dict(), state, atol=1e-5, rtol=0)
    old = PaperClassifier(T=4)  # a checkpoint from before the buffer and the watch loads strictly, as balanced
    old.load_state_dict({key: value for key, value in state.items() if key != "output_balanced"})
    assert bool(old.output_balanced)


class PushOutputOut(Callback):
    """At the second batch's start, pushes output 3 far below its window, as a block learning under it could."""

    def __init__(self) -> None:
        self.biases: list[torch.Tensor] = []
        self.fired: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: PaperClassifier, batch: Any, batch_idx: int) -> None:
        linear, node = output_layer(module.net)
        if batch_idx == 1:
            with torch.no_grad():
                linear.bias[3] -= 100.0
        self.fired.append(torch.zeros(10))
        if batch_idx == 0:
            node.register_forward_hook(self.count)

    def on_train_batch_end(self, trainer: L.Trainer, module: PaperClassifier, *args: Any) -> None:
        self.biases.append(output_layer(module.net)[0].bias.detach().clone())  # lr 0: the bias the batch ran with

    def count(self, _module: nn.Module, _args: Any, out: torch.Tensor) -> None:
        self.fired[-1] += out.detach().flatten(0, -2).sum(0)


@pytest.mark.parametrize("strategy", ["auto", "tlbptt"])
@pytest.mark.parametrize("balance_output", [True, False])
def test_an_output_silent_for_a_whole_batch_is_moved_back_and_the_others_stay(strategy: str, balance_output: bool):
    model = PaperClassifier(T=20, tau_p=0.9, u_th=0.5, lr=0.0, lr_step_epochs=0, balance_output=balance_output)
    push = PushOutputOut()
    L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, logger=False, callbacks=[push],
        strategy=TruncatedLocalBPTT(k=5, n=2) if strategy == "tlbptt" else "auto",
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(model, digits(24))  # fmt: skip
    pushed, after = push.biases[1], output_layer(model.net)[0].bias.detach()
    assert push.fired[1][3] == 0  # silent on every sample and step of the second batch
    if not balance_output:
        torch.testing.assert_close(after, pushed)  # nothing keeps it inside: the paper's raw setting
        assert push.fired[2][3] == 0
        return
    assert push.fired[1].gt(0).sum() == 9  # the others fired, so they stay where the second batch left them
    stays = torch.arange(10) != 3
    torch.testing.assert_close(push.biases[2][stays], pushed[stays], atol=1e-6, rtol=0)
    assert push.biases[2][3] > pushed[3] + 50  # moved back at the third batch's start ...
    assert push.fired[2][3] > 0  # ... where it fires again


def test_balance_output_false_keeps_the_default_init() -> None:
    model = PaperClassifier(T=4, lr=0.0, lr_step_epochs=0, balance_output=False)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    fit(model)
    torch.testing.assert_close(model.state_dict(), before)
    assert model.hparams.balance_output is False


def test_a_logit_output_has_nothing_to_balance() -> None:
    assert output_layer(PaperClassifier(model="vgg11", in_channels=2, input_size=(32, 32), T=2).net) is None
    linear, node = output_layer(PaperClassifier(model="lenet1").net)
    assert linear.out_features == 10 and node is not None


def test_a_checkpoint_between_two_batches_carries_the_measure(tmp_path) -> None:
    def trainer(**kwargs: Any) -> L.Trainer:
        return L.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, **kwargs,
        )  # fmt: skip

    model = PaperClassifier(T=20, tau_p=0.9, u_th=0.5, lr=0.0, lr_step_epochs=0)
    first = trainer(max_epochs=1, limit_train_batches=2, callbacks=[PushOutputOut()])
    first.fit(model, digits(24))  # output 3 silent on the second batch, the last before the checkpoint
    first.save_checkpoint(tmp_path / "last.ckpt")
    pushed = output_layer(model.net)[0].bias.detach().clone()

    resumed = PaperClassifier(T=20, tau_p=0.9, u_th=0.5, lr=0.0, lr_step_epochs=0)
    trainer(max_epochs=2, limit_train_batches=1).fit(resumed, digits(24), ckpt_path=tmp_path / "last.ckpt")
    assert output_layer(resumed.net)[0].bias[3] > pushed[3] + 50  # moved back at the resumed fit's first batch
