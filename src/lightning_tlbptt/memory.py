"""Measure training memory on any device: what autograd saves for backward, and every live tensor.

:class:`SavedTensorsMeter` counts the activations saved for backward (the paper's ``MC(CG)``, what truncation and
local blocks shrink); :class:`TensorMemoryMeter` counts every tensor an op allocates, transients included, the CPU
counterpart of ``torch.cuda.max_memory_allocated``; :func:`training_state` counts what does not depend on ``k``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["SavedTensorsMeter", "TensorMemoryMeter", "TrainingState", "training_state", "training_state_bytes"]


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
        params: the module's parameters.
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


class TensorMemoryMeter(TorchDispatchMode):
    """Live and peak bytes of every tensor storage that an op allocates while the context is active.

    The CPU counterpart of ``torch.cuda.max_memory_allocated``: activations, the transients of forward and
    backward, gradients, optimizer state and parameters created inside the context, each storage counted
    from its allocation to its release. :class:`SavedTensorsMeter` sees only what autograd saves through
    its hooks, and saved-tensor hooks do not nest: inside ``torch.utils.checkpoint`` (which memopt uses)
    only the checkpoint's own hooks run, so that meter misses everything a checkpointed region stores and
    recomputes, and it never sees the transients that set the peak. An op's output that shares an input's
    storage (a view, an in-place op) allocates nothing and is not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._storages: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _release(self, nbytes: int, _: weakref.ref) -> None:
        self.current_bytes -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            if id(storage) in inputs or storage in self._storages:
                continue
            nbytes = storage.nbytes()
            self._storages[storage] = weakref.ref(storage, lambda ref, n=nbytes: self._release(n, ref))
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out
