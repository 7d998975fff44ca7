"""PaperClassifier: a Table 2 network from plain values, rebuilt from its hyperparameters, its output layer balanced
from one batch when training starts; paper_setting with the learning rate scaled to the batch."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_tlbptt import TruncatedLocalBPTT
from lightning_tlbptt.classifiers import threshold_input
from lightning_tlbptt.paper import DATASETS, MODELS, PaperClassifier, paper_setting
from lightning_tlbptt.paper.classifier import output_layer


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
    torch.testing.assert_close(resumed.state_dict(), state)
    old = PaperClassifier(T=4)
    old.load_state_dict({key: value for key, value in state.items() if key != "output_balanced"})
    assert bool(old.output_balanced)


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
