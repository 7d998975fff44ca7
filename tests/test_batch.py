"""Local losses' gradients: each block's graph freed at its boundary (the memory truncation saves), and a user's loss
on hidden spikes explained, or trained into their block with ``retain_block_graphs=True``."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from spikingjelly.activation_based import functional, layer
from torch import nn

from lightning_tlbptt import TruncatedLocalBPTT
from lightning_tlbptt.memory import TensorMemoryMeter

from snn_fixtures import event_batches, lif


class HiddenOut(nn.Module):
    """Returns its first conv block's spikes beside its output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(layer.Conv2d(1, 8, 3, padding=1, step_mode="m"), lif())
        self.head = nn.Sequential(
            layer.Conv2d(8, 8, 3, padding=1, step_mode="m"),
            lif(),
            layer.AvgPool2d(8, step_mode="m"),
            layer.Flatten(step_mode="m"),
            layer.Linear(8, 4, step_mode="m"),
            lif(),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.features(x)
        return self.head(hidden), hidden


class Regularised(L.LightningModule):
    """Its loss adds the firing rate of the hidden spikes the network returns."""

    def __init__(self) -> None:
        super().__init__()
        self.net = HiddenOut()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        functional.reset_net(self.net)
        out, hidden = self.net(x.transpose(0, 1))
        return nn.functional.cross_entropy(out.mean(0) * 4, y) + 0.5 * hidden.mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_loss_on_hidden_spikes_is_explained_or_trained_into_its_block(make_trainer: Any) -> None:
    module = Regularised()
    before = [p.detach().clone() for p in module.parameters()]
    for step_every in ("chunk", "batch"):  # its backward in Lightning's closure, or held per chunk
        with pytest.raises(RuntimeError, match=r"reads a tensor made inside a block.*retain_block_graphs=True"):
            make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1, step_every=step_every)).fit(
                module, event_batches(n=8, T=4)
            )
        assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))

    # with the graphs kept, the first block's gradient is its local loss's plus the regulariser's
    grads: dict[bool, torch.Tensor] = {}

    class Weighted(Regularised):
        def __init__(self, weight: float) -> None:
            super().__init__()
            self.weight = weight

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            functional.reset_net(self.net)
            out, hidden = self.net(x.transpose(0, 1))
            return nn.functional.cross_entropy(out.mean(0) * 4, y) + self.weight * hidden.mean()

    class First(L.Callback):
        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
            grads.setdefault(pl_module.weight > 0, pl_module.net.features[0].weight.grad.clone())

    for weight in (0.5, 0.0):
        strategy = TruncatedLocalBPTT(k=2, n=1, retain_block_graphs=True, slice_bytes=None)
        make_trainer(strategy=strategy, max_steps=1, callbacks=[First()]).fit(Weighted(weight), event_batches(n=8, T=4))
    assert not torch.allclose(grads[True], grads[False])  # the regulariser reached the first block


def test_each_block_graph_is_freed_at_its_boundary() -> None:
    """The memory truncation saves: kept graphs hold every block's activations until the network returns."""
    peaks = {}
    for retain in (False, True):
        module = Regularised()
        module.training_step = lambda batch, batch_idx, m=module: (  # type: ignore[method-assign]
            nn.functional.cross_entropy(m.net(batch[0].transpose(0, 1))[0].mean(0) * 4, batch[1])
        )
        strategy = TruncatedLocalBPTT(k=4, n=1, retain_block_graphs=retain, slice_bytes=None, fast_neurons=False)
        trainer = L.Trainer(
            strategy=strategy, max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", devices=1,
        )  # fmt: skip
        with TensorMemoryMeter() as live:
            trainer.fit(module, event_batches(n=8, T=4, batch_size=8, channels=1))
        peaks[retain] = live.peak_bytes
    assert peaks[False] < peaks[True]
