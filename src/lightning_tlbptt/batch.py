"""What the hooks of one batch share: its time window, target, local losses and the local losses' gradients.

One :class:`BatchState` is made per batch by the chunk loop (:mod:`lightning_tlbptt.chunks`) and handed to the
hooks installed in the network (:mod:`lightning_tlbptt.cuts`) and to the strategy's ``backward``; nothing else
carries state from one hook to the next.

Why the local losses' gradients are held aside (:class:`LocalGradients`): a block's local loss is back-propagated at
the block boundary, while the user's training step runs (its graph is freed before the next block runs), but
Lightning's automatic optimisation zeroes the gradients *after* the training step and before the backward of the
returned loss. So local gradients are taken with :func:`torch.autograd.grad` into a buffer and added to ``.grad``
by the strategy's ``backward``, after the step's ``optimizer_zero_grad`` and before ``on_after_backward``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

__all__ = ["BatchState", "LocalGradients", "average_over_ranks", "batch_size", "tensors"]


def tensors(batch: Any) -> list[Tensor]:
    """Every tensor of a batch (any collection), in order."""
    found: list[Tensor] = []
    apply_to_collection(batch, Tensor, found.append)
    return found


def batch_size(batch: Any) -> int | None:
    """The first tensor's first axis, as Lightning reads a batch's size."""
    found = tensors(batch)
    return found[0].shape[0] if found and found[0].dim() else None


class LocalGradients:
    """Gradients of the local losses of one chunk, held until the step's backward adds them to ``.grad``.

    Args:
        params: every trainable parameter a local loss can reach (the network's and the local classifiers').
        scale: what the precision plugin does to a loss before its backward (a gradient scaler's ``scale``), so
            that local gradients are unscaled with the rest before the step.
        retain_graph: keep each block's graph after its local backward, for a user's loss that reads a tensor made
            inside a block (hidden spikes returned beside the output): it then back-propagates into that block too.
            Costs the blocks' activations until the network call returns.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        scale: Callable[[Tensor], Tensor] | None = None,
        retain_graph: bool = False,
    ) -> None:
        self.params = list(params)
        self.scale = scale
        self.retain_graph = retain_graph
        self._held: list[Tensor | None] = [None] * len(self.params)

    def backward(self, loss: Tensor, retain_graph: bool | None = None) -> None:
        """Back-propagate ``loss`` now (freeing its graph unless ``retain_graph``, by default the instance's),
        holding its gradients."""
        if self.scale is not None:
            loss = self.scale(loss)
        # the block's graph is freed here, not when the network's forward drops its last reference to the block's
        # output (which it holds until it returns): that is the memory truncation saves
        retain = self.retain_graph if retain_graph is None else retain_graph
        grads = torch.autograd.grad(loss, self.params, allow_unused=True, retain_graph=retain)
        for i, g in enumerate(grads):
            if g is not None:
                held = self._held[i]
                self._held[i] = g if held is None else held.add_(g)

    def average(self, count: int) -> None:
        """Divide the held gradients by ``count`` (the chunks they were summed over)."""
        for g in self._held:
            if g is not None:
                g.div_(count)

    def add_to_grad(self) -> None:
        """Accumulate the held gradients into ``.grad`` (as ``loss.backward()`` would have) and forget them."""
        for p, g in zip(self.params, self._held, strict=True):
            if g is not None:
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        self.clear()

    def clear(self) -> None:
        self._held = [None] * len(self.params)

    def free_step_gradients(self) -> None:
        """Drop the last optimizer step's gradients now: Lightning zeroes them only after the training step, while
        this chunk's local gradients are already held (on VGG11-bn, 2476 -> 2046 MiB peak at batch 12)."""
        for p in self.params:
            p.grad = None


@dataclass
class BatchState:
    """The state of one batch while its chunks run.

    Attributes:
        blocks: number of local classifiers (blocks but the last).
        window: time steps ``[start, stop)`` the network's entry passes on in this chunk.
        seen_T: the time steps the network's entry received in this batch (known after its first call).
        target: the local classifiers' target for this batch, ``[B]`` or ``[B, C]`` (``None``: a label-free loss).
        losses: per local classifier, the sum of its losses over the chunks run (detached, on the device).
        readouts: per local classifier, the readouts of a single-step network's steps in this chunk
            (``[1, B, C]`` each), whose loss is taken once at the chunk's end.
        gradients: the local losses' gradients of this chunk (see the module docstring).
        skip_backward: this batch only runs forward (no local loss is back-propagated).
        calls: per cut module, how often it has been called in the current network call.
        chunk: index of the chunk running.
        batch_idx: index of the batch in its epoch.
        replaying: with ``step_every="batch"``, every chunk ran with its gradients held, and Lightning's one
            optimisation of the batch takes ``replay``, the last chunk's training-step output, instead of running the
            step again.
        replay: that output.
    """

    blocks: int
    gradients: LocalGradients
    device: torch.device
    window: tuple[int, int] = (0, 0)
    seen_T: int | None = None
    target: Tensor | None = None
    skip_backward: bool = False
    chunk: int = 0
    batch_idx: int = 0
    replaying: bool = False
    replay: Any = None
    losses: Tensor = field(init=False)
    readouts: list[list[Tensor]] = field(init=False)
    calls: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.losses = torch.zeros(self.blocks, device=self.device)
        self.readouts = [[] for _ in range(self.blocks)]

    def add_loss(self, index: int, loss: Tensor) -> None:
        """Back-propagate the local loss of block ``index`` into :attr:`gradients` and count it."""
        if not self.skip_backward and loss.requires_grad:
            self.gradients.backward(loss)
        self.losses[index] += loss.detach()


def average_over_ranks(grads: list[Tensor]) -> None:
    """Average gradients over the process group in one collective, in place (what DDP's wrapper does in backward)."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
