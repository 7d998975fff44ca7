"""A real 2-process DDP run (gloo, CPU) of TruncatedLocalBPTT, or its 1-process reference on the same global batches.

Usage: ``python tests/ddp_run.py OUT_DIR ddp|single|ragged[_batch|_window]`` (``ragged``: rank r's sequences have
T = 4 + 2r; ``_batch``: ``step_every="batch"``; ``_window``: an output neuron dead at init, and ``OutputWindow``).
Writes ``OUT_DIR/<mode>_rank<r>.pt``: the gradients
right before every optimizer step. Run as a script so that Lightning's launcher can start rank 1 the
way it does for users (by re-running the script).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_tlbptt import OutputWindow, SpikingClassifier, TruncatedLocalBPTT, TruncatedLocalBPTTDDP, slicing

from snn_fixtures import GradRecorder, conv_net

PER_RANK_BATCH = 4


def dataset(T: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(16, T, 1, 8, 8, generator=g) < 0.4).float()
    return TensorDataset(x, torch.arange(16) % 4)


def global_batches(ds: TensorDataset) -> list[list[int]]:
    """The samples both ranks see together at each step, as Lightning's DistributedSampler deals them."""
    per_rank = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(0)
        per_rank.append(list(sampler))
    return [
        per_rank[0][i : i + PER_RANK_BATCH] + per_rank[1][i : i + PER_RANK_BATCH]
        for i in range(0, len(per_rank[0]), PER_RANK_BATCH)
    ]


def main(out: Path, mode: str) -> None:
    mode, _, per = mode.partition("_")
    ds = dataset(4 + 2 * int(os.environ.get("LOCAL_RANK", "0")) if mode == "ragged" else 4)
    if mode in ("ddp", "ragged"):
        loader = DataLoader(ds, batch_size=PER_RANK_BATCH)
        devices = 2
    else:
        loader = DataLoader(ds, batch_sampler=global_batches(ds))
        devices = 1
    recorder = GradRecorder()
    find_runs = slicing.find_runs  # every layer in one-step slices, not only the widest, whatever the caller passes
    slicing.find_runs = lambda *args, **kwargs: find_runs(*args, **{**kwargs, "coarsen": False})
    trainer = L.Trainer(
        strategy=(TruncatedLocalBPTTDDP if devices > 1 else TruncatedLocalBPTT)(
            k=2, n=1, slice_bytes=1, step_every="batch" if per == "batch" else "chunk"
        ),
        accelerator="cpu",
        devices=devices,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder, OutputWindow()] if per == "window" else [recorder],
    )
    net = conv_net()
    if per == "window":  # output neuron 2 silent for every input: the window starts it from the global batch's mean
        with torch.no_grad():
            net[-2].weight[2] = -100.0
            net[-2].bias[2] = -100.0
    trainer.fit(SpikingClassifier(net, lr=0.1, lr_step_epochs=0), loader)
    torch.save(recorder.steps, out / f"{mode}{'_' + per if per else ''}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
