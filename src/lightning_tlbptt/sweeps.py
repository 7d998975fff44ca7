"""Design-space sweeps over (k, n, classifier) without a W&B server, and the paper's figures from them.

A sweep template is a W&B sweep configuration (the same YAML ``wandb sweep`` takes). :func:`run_sweep`
asks W&B's own sweep engine (the ``sweeps`` package that ``wandb[sweeps]`` installs) for the next trial
(grid, random or bayes), runs it in this process, and records it in ``<out_dir>/sweep.json`` after every
trial, so a killed sweep resumes where it stopped: finished and failed trials are kept, an interrupted one
is run again. A failing trial is recorded as failed (with its traceback in its folder) and the sweep goes
on. :func:`report` turns a sweep folder into a results table and the paper's figures.

Online, a W&B agent runs the template's ``program`` once per trial, each run in its own process and maybe
on its own machine; the figure of merit's BPTT reference then comes from :func:`cached_reference`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "Trial",
    "TrialFn",
    "cached_reference",
    "default_reference_dir",
    "load_template",
    "paper_trial",
    "recommend",
    "report",
    "run_sweep",
]

TrialFn = Callable[[dict[str, Any], Path], dict[str, float]]
"""``(parameters, trial_dir) -> summary metrics``; raises to mark the trial failed."""

STATE_FILE = "sweep.json"


@dataclass
class Trial:
    """One run of the sweep: its parameters, its state and its summary metrics."""

    name: str
    parameters: dict[str, Any]
    state: Literal["running", "finished", "failed"] = "running"
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def load_template(template: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Read a W&B sweep template and validate it against W&B's own sweep-config schema."""
    from sweeps import schema_violations_from_proposed_config

    config = dict(template) if isinstance(template, Mapping) else yaml.safe_load(Path(template).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"sweep template {template} must be a YAML mapping (a W&B sweep config)")
    # `run_cap` is a key of W&B's server-side sweep config that the engine's own schema does not list
    violations = schema_violations_from_proposed_config({k: v for k, v in config.items() if k != "run_cap"})
    if violations:
        raise ValueError(f"sweep template {template} is not a valid W&B sweep config: " + "; ".join(violations))
    return config


def _load_state(out_dir: Path) -> list[Trial]:
    path = out_dir / STATE_FILE
    if not path.is_file():
        return []
    return [Trial(**t) for t in json.loads(path.read_text())["trials"]]


def _save_state(out_dir: Path, config: Mapping[str, Any], trials: Sequence[Trial]) -> None:
    path = out_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"template": config, "trials": [asdict(t) for t in trials]}, indent=1, default=str))
    os.replace(tmp, path)  # atomic: a sweep killed while saving keeps its previous state


def _as_sweep_run(trial: Trial) -> Any:
    from sweeps import RunState, SweepRun

    return SweepRun(
        name=trial.name,
        config={key: {"value": value} for key, value in trial.parameters.items()},
        state=RunState.finished if trial.state == "finished" else RunState.failed,
        summary_metrics=trial.metrics,
        history=[trial.metrics] if trial.metrics else [],
    )


def run_sweep(
    template: str | Path | Mapping[str, Any],
    out_dir: str | Path,
    trial_fn: TrialFn,
    *,
    max_trials: int | None = None,
) -> list[Trial]:
    """Run (or resume) the sweep of ``template`` in ``out_dir``.

    Args:
        template: a W&B sweep config (path or mapping).
        out_dir: where ``sweep.json`` and one folder per trial live.
        trial_fn: runs one trial.
        max_trials: stop after this many new trials; the template's ``run_cap`` bounds the whole sweep
            (random and bayes searches need one of the two to end).

    Returns:
        All trials of the sweep, earlier ones included.
    """
    from sweeps import next_run

    config = load_template(template)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # an interrupted trial has no result: drop it so that the engine proposes it again
    trials = [t for t in _load_state(out) if t.state != "running"]
    cap = config.get("run_cap")
    if config["method"] != "grid" and cap is None and max_trials is None:
        raise ValueError(
            f"a {config['method']} sweep never runs out of trials: set run_cap in the template or pass max_trials"
        )
    engine_config = {key: value for key, value in config.items() if key != "run_cap"}
    started = 0
    while (max_trials is None or started < max_trials) and (cap is None or len(trials) < cap):
        proposal = next_run(engine_config, [_as_sweep_run(t) for t in trials], validate=True)
        if proposal is None:
            break
        trial = Trial(name=f"trial-{len(trials):03d}", parameters={k: v["value"] for k, v in proposal.config.items()})
        trials.append(trial)
        _save_state(out, config, trials)
        trial_dir = out / trial.name
        trial_dir.mkdir(exist_ok=True)
        try:
            trial.metrics = {k: float(v) for k, v in trial_fn(dict(trial.parameters), trial_dir).items()}
            trial.state = "finished"
        except Exception as err:  # a failing trial is recorded, the sweep goes on
            trial.state = "failed"
            trial.error = f"{type(err).__name__}: {err}"
            (trial_dir / "error.txt").write_text(traceback.format_exc())
        _save_state(out, config, trials)
        started += 1
    return trials


