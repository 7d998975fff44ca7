"""Train the same network with plain BPTT and with TruncatedLocalBPTT, side by side, and measure each."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from lightning_tlbptt.memory import SavedTensorsMeter
from lightning_tlbptt.module import SpikingClassifier
from lightning_tlbptt.strategy import TruncatedLocalBPTT

__all__ = ["RunResult", "compare", "fit_and_measure", "format_table"]


@dataclass(frozen=True)
class RunResult:
    """One training run.

    Attributes:
        name: ``"BPTT"`` or ``"TLBPTT(k, n)"``.
        val_acc: validation accuracy after training, in [0, 1].
        saved_activation_bytes: peak bytes saved for backward during training (what grows with T).
        state_bytes: parameters + gradients + optimizer state, in bytes, at the end of training.
        cuda_max_allocated_bytes: ``torch.cuda.max_memory_allocated`` over the run, or ``None`` on CPU.
        seconds: wall time of ``Trainer.fit`` (training and validation).
        optimizer_steps: ``trainer.global_step``.
    """

    name: str
    val_acc: float
    saved_activation_bytes: int
    state_bytes: int
    cuda_max_allocated_bytes: int | None
    seconds: float
    optimizer_steps: int

    @property
    def peak_bytes(self) -> int:
        return self.cuda_max_allocated_bytes or self.saved_activation_bytes + self.state_bytes


def _state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in module.parameters() if p.grad is not None)
    opt = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )
    return params + grads + opt


def fit_and_measure(
    name: str,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    *,
    strategy: str | TruncatedLocalBPTT = "auto",
    **trainer_kwargs: object,
) -> RunResult:
    """``Trainer.fit`` on one device, measuring accuracy, peak memory and time (a :class:`RunResult`).

    ``trainer_kwargs`` go to the Trainer (``max_epochs``, ``logger``, ``limit_train_batches``, ...); the
    module must log ``val/acc`` (as :class:`SpikingClassifier` does).
    """
    settings: dict[str, object] = dict(
        accelerator="auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    settings.update(trainer_kwargs)
    trainer = L.Trainer(strategy=strategy, devices=1, **settings)
    cuda = trainer.strategy.root_device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with SavedTensorsMeter() as meter:
        trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    return RunResult(
        name=name,
        val_acc=float(trainer.callback_metrics["val/acc"]),
        saved_activation_bytes=meter.peak_bytes,
        state_bytes=_state_bytes(module, trainer.optimizers[0]),
        cuda_max_allocated_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        seconds=seconds,
        optimizer_steps=trainer.global_step,
    )


def compare(
    make_net: Callable[[], nn.Module],
    datamodule: L.LightningDataModule,
    *,
    T: int | None,
    settings: Sequence[tuple[int, int]] = ((2, 1),),
    classifier: str = "trainable",
    epochs: int = 1,
    lr: float = 0.1,
    loss: str = "mse",
    accelerator: str = "auto",
    seed: int = 0,
) -> list[RunResult]:
    """Train ``make_net()`` with plain BPTT, then with ``TruncatedLocalBPTT(k, n)`` for each setting.

    Every run starts from the same weights (``seed``) and sees the same data. ``T`` repeats static inputs
    over time (direct encoding); leave it ``None`` for event data ``[B, T, ...]``.
    """
    L.seed_everything(seed, verbose=False)
    initial = make_net()
    runs: list[tuple[str, str | TruncatedLocalBPTT]] = [("BPTT", "auto")]
    runs += [(f"TLBPTT(k={k}, n={n})", TruncatedLocalBPTT(k=k, n=n, classifier=classifier)) for k, n in settings]
    results = []
    for name, strategy in runs:
        L.seed_everything(seed, verbose=False)
        module = SpikingClassifier(copy.deepcopy(initial), T=T, lr=lr, loss=loss, lr_step_epochs=0)
        results.append(
            fit_and_measure(name, module, datamodule, strategy=strategy, accelerator=accelerator, max_epochs=epochs)
        )
    return results


def format_table(results: Sequence[RunResult]) -> str:
    """A plain-text table with each run's figures and its ratio to the first (BPTT) run."""
    base = results[0]
    header = f"{'run':<22}{'val acc':>9}{'peak mem':>12}{'vs BPTT':>9}{'activations':>13}{'time':>9}{'vs BPTT':>9}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.name:<22}{r.val_acc:>9.2%}{r.peak_bytes / 2**20:>9.1f} MiB{r.peak_bytes / base.peak_bytes:>9.2f}"
            f"{r.saved_activation_bytes / 2**20:>9.1f} MiB{r.seconds:>8.1f}s{r.seconds / base.seconds:>9.2f}"
        )
    return "\n".join(lines)
