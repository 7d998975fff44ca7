"""PaperClassifier: a Table 2 network from plain values, rebuilt from its hyperparameters; paper_setting."""

from __future__ import annotations

import pytest
import torch

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
    assert setting["lr"] == spec.lr_range[0] and setting["dropout"] == spec.dropout_range[0]
    assert (setting["T"] is None) == (name not in ("mnist5k", "emnist", "cifar10"))