def default_reference_dir() -> Path:
    """Where :func:`cached_reference` keeps BPTT reference runs: ``$XDG_CACHE_HOME/lightning_tlbptt/references``."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lightning_tlbptt" / "references"


def cached_reference(
    cache_dir: str | Path, key: Mapping[str, Any], compute: Callable[[], dict[str, float]]
) -> tuple[dict[str, float], Path]:
    """The BPTT reference of the figure of merit for ``key``: read from ``cache_dir``, or computed once.

    W&B agents run every trial in a fresh process, so a reference kept in memory or in one sweep folder
    (as :func:`paper_trial` does offline) is not seen by the next trial. Here the reference lives in
    ``<cache_dir>/<digest of key>.json``: the first trial that needs it runs ``compute`` (trains standard
    BPTT) and writes it, every later trial with the same ``key`` reads it. ``key`` must hold every setting
    that changes the reference's result (dataset, T, batch size, learning rate, epochs, seed, ...). Agents
    on one machine wait for each other on a lock file (POSIX), so the reference is trained once; agents on
    different machines share it when ``cache_dir`` is on a shared file system, else each trains its own.

    Returns:
        The reference metrics and the file they are kept in.
    """
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(key), sort_keys=True, default=str)
    path = folder / f"{key.get('dataset', 'reference')}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    with path.with_suffix(".lock").open("w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except ImportError:  # Windows: no lock; concurrent first trials may each train the reference
            pass
        if path.is_file():
            return json.loads(path.read_text())["metrics"], path
        metrics = {name: float(value) for name, value in compute().items()}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": json.loads(text), "metrics": metrics}, indent=1))
        os.replace(tmp, path)
    return metrics, path


def paper_trial(
    dataset: str, *, data_dir: str | Path | None = None, logger: Literal["csv", "wandb"] = "csv"
) -> TrialFn:
    """The trial of the paper's study on ``dataset``: train its Table 2 network with TruncatedLocalBPTT.

    Parameters a template may set: ``k``, ``n``, ``classifier``, ``epochs`` (default 1), and the paper
    setting's ``lr``, ``loss``, ``batch_size`` and ``T``, plus ``limit_train_batches``/``limit_val_batches``
    and ``seed``. Standard BPTT of the same network and data is trained once per sweep folder (cached in
    ``reference.json``); it is the reference of the figure of merit (Eq. 18): measured peak memory and
    accuracy against it (a ``reference_acc`` parameter gives BPTT's accuracy instead, and the memory term is
    then the analytic ratio, as online), memory access, additions and MACs from the analytic model (densities 1, the
    reading that reproduces the paper's figures, see docs/costs.md). Metric keys are those the callbacks
    log (``val/acc``, ``cost/fom``, ...), so a template's metric means the same online and offline.
    """
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from lightning_tlbptt.compare import RunResult, fit_and_measure
    from lightning_tlbptt.costs import figure_of_merit, profile
    from lightning_tlbptt.data import DATASETS
    from lightning_tlbptt.paper import PaperClassifier, paper_setting
    from lightning_tlbptt.strategy import TruncatedLocalBPTT

    spec = DATASETS[dataset]
    setting = paper_setting(dataset)
    static = setting["T"] is not None

    def train(params: dict[str, Any], strategy: str | TruncatedLocalBPTT, save_dir: Path, name: str) -> RunResult:
        import lightning as L

        L.seed_everything(int(params.get("seed", 0)), verbose=False)
        steps = int(params.get("T", spec.n_steps))
        data = spec.make_datamodule(
            data_dir,
            batch_size=int(params.get("batch_size", spec.batch_size)),
            **({} if static else {"n_steps": steps}),
        )
        model = PaperClassifier(
            **{
                **setting,
                "T": steps if static else None,
                "lr": float(params.get("lr", setting["lr"])),
                "loss": params.get("loss", setting["loss"]),
            }
        )
        run_logger = (
            CSVLogger(save_dir, name=name) if logger == "csv" else WandbLogger(name=name, save_dir=str(save_dir))
        )
        run_logger.log_hyperparams({"dataset": dataset, **params})
        limits = {key: params[key] for key in ("limit_train_batches", "limit_val_batches") if key in params}
        result = fit_and_measure(
            name, model, data, strategy=strategy, max_epochs=int(params.get("epochs", 1)), logger=run_logger, **limits
        )
        if logger == "wandb":
            import wandb

            wandb.finish()
        return result

    def run(params: dict[str, Any], trial_dir: Path) -> dict[str, float]:
        reference_file = trial_dir.parent / "reference.json"
        if "reference_acc" in params:  # BPTT's accuracy given by the template: no reference run
            reference = {"val/acc": float(params["reference_acc"])}
        elif reference_file.is_file():
            reference = json.loads(reference_file.read_text())
        else:
            bptt = train(params, "auto", trial_dir.parent / "reference", "bptt")
            reference = {"val/acc": bptt.val_acc, "cost/memory/total_bytes": bptt.peak_bytes}
            reference_file.write_text(json.dumps(reference))
        k, n, kind = int(params["k"]), int(params["n"]), str(params.get("classifier", "trainable"))
        strategy = TruncatedLocalBPTT(k=k, n=n, classifier=kind, loss=params.get("loss", setting["loss"]))
        result = train(params, strategy, trial_dir, f"k{k}-n{n}-{kind}")
        steps = int(params.get("T", spec.n_steps))
        prof = profile(
            spec.make_model(), (spec.in_channels, *spec.input_size), classifier_pool=strategy.classifier_pool
        )
        batch = int(params.get("batch_size", spec.batch_size))
        costs = prof.estimate(T=steps, k=k, n=n, batch_size=batch, classifier=kind)
        ratios = costs.relative_to(prof.bptt(T=steps, batch_size=batch))
        measured = reference.get("cost/memory/total_bytes")
        memory_ratio = result.peak_bytes / measured if measured else ratios.memory
        accuracy_loss = reference["val/acc"] - result.val_acc
        return {
            "val/acc": result.val_acc,
            "cost/memory/total_bytes": result.peak_bytes,
            "seconds": result.seconds,
            "cost/reads": costs.reads,
            "cost/writes": costs.writes,
            "cost/memory_access": costs.memory_access,
            "cost/additions": costs.additions,
            "cost/macs": costs.macs,
            "cost/ratio/memory": memory_ratio,
            "cost/ratio/memory_access": ratios.memory_access,
            "cost/ratio/additions": ratios.additions,
            "cost/ratio/macs": ratios.macs,
            "cost/accuracy_loss": accuracy_loss,
            "cost/fom": figure_of_merit(
                accuracy_loss, memory_ratio, ratios.memory_access, ratios.additions, ratios.macs
            ),
            "reference/val_acc": reference["val/acc"],
        }

    return run


# --------------------------------------------------------------------------------------------- report

_COLUMNS = (
    ("k", "k"),
    ("n", "n"),
    ("classifier", "classifier"),
    ("val/acc", "accuracy"),
    ("peak_memory_mib", "peak memory (MiB)"),
    ("cost/ratio/memory", "memory / BPTT"),
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
    trials = _load_state(folder)
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


def sweep_main(argv: list[str] | None = None) -> int:
    """``tlbptt sweep <template>``: run a W&B sweep template with no W&B server."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="tlbptt sweep",
        description="Run (or resume) a W&B sweep template offline: W&B's sweep engine proposes the trials, each "
        "is trained here and logged as CSV or an offline W&B run. Rerun the same command to resume.",
    )
    parser.add_argument("template", type=Path, help="W&B sweep YAML, e.g. examples/sweeps/mnist5k.yaml")
    parser.add_argument("--out", type=Path, default=None, help="sweep folder (default: sweeps/<template name>)")
    parser.add_argument("--dataset", default=None, help="dataset (default: the name of the template's program)")
    parser.add_argument("--data-dir", default=None, help="dataset root")
    parser.add_argument("--max-trials", type=int, default=None, help="stop after this many new trials")
    parser.add_argument("--logger", choices=("csv", "wandb"), default="csv", help="wandb honours WANDB_MODE")
    args = parser.parse_args(argv)
    config = load_template(args.template)
    dataset = args.dataset or Path(str(config.get("program", ""))).stem
    from lightning_tlbptt.data import DATASETS

    if dataset not in DATASETS:
        parser.error(f"unknown dataset {dataset!r}: pass --dataset, one of {', '.join(DATASETS)}")
    out = args.out or Path("sweeps") / args.template.stem
    trials = run_sweep(
        config, out, paper_trial(dataset, data_dir=args.data_dir, logger=args.logger), max_trials=args.max_trials
    )
    done = sum(t.state == "finished" for t in trials)
    print(f"{len(trials)} trials in {out} ({done} finished, {len(trials) - done} failed); `tlbptt report {out}`")
    return 0


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
