"""Local classifiers: the readout that gives every block but the last its own loss."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import neuron
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

__all__ = ["ClassifierKind", "LocalClassifier", "pooled_size", "readout_width"]

ClassifierKind = Literal["trainable", "random"]
"""``"trainable"`` local classifiers, or ``"random"`` ones (fixed random weights, Mostafa et al. 2018)."""

_ADAPTIVE_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def pooled_size(spatial: Sequence[int], pool: int | None) -> tuple[int, ...]:
    """Spatial size a local classifier reads from a feature map of size ``spatial``.

    ``pool`` per axis when any axis is larger than ``pool``, else the map as it is; ``pool=None`` never pools
    (the paper's classifier on the fully flattened block output).
    """
    if pool is not None and any(s > pool for s in spatial):
        return (pool,) * len(spatial)
    return tuple(spatial)


def readout_width(shape: Sequence[int], pool: int | None) -> int:
    """Input width of a local classifier reading a per-sample block output of ``shape``, ``(C, *spatial)`` or ``(F,)``.

    The rule :class:`LocalClassifier` pools by, so the cost model counts the classifier the strategy builds.
    """
    return math.prod(shape[:1]) * math.prod(pooled_size(shape[1:], pool))


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
        spatial = tuple(x.shape[2:])
        size = pooled_size(spatial, self.pool)
        if size != spatial:
            if all(s % p == 0 for s, p in zip(spatial, size, strict=True)):
                # the same windows as adaptive pooling, whose CPU kernel takes twice as long
                x = _AVG_POOL[len(spatial)](x, [s // p for s, p in zip(spatial, size, strict=True)])
            else:
                x = _ADAPTIVE_POOL[len(spatial)](x, size)
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
