"""Shared fixtures: a quiet CPU Trainer; W&B never reaches a server."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest

from lightning_tlbptt import slicing

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def make_trainer(tmp_path: Any) -> Callable[..., L.Trainer]:
    def make(**kwargs: Any) -> L.Trainer:
        defaults: dict[str, Any] = dict(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=tmp_path,
        )
        defaults.update(kwargs)
        return L.Trainer(**defaults)

    return make


@pytest.fixture
def finest_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run of a network in its finest time slices (one step at ``slice_bytes=1``), not only the widest:
    ``slicing.find_runs`` called with ``coarsen=False`` whatever its caller (the strategy) passes."""
    find_runs = slicing.find_runs
    monkeypatch.setattr(slicing, "find_runs", lambda *args, **kwargs: find_runs(*args, **{**kwargs, "coarsen": False}))
