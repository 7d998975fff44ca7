"""Plain BPTT against TruncatedLocalBPTT on the offline real data: the tables of docs/results.md.

For each dataset, the paper's network and setting (``lightning_tlbptt.paper.DATASETS``: LeNet-1, T = 20, SGD with
momentum 0.9 on the MSE of output firing rates, batch 128) with the accuracy study's recipe (``paper_setting``: the
learning rate scaled to the batch, 0.05; ``PaperClassifier``: the output layer's bias balanced from one batch) is
trained from the same initial weights with plain BPTT and with ``TruncatedLocalBPTT(k, n)`` at (k, n) in the paper's
recommended range (k in 2..10, n = 1 or 2, trainable local classifiers), by ``tlbptt.compare.compare``; it reports
validation accuracy, peak memory (bytes saved for backward plus parameters, gradients and optimizer state) and wall
time. Two epochs by default, no learning-rate decay: a budget of minutes on a CPU, not the paper's 100 epochs; the
study that ranks the settings over seeds and epochs is ``benchmarks/accuracy_study.py`` (docs/results.md).

    python examples/results.py --threads 1           # both datasets, 2 epochs, seeds 0 and 1: results.csv
    python examples/results.py --datasets mnist5k --epochs 5 --seeds 0 1 2 --setting 5,2 --setting 2,2
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from collections.abc import Sequence
from dataclasses import asdict

import torch

from lightning_tlbptt.paper import DATASETS, PaperClassifier, paper_setting
from tlbptt.compare import RunResult, compare

OFFLINE = ("mnist5k", "event_mnist")


def run(
    dataset: str, settings: Sequence[tuple[int, int]], epochs: int, data_dir: str, seed: int, lr: float | None = None
) -> list[RunResult]:
    """BPTT, then TruncatedLocalBPTT at each (k, n), on ``dataset`` with its paper setting (``lr`` if given)."""
    spec = DATASETS[dataset]
    setting = paper_setting(dataset)
    return compare(
        lambda: PaperClassifier(**{**setting, "lr": setting["lr"] if lr is None else lr, "lr_step_epochs": 0}),
        spec.make_datamodule(data_dir),
        settings=settings,
        loss=setting["loss"],
        epochs=epochs,
        accelerator="cpu",
        seed=seed,
    )


def markdown_table(by_seed: Sequence[Sequence[RunResult]]) -> str:
    """One row per run: accuracy per seed and its mean; memory and mean time also as ratios to BPTT's.

    ``by_seed[i]`` is one :func:`run` (BPTT first); memory does not depend on the seed, time does (noise).
    """
    lines = [
        "| run | val acc (mean) | per seed | peak memory | vs BPTT | saved activations | time (mean) | vs BPTT "
        "| steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_bytes = by_seed[0][0].peak_bytes
    base_seconds = sum(results[0].seconds for results in by_seed) / len(by_seed)
    for runs in zip(*by_seed, strict=True):
        first = runs[0]
        accuracy = sum(r.val_acc for r in runs) / len(runs)
        seconds = sum(r.seconds for r in runs) / len(runs)
        per_seed = ", ".join(f"{r.val_acc:.1%}" for r in runs)
        lines.append(
            f"| {first.name} | {accuracy:.1%} | {per_seed} | {first.peak_bytes / 2**20:.1f} MiB "
            f"| {first.peak_bytes / base_bytes:.2f} | {first.saved_activation_bytes / 2**20:.1f} MiB "
            f"| {seconds:.0f} s | {seconds / base_seconds:.2f} | {first.optimizer_steps} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=OFFLINE, default=list(OFFLINE))
    parser.add_argument(
        "--setting", action="append", metavar="K,N", help="(k, n) to compare; repeatable (default 10,1 5,2 2,1)"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of weights and shuffling")
    parser.add_argument(
        "--lr", type=float, help="learning rate of every run (default: the dataset's paper setting scaled to the batch)"
    )
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
        by_seed = [run(dataset, settings, args.epochs, args.data_dir, seed, args.lr) for seed in args.seeds]
        spec = DATASETS[dataset]
        print(
            f"\n### {dataset}: {spec.model}, T = {spec.n_steps}, batch {spec.batch_size}, "
            f"lr {args.lr or paper_setting(dataset)['lr']}, {args.epochs} epoch(s), seeds {args.seeds}\n\n"
            + markdown_table(by_seed)
        )
        rows += [
            {"dataset": dataset, "seed": seed, "epochs": args.epochs, "peak_bytes": r.peak_bytes, **asdict(r)}
            for seed, results in zip(args.seeds, by_seed, strict=True)
            for r in results
        ]
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
