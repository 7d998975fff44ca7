"""``tlbptt train`` and ``examples/<dataset>.py``: train a dataset's paper setting with a few flags (argparse).

:func:`train_main` is the shared implementation of every ``examples/<dataset>.py``: the paper setting of
:data:`~lightning_tlbptt.paper.settings.DATASETS` with ``--k``, ``--n``, ``--bptt`` and hyperparameter flags; it is
also the ``program`` a W&B agent runs for the sweep templates of ``examples/sweeps/`` (it logs the templates' metric,
``cost/fom``). The same settings through LightningCLI: :mod:`tlbptt.lightning_cli`.

The defaults are the recipe the accuracy study found (``docs/results.md``): the output layer's bias balanced from one
batch (``--balance-output``) and the learning rate scaled from Table 1's batch to ``--batch-size`` (``--scale-lr``);
``--balance-output=false --scale-lr=false`` gives the paper's raw settings back.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from lightning_tlbptt import _lightning
from lightning_tlbptt.ddp import TruncatedLocalBPTT, TruncatedLocalBPTTDDP
from lightning_tlbptt.measure import CostMonitor, MemoryMonitor
from lightning_tlbptt.paper import DATASETS, PaperClassifier, dataset_spec, paper_setting
from tlbptt.cli import flag as _flag

__all__ = ["train_command", "train_main", "train_parser"]


def _count_or_fraction(text: str) -> int | float:
    # Lightning reads an int as a number of batches and a float as a fraction of the epoch ("1" vs "1.0").
    return float(text) if "." in text else int(text)


def _names(flag: str) -> tuple[str, ...]:
    # `--batch-size` also answers to `--batch_size`: a W&B agent passes a sweep parameter `batch_size` as
    # `--batch_size=...`, and the templates name parameters the way `tlbptt sweep` reads them.
    return (flag, "--" + flag[2:].replace("-", "_")) if "-" in flag[2:] else (flag,)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where there is one; the ``--long_flag`` spellings left to the epilog."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if len(action.option_strings) == 2 and action.option_strings[1] == _names(action.option_strings[0])[-1]:
            action = copy.copy(action)
            action.option_strings = action.option_strings[:1]
        return super()._format_action_invocation(action)


def _make_logger(kind: str, save_dir: str, name: str) -> Logger:
    if kind == "csv":
        return CSVLogger(save_dir, name=name)
    # wandb reads WANDB_MODE itself: WANDB_MODE=offline keeps the run on disk, for `wandb sync` later. Under a
    # W&B agent (WANDB_SWEEP_ID, WANDB_RUN_ID set) the run joins the agent's sweep and project.
    return WandbLogger(project="lightning-tlbptt", name=name, save_dir=save_dir)


# train_main's options that change what standard BPTT reaches: the key of a cached reference run.
_REFERENCE_SETTINGS = (
    "loss",
    "lr",
    "balance_output",
    "dropout",
    "batch_size",
    "T",
    "epochs",
    "seed",
    "max_steps",
    "limit_train_batches",
    "limit_val_batches",
)


def _device_kind(accelerator: str) -> str:
    import torch

    if accelerator in ("auto", "gpu"):
        if torch.cuda.is_available():
            return "cuda"
        if accelerator == "gpu" or torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    return accelerator


def train_parser(dataset: str, *, k: int = 5, n: int = 2) -> argparse.ArgumentParser:
    """The command line of :func:`train_main` (and of ``examples/<dataset>.py``), with defaults ``k``, ``n``."""
    spec = dataset_spec(dataset)
    setting = paper_setting(dataset)
    in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
    parser = argparse.ArgumentParser(
        prog=f"{dataset}.py",
        description=f"Train {spec.model} on {dataset} with TruncatedLocalBPTT (or plain BPTT), the paper's "
        f"setting (Table 1) unless changed. {spec.note}".strip(),
        epilog="Every --long-flag also answers to its --long_flag spelling, as a W&B agent writes sweep parameters.",
        formatter_class=_HelpFormatter,
    )

    def add(group: argparse._ArgumentGroup, flag: str, **kwargs: Any) -> None:
        group.add_argument(*_names(flag), **kwargs)

    def switch(group: argparse._ArgumentGroup, flag: str, help: str, default: bool = False) -> None:
        add(group, flag, type=_flag, nargs="?", const=True, default=default, metavar="BOOL", help=help)

    method = parser.add_argument_group("training method")
    add(method, "--k", type=int, default=k, help="time steps per truncation interval")
    add(method, "--n", type=int, default=n, help="layers per local block")
    add(method, "--classifier", choices=("trainable", "random"), default="trainable", help="local classifiers")
    switch(method, "--bptt", "plain BPTT over the whole T (ignores k, n, classifier)")
    switch(method, "--sj-neurons", "SpikingJelly's own LIF loop instead of the strategy's kernel")
    hyper = parser.add_argument_group("hyperparameters (defaults: the paper's, with the accuracy study's recipe)")
    add(hyper, "--loss", choices=("mse", "ce"), default=setting["loss"], help="output and local losses")
    add(
        hyper,
        "--lr",
        type=float,
        default=None,
        help=f"learning rate; default: {spec.recipe_lr:g} at Table 1's batch of {spec.lr_batch_size} scaled to "
        f"--batch-size ({setting['lr']:g} at {spec.batch_size}); with --scale-lr=false Table 1's lower end, "
        f"{spec.lr_range[0]:g} (range {spec.lr_range})",
    )
    switch(hyper, "--scale-lr", "scale the default learning rate to --batch-size (false: the paper's raw value)", True)
    switch(
        hyper,
        "--balance-output",
        "balance the output layer's bias from one batch when training starts (false: PyTorch's default init, as the "
        "paper)",
        True,
    )
    add(hyper, "--dropout", type=float, default=setting["dropout"], help=f"Table 1 range: {spec.dropout_range}")
    add(hyper, "--batch-size", type=int, default=spec.batch_size, help="samples per batch")
    add(hyper, "--T", type=int, default=spec.n_steps, help="time steps (event data: frames per sample)")
    add(hyper, "--epochs", type=int, default=100, help="training epochs (the paper: 100)")
    add(hyper, "--seed", type=int, default=0, help="seed of the weights and the shuffling")
    fom = parser.add_argument_group("figure of merit (cost/fom, Eq. 18; the sweep templates' metric)")
    add(
        fom,
        "--fom",
        type=_flag,
        nargs="?",
        const=True,
        default=None,
        metavar="BOOL",
        help="log cost/fom after every validation (default: under a W&B agent, or with --reference-acc)",
    )
    add(
        fom,
        "--reference-acc",
        type=float,
        default=None,
        help="BPTT's validation accuracy on this task, a fraction; default: a cached BPTT run of the same settings",
    )
    add(
        fom,
        "--reference-dir",
        type=Path,
        default=None,
        help="cache of BPTT reference runs, shared by the trials of a sweep "
        "(default: $XDG_CACHE_HOME/lightning_tlbptt/references)",
    )
    runtime = parser.add_argument_group("run")
    add(runtime, "--data-dir", default="data", help="dataset root (EventMNIST: its cache)")
    switch(runtime, "--download", "let the data module download missing files")
    add(
        runtime,
        "--logger",
        choices=("csv", "wandb"),
        default="wandb" if in_sweep else "csv",
        help="wandb honours WANDB_MODE=offline; wandb by default under a W&B agent",
    )
    add(runtime, "--log-dir", default="logs", help="logs and checkpoints, under <log-dir>/<run name>")
    add(runtime, "--accelerator", default="auto", help="cpu, gpu, ... or auto")
    add(runtime, "--devices", default="auto", help="a count, a list like 0,1, or auto (as Trainer reads it)")
    add(runtime, "--num-workers", type=int, default=0, help="DataLoader workers")
    add(runtime, "--log-every-n-steps", type=int, default=50, help="training batches between logged rows")
    add(runtime, "--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    add(runtime, "--limit-train-batches", type=_count_or_fraction, default=None, help="batches, or a fraction: 0.1")
    add(runtime, "--limit-val-batches", type=_count_or_fraction, default=None, help="batches, or a fraction: 0.1")
    return parser


def train_main(dataset: str, argv: list[str] | None = None, *, k: int = 5, n: int = 2) -> int:
    """Train on ``dataset`` with its paper setting (Table 1), changed by command-line flags.

    The shared implementation of ``examples/<dataset>.py``: ``--k``/``--n`` choose TruncatedLocalBPTT's
    truncation interval and block size (defaults ``k``, ``n``: each script passes the paper's choice for its
    dataset), ``--bptt`` plain BPTT instead; the paper's schedule (step decay by 2 every 20 epochs, 100 epochs)
    is the default. Every run logs measured memory and the analytic costs (:class:`MemoryMonitor`,
    :class:`CostMonitor`).

    The figure of merit (``cost/fom``, Eq. 18, the metric of the sweep templates) needs BPTT's accuracy on the
    same task: ``--reference-acc`` gives it, else a BPTT run of the same settings is trained once and cached
    (:func:`~tlbptt.sweeps.cached_reference`, under ``--reference-dir``) and every later run with
    the same settings reads it. The figure of merit is logged with ``--fom``, with ``--reference-acc``, and
    by default under a W&B agent (``WANDB_SWEEP_ID`` set), which also makes ``wandb`` the default logger. The
    agent passes the template's parameters as ``--name=value``: every flag also accepts ``_`` for ``-``, and
    switches accept ``=True``/``=False``.

    Args:
        dataset: a key of :data:`~lightning_tlbptt.paper.settings.DATASETS`.
        argv: the flags (``--help`` lists them); ``None`` reads ``sys.argv``.
        k: default of ``--k``.
        n: default of ``--n``.

    Returns:
        The exit status, 0.
    """
    spec = dataset_spec(dataset)
    setting = paper_setting(dataset)
    static = spec.static
    in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
    parser = train_parser(dataset, k=k, n=n)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be a positive int, got {args.batch_size}")
    if args.lr is None:  # the recipe's learning rate for this batch (or the paper's raw one): one value to log
        args.lr = paper_setting(dataset, batch_size=args.batch_size, scale_lr=args.scale_lr)["lr"]

    accepted = inspect.signature(spec.datamodule).parameters
    if args.download and "download" not in accepted:
        parser.error(f"{dataset} has nothing to download")
    if args.reference_acc is not None and not 0.0 <= args.reference_acc <= 1.0:
        parser.error(f"--reference-acc is a fraction in [0, 1], got {args.reference_acc}")
    data_overrides: dict[str, Any] = {"batch_size": args.batch_size, "num_workers": args.num_workers}
    if args.download:
        data_overrides["download"] = True
    if not static:
        data_overrides["n_steps"] = args.T

    def build() -> tuple[pl.LightningDataModule, PaperClassifier]:
        pl.seed_everything(args.seed)
        datamodule = spec.make_datamodule(args.data_dir, **data_overrides)
        model = PaperClassifier(
            **{
                **setting,
                "T": args.T if static else None,
                "loss": args.loss,
                "lr": args.lr,
                "dropout": args.dropout,
                "balance_output": args.balance_output,
            }
        )
        return datamodule, model

    if args.bptt:
        strategy: str | TruncatedLocalBPTT = "auto"
        run_name = f"{dataset}-bptt"
    else:
        # one process per device when the Trainer will use several (as Lightning's own "auto" picks DDP)
        several = _lightning.device_count(args.accelerator, args.devices) > 1
        strategy = (TruncatedLocalBPTTDDP if several else TruncatedLocalBPTT)(
            k=args.k, n=args.n, classifier=args.classifier, loss=args.loss, fast_neurons=not args.sj_neurons
        )
        run_name = f"{dataset}-k{args.k}-n{args.n}-{args.classifier}"
    trainer_settings: dict[str, Any] = dict(
        accelerator=args.accelerator,
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_val_batches,
    )

    reference: dict[str, Any] = {}
    if args.fom if args.fom is not None else (in_sweep or args.reference_acc is not None):
        if args.reference_acc is not None:
            reference = {"reference/val_acc": args.reference_acc, "reference/source": "--reference-acc"}
        else:

            def train_reference() -> dict[str, float]:
                datamodule, model = build()
                return bptt_reference(model, datamodule, **trainer_settings)

            from lightning_tlbptt import __version__
            from tlbptt.compare import bptt_reference
            from tlbptt.sweeps import cached_reference, default_reference_dir

            key = {
                "dataset": dataset,
                "version": __version__,
                "device": _device_kind(args.accelerator),
                **{name: getattr(args, name) for name in _REFERENCE_SETTINGS},
            }
            metrics, path = cached_reference(args.reference_dir or default_reference_dir(), key, train_reference)
            reference = {"reference/val_acc": metrics["val/acc"], "reference/source": str(path)}
            if "cost/memory/total_bytes" in metrics:
                reference["reference/memory_bytes"] = metrics["cost/memory/total_bytes"]

    datamodule, model = build()
    logger = _make_logger(args.logger, args.log_dir, run_name)
    hyperparams = {"dataset": dataset, "method": "bptt" if args.bptt else "tlbptt", **vars(args), **reference}
    logger.log_hyperparams({name: str(v) if isinstance(v, Path) else v for name, v in hyperparams.items()})
    monitors = [
        MemoryMonitor(),
        CostMonitor(
            reference_accuracy=reference.get("reference/val_acc"),
            reference_memory_bytes=reference.get("reference/memory_bytes"),
        ),
    ]
    trainer = pl.Trainer(
        strategy=strategy,
        devices=args.devices,
        logger=logger,
        log_every_n_steps=args.log_every_n_steps,
        callbacks=monitors,
        **trainer_settings,
    )
    trainer.fit(model, datamodule=datamodule)
    return 0


def train_command(argv: list[str]) -> int:
    """``tlbptt train <dataset> [flags]``: :func:`train_main` for any dataset of ``DATASETS``."""
    if not argv or argv[0] not in DATASETS:
        names = ", ".join(DATASETS)
        print(f"usage: tlbptt train {{{names}}} [flags]   (tlbptt train <dataset> --help)", file=sys.stderr)
        return 2
    return train_main(argv[0], argv[1:])
