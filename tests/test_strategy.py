"""The strategy inside real Lightning runs: plug-and-play contract, schedulers, clipping, checkpoints, errors."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from spikingjelly.activation_based import functional, layer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_tlbptt import PartitionError, SpikingClassifier, TruncatedLocalBPTT

from snn_fixtures import GradRecorder, conv_net, event_batches, lif


class TransposingNet(nn.Module):
    """SpikingJelly's memopt example style: reset and `[B, T] -> [T, B]` inside the network's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.features = conv_net()[:6]
        self.classifier = nn.Sequential(layer.Linear(8 * 2 * 2, 4, step_mode="m"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self)
        x = x.transpose(0, 1).contiguous()  # [T, N, C, H, W]
        x = self.features(x)
        return self.classifier(torch.flatten(x, 2))


class ClassificationLightningModule(L.LightningModule):
    """Modelled on spikingjelly/activation_based/examples/memopt/lightning_modules.py."""

    def __init__(self, net: nn.Module, num_classes: int = 4) -> None:
        super().__init__()
        self.net = net
        self.criterion = nn.CrossEntropyLoss()
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes)
        self.val_acc = MulticlassAccuracy(num_classes)
        self.val_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        raise AssertionError("TruncatedLocalBPTT replaces training_step")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, label = batch[0].float(), batch[1]
        y = self(x).mean(0)
        self.val_calls += 1
        self.val_acc.update(y, label)
        self.log("val_acc", self.val_acc, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.1)  # written before local classifiers existed


