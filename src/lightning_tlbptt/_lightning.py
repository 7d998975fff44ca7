"""The private Lightning API the strategy uses, all of it, in one place.

Checked against ``lightning`` and ``pytorch_lightning`` 2.6 (2.6.0 to 2.6.6). ``tests/test_lightning_private.py``
fails when a name used here disappears from the installed Lightning, so an upgrade breaks a test, not a user's run.

- **One automatic optimisation per chunk.** Lightning's epoch loop runs a batch's optimisation with
  ``fit_loop.epoch_loop.automatic_optimization.run(optimizer, batch_idx, kwargs)``, once per batch: the training step
  in a closure, ``optimizer_zero_grad``, backward, the module's ``optimizer_step`` and every hook in between, and the
  step counters (``global_step``) that callbacks read. :func:`run_per_chunk` wraps that one call on the trainer's
  loop instance, so the strategy can call the original once per chunk with the chunk's batch.
- **A training step outside the optimisation** (``step_every="batch"``): Lightning's own call of the strategy's
  ``training_step`` (hook name, profiler), without its closure (:func:`call_training_step`).
- **A forward-only epoch.** ``StochasticWeightAveraging`` sets ``fit_loop._skip_backward`` for its epoch that only
  recomputes BatchNorm statistics; local losses must not be back-propagated then (:func:`skips_backward`).
- **The learning-rate finder** counts its sweep in batches (its scheduler steps once per batch) but stops the fit at
  ``max_steps`` optimizer steps; with several chunks per batch its stop is stretched (:func:`stretch_lr_finder`).
- **DDP without the wrapper**: the network starts from rank 0's weights (:func:`sync_module_states`).
- **How many devices a Trainer will use**, for the applications that pick the one-device or the DDP strategy
  (:func:`device_count`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.tuner.lr_finder import _LRCallback
from torch import nn

__all__ = [
    "PRIVATE_NAMES",
    "call_training_step",
    "device_count",
    "restore_run",
    "run_per_chunk",
    "skips_backward",
    "stretch_lr_finder",
    "sync_module_states",
]

PRIVATE_NAMES = (
    "lightning.pytorch.loops.optimization.automatic._AutomaticOptimization.run",
    "lightning.pytorch.loops.fit_loop._FitLoop._skip_backward",
    "lightning.pytorch.trainer.call._call_strategy_hook",
    "lightning.pytorch.tuner.lr_finder._LRCallback.num_training",
    "lightning.pytorch.overrides.distributed._sync_module_states",
    "lightning.pytorch.trainer.connectors.accelerator_connector._AcceleratorConnector._parallel_devices",
)
"""What this module reaches into, for the test that checks they still exist."""

BatchRun = Callable[[Any, int, dict[str, Any]], dict[str, Any]]
"""Lightning's ``run(optimizer, batch_idx, kwargs) -> outputs`` of one batch's automatic optimisation."""


def run_per_chunk(trainer: pl.Trainer, run_batch: Callable[[BatchRun, Any, int, dict[str, Any]], Any]) -> None:
    """Route each batch's automatic optimisation through ``run_batch(original_run, optimizer, batch_idx, kwargs)``.

    ``run_batch`` calls ``original_run`` once per chunk. Undone by :func:`restore_run`.
    """
    loop = trainer.fit_loop.epoch_loop.automatic_optimization
    original = type(loop).run.__get__(loop)

    def run(optimizer: Any, batch_idx: int, kwargs: dict[str, Any]) -> Any:
        return run_batch(original, optimizer, batch_idx, kwargs)

    loop.run = run  # type: ignore[method-assign]


def restore_run(trainer: pl.Trainer) -> None:
    """Undo :func:`run_per_chunk`: the trainer's loop runs one optimisation per batch again."""
    vars(trainer.fit_loop.epoch_loop.automatic_optimization).pop("run", None)


def call_training_step(trainer: pl.Trainer, kwargs: dict[str, Any]) -> Any:
    """The strategy's ``training_step`` as the automatic optimisation's closure calls it (the module's
    ``_current_fx_name`` set for ``self.log``, the profiler's section), and ``post_training_step``."""
    from lightning.pytorch.trainer import call

    output = call._call_strategy_hook(trainer, "training_step", *kwargs.values())
    trainer.strategy.post_training_step()
    return output


def skips_backward(trainer: pl.Trainer) -> bool:
    """Whether this epoch only runs forward (``StochasticWeightAveraging``'s BatchNorm epoch)."""
    return bool(trainer.fit_loop._skip_backward)


def stretch_lr_finder(trainer: pl.Trainer, chunks_per_batch: int) -> None:
    """``Tuner.lr_find`` stops after ``num_training`` optimizer steps but raises the rate once per batch: with
    ``chunks_per_batch`` steps a batch its sweep would end a fraction of the way. Let it run ``num_training`` batches.

    Called once per fit, at its first batch."""
    finder = next((c for c in trainer.callbacks if isinstance(c, _LRCallback)), None)  # type: ignore[attr-defined]
    if finder is not None and chunks_per_batch > 1:
        trainer.fit_loop.epoch_loop.max_steps += finder.num_training * (chunks_per_batch - 1)


def sync_module_states(module: nn.Module) -> None:
    """Broadcast rank 0's parameters and buffers, as DistributedDataParallel does when it wraps a module."""
    _sync_module_states(module)


def device_count(accelerator: str, devices: Any) -> int:
    """How many devices ``Trainer(accelerator=accelerator, devices=devices)`` will use ("auto" resolved as it does)."""
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    return len(_AcceleratorConnector(accelerator=accelerator, devices=devices)._parallel_devices) or 1
