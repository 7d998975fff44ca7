"""Local classifiers: the readout that gives every block but the last its own loss."""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import neuron
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

__all__ = ["ClassifierKind", "LocalClassifier"]

ClassifierKind = Literal["trainable", "random"]

_ADAPTIVE_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


class LocalClassifier(nn.Module):
    """Flatten -> Linear -> spiking neuron, applied to a block's output over a chunk.

    Shapes: ``[k, B, C, *spatial]`` or ``[k, B, F]`` -> ``[k, B, num_classes]``.

    Feature maps larger than ``pool`` per spatial axis are first average-pooled to ``pool`` per axis, so
    the readout has at most ``C * pool ** d`` inputs whatever the resolution: a full flatten of a
    ``128 x 32 x 32`` map would make the classifier bigger than the layer it reads. The linear layer is
    lazy: its input width is known at the first batch, and it is then initialised from ``seed``
    (identically on every rank, reproducibly for ``kind="random"``). Random classifiers are frozen and
    still stored in checkpoints.

    Args:
        num_classes: output width.
        template: a neuron of the network; the classifier's neuron is a fresh copy of it, so the
            readout spikes with the network's own dynamics (the paper's classifier neurons).
        kind: ``"trainable"`` or ``"random"`` (fixed random weights, Mostafa et al. 2018).
        pool: bound per spatial axis before flattening.
        seed: seed of the initial weights.
    """

    def __init__(
        self,
        num_classes: int,
        template: neuron.BaseNode,
        kind: ClassifierKind = "trainable",
        pool: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kind not in ("trainable", "random"):
            raise ValueError(f"classifier must be 'trainable' or 'random', got {kind!r}")
        if not isinstance(pool, int) or pool < 1:
            raise ValueError(f"classifier_pool must be a positive int, got {pool!r}")
        self.kind = kind
        self.pool = pool
        self.seed = seed
        self.linear = nn.LazyLinear(num_classes)
        template.reset()  # a neuron holding a graph cannot be deep-copied
        self.neuron = copy.deepcopy(template)
        self.neuron.step_mode = "m"
        if kind == "random":
            self.linear.weight = UninitializedParameter(requires_grad=False)
            self.linear.bias = UninitializedParameter(requires_grad=False)
            self.neuron.requires_grad_(False)  # e.g. ParametricLIFNode's decay `w`: frozen means every parameter

    def forward(self, x_seq: Tensor) -> Tensor:
        k, b = x_seq.shape[:2]
        x = x_seq.flatten(0, 1)
        spatial = x.shape[2:]
        if spatial and any(s > self.pool for s in spatial):
            if all(s % self.pool == 0 for s in spatial):
                # the same windows as adaptive pooling, whose CPU kernel takes twice as long
                x = _AVG_POOL[len(spatial)](x, [s // self.pool for s in spatial])
            else:
                x = _ADAPTIVE_POOL[len(spatial)](x, self.pool)
        x = x.flatten(1)
        # a lazy layer loaded from a checkpoint holds its weights already and only turns into nn.Linear
        # at its first forward
        if isinstance(self.linear, LazyModuleMixin) and self.linear.has_uninitialized_params():
            # materialising draws from the global RNG; those numbers are replaced by the seeded ones, so
            # keep the user's RNG stream (dropout masks, shuffling) as if nothing happened
            with torch.no_grad(), torch.random.fork_rng(devices=[x.device.index] if x.is_cuda else []):
                self.linear(x)
            self._init_from_seed()
        return self.neuron(self.linear(x).unflatten(0, (k, b)))

    @torch.no_grad()
    def _init_from_seed(self) -> None:
        """nn.Linear's default init (uniform, bound 1/sqrt(fan_in)), drawn from ``seed``."""
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        bound = 1.0 / math.sqrt(self.linear.in_features)
        for p in (self.linear.weight, self.linear.bias):
            p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))