class TimeMajorModule(L.LightningModule):
    """The other common style: the module transposes, the net takes `[T, B]`, reset after each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x.transpose(0, 1)).mean(0)
        functional.reset_net(self.net)
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        raise AssertionError("TruncatedLocalBPTT replaces training_step")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_mse", F.mse_loss(self(batch[0]), F.one_hot(batch[1], 4).float()))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}


@pytest.mark.parametrize("module_cls", [lambda: ClassificationLightningModule(TransposingNet()), TimeMajorModule])
def test_existing_modules_train_unchanged(make_trainer, module_cls):
    module = module_cls()
    before = [p.detach().clone() for p in module.net.parameters()]
    loader = event_batches(n=16, T=8, batch_size=8)
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=4, n=1), max_epochs=2, limit_val_batches=1)
    trainer.fit(module, loader, loader)
    assert trainer.global_step == 2 * 2 * 2  # epochs x batches x chunks
    assert all(not torch.equal(a, b) for a, b in zip(before, module.net.parameters(), strict=True))
    assert {"train/loss", "train/acc", "train/block0/loss", "train/block1/loss"} <= set(trainer.callback_metrics)
    assert any(k in trainer.callback_metrics for k in ("val_acc", "val_mse"))  # their own validation ran
    clf = module.local_classifiers[0].linear.weight
    assert any(clf is p for g in trainer.optimizers[0].param_groups for p in g["params"])


def test_registered_under_tlbptt(make_trainer):
    trainer = make_trainer(strategy="tlbptt", max_steps=1)
    assert isinstance(trainer.strategy, TruncatedLocalBPTT)
    assert (trainer.strategy.k, trainer.strategy.n) == (5, 2)


class _AsksForDevice(L.Callback):
    """Asks the strategy to move each batch to the meta device, as Lightning asks it for the root device."""

    def __init__(self) -> None:
        self.devices: dict[str, set[str]] = {"train": set(), "val": set()}

    def _ask(self, trainer: L.Trainer, batch: Any, stage: str) -> None:
        moved = trainer.strategy.batch_to_device(batch, torch.device("meta"))
        self.devices[stage] |= {t.device.type for t in moved}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._ask(trainer, batch, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._ask(trainer, batch, "val")


def test_training_batches_stay_on_the_host_and_move_chunk_by_chunk(make_trainer):
    # Only a chunk of the [B, T, ...] batch is on the device at a time (device memory flat in T);
    # validation runs the user's module as Lightning moves it, the whole batch.
    asks = _AsksForDevice()
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=3, n=1), max_steps=2, limit_val_batches=1, callbacks=[asks])
    trainer.fit(SpikingClassifier(conv_net()), event_batches(n=8, T=6), event_batches(n=8, T=6))
    assert asks.devices == {"train": {"cpu"}, "val": {"meta"}}


def test_static_images_are_repeated_over_T(make_trainer):
    x = torch.rand(8, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.arange(8) % 4), batch_size=8)
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=2, n=2, T=6), max_steps=3)
    trainer.fit(SpikingClassifier(conv_net()), loader)
    assert trainer.global_step == 3
    # the module's own T is used when the strategy is not given one
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=3, n=2), max_epochs=1)
    trainer.fit(SpikingClassifier(conv_net(), T=6), loader)
    assert trainer.global_step == 2


def test_step_and_epoch_schedulers_follow_optimizer_steps_and_epochs(make_trainer):
    module = TimeMajorModule()
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=4, n=99), max_epochs=3)
    trainer.fit(module, event_batches(n=16, T=8, batch_size=8))
    # StepLR(step_size=1) on epochs: stepped before epochs 1 and 2 -> 0.1 * 0.5 ** 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)

    class PerStep(TimeMajorModule):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 2}}

    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=2, n=99), max_epochs=1)
    trainer.fit(PerStep(), event_batches(n=16, T=8, batch_size=8))
    assert trainer.global_step == 8
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1.0 / (1 + 8 // 2))


def test_gradient_clipping_is_honoured_per_optimizer_step(make_trainer):
    recorder = GradRecorder()
    trainer = make_trainer(
        strategy=TruncatedLocalBPTT(k=4, n=1), max_steps=4, gradient_clip_val=1e-3, callbacks=[recorder]
    )
    trainer.fit(SpikingClassifier(conv_net()), event_batches(n=16, T=8, batch_size=8))
    for grads in recorder.steps:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        assert norm <= 1e-3 * (1 + 1e-4)
    assert len(recorder.steps) == 4


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def test_resume_mid_training_reproduces_uninterrupted_run(make_trainer, tmp_path):
    def run(max_epochs: int, ckpt_path: str | None = None, checkpoint: Any = None) -> tuple[LossRecorder, Any]:
        recorder = LossRecorder()
        module = TimeMajorModule()
        callbacks = [recorder] + ([checkpoint] if checkpoint else [])
        trainer = make_trainer(
            strategy=TruncatedLocalBPTT(k=4, n=1),
            max_epochs=max_epochs,
            callbacks=callbacks,
            enable_checkpointing=checkpoint is not None,
        )
        trainer.fit(module, event_batches(n=16, T=8, batch_size=8), ckpt_path=ckpt_path)
        return recorder, module

    full, full_module = run(3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    run(1, checkpoint=checkpoint)
    resumed, resumed_module = run(3, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert len(resumed.losses) == 4  # epochs 1 and 2, two batches each
    assert resumed.losses == pytest.approx(full.losses[2:], abs=1e-6)
    for a, b in zip(full_module.parameters(), resumed_module.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

    # the trained checkpoint loads into the user's plain module for inference
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)["state_dict"]
    plain = TimeMajorModule()
    result = plain.load_state_dict(state, strict=False)
    assert set(result.unexpected_keys) == {k for k in state if k.startswith("local_classifiers.")}
    assert not result.missing_keys


def test_k_must_fit_T_and_be_positive(make_trainer):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be a positive int"):
            TruncatedLocalBPTT(k=bad)
    with pytest.raises(ValueError, match="n must be a positive int"):
        TruncatedLocalBPTT(k=2, n=0)
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=9, n=1))
    with pytest.raises(ValueError, match=r"k=9 is larger than the number of time steps T=8"):
        trainer.fit(SpikingClassifier(conv_net()), event_batches(T=8))


def test_batch_without_time_axis_is_explained(make_trainer):
    loader = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.arange(8) % 4), batch_size=8)
    with pytest.raises(ValueError, match=r"no time axis.*pass T=<time steps>"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1)).fit(SpikingClassifier(conv_net()), loader)


def test_labels_must_match_the_output_layer(make_trainer):
    x = torch.rand(8, 4, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.full((8,), 7)), batch_size=8)
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1)).fit(SpikingClassifier(conv_net()), loader)


def test_network_without_neurons_or_weights_or_ambiguous_is_refused(make_trainer):
    class Plain(TimeMajorModule):
        def __init__(self, net: nn.Module) -> None:
            L.LightningModule.__init__(self)
            self.net = net

    with pytest.raises(PartitionError, match="no SpikingJelly neuron"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2)).fit(Plain(nn.Sequential(nn.Linear(4, 4))), event_batches())
    with pytest.raises(PartitionError, match="no weighted layer"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2)).fit(Plain(nn.Sequential(lif())), event_batches())

    class Two(TimeMajorModule):
        def __init__(self) -> None:
            super().__init__()
            self.other = conv_net()

    with pytest.raises(PartitionError, match=r"ambiguous.*network='<attribute name>'"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2)).fit(Two(), event_batches())
    with pytest.raises(PartitionError, match="has no sub-module 'backbone'"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, network="backbone")).fit(TimeMajorModule(), event_batches())
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=4, network="other"), max_steps=1)
    trainer.fit(Two(), event_batches())
    assert trainer.global_step == 2  # max_steps is checked between batches; a batch of T=8 makes 2 steps


def test_settings_manual_optimisation_cannot_honour_are_refused(make_trainer):
    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches=2"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2), accumulate_grad_batches=2).fit(
            SpikingClassifier(conv_net()), event_batches()
        )

    class TwoOptimizers(TimeMajorModule):
        def configure_optimizers(self) -> Any:
            return [torch.optim.SGD(self.net[:3].parameters(), lr=0.1), torch.optim.SGD(self.net[3:].parameters())]

    with pytest.raises(MisconfigurationException, match=r"returned 2\. Return a single optimizer"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2)).fit(TwoOptimizers(), event_batches())


def test_non_finite_loss_names_block_and_chunk(make_trainer):
    def explode(out_seq: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return out_seq.sum() * math.inf

    module = SpikingClassifier(conv_net())
    before = [p.detach().clone() for p in module.net.parameters()]
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* in block 0 at chunk 0"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1, loss=explode)).fit(module, event_batches())
    assert all(torch.equal(a, b) for a, b in zip(before, module.net.parameters(), strict=True))


def test_a_module_can_be_fitted_again(make_trainer):
    module = SpikingClassifier(conv_net(), lr_step_epochs=0)
    loader = event_batches(n=8, T=4, batch_size=8)
    make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1), max_epochs=1).fit(module, loader)
    classifiers = module.local_classifiers
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1), max_epochs=1)
    trainer.fit(module, loader)
    assert module.local_classifiers is classifiers and trainer.global_step == 2


def test_loss_defaults_to_the_modules_own(make_trainer):
    from lightning_tlbptt import rate_cross_entropy, rate_mse

    strategy = TruncatedLocalBPTT(k=2, n=1)
    make_trainer(strategy=strategy, max_steps=1).fit(SpikingClassifier(conv_net(), loss="ce"), event_batches())
    assert strategy.loss_fn is rate_cross_entropy
    strategy = TruncatedLocalBPTT(k=2, n=1)
    make_trainer(strategy=strategy, max_steps=1).fit(TimeMajorModule(), event_batches())  # no loss_fn: Eq. 3
    assert strategy.loss_fn is rate_mse
