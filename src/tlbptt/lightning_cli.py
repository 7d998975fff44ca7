"""``tlbptt fit|validate|test|predict``: LightningCLI over :class:`~lightning_tlbptt.paper.PaperClassifier`.

Every value of the model, the data module, the Trainer and the strategy lives in a YAML config
(``examples/configs/<dataset>.yaml``) and can be overridden on the command line, e.g.
``--trainer.strategy.init_args.k=2`` or ``--trainer.strategy=auto`` (plain BPTT). The configs repeat the paper's
values of :data:`~lightning_tlbptt.paper.settings.DATASETS` because LightningCLI configs are plain files;
``tests/apps/test_lightning_cli.py`` checks that they agree.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from lightning_tlbptt.paper import PaperClassifier

__all__ = ["build_cli", "fit_main"]


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
