"""``tlbptt demo``: train the same network with plain BPTT and with TruncatedLocalBPTT, side by side, and measure each.

One fit is one measurement: the peak of activations saved for backward over the whole fit
(:class:`~lightning_tlbptt.memory.SavedTensorsMeter`) plus the training state
(:func:`~lightning_tlbptt.memory.training_state_bytes`, the rule the strategy's memory budget and
:class:`~lightning_tlbptt.measure.MemoryMonitor` use). For per-step metrics in a logger, use the callbacks of
:mod:`lightning_tlbptt.measure`.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch

from lightning_tlbptt.measure import MemoryMonitor
from lightning_tlbptt.memory import SavedTensorsMeter, training_state_bytes
from lightning_tlbptt.strategy import TruncatedLocalBPTT

__all__ = ["RunResult", "bptt_reference", "compare", "fit_and_measure", "format_table", "quiet_trainer"]


@dataclass(frozen=True)
class RunResult:
    """One training run.

    Attributes:
        name: ``"BPTT"`` or ``"TLBPTT(k, n)"``.
        val_acc: validation accuracy after training, in [0, 1].
        saved_activation_bytes: peak bytes saved for backward during training (what grows with T).
        state_bytes: parameters, one gradient per trainable parameter and optimizer state, in bytes, at the end of
            training (:func:`~lightning_tlbptt.memory.training_state_bytes`).
        cuda_max_allocated_bytes: ``torch.cuda.max_memory_allocated`` over the run, or ``None`` on CPU.
        seconds: wall time of ``Trainer.fit`` (training and validation).
        optimizer_steps: ``trainer.global_step``.
        cpu_seconds: CPU time of the process over ``Trainer.fit`` (every thread): the fair measure when runs share
            the cores.
    """

    name: str
    val_acc: float
    saved_activation_bytes: int
    state_bytes: int
    cuda_max_allocated_bytes: int | None
    seconds: float
    optimizer_steps: int
    cpu_seconds: float = float("nan")

    @property
    def peak_bytes(self) -> int:
        return self.cuda_max_allocated_bytes or self.saved_activation_bytes + self.state_bytes


def quiet_trainer(strategy: str | TruncatedLocalBPTT = "auto", **trainer_kwargs: Any) -> L.Trainer:
    """A one-device Trainer for measured runs: no logger, checkpoint, progress bar, model summary or sanity check
    unless ``trainer_kwargs`` (``max_epochs``, ``logger``, ``callbacks``, ...) say otherwise."""
    settings: dict[str, Any] = dict(
        accelerator="auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    settings.update(trainer_kwargs)
    return L.Trainer(strategy=strategy, devices=1, **settings)


def bptt_reference(
    module: L.LightningModule, datamodule: L.LightningDataModule, *, every_n_steps: int = 10, **trainer_kwargs: Any
) -> dict[str, float]:
    """Train ``module`` with standard BPTT: the reference of the figure of merit (Eq. 18).

    Returns its ``val/acc`` and, when :class:`~lightning_tlbptt.measure.MemoryMonitor` sampled a step (one in
    ``every_n_steps``), its measured peak memory as ``cost/memory/total_bytes``: the same measurement a
    configuration's :class:`~lightning_tlbptt.measure.CostMonitor` divides by. ``trainer_kwargs`` go to
    :func:`quiet_trainer`; no logger unless given (under a W&B agent a second wandb run would take the agent's run
    id).
    """
    memory = MemoryMonitor(every_n_steps)
    trainer = quiet_trainer("auto", callbacks=[memory], **trainer_kwargs)
    trainer.fit(module, datamodule=datamodule)
    if "val/acc" not in trainer.callback_metrics:
        raise ValueError("the BPTT reference logged no val/acc: the figure of merit needs validation")
    metrics = {"val/acc": float(trainer.callback_metrics["val/acc"])}
    if memory.peak_bytes is not None:
        metrics["cost/memory/total_bytes"] = memory.peak_bytes
    return metrics


def fit_and_measure(
    name: str,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    *,
    strategy: str | TruncatedLocalBPTT = "auto",
    **trainer_kwargs: object,
) -> RunResult:
    """``Trainer.fit`` on one device, measuring accuracy, peak memory and time (a :class:`RunResult`).

    ``trainer_kwargs`` go to :func:`quiet_trainer` (``max_epochs``, ``logger``, ``limit_train_batches``, ...); the
    module must log ``val/acc`` (as :class:`~lightning_tlbptt.module.SpikingClassifier` does).
    """
    trainer = quiet_trainer(strategy, **trainer_kwargs)
    cuda = trainer.strategy.root_device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    with SavedTensorsMeter() as meter:
        trainer.fit(module, datamodule=datamodule)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return RunResult(
        name=name,
        val_acc=float(trainer.callback_metrics["val/acc"]),
        saved_activation_bytes=meter.peak_bytes,
        state_bytes=training_state_bytes(module.parameters(), trainer.optimizers[0]),
        cuda_max_allocated_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        seconds=seconds,
        optimizer_steps=trainer.global_step,
        cpu_seconds=cpu_seconds,
    )


def compare(
    make_module: Callable[[], L.LightningModule],
    datamodule: L.LightningDataModule,
    *,
    settings: Sequence[tuple[int, int]] = ((2, 1),),
    classifier: str = "trainable",
    loss: str = "mse",
    epochs: int = 1,
    accelerator: str = "auto",
    seed: int = 0,
    jobs: int = 1,
) -> list[RunResult]:
    """Train ``make_module()`` with plain BPTT, then with ``TruncatedLocalBPTT(k, n)`` for each setting.

    Every run seeds ``seed`` before it calls ``make_module``, so a module built deterministically (the paper's
    :class:`~lightning_tlbptt.paper.PaperClassifier`, a :class:`~lightning_tlbptt.module.SpikingClassifier` of a
    freshly built network) starts every run from the same weights, and every run sees the same batches. ``loss`` is
    the local classifiers' loss (the module's own, by name).

    ``jobs > 1`` runs up to that many fits at once, each in a forked process with one torch thread (where the
    platform forks; else one after another): the same figures, sooner on several cores; compare their
    ``cpu_seconds``, since the runs share the cores.
    """
    runs: list[tuple[str, str | TruncatedLocalBPTT]] = [("BPTT", "auto")]
    runs += [
        (f"TLBPTT(k={k}, n={n})", TruncatedLocalBPTT(k=k, n=n, classifier=classifier, loss=loss)) for k, n in settings
    ]

    def run(name: str, strategy: str | TruncatedLocalBPTT) -> RunResult:
        L.seed_everything(seed, verbose=False)
        module = make_module()
        return fit_and_measure(
            name,
            module,
            datamodule,
            strategy=strategy,
            accelerator=accelerator,
            max_epochs=epochs,
            check_val_every_n_epoch=epochs,  # the table reports the last epoch's accuracy only
        )

    tasks = [functools.partial(run, name, strategy) for name, strategy in runs]
    if jobs > 1 and "fork" in mp.get_all_start_methods():
        return _forked(tasks, jobs)
    return [task() for task in tasks]


def _forked(tasks: Sequence[Callable[[], RunResult]], jobs: int) -> list[RunResult]:
    """Each task in a forked child of one torch thread, ``jobs`` at a time; results in task order. A child's error is
    raised here with its traceback; a child that dies without one (killed) is named with its exit code."""
    context = mp.get_context("fork")  # the children inherit the tasks (closures): nothing is pickled but results
    results_queue = context.Queue()

    def child(index: int, task: Callable[[], RunResult]) -> None:
        torch.set_num_threads(1)
        try:
            results_queue.put((index, task(), None))
        except BaseException:
            results_queue.put((index, None, traceback.format_exc()))

    results: dict[int, RunResult] = {}
    waiting = list(enumerate(tasks))
    running: dict[int, Any] = {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                index, task = waiting.pop(0)
                running[index] = context.Process(target=child, args=(index, task), daemon=True)
                running[index].start()
            try:
                index, result, error = results_queue.get(timeout=1.0)
            except queue.Empty:
                dead = {i: p.exitcode for i, p in running.items() if p.exitcode is not None}
                if dead:
                    try:  # a child that finished may have exited before its result was read
                        index, result, error = results_queue.get(timeout=5.0)
                    except queue.Empty:
                        raise RuntimeError(f"run(s) {sorted(dead)} died without a result (exit codes {dead})") from None
                else:
                    continue
            running.pop(index).join()
            if error is not None:
                raise RuntimeError(f"run {index} failed in its process:\n{error}")
            results[index] = result
    finally:
        for process in running.values():
            process.terminate()
    return [results[i] for i in range(len(tasks))]


def format_table(results: Sequence[RunResult], clock: Literal["wall", "cpu"] = "wall") -> str:
    """A plain-text table with each run's figures and its ratio to the first (BPTT) run; ``clock`` picks the time
    shown (``"cpu"`` for runs that shared the cores)."""
    base = results[0]
    title = "time" if clock == "wall" else "cpu time"
    header = f"{'run':<22}{'val acc':>9}{'peak mem':>12}{'vs BPTT':>9}{'activations':>13}{title:>10}{'vs BPTT':>9}"
    lines = [header, "-" * len(header)]
    for r in results:
        seconds = r.seconds if clock == "wall" else r.cpu_seconds
        base_seconds = base.seconds if clock == "wall" else base.cpu_seconds
        lines.append(
            f"{r.name:<22}{r.val_acc:>9.2%}{r.peak_bytes / 2**20:>9.1f} MiB{r.peak_bytes / base.peak_bytes:>9.2f}"
            f"{r.saved_activation_bytes / 2**20:>9.1f} MiB{seconds:>9.1f}s{seconds / base_seconds:>9.2f}"
        )
    return "\n".join(lines)
