"""Two reliability figures of issue 11, measured side by side in one run.

    .venv/bin/python benchmarks/reliability.py             # 300 batches for the RSS curve, 6 x 2 x 40 batches timed
    .venv/bin/python benchmarks/reliability.py --quick     # smoke run

1. **Memory creep.** Resident set size of the process every 25 batches over 300 training batches of a small
   conv net with ``TruncatedLocalBPTT(k=2, n=1)``: after warm-up it must stay flat (no tensor, hook or graph kept
   across batches). Reports the growth from batch 50 to the last batch.
2. **Overhead of the gradient check.** Before every optimizer step the strategy checks the gradients for NaN/inf
   (one fused norm and one synchronisation per chunk). The same fit is timed with the check and with it replaced
   by a no-op, interleaved over rounds; reports the median time ratio.

Writes ``benchmarks/results/reliability[_quick].csv``. Numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from lightning_tlbptt import SpikingClassifier, TruncatedLocalBPTT

from snn_fixtures import conv_net, event_batches

RESULTS = Path(__file__).parent / "results"


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class _RSS(L.Callback):
    def __init__(self, every: int) -> None:
        self.every = every
        self.rows: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        batches = len(self.rows) * self.every
        if trainer.fit_loop.total_batch_idx + 1 >= batches + self.every or not self.rows:
            self.rows.append((trainer.fit_loop.total_batch_idx + 1, _rss_mib()))


def _trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def creep(batches: int) -> list[tuple[int, float]]:
    rss = _RSS(every=25)
    loader = event_batches(n=16, T=8, batch_size=8)  # 2 batches per epoch
    _trainer(strategy=TruncatedLocalBPTT(k=2, n=1), max_epochs=batches // 2, callbacks=[rss]).fit(
        SpikingClassifier(conv_net(), lr=0.01, lr_step_epochs=0), loader
    )
    return rss.rows


def timed_fit(check: bool, batches: int) -> float:
    original = TruncatedLocalBPTT._check_gradients
    if not check:
        TruncatedLocalBPTT._check_gradients = lambda self, *args: None  # type: ignore[method-assign]
    try:
        loader = event_batches(n=2 * batches, T=8, batch_size=8)
        trainer = _trainer(strategy=TruncatedLocalBPTT(k=2, n=1), max_epochs=1)
        start = time.perf_counter()
        trainer.fit(SpikingClassifier(conv_net(), lr=0.01, lr_step_epochs=0), loader)
        return time.perf_counter() - start
    finally:
        TruncatedLocalBPTT._check_gradients = original  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches, timed, rounds = (60, 10, 2) if args.quick else (300, 40, 6)

    rows = creep(batches)
    warm = next(rss for b, rss in rows if b >= min(50, batches // 2))
    growth = rows[-1][1] - warm
    print(f"RSS over {rows[-1][0]} batches (MiB): " + ", ".join(f"{b}: {rss:.1f}" for b, rss in rows))
    print(f"growth after warm-up (batch {min(50, batches // 2)} -> {rows[-1][0]}): {growth:+.1f} MiB")

    timed_fit(True, timed)  # warm-up: the first fit of a process pays for imports and allocator growth
    with_check, without = [], []
    for i in range(rounds):  # alternate which goes first, so drift on a shared machine does not favour one
        for check in (True, False) if i % 2 == 0 else (False, True):
            (with_check if check else without).append(timed_fit(check, timed))
    ratio = statistics.median(a / b for a, b in zip(with_check, without, strict=True))
    print(f"gradient check: fit time with / without = {ratio:.3f} (median of {rounds} interleaved rounds)")

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"reliability{'_quick' if args.quick else ''}.csv"
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["figure", "value"])
        writer.writerows([("rss_growth_after_warmup_mib", f"{growth:.2f}"), ("check_time_ratio", f"{ratio:.4f}")])
        writer.writerows((f"rss_mib_at_batch_{b}", f"{rss:.2f}") for b, rss in rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
