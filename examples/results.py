"""Plain BPTT against TruncatedLocalBPTT on the offline real data: the tables of docs/results.md.

For each dataset, the paper's network and setting (``lightning_tlbptt.data.DATASETS``: LeNet-1, T = 20, SGD with
momentum 0.9 on the MSE of output firing rates, batch 128) is trained from the same initial weights with plain
BPTT and with ``TruncatedLocalBPTT(k, n)`` at (k, n) in the paper's recommended range (k in 2..10, n = 1 or 2,
trainable local classifiers), by ``lightning_tlbptt.compare.compare``; it reports validation accuracy, peak
memory (bytes saved for backward plus parameters, gradients and optimizer state) and wall time. One epoch by
default, no learning-rate decay: a budget of minutes on a CPU, not the paper's 100 epochs.

    python examples/results.py --threads 1           # both datasets, 1 epoch: writes results.csv
    python examples/results.py --datasets mnist5k --epochs 3 --setting 5,2 --setting 2,2
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from collections.abc import Sequence
from dataclasses import asdict

import torch

from lightning_tlbptt.compare import RunResult, compare
from lightning_tlbptt.data import DATASETS
from lightning_tlbptt.paper import paper_setting

OFFLINE = ("mnist5k", "event_mnist")


def run(dataset: str, settings: Sequence[tuple[int, int]], epochs: int, data_dir: str, seed: int) -> list[RunResult]:
    """BPTT, then TruncatedLocalBPTT at each (k, n), on ``dataset`` with its paper setting."""
    spec = DATASETS[dataset]
    setting = paper_setting(dataset)
    return compare(
        spec.make_model,
        spec.make_datamodule(data_dir),
        T=setting["T"],  # static digits are repeated over T; event frames carry their own T
        settings=settings,
        epochs=epochs,
        lr=setting["lr"],
        loss=setting["loss"],
        accelerator="cpu",
        seed=seed,
    )


def markdown_table(results: Sequence[RunResult]) -> str:
    """One row per run, with memory and time also as ratios to the first (BPTT) run."""
    base = results[0]
    lines = [
        "| run | val acc | peak memory | vs BPTT | saved activations | time | vs BPTT | optimizer steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.val_acc:.2%} | {r.peak_bytes / 2**20:.1f} MiB | {r.peak_bytes / base.peak_bytes:.2f} "
            f"| {r.saved_activation_bytes / 2**20:.1f} MiB | {r.seconds:.0f} s | {r.seconds / base.seconds:.2f} "
            f"| {r.optimizer_steps} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=OFFLINE, default=list(OFFLINE))
    parser.add_argument(
        "--setting", action="append", metavar="K,N", help="(k, n) to compare; repeatable (default 10,1 5,2 2,1)"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="data", help="cache of the simulated EventMNIST events")
    parser.add_argument("--out", default="results.csv")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's); 1 is far faster on cores other jobs share"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [tuple(int(v) for v in s.split(",")) for s in (args.setting or ["10,1", "5,2", "2,1"])]

    start = time.perf_counter()
    rows = []
    for dataset in args.datasets:
        results = run(dataset, settings, args.epochs, args.data_dir, args.seed)
        spec = DATASETS[dataset]
        print(
            f"\n### {dataset}: {spec.model}, T = {spec.n_steps}, batch {spec.batch_size}, {args.epochs} epoch(s)\n\n"
            + markdown_table(results)
        )
        rows += [{"dataset": dataset, "epochs": args.epochs, "peak_bytes": r.peak_bytes, **asdict(r)} for r in results]
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(
        f"\n{len(rows)} runs in {time.perf_counter() - start:.0f} s on {os.cpu_count()} CPU cores "
        f"({torch.get_num_threads()} torch threads); written to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
