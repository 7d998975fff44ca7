"""OutputWindow: a user's spiking output layer started inside its surrogate window and kept there, under plain
Lightning and under the strategy, through a checkpoint."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_tlbptt import OutputWindow, SpikingClassifier, TruncatedLocalBPTT
from lightning_tlbptt.classifiers import threshold_input
from lightning_tlbptt.output_window import output_layer

from snn_fixtures import conv_net, event_batches

STRATEGIES = {"plain": lambda: "auto", "tlbptt": lambda: TruncatedLocalBPTT(k=2, n=1, silent_steps=None)}


class Spikes(L.Callback):
    """Per batch, how often each output neuron spiked; the output bias each batch ran with (lr 0: its last value)."""

    def __init__(self) -> None:
        self.fired: list[torch.Tensor] = []
        self.biases: list[torch.Tensor] = []
        self.rows: list[int] = []

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        output_layer(module)[1].register_forward_hook(self.count)

    def on_train_batch_start(self, *args: Any) -> None:
        self.fired.append(torch.zeros(4))

    def count(self, node: nn.Module, _args: Any, out: torch.Tensor) -> None:
        if node.training:
            self.fired[-1] += out.detach().flatten(0, -2).sum(0)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.biases.append(output_layer(module)[0].bias.detach().clone())
        window = next((c for c in trainer.callbacks if isinstance(c, OutputWindow)), None)
        self.rows.append(window._measure.rows if window else 0)


def dead_output_module(lr: float = 0.0) -> SpikingClassifier:
    """conv_net with output neuron 2 silent for every input (the default init can leave one there)."""
    net = conv_net()
    with torch.no_grad():
        net[-2].weight[2] = -100.0
        net[-2].bias[2] = -100.0
    return SpikingClassifier(net, lr=lr, lr_step_epochs=0)


def fit(module: L.LightningModule, strategy: str, callbacks: list[L.Callback], batches: int = 3, **kwargs: Any):
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=batches, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        strategy=STRATEGIES[strategy](), callbacks=callbacks, **kwargs,
    )  # fmt: skip
    trainer.fit(module, event_batches(n=8 * batches, T=4, batch_size=8))
    return trainer


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_an_output_dead_from_init_fires_from_the_first_batch(strategy: str) -> None:
    spikes = Spikes()
    fit(dead_output_module(), strategy, [spikes])
    assert spikes.fired[0][2] == 0 and spikes.fired[-1][2] == 0  # without the window it never fires

    spikes = Spikes()
    fit(dead_output_module(), strategy, [OutputWindow(), spikes])
    assert (spikes.fired[0] > 0).all()  # every output, the dead one included, in the first batch
    assert spikes.rows[0] == 4 * 8  # the first batch's T * B rows: the strategy's probe of the network is not counted
    assert spikes.biases[1][2] > -10  # and, re-centred on the whole first batch, it stays in reach


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_an_output_silent_for_a_whole_batch_is_moved_back_and_the_others_stay(strategy: str) -> None:
    class Push(Spikes):
        def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
            super().on_train_batch_start()
            if idx == 2:  # started and re-centred by now: push output 1 far out, as the layers below could
                with torch.no_grad():
                    output_layer(module)[0].bias[1] -= 100.0

    module, push = SpikingClassifier(conv_net(), lr=0.0, lr_step_epochs=0), Push()
    fit(module, strategy, [OutputWindow(), push], batches=4)
    assert push.fired[2][1] == 0 and (push.fired[2][[0, 2, 3]] > 0).all()
    stays = torch.tensor([True, False, True, True])
    torch.testing.assert_close(push.biases[3][stays], push.biases[2][stays], atol=1e-6, rtol=0)
    assert push.biases[3][1] > push.biases[2][1] + 50  # moved back when the fourth batch started ...
    assert push.fired[3][1] > 0  # ... where it fires again


def test_the_state_resumes_a_fit_between_two_batches(tmp_path) -> None:
    window = OutputWindow()
    trainer = fit(dead_output_module(), "tlbptt", [window], batches=1)
    assert not window.started and window._measure  # the first batch measured, its re-centring still to come
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    saved = torch.load(tmp_path / "one.ckpt", weights_only=False)["callbacks"][window.state_key]
    assert saved["started"] is False and saved["measure"]["rows"] == 4 * 8

    resumed = OutputWindow()
    resumed.load_state_dict(saved)
    fresh = OutputWindow()
    for w in (resumed, fresh):  # the next batch of each: only the resumed one re-centres on the saved batch
        module = dead_output_module()
        module.load_state_dict(trainer.lightning_module.state_dict())
        fit(module, "plain", [w], batches=1)
        assert w.started is (w is resumed)


def test_a_module_without_a_spiking_output_layer_or_a_wrong_name_is_named() -> None:
    class Logits(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

    with pytest.raises(ValueError, match=r"found no spiking output layer in Logits.*OutputWindow\(layer='net.fc'\)"):
        OutputWindow().on_fit_start(None, Logits())
    with pytest.raises(ValueError, match=r"layer='fc'\): no spiking neuron follows it in Logits"):
        OutputWindow(layer="fc").on_fit_start(None, Logits())
    module = dead_output_module()
    with pytest.raises(ValueError, match=r"layer='net.nope'.*no such submodule"):
        OutputWindow(layer="net.nope").on_fit_start(None, module)
    with pytest.raises(ValueError, match=r"layer='net.0'\) is a Conv2d, not an nn.Linear"):
        OutputWindow(layer="net.0").on_fit_start(None, module)
    no_bias = dead_output_module()
    no_bias.net[-2].bias = None
    with pytest.raises(ValueError, match=r"bias=False\) has no bias to balance: build it with bias=True"):
        OutputWindow().on_fit_start(None, no_bias)
    window = OutputWindow(layer="net.8")  # the output Linear, named
    window.on_fit_start(None, module)
    assert window._output == output_layer(module)
    window.on_fit_end(None, module)
    assert threshold_input(window._output[1]) == pytest.approx(0.1)
