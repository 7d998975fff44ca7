"""How long training with the neuron kernel follows training with SpikingJelly's LIF loop, step by step.

    .venv/bin/python benchmarks/kernel_drift.py                  # EventMNIST, LeNet-1, (k, n) = (2, 1), lr 0.05
    .venv/bin/python benchmarks/kernel_drift.py --steps 40       # shorter

Trains the same network from the same weights on the same batches twice, with ``fast_neurons=False`` and
``True``, records every parameter gradient before every optimizer step, and prints, per step, the largest relative
difference ``|g_kernel - g_sj| / |g_sj|`` over the parameters. The kernel's gradients equal SpikingJelly's up to
float rounding; this shows how many steps that rounding takes to change the course of a run (docs/results.md).
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import lightning as L
import torch

from lightning_tlbptt import SpikingClassifier, TruncatedLocalBPTT
from lightning_tlbptt.paper import DATASETS


class _Gradients(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.steps.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def gradients(initial: torch.nn.Module, args: argparse.Namespace, fast: bool) -> list[dict[str, torch.Tensor]]:
    L.seed_everything(args.seed, verbose=False)
    module = SpikingClassifier(copy.deepcopy(initial), T=None, lr=args.lr, loss="mse", lr_step_epochs=0)
    recorder = _Gradients()
    trainer = L.Trainer(
        strategy=TruncatedLocalBPTT(k=args.k, n=args.n, fast_neurons=fast),
        accelerator="cpu",
        max_steps=args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(module, DATASETS["event_mnist"].make_datamodule(args.data_dir))
    return recorder.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="data", help="cache of the simulated EventMNIST events")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(args.seed, verbose=False)
    initial = DATASETS["event_mnist"].make_model()
    reference, kernel = (gradients(initial, args, fast) for fast in (False, True))
    print("step  max relative gradient difference")
    for step, (a, b) in enumerate(zip(reference, kernel, strict=True), start=1):
        worst = max(((b[k] - a[k]).norm() / a[k].norm().clamp_min(1e-30)).item() for k in a)
        print(f"{step:4d}  {worst:.2e}")


if __name__ == "__main__":
    main()
