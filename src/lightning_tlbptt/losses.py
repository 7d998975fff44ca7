"""Local losses on a chunk of network or classifier output.

Every loss takes the output sequence of one chunk, ``out_seq`` ``[k, B, C]``, and the target: class
indices ``[B]`` or per-class targets ``[B, C]`` (one-hot or soft; ``[B, 1]`` of 0/1 for a one-output binary head),
and returns a scalar. A user's loss for a module without labels receives ``target=None``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

__all__ = ["LocalLoss", "loss_name", "rate_cross_entropy", "rate_mse", "resolve_loss"]

LocalLoss = Callable[[Tensor, Tensor], Tensor]


def rate_mse(out_seq: Tensor, target: Tensor) -> Tensor:
    """The paper's Eq. 3: MSE between the target rate (one-hot) and the firing rate over the chunk."""
    rate = out_seq.mean(0)
    if target.dim() == 1:
        target = F.one_hot(target, rate.shape[-1])
    return F.mse_loss(rate, target.to(rate.dtype))


def rate_cross_entropy(out_seq: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy on the chunk-averaged output (the paper's choice for VGG11 and ResNet18); with one output (a
    binary head, target ``[B, 1]`` of 0/1) binary cross-entropy on it as a logit."""
    mean = out_seq.mean(0)
    if mean.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(mean, target.to(mean.dtype).reshape(mean.shape))
    return F.cross_entropy(mean, target)


_BY_NAME: dict[str, LocalLoss] = {"mse": rate_mse, "ce": rate_cross_entropy}


def resolve_loss(loss: Literal["mse", "ce"] | LocalLoss) -> LocalLoss:
    """Turn ``"mse"``, ``"ce"`` or a callable ``(out_seq [k, B, C], target) -> scalar`` into a callable."""
    if callable(loss):
        return loss
    try:
        return _BY_NAME[loss]
    except (KeyError, TypeError):
        raise ValueError(
            f"loss must be 'mse' (the paper's Eq. 3), 'ce' or a callable (out_seq [k, B, C], target) -> "
            f"scalar, got {loss!r}"
        ) from None


def loss_name(loss: LocalLoss | None) -> str:
    """``"mse"`` or ``"ce"`` for the built-in losses, else the callable's name (for logs and hyperparameters)."""
    if loss is None:
        return "unknown"
    names = {fn: name for name, fn in _BY_NAME.items()}
    return names.get(loss) or getattr(loss, "__name__", type(loss).__name__)
