"""The memory budget mode: which k ``TruncatedLocalBPTT(k="auto", memory_budget=...)`` chooses, and what it then uses.

    .venv/bin/python benchmarks/budget.py --network alexnet            # a documented run
    .venv/bin/python benchmarks/budget.py --network alexnet --quick    # smoke run, well under 2 minutes

Every row is one fresh training (one child process, one batch by default) with ``k="auto"``, ``n=1`` and one
budget. The first row's budget is loose (4 GiB: k must come out = T); the strategy's fitted memory model of that
run then sets the other budgets, each just above what the strategy itself measured (or predicts) for a target k,
down to one below what k = 1 needs, where the strategy must raise. Per row: the chosen ``strategy.k``, the
strategy's prediction for it (``memory_model(k)``), what its first-batch check saw (``memory_used``: saved
activations plus parameters, gradients and optimizer state on CPU), and the true peak of all live tensors
(``harness.TensorMemoryMeter``; CUDA: ``max_memory_allocated``) during the setup (where the strategy measures its
chunks) and during the training batches, each against the budget.

Prints a table and writes ``benchmarks/results/budget_<network>[_quick].csv``. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import harness as H
import torch
from torch.utils.data import DataLoader

from lightning_tlbptt import SpikingClassifier, TruncatedLocalBPTT
from lightning_tlbptt.budget import parse_bytes

COLUMNS = (
    ("budget", "budget", "s"),
    ("budget_mib", "MiB", ".1f"),
    ("target", "sized for", "s"),
    ("k", "chosen k", "s"),
    ("predicted_mib", "predicted MiB", ".1f"),
    ("used_mib", "first batch MiB", ".1f"),
    ("batch_peak_mib", "true peak MiB", ".1f"),
    ("batch_peak_vs_budget", "vs budget", ".2f"),
    ("setup_peak_mib", "setup peak MiB", ".1f"),
    ("setup_peak_vs_budget", "vs budget", ".2f"),
)

LOOSE = "4GiB"


@dataclass
class Row:
    """What one training with ``k="auto"`` leaves (bytes; ``None`` where the strategy raised)."""

    k: int | None
    error: str | None
    model_fixed: float | None
    model_per_step: float | None
    measured: tuple[tuple[int, int], ...]
    predicted: float | None
    used: int | None
    setup_peak: int
    batch_peak: int | None


def _train(w: H.Workload, budget: int, device: torch.device, n_batches: int) -> Row:
    """One fit with ``k="auto"`` under ``budget`` inside the true-peak meter, setup and batches apart."""
    batches = H.make_batches(w, n_batches)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    setup: dict[str, int] = {}
    strategy = TruncatedLocalBPTT(k="auto", n=1, memory_budget=budget, loss=w.loss)
    error = None
    # The strategy's own SavedTensorsMeter runs during its setup and first batch; saved-tensor hooks do not nest, so
    # only the dispatch-mode meter (which sees every allocation) runs around the fit.
    with H.TensorMemoryMeter() as tensors:

        def split_peaks() -> None:
            setup["tensors"] = tensors.peak_bytes
            tensors.peak_bytes = tensors.current_bytes
            if cuda:
                setup["cuda"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()

        module = SpikingClassifier(H.build_network(w), loss=w.loss, optimizer=w.optimizer, lr=w.lr, lr_step_epochs=0)
        trainer = H.one_epoch_trainer(strategy, device, [H._FirstBatch(split_peaks)])
        try:
            trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
        except ValueError as err:
            error = str(err).splitlines()[0]
    if not setup:  # raised at setup: everything measured was setup
        setup["tensors"] = tensors.peak_bytes
        if cuda:
            setup["cuda"] = torch.cuda.max_memory_allocated()
    model = strategy.memory_model
    chosen = strategy.k if isinstance(strategy.k, int) else None
    return Row(
        k=chosen,
        error=error,
        model_fixed=None if model is None else model.fixed,
        model_per_step=None if model is None else model.per_step,
        measured=() if model is None else model.measured,
        predicted=None if model is None or chosen is None else model(chosen),
        used=getattr(strategy, "memory_used", None),
        setup_peak=setup["cuda"] if cuda else setup["tensors"],
        batch_peak=None if error else (torch.cuda.max_memory_allocated() if cuda else tensors.peak_bytes),
    )


def _ceil_mib(size: float) -> str:
    return f"{math.ceil(size / H.MiB)}MiB"


def derived_budgets(loose: Row, T: int, margin: float = 0.1) -> list[tuple[str, str]]:
    """``(budget, what it aims at)`` from the loose run's measurements: just above what ``k`` needs, for ``k`` from T
    down to 1, and below what ``k = 1`` needs.

    Where the loose run measured ``k`` itself (1, 2, 4, ...), its measurement is used; elsewhere its model, which is
    fitted between the two longest chunks and holds where activations dominate.
    """
    assert loose.model_fixed is not None and loose.model_per_step is not None and loose.measured
    measured = dict(loose.measured)

    def needs(k: int) -> float:
        assert loose.model_fixed is not None and loose.model_per_step is not None
        return measured.get(k, loose.model_fixed + loose.model_per_step * k)

    targets = sorted({T, T // 2, T // 5, 4, 1}, reverse=True)
    rows = [(_ceil_mib(needs(k) / (1 - margin)), f"k={k}") for k in targets if k >= 1]
    smallest = min(needs(k) for k in measured)  # the strategy raises when even k = 1 is over the budget's 90 %
    rows.append((f"{math.floor(0.8 * smallest / H.MiB * 10) / 10}MiB", "below k=1"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", choices=sorted(H.WORKLOADS), default="alexnet")
    parser.add_argument("--quick", action="store_true", help="short sequences and small batches")
    parser.add_argument("--budgets", help=f"comma-separated budgets (default: {LOOSE}, then derived from its run)")
    parser.add_argument("--batches", type=int, default=1, help="training batches per row (default 1)")
    H.add_run_options(parser)
    args = parser.parse_args()

    setup, device = H.start(args)
    w = H.workload(args.network, quick=args.quick)
    print(f"{w.describe()}\ndevice {device}, {setup}; TruncatedLocalBPTT(k='auto', n=1), one process per row")

    plan = [(b.strip(), "") for b in args.budgets.split(",")] if args.budgets else [(LOOSE, "k=T")]
    results: list[tuple[str, str, Row]] = []
    while plan:
        budget, target = plan.pop(0)
        row: Row = H._in_child(_train, w, parse_bytes(budget), device, args.batches)
        results.append((budget, target, row))
        peak = "-" if row.batch_peak is None else f"{row.batch_peak / H.MiB:.1f} MiB"
        print(f"  budget {budget:>8}: k={row.k}  true peak {peak}  {row.error or ''}", flush=True)
        if not args.budgets and len(results) == 1:
            if row.model_fixed is None:
                parser.error(f"the loose budget {LOOSE} did not fit: {row.error}")
            plan = derived_budgets(row, w.T)

    rows: list[dict[str, Any]] = []
    for budget, target, row in results:
        size = parse_bytes(budget)
        rows.append(
            {
                "network": w.network,
                "budget": budget,
                "budget_mib": size / H.MiB,
                "target": target or "-",
                "k": str(row.k) if row.k is not None else "raised",
                "n": 1,
                "error": row.error,
                "predicted_mib": None if row.predicted is None else row.predicted / H.MiB,
                "used_mib": None if row.used is None else row.used / H.MiB,
                "batch_peak_mib": None if row.batch_peak is None else row.batch_peak / H.MiB,
                "batch_peak_vs_budget": None if row.batch_peak is None else row.batch_peak / size,
                "batch_peak_within_budget": None if row.batch_peak is None else row.batch_peak <= size,
                "setup_peak_mib": row.setup_peak / H.MiB,
                "setup_peak_vs_budget": row.setup_peak / size,
                "setup_peak_within_budget": row.setup_peak <= size,
                "model_fixed_mib": None if row.model_fixed is None else row.model_fixed / H.MiB,
                "model_per_step_mib": None if row.model_per_step is None else row.model_per_step / H.MiB,
                "measured_mib": " ".join(f"{k}:{b / H.MiB:.2f}" for k, b in row.measured),
                "batches": args.batches,
                **H.workload_fields(w),
                "device": device.type,
                "setup": setup,
                **H.machine(),
            }
        )
    peak = "CUDA max_memory_allocated" if device.type == "cuda" else "peak of all live tensors"
    print(f"\n{w.describe()}; TruncatedLocalBPTT(k='auto', n=1); {setup}\n{H.format_table(rows, COLUMNS)}")
    own = "max_memory_allocated" if device.type == "cuda" else "every live tensor + parameters, optimizer state"
    print(
        f"predicted = the strategy's memory_model(k); first batch = its memory_used ({own}); true peak = {peak} "
        f"over the {args.batches} training batch(es); setup peak = the same during setup, where the strategy measures "
        "chunks of k = 1, 2, 4, ..."
    )
    for budget, _, row in results:
        if row.error:
            print(f"budget {budget}: {row.error}")
    H.save(f"budget_{w.network}", rows, "quick" if args.quick else "", args.tag)


if __name__ == "__main__":
    main()
