"""Lightning's own features under the strategy, each against plain Lightning on the same module, seed and data.

At ``k = T`` with one block the strategy must be indistinguishable from plain Lightning (weights to 1e-6, the same
hook calls, the same checkpoints); at ``k < T, n = 1`` the same features must work with one optimizer step per chunk
and every block must learn.
"""

from __future__ import annotations

import collections
import datetime as dt
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    EMAWeightAveraging,
    GradientAccumulationScheduler,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from spikingjelly.activation_based import functional, layer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_tlbptt import TruncatedLocalBPTT

from snn_fixtures import conv_net, event_batches, lif

T = 4
HOOKS = (
    "optimizer_step",
    "optimizer_zero_grad",
    "on_before_zero_grad",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "configure_gradient_clipping",
)


class Module(L.LightningModule):
    """A plain user's module: [B, T] batches, CE on the time mean; counts the optimisation hooks it overrides and
    warms its learning rate up in ``optimizer_step`` as Lightning's docs show."""

    def __init__(self, lr: float = 0.1, net: nn.Module | None = None, batch_size: int = 4) -> None:
        super().__init__()
        self.net = net if net is not None else conv_net()
        self.lr = lr
        self.batch_size = batch_size
        self.counts: collections.Counter[str] = collections.Counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self.net)
        return self.net(x.transpose(0, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x).mean(0) * 4, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        self.counts["optimizer_step"] += 1
        optimizer.step(closure=optimizer_closure)
        if self.trainer.global_step < 3:  # learning-rate warm-up, Lightning's documented recipe
            for group in optimizer.param_groups:
                group["lr"] = min(1.0, (self.trainer.global_step + 1) / 3) * self.lr

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        self.counts["optimizer_zero_grad"] += 1
        optimizer.zero_grad()

    def on_before_zero_grad(self, optimizer: Any) -> None:
        self.counts["on_before_zero_grad"] += 1

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.counts["on_before_backward"] += 1

    def on_after_backward(self) -> None:
        self.counts["on_after_backward"] += 1

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.counts["on_before_optimizer_step"] += 1

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        self.counts["configure_gradient_clipping"] += 1
        self.clip_gradients(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm="norm")

    def train_dataloader(self) -> DataLoader:
        return event_batches(n=16, T=T, batch_size=self.batch_size)


class NoBatchIdx(Module):
    def training_step(self, batch: Any) -> torch.Tensor:  # type: ignore[override]
        return super().training_step(batch, 0)


def bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1, step_mode="m"),
        layer.BatchNorm2d(4, step_mode="m"),
        lif(),
        layer.AvgPool2d(2, step_mode="m"),
        layer.Conv2d(4, 8, 3, padding=1, step_mode="m"),
        layer.BatchNorm2d(8, step_mode="m"),
        lif(),
        layer.AvgPool2d(4, step_mode="m"),
        layer.Flatten(step_mode="m"),
        layer.Linear(8, 4, step_mode="m"),
        lif(),
    )


def fit(make_trainer: Any, module: L.LightningModule, strategy: Any = None, **kwargs: Any) -> L.Trainer:
    trainer = make_trainer(**({"strategy": strategy} if strategy is not None else {}), **kwargs)
    L.seed_everything(1, verbose=False)
    trainer.fit(module)
    return trainer


def weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def every_block_learned(before: list[torch.Tensor], module: Module) -> None:
    after = weights(module)
    changed = [not torch.equal(x, y) for x, y in zip(before, after, strict=True)]
    assert all(changed), changed


@pytest.mark.parametrize("cls", [Module, NoBatchIdx])
def test_module_hooks_run_per_optimizer_step_as_in_plain_lightning(make_trainer: Any, cls: type[Module]) -> None:
    plain = fit(make_trainer, cls())
    ours = fit(make_trainer, cls(), TruncatedLocalBPTT(k=T, n=None))
    assert ours.global_step == plain.global_step == 4
    assert {h: ours.lightning_module.counts[h] for h in HOOKS} == {h: plain.lightning_module.counts[h] for h in HOOKS}
    assert all(plain.lightning_module.counts[h] == 4 for h in HOOKS)
    assert_close(weights(ours.lightning_module), weights(plain.lightning_module))

    module = cls()
    before = weights(module)
    chunked = fit(make_trainer, module, TruncatedLocalBPTT(k=2, n=1))
    assert chunked.global_step == 8  # one optimizer step per chunk: 4 batches x 2 chunks
    assert all(module.counts[h] == 8 for h in HOOKS), module.counts
    every_block_learned(before, module)


