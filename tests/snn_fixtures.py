"""Tiny real SpikingJelly networks, event data and a gradient recorder shared by the tests."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from spikingjelly.activation_based import layer, neuron, surrogate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def lif(**kwargs: Any) -> neuron.LIFNode:
    """The paper's neuron (soft reset, tau_p = 0.5, Rect surrogate of width a = 1): low threshold, wide
    surrogate, so every layer of a tiny untrained net spikes and receives gradient."""
    return neuron.LIFNode(
        tau=2.0,
        decay_input=False,
        v_reset=None,
        v_threshold=0.2,
        surrogate_function=surrogate.Rect(alpha=1.0),
        step_mode="m",
        **kwargs,
    )


def conv_net(seed: int = 0, in_channels: int = 1, num_classes: int = 4) -> nn.Sequential:
    """[T, B, in_channels, 8, 8] -> [T, B, num_classes] spikes: 4 layers (3 hidden + output)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        layer.Conv2d(in_channels, 4, 3, padding=1, step_mode="m"),
        lif(),
        layer.AvgPool2d(2, step_mode="m"),
        nn.Sequential(layer.Conv2d(4, 8, 3, padding=1, step_mode="m"), lif()),
        layer.AvgPool2d(2, step_mode="m"),
        layer.Flatten(step_mode="m"),
        layer.Linear(8 * 2 * 2, 16, step_mode="m"),
        lif(),
        layer.Linear(16, num_classes, step_mode="m"),
        lif(),
    )


def wide_net(seed: int = 0, channels: int = 16, dropout: bool = True) -> nn.Sequential:
    """[T, B, 1, 8, 8] -> [T, B, 4]: spiking pools, so the second conv reads (and saves) spikes; ``channels`` wide
    enough that one layer's chunk dwarfs everything else."""
    torch.manual_seed(seed)
    return nn.Sequential(
        layer.Conv2d(1, channels, 3, padding=1, step_mode="m"),
        lif(),
        layer.AvgPool2d(2, step_mode="m"),
        lif(),
        *([layer.Dropout(0.2, step_mode="m")] if dropout else []),
        layer.Conv2d(channels, channels, 3, padding=1, step_mode="m"),
        lif(),
        layer.AvgPool2d(2, step_mode="m"),
        layer.Flatten(step_mode="m"),
        layer.Linear(channels * 4, 4, step_mode="m"),
        lif(),
    )


def event_batches(
    n: int = 16, T: int = 8, batch_size: int = 8, num_classes: int = 4, seed: int = 0, channels: int = 1
) -> DataLoader:
    """Binary event frames [B, T, C, 8, 8] (tonic's layout) whose class sets the active quadrant."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = (torch.rand(n, T, channels, 8, 8, generator=g) < 0.15).float()
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, :, :, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += (torch.rand(T, channels, 4, 4, generator=g) < 0.6).float()
    return DataLoader(TensorDataset(x.clamp(max=1), y), batch_size=batch_size)


class GradRecorder(L.Callback):
    """Snapshot of every parameter gradient right before each optimizer step, the strategy's local classifiers'
    (which are not part of the module) under ``local_classifiers.<i>.<name>``."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        named = list(pl_module.named_parameters())
        classifiers = getattr(trainer.strategy, "local_classifiers", None)
        if classifiers is not None:
            named += [(f"local_classifiers.{name}", p) for name, p in classifiers.named_parameters()]
        self.steps.append({name: p.grad.detach().clone() for name, p in named if p.grad is not None})
