"""Choose the truncation length ``k`` from a memory budget, beyond the paper (its Sec. 5.4 leaves (k, n) open).

Training memory under truncation is affine in ``k``: the parameters, gradients, optimizer state and input batch do
not depend on it, and every block keeps the activations of ``k`` steps until its local loss is back-propagated.
So measured chunks fix the model ``bytes(k) = fixed + per_step * k``: the strategy runs chunks of ``k = 1, 2, 4,
...`` on the real device at setup, each after an uncounted chunk so that every layer's neuron states are alive as
in training (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the peak of every live tensor,
:class:`~lightning_tlbptt.memory.TensorMemoryMeter`, plus the parameters and optimizer state allocated before),
growing ``k`` no further than the last two measurements predict to fit, and :func:`choose_k` takes the largest
``k <= T`` whose predicted bytes fit the budget less a safety margin. When even ``k = 1`` does not fit, the part
that scales with the batch (activations, not the training state) tells which batch size would, if any.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MemoryModel", "choose_k", "format_bytes", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(value: int | str, name: str = "memory_budget") -> int:
    """``2147483648``, ``"2GiB"``, ``"1.5 GB"``, ``"512MiB"``, ``"800k"`` -> bytes; errors name the setting ``name``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", str(value).lower())
    if not match:
        raise ValueError(
            f"{name} must be a number of bytes or a string like '2GiB', '512MiB' or '1.5GB', got {value!r}"
        )
    number, unit = float(match.group(1)), match.group(2) or ""
    size = int(number * (_BINARY.get(unit) or _UNITS[unit]))
    if size <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return size


def format_bytes(size: float) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size:.0f} B"


@dataclass(frozen=True)
class MemoryModel:
    """``bytes(k) = fixed + per_step * k``, fitted on chunks of ``k_low`` and ``k_high`` steps."""

    fixed: float
    per_step: float
    measured: tuple[tuple[int, int], ...]  # (k, bytes) pairs

    def __call__(self, k: int) -> float:
        return self.fixed + self.per_step * k


def choose_k(
    measure: Callable[[int], int],
    T: int,
    budget: int,
    *,
    margin: float = 0.1,
    batch_size: int | None = None,
    state_bytes: int = 0,
) -> tuple[int, MemoryModel]:
    """The largest ``k <= T`` whose memory fits ``budget * (1 - margin)``.

    Chunks of ``k = 1, 2`` are measured, then ``k`` doubles, but never past the ``k`` that the last two
    measurements predict to fit, so that setup itself stays within the budget as far as the model holds; it stops
    at ``T``, at the predicted ``k``, or at a chunk that does not fit. At small ``k`` the peak can be set by
    something that does not grow with ``k`` (the output layer's loss, a classifier), so a line through the first
    points would misjudge larger ``k``: the slope is read from the last two, where the activations of ``k`` steps
    dominate.

    Args:
        measure: ``k -> peak bytes`` of one training chunk of ``k`` steps on the real device.
        T: time steps of a batch.
        budget: bytes allowed.
        margin: fraction of the budget kept free (allocator fragmentation, a longer loss graph).
        batch_size: the batch size measured, to say which one would fit when nothing does.
        state_bytes: the part of every measurement that does not scale with the batch (parameters, gradients,
            optimizer state), for that hint.

    Raises:
        ValueError: when even ``k = 1`` does not fit, naming the bytes it needs and a batch size that would fit,
            or saying that the training state alone does not.
    """
    allowed = budget * (1 - margin)
    points = [(1, measure(1))]
    while points[-1][0] < T and points[-1][1] <= allowed:
        k = min(2 * points[-1][0], T)
        if len(points) >= 2:
            predicted = _fitting_k(_line(points[-2:]), allowed)
            if predicted is not None:
                k = min(k, predicted)
        if k <= points[-1][0]:
            break
        points.append((k, measure(k)))
    if len(points) == 1:
        model = MemoryModel(fixed=0.0, per_step=float(points[0][1]), measured=tuple(points))
    else:
        line = _line(points[-2:])
        model = MemoryModel(fixed=line(0), per_step=line(1) - line(0), measured=tuple(points))
    low = points[0][1]
    if low > allowed:
        raise ValueError(
            f"memory_budget={format_bytes(budget)} is too small: even k=1 needs {format_bytes(low)} (parameters, "
            f"gradients, optimizer state, input and one step of activations), and {margin:.0%} of the budget is "
            f"kept free.{_batch_hint(low, allowed, batch_size, state_bytes)} A smaller n also helps (each block's "
            "graph is freed before the next runs). Or raise memory_budget."
        )
    fitted = max(k for k, used in points if used <= allowed)
    if model.per_step <= 0:
        return (T if fitted == points[-1][0] else fitted), model
    return max(fitted, min(T, math.floor((allowed - model.fixed) / model.per_step))), model


def _fitting_k(line: Callable[[float], float], allowed: float) -> int | None:
    """The largest ``k`` the line predicts to fit; ``None`` when it does not grow with ``k``."""
    per_step = line(1) - line(0)
    if per_step <= 0:
        return None
    return math.floor((allowed - line(0)) / per_step)


def _batch_hint(needed: int, allowed: float, batch_size: int | None, state_bytes: int) -> str:
    if not batch_size or needed <= state_bytes:
        return ""
    if state_bytes >= allowed:
        return (
            f" The training state alone (parameters, gradients, optimizer state) takes {format_bytes(state_bytes)}: "
            "no batch size fits."
        )
    fits = int(batch_size * (allowed - state_bytes) / (needed - state_bytes))
    if fits < 1:
        return " Not even a batch of 1 fits."
    return f" A batch size of about {fits} (now {batch_size}) might fit."


def _line(points: list[tuple[int, int]]) -> Callable[[float], float]:
    (k0, b0), (k1, b1) = points
    slope = (b1 - b0) / (k1 - k0)
    return lambda k: b0 + slope * (k - k0)
