"""``tlbptt train`` and ``examples/<dataset>.py``: a dataset's paper setting with a few flags (argparse).

Training runs here are a few optimizer steps on the offline MNIST-5k digits with T = 2 and tiny batches: they
check that the program wires model, data, strategy and logger together, not that anything learns.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from lightning.pytorch.core.saving import load_hparams_from_yaml

from tlbptt.train import _make_logger, train_command, train_main


def test_train_main_writes_a_csv_log(tmp_path: Path) -> None:
    argv = ["--T", "2", "--k", "1", "--n", "1", "--batch-size", "8", "--epochs", "1", "--accelerator", "cpu"]
    argv += ["--limit-train-batches", "2", "--limit-val-batches", "1", "--log-every-n-steps", "1"]
    argv += ["--log-dir", str(tmp_path), "--data-dir", str(tmp_path)]
    assert train_main("mnist5k", argv) == 0

    (run,) = (tmp_path / "mnist5k-k1-n1-trainable").iterdir()
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["train/loss_step"] for r in rows if r.get("train/loss_step")]  # logged by its own training_step
    assert [r["val/acc"] for r in rows if r.get("val/acc")]
    hparams = load_hparams_from_yaml(run / "hparams.yaml")
    assert (hparams["k"], hparams["n"], hparams["T"], hparams["method"]) == (1, 1, 2, "tlbptt")
    assert hparams["sj_neurons"] is False
    # the study's recipe by default: the paper's EMNIST rate (0.4 at batch 1,024) scaled to batch 8, output balanced
    assert hparams["lr"] == pytest.approx(0.4 * 8 / 1024) and hparams["balance_output"] is True


def test_the_papers_raw_settings_come_back_with_two_switches(tmp_path: Path) -> None:
    argv = ["--T", "2", "--k", "1", "--n", "1", "--batch-size", "8", "--epochs", "1", "--accelerator", "cpu"]
    argv += ["--limit-train-batches", "1", "--limit-val-batches", "1", "--log-dir", str(tmp_path)]
    assert train_main("mnist5k", [*argv, "--balance-output=false", "--scale_lr=False"]) == 0
    (run,) = (tmp_path / "mnist5k-k1-n1-trainable").iterdir()
    hparams = load_hparams_from_yaml(run / "hparams.yaml")
    assert hparams["lr"] == 0.2 and hparams["balance_output"] is False  # Table 1's lower end, at any batch


def test_wandb_logger_runs_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = _make_logger("wandb", str(tmp_path), "probe")
    logger.log_metrics({"train/loss": 0.5}, step=0)
    logger.experiment.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_bad_values_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; available datasets: cifar10"):
        train_main("mnist", [])
    assert train_command(["mnist"]) == 2  # usage, naming the datasets
    with pytest.raises(SystemExit):
        train_main("mnist5k", ["--download"])  # nothing to download: an argparse error
    with pytest.raises(ValueError, match="k must be a positive int or 'auto', got 0"):
        train_main("mnist5k", ["--k", "0", "--log-dir", str(tmp_path)])
