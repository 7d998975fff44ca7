"""SpikingClassifier, the ready LightningModule, and SavedTensorsMeter."""

from __future__ import annotations

import pytest
import torch

from lightning_tlbptt import SavedTensorsMeter, SpikingClassifier

from snn_fixtures import conv_net, event_batches


def test_spiking_classifier_trains_with_plain_bptt(make_trainer):
    module = SpikingClassifier(conv_net(), lr=0.5, lr_step_epochs=0)
    loader = event_batches(n=16, T=6, batch_size=8)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = make_trainer(max_epochs=2)
    trainer.fit(module, loader, loader)
    assert trainer.global_step == 4  # one optimizer step per batch under the default strategy
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    predictions = trainer.predict(module, loader)
    assert predictions[0].shape == (8,) and predictions[0].max() < 4


def test_spiking_classifier_checks_its_arguments():
    assert SpikingClassifier(conv_net()).num_classes == 4  # inferred from the output layer
    with pytest.raises(ValueError, match="num_classes=10 but the network's output layer has 4"):
        SpikingClassifier(conv_net(), num_classes=10)
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adam'"):
        SpikingClassifier(conv_net(), optimizer="rmsprop")
    with pytest.raises(ValueError, match="loss must be 'mse'"):
        SpikingClassifier(conv_net(), loss="hinge")


def test_saved_tensors_meter_tracks_live_and_peak_bytes():
    w = torch.randn(64, 64, requires_grad=True)
    with SavedTensorsMeter() as meter:
        h = torch.randn(32, 64)
        for _ in range(3):
            h = torch.tanh(h @ w)  # mm saves its input, tanh its output
        peak_before_backward = meter.current_bytes
        h.sum().backward()
    assert peak_before_backward == meter.peak_bytes
    # the input and the 3 tanh outputs (32x64 floats); each tanh output is saved again by the next mm but
    # shares its storage, so it counts once; the weight, a parameter, is not counted
    assert meter.peak_bytes == 4 * 32 * 64 * 4
    assert meter.current_bytes == 0  # freed by backward
