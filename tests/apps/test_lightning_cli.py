"""``tlbptt fit``: LightningCLI over PaperClassifier, the per-dataset configs and their example scripts.

Training runs here are a few optimizer steps on the offline MNIST-5k digits with T <= 4 and tiny batches: they
check that the programs wire model, data, strategy and logger together, not that anything learns.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from lightning_tlbptt import TruncatedLocalBPTT
from lightning_tlbptt.paper import DATASETS, PaperClassifier, paper_setting
from tlbptt.lightning_cli import build_cli, fit_main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIGS = EXAMPLES / "configs"
MNIST5K = str(CONFIGS / "mnist5k.yaml")


def _quick(tmp_path: Path) -> list[str]:
    """LightningCLI options shrinking the MNIST-5k config to seconds: T = 4, two batches of 8 to train and validate."""
    return [
        "--model.T=4",
        "--data.init_args.batch_size=8",
        "--trainer.max_epochs=1",
        # 2, not 1: LightningCLI reads "1" as the float 1.0, i.e. the whole epoch
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def test_lightning_cli_trains_with_tlbptt_then_validates_and_trains_with_bptt(tmp_path: Path) -> None:
    cli = build_cli(["fit", "--config", MNIST5K, *_quick(tmp_path), "--trainer.strategy.init_args.k=2"])
    assert isinstance(cli.trainer.strategy, TruncatedLocalBPTT)
    assert (cli.trainer.strategy.k, cli.trainer.strategy.n) == (2, 2)
    assert cli.trainer.global_step == 4  # two batches of T = 4 in chunks of k = 2
    checkpoint = next(Path(cli.trainer.log_dir).glob("checkpoints/*.ckpt"))

    # The checkpoint holds the local classifiers; validating with it must not need them.
    assert fit_main(["validate", "--config", MNIST5K, *_quick(tmp_path), f"--ckpt_path={checkpoint}"]) == 0

    cli = build_cli(["fit", "--config", MNIST5K, *_quick(tmp_path), "--trainer.strategy=auto"])
    assert not isinstance(cli.trainer.strategy, TruncatedLocalBPTT)
    assert cli.trainer.global_step == 2  # one optimizer step per batch
    assert "val/acc" in cli.trainer.callback_metrics


def test_every_dataset_has_a_config_and_an_example() -> None:
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(DATASETS)
    assert set(DATASETS) <= {p.stem for p in EXAMPLES.glob("*.py")}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_config_instantiates_the_paper_setting(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # Instantiating does not read data files: data modules look for them in setup only.
    cli = build_cli(["--config", str(CONFIGS / f"{name}.yaml"), "--trainer.logger=false"], run=False)

    assert isinstance(cli.model, PaperClassifier)
    setting = paper_setting(name)
    if setting["optimizer"] == "adam":
        del setting["momentum"]  # unused by Adam, so the config leaves it out
    for key, value in setting.items():
        assert _normalise(cli.model.hparams[key]) == _normalise(value), key
    assert cli.model.hparams["balance_output"] is True  # the study's recipe, as PaperClassifier's default

    spec = DATASETS[name]
    expected = spec.make_datamodule("data")
    assert type(cli.datamodule) is spec.datamodule
    for attribute in ("batch_size", "n_steps", "dt_ms", "input_size"):
        assert getattr(cli.datamodule, attribute, None) == getattr(expected, attribute, None), attribute

    strategy = cli.trainer.strategy
    assert isinstance(strategy, TruncatedLocalBPTT)
    assert strategy.loss_fn is cli.model.loss_fn, "the local blocks must use the model's loss"

    # The example script defaults to the config's (k, n).
    script = ast.parse((EXAMPLES / f"{name}.py").read_text())
    (call,) = [n for n in ast.walk(script) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "train_main"]
    assert [ast.literal_eval(a) for a in call.args] == [name]
    assert {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords} == {"k": strategy.k, "n": strategy.n}


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--model.in_channels=2", "the data have in_channels=1, the model in_channels=2"),
        ("--model.T=null", "set the model's T"),
    ],
)
def test_model_that_does_not_fit_the_data_fails_before_training(tmp_path: Path, option: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_cli(["fit", "--config", MNIST5K, *_quick(tmp_path), option])


def test_bad_values_fail_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="k must be a positive int or 'auto', got 0"):
        build_cli(["--config", MNIST5K, "--trainer.strategy.init_args.k=0"], run=False)
    with pytest.raises(ValueError, match="unknown model 'lenet9'; available models: alexnet"):
        build_cli(["--config", MNIST5K, "--model.model=lenet9"], run=False)
