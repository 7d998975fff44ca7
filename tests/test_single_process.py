"""On one device the strategy leaves torch's thread count as the user set it, as a single-device strategy does."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import pytest
import torch

from lightning_tlbptt import SpikingClassifier, TruncatedLocalBPTT

from snn_fixtures import conv_net, event_batches


def test_one_device_keeps_the_thread_count(
    make_trainer: Callable[..., L.Trainer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lightning's DDP launcher sets torch's thread count to the CPU count unless OMP_NUM_THREADS is set
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = make_trainer(strategy=TruncatedLocalBPTT(k=4, n=1), max_steps=2)
        trainer.fit(SpikingClassifier(conv_net(), lr_step_epochs=0), event_batches())
        assert trainer.global_step == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
