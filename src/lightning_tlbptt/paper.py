"""The paper's experiments as programs: a LightningModule configured by plain values, LightningCLI, scripts.

Three ways to run a paper setting (Guo et al. 2023, Table 1 and section 3.1), from most to least flexible:

* ``tlbptt fit --config examples/configs/<dataset>.yaml``: LightningCLI (:func:`fit_main`); every value of
  the model, the data module, the Trainer and the strategy lives in the YAML and can be overridden on the
  command line, e.g. ``--trainer.strategy.init_args.k=2`` or ``--trainer.strategy=auto`` (plain BPTT);
* ``python examples/<dataset>.py --k 5 --n 2``: argparse (:func:`train_main`), the paper setting of
  :data:`~lightning_tlbptt.data.DATASETS` with a few flags;
* :class:`PaperClassifier` and :func:`paper_setting` from Python.

The paper's values are read from :data:`~lightning_tlbptt.data.DATASETS` only; the YAML files repeat them
because LightningCLI configs are plain files, and ``tests/test_paper.py`` checks that they agree.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from lightning_tlbptt.data import DATASETS, DatasetSpec
from lightning_tlbptt.layout import BatchLayout
from lightning_tlbptt.models import PaperNeuron, build_model
from lightning_tlbptt.module import SpikingClassifier
from lightning_tlbptt.strategy import TruncatedLocalBPTT

__all__ = ["PaperClassifier", "build_cli", "fit_main", "paper_setting", "train_command", "train_main"]


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


def _make_logger(kind: str, save_dir: str, name: str) -> Logger:
    if kind == "csv":
        return CSVLogger(save_dir, name=name)
    # wandb reads WANDB_MODE itself: WANDB_MODE=offline keeps the run on disk, for `wandb sync` later.
    return WandbLogger(project="lightning-tlbptt", name=name, save_dir=save_dir)


def train_main(dataset: str, argv: list[str] | None = None, *, k: int = 5, n: int = 2) -> int:
    """Train on ``dataset`` with its paper setting (Table 1), changed by command-line flags.

    The shared implementation of ``examples/<dataset>.py``: ``--k``/``--n`` choose TruncatedLocalBPTT's
    truncation interval and block size (defaults ``k``, ``n``: each script passes the paper's choice for its
    dataset), ``--bptt`` plain BPTT instead; the paper's schedule (step decay by 2 every 20 epochs, 100 epochs)
    is the default.

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
    parser = argparse.ArgumentParser(
        prog=f"{dataset}.py",
        description=f"Train {spec.model} on {dataset} with TruncatedLocalBPTT (or plain BPTT), the paper's "
        f"setting (Table 1) unless changed. {spec.note}".strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    method = parser.add_argument_group("training method")
    method.add_argument("--k", type=int, default=k, help="time steps per truncation interval")
    method.add_argument("--n", type=int, default=n, help="layers per local block")
    method.add_argument("--classifier", choices=("trainable", "random"), default="trainable", help="local classifiers")
    method.add_argument("--bptt", action="store_true", help="plain BPTT over the whole T (ignores k, n, classifier)")
    method.add_argument(
        "--sj-neurons", action="store_true", help="SpikingJelly's own LIF loop instead of the strategy's kernel"
    )
    hyper = parser.add_argument_group("hyperparameters (defaults: the paper's)")
    hyper.add_argument("--loss", choices=("mse", "ce"), default=setting["loss"], help="output and local losses")
    hyper.add_argument("--lr", type=float, default=setting["lr"], help=f"Table 1 range: {spec.lr_range}")
    hyper.add_argument("--dropout", type=float, default=setting["dropout"], help=f"Table 1 range: {spec.dropout_range}")
    hyper.add_argument("--batch-size", type=int, default=spec.batch_size, help="samples per batch")
    hyper.add_argument("--T", type=int, default=spec.n_steps, help="time steps (event data: frames per sample)")
    hyper.add_argument("--epochs", type=int, default=100, help="training epochs (the paper: 100)")
    hyper.add_argument("--seed", type=int, default=0, help="seed of the weights and the shuffling")
    runtime = parser.add_argument_group("run")
    runtime.add_argument("--data-dir", default="data", help="dataset root (EventMNIST: its cache)")
    runtime.add_argument("--download", action="store_true", help="let the data module download missing files")
    runtime.add_argument("--logger", choices=("csv", "wandb"), default="csv", help="wandb honours WANDB_MODE=offline")
    runtime.add_argument("--log-dir", default="logs", help="logs and checkpoints, under <log-dir>/<run name>")
    runtime.add_argument("--accelerator", default="auto", help="cpu, gpu, ... or auto")
    runtime.add_argument("--devices", default="auto", help="a count, a list like 0,1, or auto (as Trainer reads it)")
    runtime.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    runtime.add_argument("--log-every-n-steps", type=int, default=50, help="training batches between logged rows")
    runtime.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    runtime.add_argument(
        "--limit-train-batches", type=_count_or_fraction, default=None, help="batches, or a fraction: 0.1"
    )
    runtime.add_argument(
        "--limit-val-batches", type=_count_or_fraction, default=None, help="batches, or a fraction: 0.1"
    )
    args = parser.parse_args(argv)

    accepted = inspect.signature(spec.datamodule).parameters
    if args.download and "download" not in accepted:
        parser.error(f"{dataset} has nothing to download")
    data_overrides: dict[str, Any] = {"batch_size": args.batch_size, "num_workers": args.num_workers}
    if args.download:
        data_overrides["download"] = True
    if not static:
        data_overrides["n_steps"] = args.T
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
    if args.bptt:
        strategy: str | TruncatedLocalBPTT = "auto"
        run_name = f"{dataset}-bptt"
    else:
        strategy = TruncatedLocalBPTT(
            k=args.k, n=args.n, classifier=args.classifier, loss=args.loss, fast_neurons=not args.sj_neurons
        )
        run_name = f"{dataset}-k{args.k}-n{args.n}-{args.classifier}"
    logger = _make_logger(args.logger, args.log_dir, run_name)
    logger.log_hyperparams({"dataset": dataset, "method": "bptt" if args.bptt else "tlbptt", **vars(args)})
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=args.devices,
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_val_batches,
        logger=logger,
        log_every_n_steps=args.log_every_n_steps,
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