class CountingSteps(Module):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.counts["training_step"] += 1
        return super().training_step(batch, batch_idx)


def test_step_every_batch_runs_lightnings_optimisation_once_per_batch(make_trainer: Any) -> None:
    plain = fit(make_trainer, CountingSteps())
    ours = fit(make_trainer, CountingSteps(), TruncatedLocalBPTT(k=T, n=None, step_every="batch"))
    assert_close(weights(ours.lightning_module), weights(plain.lightning_module))

    module = CountingSteps()
    before = weights(module)
    trainer = fit(make_trainer, module, TruncatedLocalBPTT(k=2, n=1, step_every="batch"))
    assert trainer.global_step == 4  # one optimizer step per batch, as plain Lightning
    assert all(module.counts[h] == 4 for h in HOOKS), module.counts  # zero_grad, backward hooks, clipping: per batch
    assert module.counts["training_step"] == 1 + 8  # the probe's, then one per chunk: 4 batches x 2 chunks
    assert {"train_loss_step", "train_loss_epoch", "train/block0/loss", "train/block1/loss"} <= set(
        trainer.callback_metrics
    )
    every_block_learned(before, module)


def _checkpoints(tmp_path: Path) -> list[ModelCheckpoint]:
    return [
        ModelCheckpoint(tmp_path / "steps", every_n_train_steps=2, save_top_k=-1),
        ModelCheckpoint(tmp_path / "time", train_time_interval=dt.timedelta(microseconds=1), save_top_k=-1),
        ModelCheckpoint(tmp_path / "epochs", every_n_epochs=1, save_top_k=-1),
        ModelCheckpoint(tmp_path / "metric", monitor="train_loss_epoch", save_last=True),
    ]


def test_checkpoint_triggers_early_stopping_and_lr_monitor(make_trainer: Any, tmp_path: Path) -> None:
    def run(root: Path, strategy: Any) -> tuple[L.Trainer, dict[str, list[str]]]:
        callbacks = [*_checkpoints(root), EarlyStopping("train_loss_epoch", patience=0), LearningRateMonitor()]
        trainer = fit(
            make_trainer,
            Module(),
            strategy,
            max_epochs=3,
            callbacks=callbacks,
            logger=CSVLogger(root),
            enable_checkpointing=True,
        )
        saved = {d: sorted(p.name for p in (root / d).glob("*.ckpt")) for d in ("steps", "time", "epochs", "metric")}
        return trainer, saved

    plain, plain_saved = run(tmp_path / "plain", None)
    ours, ours_saved = run(tmp_path / "ours", TruncatedLocalBPTT(k=T, n=None))
    assert ours_saved == plain_saved and all(plain_saved.values())
    assert ours.current_epoch == plain.current_epoch and ours.global_step == plain.global_step
    assert "lr-SGD" in ours.callback_metrics or any((tmp_path / "ours").rglob("metrics.csv"))

    _, saved = run(tmp_path / "chunked", TruncatedLocalBPTT(k=2, n=1))
    assert all(saved.values()), saved  # every trigger wrote, with two optimizer steps a batch
    assert "last.ckpt" in saved["metric"]


def test_gradient_accumulation_is_refused_before_training_with_the_reason(make_trainer: Any) -> None:
    for kwargs in ({"accumulate_grad_batches": 2}, {"callbacks": [GradientAccumulationScheduler({0: 2})]}):
        module = Module()
        before = weights(module)
        with pytest.raises(MisconfigurationException, match=r"steps the optimizer after every chunk.*larger batch"):
            fit(make_trainer, module, TruncatedLocalBPTT(k=2, n=1), **kwargs)
        assert_close(weights(module), before)


