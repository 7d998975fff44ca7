"""Projects written with ``import pytorch_lightning as pl`` change the same one line as ``lightning`` users.

``pytorch_lightning`` is Lightning's mirror package (installed with ``lightning``); its Trainer accepts only its own
strategies, and the strategy turns into its ``pytorch_lightning`` twin when such a Trainer takes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from spikingjelly.activation_based import functional
from torch import nn

from lightning_tlbptt import TruncatedLocalBPTT, TruncatedLocalBPTTDDP

from snn_fixtures import conv_net, event_batches


class PLModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        functional.reset_net(self.net)
        loss = nn.functional.cross_entropy(self.net(x.transpose(0, 1)).mean(0) * 4, y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def _fit(trainer: pl.Trainer, **kwargs: Any) -> PLModule:
    module = PLModule()
    pl.seed_everything(1, verbose=False)
    trainer.fit(module, event_batches(n=8, T=4, batch_size=4), **kwargs)
    return module


def test_pytorch_lightning_trainer_takes_the_same_strategy_line(tmp_path: Path) -> None:
    plain = _fit(_trainer(tmp_path))
    trainer = _trainer(tmp_path, strategy=TruncatedLocalBPTT(k=4, n=None))
    ours = _fit(trainer)
    assert isinstance(trainer.strategy, pl.strategies.SingleDeviceStrategy)
    for a, b in zip(ours.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)

    module = PLModule()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = _trainer(tmp_path, strategy=TruncatedLocalBPTT(k=2, n=1), enable_checkpointing=True)
    trainer.fit(module, event_batches(n=8, T=4, batch_size=4))
    assert trainer.global_step == 4 and "train_loss_epoch" in trainer.callback_metrics
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    again = _trainer(tmp_path, strategy=TruncatedLocalBPTT(k=2, n=1), max_epochs=2)
    again.fit(PLModule(), event_batches(n=8, T=4, batch_size=4), ckpt_path=trainer.checkpoint_callback.best_model_path)
    assert again.global_step == 8


def test_registered_names_and_the_ddp_sibling_exist_for_pytorch_lightning(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, strategy="tlbptt")
    assert type(trainer.strategy).__name__ == "TruncatedLocalBPTT"
    assert isinstance(trainer.strategy, pl.strategies.SingleDeviceStrategy)
    ddp = _trainer(tmp_path, strategy=TruncatedLocalBPTTDDP(k=2, n=1), devices=2)
    assert isinstance(ddp.strategy, pl.strategies.DDPStrategy)


def test_one_device_strategy_names_the_ddp_sibling_for_several_devices(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"TruncatedLocalBPTTDDP\(\.\.\.\) with the same arguments"):
        _trainer(tmp_path, strategy=TruncatedLocalBPTT(k=2, n=1), devices=2)
