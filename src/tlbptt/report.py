"""``tlbptt report``: a sweep folder's results table, the paper's figures and a recommendation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tlbptt.sweeps import STATE_FILE, Trial, load_state

__all__ = ["recommend", "report", "report_main"]


_COLUMNS = (
    ("k", "k"),
    ("n", "n"),
    ("classifier", "classifier"),
    ("val/acc", "accuracy"),
    ("peak_memory_mib", "peak memory (MiB)"),
    ("cost/fom_memory_ratio", "memory / BPTT"),
    ("cost/ratio/memory_access", "memory access / BPTT"),
    ("cost/ratio/additions", "additions / BPTT"),
    ("cost/ratio/macs", "MACs / BPTT"),
    ("cost/fom", "FoM (Eq. 18)"),
)


def _rows(trials: Sequence[Trial]) -> list[dict[str, Any]]:
    rows = []
    for t in trials:
        row: dict[str, Any] = {"trial": t.name, "state": t.state, **t.parameters, **t.metrics}
        if "cost/memory/total_bytes" in t.metrics:
            row["peak_memory_mib"] = t.metrics["cost/memory/total_bytes"] / 2**20
        rows.append(row)
    return rows


def recommend(trials: Sequence[Trial], *, memory_budget_mib: float | None = None) -> tuple[Trial, str] | None:
    """The trial to pick: lowest figure of merit, or the most accurate one within a memory budget."""
    done = [t for t in trials if t.state == "finished"]
    if memory_budget_mib is not None:
        fits = [t for t in done if t.metrics.get("cost/memory/total_bytes", math.inf) / 2**20 <= memory_budget_mib]
        if not fits:
            return None
        best = max(fits, key=lambda t: t.metrics.get("val/acc", -math.inf))
        return best, f"most accurate within {memory_budget_mib:g} MiB of peak memory"
    scored = [t for t in done if math.isfinite(t.metrics.get("cost/fom", math.nan))]
    if not scored:
        return None
    return min(scored, key=lambda t: t.metrics["cost/fom"]), "lowest figure of merit (Eq. 18)"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def report(sweep_dir: str | Path, *, memory_budget_mib: float | None = None) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and the paper's figures (PNG) into ``sweep_dir``.

    Figures: accuracy against k per block size (the paper's Figs. 3-5), measured peak memory against k
    (Figs. 6-7), memory access, additions and MACs against k (Figs. 9-13), and the figure of merit's best k
    per block size (Fig. 14). One panel per classifier kind where the sweep has both.

    Returns:
        The paths written, by name.
    """
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(sweep_dir)
    trials = load_state(folder)
    if not trials:
        raise FileNotFoundError(f"{folder / STATE_FILE} not found or empty: run `tlbptt sweep` into {folder} first")
    rows = _rows(trials)
    written: dict[str, Path] = {}

    keys = ["trial", "state", *dict.fromkeys(k for row in rows for k in row if k not in ("trial", "state"))]
    with (folder / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    written["csv"] = folder / "results.csv"

    shown = [(key, title) for key, title in _COLUMNS if any(key in row for row in rows)]
    lines = ["| trial | state | " + " | ".join(title for _, title in shown) + " |"]
    lines.append("|" + "---|" * (len(shown) + 2))
    for row in rows:
        lines.append(f"| {row['trial']} | {row['state']} | " + " | ".join(_fmt(row.get(k)) for k, _ in shown) + " |")
    pick = recommend(trials, memory_budget_mib=memory_budget_mib)
    if pick is None:
        lines.append("\nNo finished trial meets the criterion" + (" (memory budget)." if memory_budget_mib else "."))
    else:
        trial, why = pick
        params = ", ".join(f"{k}={trial.parameters[k]}" for k in ("k", "n", "classifier") if k in trial.parameters)
        lines.append(f"\nRecommended: **{params}** ({trial.name}): {why}.")
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    written["markdown"] = folder / "results.md"

    finished = [r for r in rows if r["state"] == "finished" and "k" in r and "n" in r]
    kinds = sorted({str(r.get("classifier", "trainable")) for r in finished}) or ["trainable"]

    def by_n(kind: str, metric: str) -> dict[Any, list[tuple[float, float]]]:
        series: dict[Any, list[tuple[float, float]]] = {}
        for r in finished:
            if str(r.get("classifier", "trainable")) == kind and metric in r:
                series.setdefault(r["n"], []).append((r["k"], r[metric]))
        return {n: sorted(points) for n, points in sorted(series.items())}

    def line_figure(name: str, panels: Sequence[tuple[str, str]]) -> None:
        if not any(by_n(kind, metric) for kind in kinds for metric, _ in panels):
            return
        fig, axes = plt.subplots(len(kinds), len(panels), figsize=(4.5 * len(panels), 3.5 * len(kinds)), squeeze=False)
        for i, kind in enumerate(kinds):
            for j, (metric, label) in enumerate(panels):
                ax = axes[i][j]
                for n, points in by_n(kind, metric).items():
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"n={n}")
                ax.set_xscale("log")
                ks = sorted({p[0] for points in by_n(kind, metric).values() for p in points})
                ax.set_xticks(ks, [str(k) for k in ks])
                ax.minorticks_off()
                ax.set_xlabel("truncation interval k")
                ax.set_ylabel(label)
                ax.set_title(f"{label} ({kind} classifiers)")
                ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=100)
        plt.close(fig)
        written[name] = folder / f"{name}.png"

    line_figure("accuracy_vs_k", [("val/acc", "validation accuracy")])
    line_figure("memory_vs_k", [("peak_memory_mib", "peak memory (MiB)")])
    line_figure(
        "costs_vs_k",
        [("cost/memory_access", "memory accesses"), ("cost/additions", "additions"), ("cost/macs", "MACs")],
    )

    best: dict[tuple[str, Any], dict[str, Any]] = {}
    for r in finished:
        if math.isfinite(r.get("cost/fom", math.nan)):
            key = (str(r.get("classifier", "trainable")), r["n"])
            if key not in best or r["cost/fom"] < best[key]["cost/fom"]:
                best[key] = r
    if best:
        fig, ax = plt.subplots(figsize=(1.2 * len(best) + 3, 3.5))
        labels = [f"n={n}\n{kind}" for kind, n in best]
        bars = ax.bar(labels, [r["cost/fom"] for r in best.values()])
        for bar, r in zip(bars, best.values(), strict=True):
            ax.annotate(f"k={r['k']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
        ax.set_ylabel("figure of merit (lower is better)")
        ax.set_title("best k per block size (Eq. 18)")
        fig.tight_layout()
        fig.savefig(folder / "fom.png", dpi=100)
        plt.close(fig)
        written["fom"] = folder / "fom.png"
    return written


def report_main(argv: list[str] | None = None) -> int:
    """``tlbptt report <sweep dir>``: the results table, the paper's figures and a recommendation."""
    import argparse

    parser = argparse.ArgumentParser(prog="tlbptt report", description=report.__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--memory-budget", type=float, default=None, metavar="MIB", help="recommend within it")
    args = parser.parse_args(argv)
    written = report(args.sweep_dir, memory_budget_mib=args.memory_budget)
    print(written["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0
