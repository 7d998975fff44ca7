"""Design-space sweeps over (k, n, classifier) without a W&B server, and the paper's figures from them.

A sweep template is a W&B sweep configuration (the same YAML ``wandb sweep`` takes). :func:`run_sweep`
asks W&B's own sweep engine (the ``sweeps`` package that ``wandb[sweeps]`` installs) for the next trial
(grid, random or bayes), runs it in this process, and records it in ``<out_dir>/sweep.json`` after every
trial, so a killed sweep resumes where it stopped: finished and failed trials are kept, an interrupted one
is run again. A failing trial is recorded as failed (with its traceback in its folder) and the sweep goes
on. :func:`tlbptt.report.report` turns a sweep folder into a results table and the paper's figures.

Online, a W&B agent runs the template's ``program`` once per trial, each run in its own process and maybe
on its own machine; the figure of merit's BPTT reference then comes from :func:`cached_reference`.
"""

from __future__ import annotations

import hashlib
import json
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
    "load_state",
    "load_template",
    "paper_trial",
    "run_sweep",
    "sweep_main",
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


def load_state(out_dir: Path) -> list[Trial]:
    """The trials recorded in a sweep folder (none before its first trial)."""
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
    trials = [t for t in load_state(out) if t.state != "running"]
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
    and ``seed``; ``scale_lr`` and ``balance_output`` (both true by default: the accuracy study's recipe, as
    ``train_main``'s flags of the same names; false gives the paper's raw settings). Standard BPTT of the same
    network and data is trained once per sweep folder (cached in ``reference.json``,
    :func:`~tlbptt.compare.bptt_reference`); it is the reference of the figure of merit (Eq. 18): measured peak
    memory and accuracy against it (a ``reference_acc`` parameter gives BPTT's accuracy instead, and the memory term
    is then the analytic ratio, as online), memory access, additions and MACs from the analytic model (densities 1,
    the reading that reproduces the paper's figures, see docs/costs.md). The trial is measured by the callbacks an
    online run logs with (:class:`~lightning_tlbptt.measure.MemoryMonitor`,
    :class:`~lightning_tlbptt.measure.CostMonitor`, every step), and its metrics are theirs (``val/acc``,
    ``cost/memory/total_bytes``, ``cost/fom``, ...), so a template's metric means the same online and offline.
    """
    import time

    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from lightning_tlbptt.measure import CostMonitor, MemoryMonitor
    from lightning_tlbptt.paper import PaperClassifier, dataset_spec, paper_setting
    from lightning_tlbptt.strategy import TruncatedLocalBPTT
    from tlbptt.cli import flag
    from tlbptt.compare import bptt_reference, quiet_trainer

    def truth(value: Any) -> bool:  # a YAML boolean, or the text a W&B agent passes on, read as train_main reads it
        return value if isinstance(value, bool) else flag(str(value))

    spec = dataset_spec(dataset)
    setting = paper_setting(dataset)
    static = setting["T"] is not None

    def build(params: dict[str, Any]) -> tuple[Any, PaperClassifier]:
        import lightning as L

        L.seed_everything(int(params.get("seed", 0)), verbose=False)
        steps = int(params.get("T", spec.n_steps))
        data = spec.make_datamodule(
            data_dir,
            batch_size=int(params.get("batch_size", spec.batch_size)),
            **({} if static else {"n_steps": steps}),
        )
        batch = int(params.get("batch_size", spec.batch_size))
        recipe_lr = paper_setting(dataset, batch_size=batch, scale_lr=truth(params.get("scale_lr", True)))["lr"]
        model = PaperClassifier(
            **{
                **setting,
                "T": steps if static else None,
                "lr": float(params.get("lr", recipe_lr)),
                "loss": params.get("loss", setting["loss"]),
                "balance_output": truth(params.get("balance_output", True)),
            }
        )
        return data, model

    def run_logger(save_dir: Path, name: str) -> CSVLogger | WandbLogger:
        return CSVLogger(save_dir, name=name) if logger == "csv" else WandbLogger(name=name, save_dir=str(save_dir))

    def finish() -> None:
        if logger == "wandb":
            import wandb

            wandb.finish()

    def run(params: dict[str, Any], trial_dir: Path) -> dict[str, float]:
        fit_settings = {"max_epochs": int(params.get("epochs", 1))}
        fit_settings |= {key: params[key] for key in ("limit_train_batches", "limit_val_batches") if key in params}
        reference_file = trial_dir.parent / "reference.json"
        if "reference_acc" in params:  # BPTT's accuracy given by the template: no reference run
            reference = {"val/acc": float(params["reference_acc"])}
        elif reference_file.is_file():
            reference = json.loads(reference_file.read_text())
        else:
            data, model = build(params)
            bptt_logger = run_logger(trial_dir.parent / "reference", "bptt")
            bptt_logger.log_hyperparams({"dataset": dataset, "method": "bptt", **params})
            reference = bptt_reference(model, data, every_n_steps=1, logger=bptt_logger, **fit_settings)
            finish()
            reference_file.write_text(json.dumps(reference))
        k, n, kind = int(params["k"]), int(params["n"]), str(params.get("classifier", "trainable"))
        strategy = TruncatedLocalBPTT(k=k, n=n, classifier=kind, loss=params.get("loss", setting["loss"]))
        trial_logger = run_logger(trial_dir, f"k{k}-n{n}-{kind}")
        trial_logger.log_hyperparams({"dataset": dataset, **params})
        memory = MemoryMonitor(1)
        cost = CostMonitor(
            1,
            reference_accuracy=reference["val/acc"],
            reference_memory_bytes=reference.get("cost/memory/total_bytes"),
        )
        data, model = build(params)
        trainer = quiet_trainer(strategy, logger=trial_logger, callbacks=[memory, cost], **fit_settings)
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        seconds = time.perf_counter() - start
        finish()
        if "cost/fom" not in cost.metrics:
            raise ValueError("the trial logged no val/acc after training: the figure of merit needs validation")
        return {
            "val/acc": float(trainer.callback_metrics["val/acc"]),
            "seconds": seconds,
            **memory.metrics,
            **cost.metrics,
            "reference/val_acc": reference["val/acc"],
        }

    return run


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
    from lightning_tlbptt.paper import DATASETS

    if dataset not in DATASETS:
        parser.error(f"unknown dataset {dataset!r}: pass --dataset, one of {', '.join(DATASETS)}")
    out = args.out or Path("sweeps") / args.template.stem
    trials = run_sweep(
        config, out, paper_trial(dataset, data_dir=args.data_dir, logger=args.logger), max_trials=args.max_trials
    )
    done = sum(t.state == "finished" for t in trials)
    print(f"{len(trials)} trials in {out} ({done} finished, {len(trials) - done} failed); `tlbptt report {out}`")
    return 0
