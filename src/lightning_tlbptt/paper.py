"""The paper's experiments as programs: a LightningModule configured by plain values, LightningCLI, scripts.

Three ways to run a paper setting (Guo et al. 2023, Table 1 and section 3.1), from most to least flexible:

* ``tlbptt fit --config examples/configs/<dataset>.yaml``: LightningCLI (:func:`fit_main`); every value of
  the model, the data module, the Trainer and the strategy lives in the YAML and can be overridden on the
  command line, e.g. ``--trainer.strategy.init_args.k=2`` or ``--trainer.strategy=auto`` (plain BPTT);
* ``python examples/<dataset>.py --k 5 --n 2``: argparse (:func:`train_main`), the paper setting of
  :data:`~lightning_tlbptt.data.DATASETS` with a few flags; also the ``program`` a W&B agent runs for the
  sweep templates of ``examples/sweeps/`` (it logs the templates' metric, ``cost/fom``);
* :class:`PaperClassifier` and :func:`paper_setting` from Python.

The paper's values are read from :data:`~lightning_tlbptt.data.DATASETS` only; the YAML files repeat them
because LightningCLI configs are plain files, and ``tests/test_paper.py`` checks that they agree.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from lightning_tlbptt.callbacks import CostMonitor, MemoryMonitor
from lightning_tlbptt.data import DATASETS, DatasetSpec
from lightning_tlbptt.layout import BatchLayout
from lightning_tlbptt.models import PaperNeuron, build_model
from lightning_tlbptt.module import SpikingClassifier
from lightning_tlbptt.strategy import TruncatedLocalBPTT

__all__ = ["PaperClassifier", "build_cli", "fit_main", "paper_setting", "train_command", "train_main", "train_parser"]


class PaperClassifier(SpikingClassifier):
    """:class:`SpikingClassifier` that builds a Table 2 network itself from plain values.

    LightningCLI and YAML configs can only pass values, not an ``nn.Module``; this class takes the network's
    name and sizes instead, and saves every argument as a hyperparameter, so that
    ``PaperClassifier.load_from_checkpoint(path)`` rebuilds the same network.

    Input ``[B, T, C, H, W]`` event frames (``T=None``), or static ``[B, C, H, W]`` images repeated over ``T``
    steps (the paper's direct encoding); output ``[T, B, num_classes]``.

    Args:
        model: a key of :data:`~lightning_tlbptt.models.MODELS` (``lenet1``, ``lenet2``, ``alexnet``,
            ``vgg11``, ``resnet18``).
        in_channels: ``C`` of the input (1 for grey images, 3 for RGB, 2 event polarities).
        num_classes: width of the output layer.
        input_size: ``(H, W)`` of the input.
        tau_p: the paper's leaky constant (decay factor per step, Table 1's "tau").
        u_th: firing threshold.
        a: width of the rectangular surrogate gradient.
        dropout: dropout rate after every hidden layer (0 disables it).
        T: time steps to repeat static images over; ``None`` for event data, whose batches carry ``T``.
        batch_layout: ``"BT"`` (``[B, T, ...]``, tonic's layout) or ``"TB"``.
        loss: ``"mse"`` on output firing rates (Eq. 3; LeNet, AlexNet) or ``"ce"`` (VGG11, ResNet18).
        optimizer: ``"sgd"`` with ``momentum`` (LeNet, AlexNet) or ``"adam"`` (VGG11, ResNet18).
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        lr_step_epochs: halve (``lr_gamma``) the learning rate every this many epochs (20 in the paper).
        lr_gamma: factor of that step decay.
    """

    def __init__(
        self,
        model: str = "lenet1",
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: tuple[int, int] = (28, 28),
        tau_p: float = 0.8,
        u_th: float = 0.5,
        a: float = 0.5,
        dropout: float = 0.0,
        T: int | None = None,
        batch_layout: BatchLayout = "BT",
        loss: Literal["mse", "ce"] = "mse",
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_step_epochs: int = 20,
        lr_gamma: float = 0.5,
    ) -> None:
        net = build_model(
            model,
            in_channels=in_channels,
            num_classes=num_classes,
            input_size=tuple(input_size),
            neuron=PaperNeuron(tau_p=tau_p, u_th=u_th, a=a),
            dropout=dropout,
        )
        super().__init__(
            net,
            num_classes,
            T=T,
            batch_layout=batch_layout,
            loss=loss,
            optimizer=optimizer,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            lr_step_epochs=lr_step_epochs,
            lr_gamma=lr_gamma,
        )
        # SpikingClassifier leaves `loss` out (it may be a callable there); here it is a name, and every
        # argument is needed to rebuild the network from a checkpoint.
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        """Check that the data module fits the network before any batch is drawn.

        A mismatch would otherwise surface as a shape error inside a conv, or, for static images without
        ``T``, as a silently wrong run: ``[B, C, H, W]`` read as ``[B, T=C, H, W]``.
        """
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        hp = self.hparams
        where = f"{type(datamodule).__name__} and {type(self).__name__}"
        for name in ("num_classes", "in_channels", "input_size"):
            if hasattr(datamodule, name) and _as_tuple(getattr(datamodule, name)) != _as_tuple(hp[name]):
                raise ValueError(
                    f"{where} disagree: the data have {name}={getattr(datamodule, name)}, the model "
                    f"{name}={hp[name]}; set the model's {name} to the data's."
                )
        if not hasattr(datamodule, "n_steps"):
            return
        if datamodule.n_steps is None and self.T is None:
            raise ValueError(
                f"{where}: {type(datamodule).__name__} yields static images [B, C, H, W]; set the model's T "
                "(time steps to repeat them over, the paper's direct encoding)."
            )
        if datamodule.n_steps is not None and self.T is not None:
            raise ValueError(
                f"{where}: {type(datamodule).__name__} yields [B, T={datamodule.n_steps}, ...] event frames; "
                f"leave the model's T unset (it is {self.T}), or set the data's n_steps to change T."
            )


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _is_static(spec: DatasetSpec) -> bool:
    # Event data modules take the frame count; static image modules leave T to the model.
    return "n_steps" not in inspect.signature(spec.datamodule).parameters


def _spec(dataset: str) -> DatasetSpec:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; available datasets: {', '.join(sorted(DATASETS))}") from None


def paper_setting(dataset: str) -> dict[str, Any]:
    """:class:`PaperClassifier` keyword arguments for ``dataset``'s paper setting (Table 1 via ``DATASETS``).

    Where Table 1 gives a range, the lower end is taken: for the learning rate the conservative value, for the
    dropout rate 0, i.e. no dropout (every range starts at 0). The neuron is the registry's (the middle of the
    threshold range). ``T`` is set for static images only; event frames carry their own ``T``.
    """
    spec = _spec(dataset)
    return {
        "model": spec.model,
        "in_channels": spec.in_channels,
        "num_classes": spec.num_classes,
        "input_size": spec.input_size,
        "tau_p": spec.neuron.tau_p,
        "u_th": spec.neuron.u_th,
        "a": spec.neuron.a,
        "dropout": spec.dropout_range[0],
        "T": spec.n_steps if _is_static(spec) else None,
        "loss": spec.loss,
        "optimizer": spec.optimizer,
        "lr": spec.lr_range[0],
        "momentum": spec.momentum or 0.0,
    }


def build_cli(argv: list[str] | None = None, *, run: bool = True) -> LightningCLI:
    """LightningCLI over :class:`PaperClassifier` and any LightningDataModule (``data: class_path: ...``).

    ``argv`` is ``[subcommand, ...options]`` (``fit``, ``validate``, ``test``, ``predict``) when ``run``,
    options only otherwise. The Trainer's ``strategy`` takes ``class_path: lightning_tlbptt.TruncatedLocalBPTT``
    with ``init_args``, the registered name ``tlbptt``, or ``auto`` (plain BPTT). The optimizer is the
    model's (the paper's SGD or Adam with its step decay), so LightningCLI's own ``--optimizer`` is off.
    """
    with warnings.catch_warnings():
        # `tlbptt fit ...` passes its own command line on as `argv`: Lightning's warning against giving `args`
        # while sys.argv holds arguments too is about two different command lines, which this is not.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return LightningCLI(
            PaperClassifier,
            pl.LightningDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=argv,
            run=run,
        )


def fit_main(argv: list[str] | None = None) -> int:
    """``tlbptt fit|validate|test --config examples/configs/<dataset>.yaml [--section.key=value ...]``."""
    build_cli(argv)
    return 0


def _count_or_fraction(text: str) -> int | float:
    # Lightning reads an int as a number of batches and a float as a fraction of the epoch ("1" vs "1.0").
    return float(text) if "." in text else int(text)


def _flag(text: str) -> bool:
    # A W&B agent writes a boolean parameter as `--name=True` (its `${args}` macro); a bare `--name` is True too.
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


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
    spec = _spec(dataset)
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

    def switch(group: argparse._ArgumentGroup, flag: str, help: str) -> None:
        add(group, flag, type=_flag, nargs="?", const=True, default=False, metavar="BOOL", help=help)

    method = parser.add_argument_group("training method")
    add(method, "--k", type=int, default=k, help="time steps per truncation interval")
    add(method, "--n", type=int, default=n, help="layers per local block")
    add(method, "--classifier", choices=("trainable", "random"), default="trainable", help="local classifiers")
    switch(method, "--bptt", "plain BPTT over the whole T (ignores k, n, classifier)")
    switch(method, "--sj-neurons", "SpikingJelly's own LIF loop instead of the strategy's kernel")
    hyper = parser.add_argument_group("hyperparameters (defaults: the paper's)")
    add(hyper, "--loss", choices=("mse", "ce"), default=setting["loss"], help="output and local losses")
    add(hyper, "--lr", type=float, default=setting["lr"], help=f"Table 1 range: {spec.lr_range}")
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
    (:func:`~lightning_tlbptt.sweeps.cached_reference`, under ``--reference-dir``) and every later run with
    the same settings reads it. The figure of merit is logged with ``--fom``, with ``--reference-acc``, and
    by default under a W&B agent (``WANDB_SWEEP_ID`` set), which also makes ``wandb`` the default logger. The
    agent passes the template's parameters as ``--name=value``: every flag also accepts ``_`` for ``-``, and
    switches accept ``=True``/``=False``.

    Args:
        dataset: a key of :data:`~lightning_tlbptt.data.DATASETS`.
        argv: the flags (``--help`` lists them); ``None`` reads ``sys.argv``.
        k: default of ``--k``.
        n: default of ``--n``.

    Returns:
        The exit status, 0.
    """
    spec = _spec(dataset)
    setting = paper_setting(dataset)
    static = _is_static(spec)
    in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
    parser = train_parser(dataset, k=k, n=n)
    args = parser.parse_args(argv)

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
            }
        )
        return datamodule, model

    if args.bptt:
        strategy: str | TruncatedLocalBPTT = "auto"
        run_name = f"{dataset}-bptt"
    else:
        strategy = TruncatedLocalBPTT(
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
                # One device, no logger: under a W&B agent a second wandb run would take the agent's run id.
                datamodule, model = build()
                memory = MemoryMonitor()
                trainer = pl.Trainer(
                    strategy="auto",
                    devices=1,
                    logger=False,
                    callbacks=[memory],
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    **trainer_settings,
                )
                trainer.fit(model, datamodule=datamodule)
                if "val/acc" not in trainer.callback_metrics:
                    raise ValueError("the BPTT reference logged no val/acc: the figure of merit needs validation")
                metrics = {"val/acc": float(trainer.callback_metrics["val/acc"])}
                if memory.peak_bytes is not None:
                    metrics["cost/memory/total_bytes"] = memory.peak_bytes
                return metrics

            from lightning_tlbptt import __version__
            from lightning_tlbptt.sweeps import cached_reference, default_reference_dir

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