def test_stochastic_weight_averaging_with_batchnorm(make_trainer: Any) -> None:
    def swa() -> StochasticWeightAveraging:
        return StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)

    plain = fit(make_trainer, Module(net=bn_net()), max_epochs=2, callbacks=[swa()])
    ours = fit(make_trainer, Module(net=bn_net()), TruncatedLocalBPTT(k=T, n=None), max_epochs=2, callbacks=[swa()])
    assert ours.global_step == plain.global_step
    assert_close(weights(ours.lightning_module), weights(plain.lightning_module))
    assert_close(list(ours.lightning_module.buffers()), list(plain.lightning_module.buffers()))
    chunked = fit(make_trainer, Module(net=bn_net()), TruncatedLocalBPTT(k=2, n=1), max_epochs=2, callbacks=[swa()])
    assert chunked.global_step == 2 * plain.global_step


def test_ema_weight_averaging_with_batchnorm_and_local_blocks(make_trainer: Any) -> None:
    plain = fit(make_trainer, Module(net=bn_net()), callbacks=[EMAWeightAveraging()])
    ours = fit(make_trainer, Module(net=bn_net()), TruncatedLocalBPTT(k=T, n=None), callbacks=[EMAWeightAveraging()])
    assert_close(weights(ours.lightning_module), weights(plain.lightning_module))
    module = Module(net=bn_net())
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    fit(make_trainer, module, TruncatedLocalBPTT(k=2, n=1), callbacks=[EMAWeightAveraging()])
    # every block's weights moved (a conv bias before BatchNorm gets no gradient, with or without the strategy)
    assert all(not torch.equal(p, before[name]) for name, p in module.named_parameters() if name.endswith("weight"))


def test_lr_find_sweeps_the_range_in_num_training_points(make_trainer: Any) -> None:
    class Long(Module):
        def train_dataloader(self) -> DataLoader:
            return event_batches(n=64, T=T, batch_size=4)

    for strategy in (TruncatedLocalBPTT(k=T, n=None), TruncatedLocalBPTT(k=2, n=1)):
        trainer = make_trainer(strategy=strategy)
        finder = Tuner(trainer).lr_find(Long(), min_lr=1e-4, max_lr=1.0, num_training=16, early_stop_threshold=None)
        assert finder is not None and len(finder.results["lr"]) == 16
        assert finder.results["lr"][-1] > 0.5  # the whole range, not half of it
        assert finder.suggestion() is not None


def test_scale_batch_size_runs_on_one_device(make_trainer: Any) -> None:
    plain = Tuner(make_trainer()).scale_batch_size(Module(batch_size=2), mode="power", steps_per_trial=1, max_trials=3)
    module = Module(batch_size=2)
    size = Tuner(make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1))).scale_batch_size(
        module, mode="power", steps_per_trial=1, max_trials=3
    )
    assert size == plain == module.batch_size > 2


class _NumpyAugmented(Dataset):
    """tonic-style: the dataset draws its augmentation from numpy's global stream."""

    def __init__(self) -> None:
        self.data = event_batches(n=16, T=T).dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data[i]
        shift = int(np.random.randint(0, 3))
        return torch.roll(x, shift, dims=-1), y


@pytest.mark.parametrize("workers", [0, 1])
def test_setup_draws_no_random_number_and_starts_no_iterator(make_trainer: Any, workers: int) -> None:
    class Shuffled(Module):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(
                _NumpyAugmented(), batch_size=4, shuffle=True, num_workers=workers, persistent_workers=workers > 0
            )

    plain = fit(make_trainer, Shuffled(), max_epochs=2)
    ours = fit(make_trainer, Shuffled(), TruncatedLocalBPTT(k=T, n=None), max_epochs=2)
    assert_close(weights(ours.lightning_module), weights(plain.lightning_module))


def test_checkpoints_go_both_ways_with_plain_lightning(make_trainer: Any, tmp_path: Path) -> None:
    plain = make_trainer(enable_checkpointing=True, default_root_dir=tmp_path / "plain")
    L.seed_everything(1, verbose=False)
    plain.fit(Module())
    ckpt = plain.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    saved = torch.load(ckpt, weights_only=False)

    resumed = make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1), max_epochs=2, default_root_dir=tmp_path / "a")
    module = Module()
    resumed.fit(module, ckpt_path=ckpt)
    assert resumed.global_step == plain.global_step + 8 and resumed.current_epoch == 2  # 4 batches x 2 chunks
    momentum = resumed.optimizers[0].state_dict()["param_groups"]
    assert len(momentum) == 2  # the user's group and the local classifiers'

    ours = make_trainer(
        strategy=TruncatedLocalBPTT(k=2, n=1), enable_checkpointing=True, default_root_dir=tmp_path / "b"
    )
    L.seed_everything(1, verbose=False)
    ours.fit(Module())
    ours_ckpt = ours.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    written = torch.load(ours_ckpt, weights_only=False)
    assert written["optimizer_states"][0]["param_groups"].__len__() == len(saved["optimizer_states"][0]["param_groups"])
    assert "tlbptt" in written and not any(k.startswith("local_classifiers") for k in written["state_dict"])
    again = make_trainer(max_epochs=2, default_root_dir=tmp_path / "c")
    again.fit(Module(), ckpt_path=ours_ckpt)
    assert again.global_step == ours.global_step + 4


