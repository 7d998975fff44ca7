"""``tlbptt.compare``: runs trained at once in forked processes give the figures of runs trained one after another."""

from __future__ import annotations

import pytest

from lightning_tlbptt.paper import PaperClassifier
from lightning_tlbptt.paper.data import MNIST5kDataModule
from tlbptt.compare import compare


def _module() -> PaperClassifier:
    return PaperClassifier(model="lenet1", T=1, lr=0.1, lr_step_epochs=0)


def test_runs_at_once_give_the_figures_of_runs_one_after_another() -> None:
    kwargs = {"settings": [(1, 1)], "epochs": 1, "accelerator": "cpu"}
    alone = compare(_module, MNIST5kDataModule(batch_size=500), jobs=1, **kwargs)
    together = compare(_module, MNIST5kDataModule(batch_size=500), jobs=2, **kwargs)
    assert [r.name for r in together] == ["BPTT", "TLBPTT(k=1, n=1)"]
    for a, b in zip(alone, together, strict=True):
        assert (a.val_acc, a.saved_activation_bytes, a.state_bytes, a.optimizer_steps) == (
            b.val_acc,
            b.saved_activation_bytes,
            b.state_bytes,
            b.optimizer_steps,
        )
        assert b.cpu_seconds > 0


def test_a_run_that_fails_in_its_process_is_raised_with_its_traceback() -> None:
    def broken() -> PaperClassifier:
        raise ValueError("no such network: lenet9")

    with pytest.raises(RuntimeError, match=r"(?s)run \d failed in its process.*no such network: lenet9"):
        compare(broken, MNIST5kDataModule(batch_size=500), settings=[(1, 1)], jobs=2, accelerator="cpu")
