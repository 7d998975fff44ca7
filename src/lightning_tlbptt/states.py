"""Neuron states across the chunks of one batch, kept per network call.

SpikingJelly keeps a neuron's state (membrane ``v``, a dropout mask, a recurrent output) on the module between calls
until ``reset()``. Under truncation the user's training step runs once per chunk of ``k`` time steps, and each
chunk must continue the states the previous chunk left, detached from its graph (truncated BPTT).

A step may run the network more than once: two augmented views through one backbone with
``functional.reset_net`` between them (SimCLR-style), or a time loop of single-step calls. The calls between two
resets form a *stream*; the ``j``-th stream of a chunk continues where the ``j``-th stream of the previous chunk
stopped:

1. At a chunk's start stream 0 opens: its state is the one stream 0 of the previous chunk ended with (or fresh, in
   the first chunk).
2. A user's reset closes the open stream if any state changed since it opened: its states are kept (detached) for
   the next chunk, every module is reset for real, and the next stream opens (continued from the previous chunk's
   stream of the same index, if there was one). A reset when nothing changed since the stream opened (a ``forward``
   that calls ``reset_net`` before it runs, as SpikingJelly's examples do) changes nothing: the stream has just been
   opened, fresh or continued.
3. At a chunk's end the open stream is closed the same way, without a reset.

At ``k = T`` there is one chunk and this is exactly SpikingJelly's own behaviour. Any reset of any tracked module
counts as a reset of all of them (``functional.reset_net`` resets every module in one sweep).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from spikingjelly.activation_based import base
from torch import Tensor

__all__ = ["StateStreams"]

_Snapshot = list[dict[str, Any]]


class StateStreams:
    """Tracks the neuron states of ``modules`` (every ``MemoryModule`` of the network and its local classifiers).

    Use :meth:`installed` around training, :meth:`start_batch`/:meth:`start_chunk`/:meth:`end_chunk`/
    :meth:`end_batch` around each batch and chunk.
    """

    def __init__(self, modules: Iterable[base.MemoryModule]) -> None:
        self.modules = list(modules)
        self._previous: list[_Snapshot | None] = []  # streams of the previous chunk, dropped as they are restored
        self._current: list[_Snapshot] = []  # streams of this chunk, written as they close
        self._marks: list[tuple[Any, ...]] = []

    def install(self) -> None:
        """Route every tracked module's ``reset`` through :meth:`_on_reset` (instance attributes, undone by
        :meth:`uninstall`)."""
        for m in self.modules:
            m.reset = self._on_reset  # type: ignore[method-assign]

    def uninstall(self) -> None:
        for m in self.modules:
            vars(m).pop("reset", None)

    def start_batch(self) -> None:
        self._previous, self._current = [], []
        self._reset_all()

    def start_chunk(self) -> None:
        self._previous, self._current = self._current, []
        self._open()

    def end_chunk(self) -> None:
        if self._ran():
            self._current.append(self._snapshot())

    def end_batch(self) -> None:
        """Free the last chunk's states (and their graph) now rather than at the next batch."""
        self._previous, self._current = [], []
        self._reset_all()

    @property
    def streams(self) -> int:
        """Streams closed so far in this chunk (network calls separated by resets)."""
        return len(self._current)

    def _on_reset(self) -> None:
        if not self._ran():
            return
        self._current.append(self._snapshot())
        self._open()

    def _open(self) -> None:
        j = len(self._current)
        snapshot = self._previous[j] if j < len(self._previous) else None
        if snapshot is not None:
            for m, state in zip(self.modules, snapshot, strict=True):
                m._memories.update(state)
            self._previous[j] = None  # held by the modules now: one set of states alive, not two
        else:
            self._reset_all()
        self._marks = self._mark()

    def _ran(self) -> bool:
        return any(
            any(_marked(a) is not b for a, b in zip(mark, m._memories.values(), strict=True))
            for mark, m in zip(self._marks, self.modules, strict=True)
        )

    def _mark(self) -> list[tuple[Any, ...]]:
        # tensors weakly: a mark must not keep alive a state the module has since replaced (the previous chunk's
        # states, one per layer, would otherwise live until the chunk ends beside the new ones)
        return [tuple(_Weak(v) if isinstance(v, Tensor) else v for v in m._memories.values()) for m in self.modules]

    def _snapshot(self) -> _Snapshot:
        # detach out of place: a recurrent container's state can be a view, which detach_ refuses
        return [
            {key: v.detach() if isinstance(v, Tensor) else v for key, v in m._memories.items()} for m in self.modules
        ]

    def _reset_all(self) -> None:
        for m in self.modules:
            type(m).reset(m)
        self._marks = self._mark()


class _Weak(weakref.ref):  # type: ignore[type-arg]
    """A mark's weak reference to a tensor state (a type of its own, so that no state value is taken for one)."""

    __slots__ = ()


_FREED = object()  # what a mark stands for once its tensor was freed: no state is it


def _marked(mark: Any) -> Any:
    """The value a mark stands for: its tensor (:data:`_FREED` once freed), or the value itself."""
    if isinstance(mark, _Weak):
        value = mark()
        return _FREED if value is None else value
    return mark