def test_features_that_worked_keep_working(make_trainer: Any) -> None:
    """Precision plugins, value clipping, fast_dev_run and max_steps with one optimizer step per chunk."""
    for kwargs in (
        {"precision": "bf16-mixed"},
        {"precision": "64-true"},
        {"gradient_clip_val": 0.1, "gradient_clip_algorithm": "value"},
        {"fast_dev_run": True},
        {"max_steps": 3},
    ):

        class Plain(Module):
            def configure_gradient_clipping(self, *args: Any, **kw: Any) -> None:
                L.LightningModule.configure_gradient_clipping(self, *args, **kw)

        module = Plain()
        trainer = fit(make_trainer, module, TruncatedLocalBPTT(k=2, n=1), **kwargs)
        assert trainer.global_step == {"fast_dev_run": 2, "max_steps": 3}.get(next(iter(kwargs)), 8), kwargs
        assert torch.isfinite(torch.stack([p.double().sum() for p in module.parameters()])).all()


def test_two_views_through_one_backbone(make_trainer: Any) -> None:
    """Two network calls per step with reset_net between them: k = T exact, k < T at n = 1 trains."""

    class TwoViews(Module):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            a = self(x).mean(0)
            b = self(x.flip(-1)).mean(0)
            return nn.functional.cross_entropy(a * 4, y) + nn.functional.cross_entropy(b * 4, y)

    plain = fit(make_trainer, TwoViews())
    ours = fit(make_trainer, TwoViews(), TruncatedLocalBPTT(k=T, n=None))
    assert_close(weights(ours.lightning_module), weights(plain.lightning_module))
    module = TwoViews()
    before = weights(module)
    fit(make_trainer, module, TruncatedLocalBPTT(k=2, n=1))
    every_block_learned(before, module)


def test_random_draws_in_the_step_repeat_in_every_chunk(make_trainer: Any) -> None:
    """A Poisson encoder in the step draws the same spikes in every chunk (k = T equals plain Lightning), and a
    batch the step edits in place reaches every chunk as the loader gave it."""

    class Poisson(Module):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            x.mul_(0.5)  # edits the batch in place, as some augmentations do
            spikes = (torch.rand_like(x) < x + 0.2).float()
            loss = nn.functional.cross_entropy(self(spikes).mean(0) * 4, y)
            return loss

    plain = fit(make_trainer, Poisson())
    ours = fit(make_trainer, Poisson(), TruncatedLocalBPTT(k=T, n=None))
    assert_close(weights(ours.lightning_module), weights(plain.lightning_module))

    seen: list[torch.Tensor] = []

    class Recording(Poisson):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.clone())
            return super().forward(x)

    fit(make_trainer, Recording(), TruncatedLocalBPTT(k=2, n=1))
    chunks = seen[1:]  # after the strategy's probe of the first batch
    assert len(chunks) == 8 and all(torch.equal(chunks[i], chunks[i + 1]) for i in range(0, 8, 2))


def test_dict_batches_and_variable_T(make_trainer: Any) -> None:
    class Dicts(Module):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return super().training_step((batch["x"], batch["y"]), batch_idx)

        def train_dataloader(self) -> Any:
            data = event_batches(n=8, T=6).dataset.tensors
            short = event_batches(n=8, T=4).dataset.tensors
            batches = [{"x": data[0][:4], "y": data[1][:4]}, {"x": short[0][:4], "y": short[1][:4]}]
            return DataLoader(batches, batch_size=None)

    module = Dicts()
    trainer = fit(make_trainer, module, TruncatedLocalBPTT(k=2, n=1))
    assert trainer.global_step == 3 + 2
