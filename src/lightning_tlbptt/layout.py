"""The time axis: bring a batch into SpikingJelly's time-major ``[T, B, ...]``, and cut it into chunks."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

__all__ = ["BatchLayout", "time_chunks", "to_time_major"]

BatchLayout = Literal["BT", "TB"]
"""``"BT"``: ``[B, T, ...]`` as a DataLoader over tonic yields; ``"TB"``: SpikingJelly's ``[T, B, ...]``."""


def to_time_major(x: Tensor, layout: BatchLayout = "BT", T: int | None = None) -> Tensor:
    """Return ``x`` as ``[T, B, ...]``.

    Args:
        x: ``[B, T, ...]`` or ``[T, B, ...]`` (per ``layout``); or, when ``T`` is given, a static batch
            ``[B, ...]`` (e.g. images ``[B, C, H, W]``).
        layout: where the time axis is when ``T`` is not given.
        T: repeat a static batch over ``T`` steps: the paper's direct encoding (Sec. 3.3.1), where the
            first layer receives the intensities at every step. The repeat is a view, not a copy.
    """
    if T is not None:
        if not isinstance(T, int) or isinstance(T, bool) or T < 1:
            raise ValueError(f"T must be a positive int (time steps to repeat a static input), got {T!r}")
        return x.unsqueeze(0).expand(T, *x.shape)
    if layout == "BT":
        return x.transpose(0, 1)
    if layout == "TB":
        return x
    raise ValueError(f"batch_layout must be 'BT' ([B, T, ...]) or 'TB' ([T, B, ...]), got {layout!r}")


def time_chunks(T: int, k: int | None) -> list[tuple[int, int]]:
    """``(start, stop)`` of each truncation interval over ``T`` steps: chunks of ``k``, the last one shorter when
    ``k`` does not divide ``T``; ``k=None`` (or ``k >= T``) is the whole sequence, standard BPTT."""
    step = T if k is None else k
    return [(start, min(start + step, T)) for start in range(0, T, step)]
