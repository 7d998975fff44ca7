"""Measure the memory that training keeps for backward, on any device."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

import torch
from torch import Tensor

__all__ = ["SavedTensorsMeter", "TrainingState", "training_state", "training_state_bytes"]


class _Saved:
    __slots__ = ("key", "meter", "tensor")

    def __init__(self, meter: SavedTensorsMeter, tensor: Tensor) -> None:
        self.meter = meter
        self.tensor = tensor
        self.key = meter._add(tensor)

    def __del__(self) -> None:
        self.meter._remove(self.key)


class SavedTensorsMeter:
    """Live and peak bytes of activations saved for backward while the context is active.

    This is the part of training memory that BPTT makes grow with ``T`` (the paper's ``MC(CG)``, Eq. 8),
    measured the same way on CPU and GPU. Saved tensors are counted once per storage (two ops saving
    the same activation cost its bytes once) and released when autograd frees them, so the peak
    reflects when graphs are freed, e.g. after each block's backward. Parameters saved by an op
    (a conv's weight) are not counted: they exist anyway.

    Example::

        with SavedTensorsMeter() as meter:
            loss = net(x).sum(); loss.backward()
        meter.peak_bytes
    """

    def __init__(self) -> None:
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, list[int]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: Tensor) -> Tensor | _Saved:
        if tensor.requires_grad and tensor.is_leaf:
            return tensor
        return _Saved(self, tensor)

    @staticmethod
    def _unpack(saved: Tensor | _Saved) -> Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _add(self, tensor: Tensor) -> int:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [storage.nbytes(), 1]
            self.current_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        else:
            entry[1] += 1
        return key

    def _remove(self, key: int) -> None:
        entry = self._live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current_bytes -= entry[0]
            del self._live[key]

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    def __enter__(self) -> SavedTensorsMeter:
        self._hooks.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._hooks.__exit__(exc_type, exc, tb)


@dataclass(frozen=True)
class TrainingState:
    """Bytes that training keeps whatever ``k`` and ``n`` are (``N(w)`` and ``N(grads)`` of the paper's Eq. 8)."""

    params: int
    grads: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer_state


def training_state(params: Iterable[Tensor], optimizer: torch.optim.Optimizer) -> TrainingState:
    """Parameters, gradients and optimizer state of training, in bytes: the one rule every measurement uses.

    Gradients are counted from the parameters (one per trainable parameter), not read from ``.grad``: the
    strategy frees them after each optimizer step while a plain loop keeps them, and both hold them at the
    step, which is the peak. The optimizer's state is counted as allocated, or, before its first step, as it
    will be (Adam's two moments, SGD's momentum buffer), so that a budget checked at setup sees it.

    Args:
        params: the module's parameters; none for the optimizer's state alone (on CUDA, where
            ``max_memory_allocated`` already holds the parameters and gradients).
        optimizer: the optimizer that steps them.
    """
    params = list(params)
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]
    if state:
        return TrainingState(weights, grads, sum(t.numel() * t.element_size() for t in state))
    predicted = 0
    for group in optimizer.param_groups:
        slots = 2 if "betas" in group else 1 if group.get("momentum", 0) else 0
        predicted += slots * sum(p.numel() * p.element_size() for p in group["params"] if p.requires_grad)
    return TrainingState(weights, grads, predicted)


def training_state_bytes(params: Iterable[Tensor], optimizer: torch.optim.Optimizer) -> int:
    """:func:`training_state`'s total: parameters, gradients and optimizer state, in bytes."""
    return training_state(params, optimizer).total
