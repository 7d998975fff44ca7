"""A ready LightningModule for classifying with a SpikingJelly network."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from spikingjelly.activation_based import functional, layer
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_tlbptt.layout import BatchLayout, to_time_major
from lightning_tlbptt.losses import LocalLoss, resolve_loss

__all__ = ["SpikingClassifier", "output_width"]


def output_width(net: nn.Module) -> int:
    """Width of ``net``'s output, read from its last Linear/Conv (over a trailing ``VotingLayer``'s votes)."""
    width = None
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            width = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        elif isinstance(m, layer.VotingLayer) and width is not None:
            width //= m.voting_size
    if width is None:
        raise ValueError(f"{type(net).__name__} has no Linear or Conv layer: pass num_classes=")
    return width


class SpikingClassifier(pl.LightningModule):
    """Classify ``[B, T, ...]`` sequences (or static ``[B, ...]`` inputs repeated over ``T``) with ``net``.

    Train it with any Lightning strategy; with the default one it runs plain BPTT over the whole ``T``,
    which makes it the baseline that ``TruncatedLocalBPTT`` is compared against. The prediction is the
    output averaged over time (the firing rate of the output neurons).

    Args:
        net: a SpikingJelly network mapping ``[T, B, ...]`` to ``[T, B, num_classes]``.
        num_classes: inferred from the network's output layer when not given (:func:`output_width`).
        T: time steps to repeat static inputs over (direct encoding); ``None`` for sequences.
        batch_layout: ``"BT"`` or ``"TB"`` for sequence inputs (read by ``TruncatedLocalBPTT`` too).
        loss: ``"mse"`` (paper's Eq. 3), ``"ce"`` or a callable ``(out_seq, target) -> scalar``.
        optimizer: ``"sgd"`` (with ``momentum``, the paper's choice for LeNet/AlexNet) or ``"adam"``.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        lr_step_epochs: multiply the learning rate by ``lr_gamma`` every this many epochs (the
            paper halves it every 20); ``0`` disables the schedule.
        lr_gamma: the factor of that schedule.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int | None = None,
        *,
        T: int | None = None,
        batch_layout: BatchLayout = "BT",
        loss: Literal["mse", "ce"] | LocalLoss = "mse",
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_step_epochs: int = 20,
        lr_gamma: float = 0.5,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        inferred = output_width(net)
        if num_classes is not None and num_classes != inferred:
            raise ValueError(f"num_classes={num_classes} but the network's output layer has {inferred} outputs")
        self.save_hyperparameters(ignore=["net", "loss"])
        self.net = net
        self.num_classes = inferred
        self.T = T
        self.batch_layout = batch_layout
        self.loss_fn = resolve_loss(loss)
        self.train_acc = MulticlassAccuracy(inferred)
        self.val_acc = MulticlassAccuracy(inferred)
        self.test_acc = MulticlassAccuracy(inferred)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, ...]`` (or ``[B, ...]`` with ``T`` set) -> output sequence ``[T, B, num_classes]``."""
        functional.reset_net(self.net)
        return self.net(to_time_major(x, self.batch_layout, self.T))

    def _shared_step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, target = batch[0], batch[1]
        out_seq = self(x)
        loss = self.loss_fn(out_seq, target)
        metric(out_seq.mean(0), target if target.dim() == 1 else target.argmax(-1))
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=x.shape[0])
        self.log(f"{stage}/acc", metric, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=x.shape[0])
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).mean(0).argmax(-1)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        else:
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if not hp.lr_step_epochs:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.lr_step_epochs, gamma=hp.lr_gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
