"""The strategy inside real Lightning runs: the user's own training_step per chunk, Lightning's schedulers,
clipping, checkpoints and callbacks, and errors that name the problem."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from spikingjelly.activation_based import functional, layer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_tlbptt import PartitionError, SpikingClassifier, TruncatedLocalBPTT, strip_local_classifiers

from snn_fixtures import conv_net, event_batches, lif


class UserModule(L.LightningModule):
    """A user's module written for plain Lightning: [B, T] batches, its own CE loss on the time mean, its own
    torchmetrics accuracy, a `loss_fn` attribute of its own, and a scheduler of the kind given."""

    def __init__(self, scheduler: str = "none", lr: float = 0.1) -> None:
        super().__init__()
        self.net = conv_net()
        self.loss_fn = nn.CrossEntropyLoss()  # the user's, not the strategy's
        self.train_acc = MulticlassAccuracy(4)
        self.scheduler = scheduler
        self.lr = lr
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self.net)
        return self.net(x.transpose(0, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        self.calls.append(tuple(out.shape))
        loss = self.loss_fn(out.mean(0) * 4, y)
        self.train_acc(out.mean(0), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss_fn(self(batch[0]).mean(0) * 4, batch[1]))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.scheduler == "none":
            return opt
        if self.scheduler == "epoch":
            config = {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5), "interval": "epoch"}
        elif self.scheduler == "step":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
            config = {"scheduler": sched, "interval": "step", "frequency": 2}
        else:
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5, threshold=10.0)
            config = {"scheduler": sched, "monitor": "train_loss_epoch"}
        return {"optimizer": opt, "lr_scheduler": config}


def _seeded_fit(trainer: L.Trainer, module: L.LightningModule, *loaders: Any, **kwargs: Any) -> L.Trainer:
    torch.manual_seed(1)
    trainer.fit(module, *loaders, **kwargs)
    return trainer


def test_user_training_step_runs_once_per_chunk_with_its_own_loss_and_metrics(make_trainer):
    module = UserModule()
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1), max_epochs=1)
    trainer.fit(module, event_batches(n=16, T=6, batch_size=8))
    assert module.calls == [(2, 8, 4)] * 6  # 2 batches x T/k = 3 chunks, the network sees k steps each
    assert trainer.global_step == 6
    assert {"train_loss_epoch", "train_acc_epoch", "train/block0/loss", "train/block1/loss"} <= set(
        trainer.callback_metrics
    )
    # handed back as it came: automatic optimisation, no classifiers, no process group, no hooks left
    assert module.automatic_optimization and not hasattr(module, "local_classifiers")
    assert not dist.is_initialized()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in module.net.modules())


@pytest.mark.parametrize("scheduler", ["none", "epoch", "step", "plateau"])
def test_k_equal_T_is_lightnings_automatic_optimisation(make_trainer, scheduler):
    reference, ours = UserModule(scheduler), UserModule(scheduler)
    ours.load_state_dict(reference.state_dict())
    loader = event_batches(n=16, T=4, batch_size=8)
    kwargs = dict(max_epochs=3, gradient_clip_val=0.05)
    plain = _seeded_fit(make_trainer(**kwargs), reference, loader)
    trainer = _seeded_fit(make_trainer(strategy=TruncatedLocalBPTT(k=4, n=99), **kwargs), ours, loader)
    assert trainer.global_step == plain.global_step == 6
    for (name, a), b in zip(ours.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=f"{name} differs")
    lrs = [t.optimizers[0].param_groups[0]["lr"] for t in (trainer, plain)]
    assert lrs[0] == pytest.approx(lrs[1])
    if scheduler != "none":
        assert lrs[0] < 0.1  # the scheduler did step
    assert trainer.callback_metrics["train_loss_epoch"] == pytest.approx(plain.callback_metrics["train_loss_epoch"])


def test_training_step_returning_none_skips_the_chunk(make_trainer):
    class Skipping(UserModule):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            super().training_step(batch, batch_idx)

    module = Skipping()
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1), max_epochs=1)
    trainer.fit(module, event_batches(n=8, T=4))
    # as plain Lightning: the optimizer step is called (and counted) but no parameter has a gradient
    assert trainer.global_step == 2 and len(module.calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, module.net.parameters(), strict=True))


def test_callbacks_monitor_the_users_metrics(make_trainer, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="train_acc_epoch", mode="max")
    stop = EarlyStopping(monitor="train_loss_epoch", patience=0, min_delta=10.0)
    trainer = make_trainer(
        strategy=TruncatedLocalBPTT(k=2, n=1), max_epochs=5, callbacks=[checkpoint, stop], enable_checkpointing=True
    )
    trainer.fit(UserModule(), event_batches(n=16, T=4, batch_size=8))
    assert trainer.current_epoch == 2  # stopped by EarlyStopping after epoch 1 (no 10-point improvement)
    assert Path(checkpoint.best_model_path).exists()


def test_a_plain_trainer_trains_the_module_after_a_strategy_fit(make_trainer):
    module = UserModule()
    make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1), max_epochs=1).fit(module, event_batches(n=8, T=4))
    before = [p.detach().clone() for p in module.parameters()]
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, event_batches(n=8, T=4))
    assert trainer.global_step == 1
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_resume_reproduces_the_uninterrupted_run_and_plain_inference_loads_strictly(make_trainer, tmp_path):
    def run(max_epochs: int, ckpt_path: str | None = None, checkpoint: Any = None) -> UserModule:
        torch.manual_seed(0)
        module = UserModule("epoch")
        trainer = make_trainer(
            strategy=TruncatedLocalBPTT(k=2, n=1),
            max_epochs=max_epochs,
            callbacks=[checkpoint] if checkpoint else [],
            enable_checkpointing=checkpoint is not None,
        )
        trainer.fit(module, event_batches(n=16, T=4, batch_size=8), ckpt_path=ckpt_path)
        return module

    full = run(3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    run(1, checkpoint=checkpoint)
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    resumed = run(3, ckpt_path=str(path))
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

    plain = UserModule()  # the user's module, unchanged: validate / test / predict from the checkpoint
    make_trainer().validate(plain, event_batches(n=8, T=4), ckpt_path=str(path), verbose=False)
    UserModule.load_from_checkpoint(path)

    with pytest.raises(MisconfigurationException, match=r"classifier_pool=4 in the checkpoint but classifier_pool=2"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1, classifier_pool=2), max_epochs=2).fit(
            UserModule("epoch"), event_batches(n=16, T=4, batch_size=8), ckpt_path=str(path)
        )


def test_strip_local_classifiers_cleans_a_0_1_checkpoint():
    module = UserModule()
    state = {**module.state_dict(), "local_classifiers.0.linear.weight": torch.zeros(4, 4)}
    cleaned = strip_local_classifiers({"state_dict": state, "tlbptt": {}})
    assert "tlbptt" not in cleaned
    module.load_state_dict(cleaned["state_dict"])  # strict


class PerStepModule(SpikingClassifier):
    """The time loop in the module, the network in step_mode='s'; cuts the batch itself, Lightning 1.x style."""

    split_sizes: list[int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self.net)
        return functional.multi_step_forward(x.transpose(0, 1), self.net)

    def tbptt_split_batch(self, batch: Any, split_size: int) -> list[Any]:
        x, y = batch
        self.split_sizes = [len(range(s, min(s + split_size, x.shape[1]))) for s in range(0, x.shape[1], split_size)]
        return [(x[:, s : s + split_size], y) for s in range(0, x.shape[1], split_size)]


def test_single_step_networks_are_cut_in_the_batch_with_the_modules_own_split(make_trainer):
    net = conv_net()
    functional.set_step_mode(net, "s")
    module = PerStepModule(net, lr_step_epochs=0)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=3, n=1), max_epochs=1)
    trainer.fit(module, event_batches(n=8, T=7, batch_size=8))
    assert module.split_sizes == [3, 3, 1] and trainer.global_step == 3
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_static_images_repeated_inside_forward_are_cut_where_the_network_sees_T(make_trainer):
    module = SpikingClassifier(conv_net(), T=6, lr_step_epochs=0)  # repeats [B, C, H, W] over T=6 itself
    loader = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.arange(8) % 4), batch_size=8)
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=2, n=2), max_epochs=1)
    trainer.fit(module, loader)
    assert trainer.global_step == 3


def test_registered_under_tlbptt(make_trainer):
    trainer = make_trainer(strategy="tlbptt", max_steps=1)
    assert isinstance(trainer.strategy, TruncatedLocalBPTT)
    assert (trainer.strategy.k, trainer.strategy.n) == (5, 2)


def test_k_and_n_must_be_positive_and_k_fit_T(make_trainer):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be a positive int"):
            TruncatedLocalBPTT(k=bad)
    with pytest.raises(ValueError, match="n must be a positive int"):
        TruncatedLocalBPTT(k=2, n=0)
    with pytest.raises(ValueError, match="time_split must be"):
        TruncatedLocalBPTT(time_split="time")
    with pytest.raises(ValueError, match=r"step_every must be 'chunk' .* or 'batch' .* got 'epoch'"):
        TruncatedLocalBPTT(step_every="epoch")
    with pytest.raises(ValueError, match=r"k=9 is larger than the number of time steps T=8"):
        make_trainer(strategy=TruncatedLocalBPTT(k=9, n=1)).fit(UserModule(), event_batches(T=8))


def test_n_none_is_one_block(make_trainer):
    """``n=None`` is one block, as any ``n`` of at least the hidden layers: the spelling the cost model uses too."""
    strategy = TruncatedLocalBPTT(k=2, n=None)
    make_trainer(strategy=strategy, max_steps=2).fit(SpikingClassifier(conv_net(), lr_step_epochs=0), event_batches())
    assert strategy.partition is not None and len(strategy.partition.blocks) == 1
    assert strategy.local_classifiers is not None and len(strategy.local_classifiers) == 0


def test_network_that_gets_no_time_axis_is_explained(make_trainer):
    module = SpikingClassifier(conv_net())  # static images but no T: the network gets [C, B, H, W]
    loader = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.arange(8) % 4), batch_size=8)
    message = r"probe forward of Sequential failed.*\[1, 8, 8, 8\].*no time axis, repeat it over T"
    with pytest.raises(PartitionError, match=message):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1)).fit(module, loader)


def test_labels_must_fit_the_networks_output(make_trainer):
    x = torch.rand(8, 4, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.full((8,), 7)), batch_size=8)
    with pytest.raises(ValueError, match=r"batch 0 has label 7, but the network has 4 outputs"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1)).fit(SpikingClassifier(conv_net()), loader)


def test_network_without_neurons_or_weights_or_ambiguous_is_refused(make_trainer):
    class Plain(UserModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

    with pytest.raises(PartitionError, match="no SpikingJelly neuron"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2)).fit(Plain(nn.Sequential(nn.Linear(4, 4))), event_batches())
    with pytest.raises(PartitionError, match="no weighted layer"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2)).fit(Plain(nn.Sequential(lif())), event_batches())

    class Two(UserModule):
        def __init__(self) -> None:
            super().__init__()
            self.other = conv_net()

    with pytest.raises(PartitionError, match=r"ambiguous.*network='<attribute name>'"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2)).fit(Two(), event_batches())
    with pytest.raises(PartitionError, match="has no sub-module 'backbone'"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, network="backbone")).fit(UserModule(), event_batches())
    with pytest.raises(PartitionError, match="training_step did not call the network"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, network="other")).fit(Two(), event_batches())


def test_settings_that_cannot_be_honoured_are_refused(make_trainer):
    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches=2"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2), accumulate_grad_batches=2).fit(UserModule(), event_batches())

    class TwoOptimizers(UserModule):
        def configure_optimizers(self) -> Any:
            return [torch.optim.SGD(self.net[:3].parameters(), lr=0.1), torch.optim.SGD(self.net[3:].parameters())]

    with pytest.raises(MisconfigurationException, match=r"returned several\. Return a single optimizer"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2)).fit(TwoOptimizers(), event_batches())

    class Manual(UserModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(MisconfigurationException, match="sets `automatic_optimization = False`"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2)).fit(Manual(), event_batches())


def test_local_classifiers_missing_from_the_optimizer_are_added(make_trainer):
    class NetOnly(UserModule):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.net.parameters(), lr=0.1)  # written before local classifiers existed

    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1), max_steps=2)
    trainer.fit(NetOnly(), event_batches())
    classifiers = trainer.strategy.local_classifiers
    assert classifiers is not None
    params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in params for p in classifiers.parameters())


def test_a_module_can_be_fitted_again_and_each_fit_is_set_up_anew(make_trainer):
    module = UserModule()
    strategy = TruncatedLocalBPTT(k=2, n=1)
    make_trainer(strategy=strategy, max_epochs=1).fit(module, event_batches(n=8, T=4, batch_size=8))
    first = strategy.local_classifiers
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1), max_epochs=1)
    trainer.fit(module, event_batches(n=8, T=4, batch_size=8))
    assert trainer.global_step == 2 and trainer.strategy.local_classifiers is not first


def test_silent_output_is_reported_once(make_trainer):
    net = conv_net()
    net[-1].v_threshold = 1e9  # the output layer never fires
    module = SpikingClassifier(net, lr_step_epochs=0)
    with pytest.warns(UserWarning, match=r"the network's output layer has not spiked for 3 optimizer steps"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1, silent_steps=3), max_epochs=1).fit(
            module, event_batches(n=16, T=4, batch_size=8)
        )


def test_one_silent_output_neuron_is_named(make_trainer):
    net = conv_net()
    with torch.no_grad():
        net[-2].weight[2] = -100.0  # output neuron 2 (class 2) never fires; the others do
        net[-2].bias[2] = -100.0
    module = SpikingClassifier(net, lr=0.01, lr_step_epochs=0)
    named = r"output neuron\(s\) \[[^\]]*\b2\b[^\]]*\] of 4 of the network's output layer has not spiked"
    with pytest.warns(UserWarning, match=named) as record:
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1, silent_steps=3), max_epochs=1).fit(
            module, event_batches(n=16, T=4, batch_size=8)
        )

    (message,) = [str(w.message) for w in record if "network's output layer has not spiked" in str(w.message)]
    assert "since training started" in message and "OutputWindow()" in message  # dead from init: lr is no cure


def test_output_that_stops_firing_points_at_the_learning_rate(make_trainer):
    class Silence(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 1:  # fired during the first batch, then silenced
                module.net[-1].v_threshold = 1e9

    net = conv_net()
    with torch.no_grad():
        net[-2].bias += 10.0  # every output neuron fires from the start
    module = SpikingClassifier(net, lr_step_epochs=0)
    with pytest.warns(UserWarning, match="has not spiked") as record:
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1, silent_steps=3), max_epochs=1, callbacks=[Silence()]).fit(
            module, event_batches(n=48, T=4, batch_size=8)
        )
    (message,) = [str(w.message) for w in record if "network's output layer has not spiked" in str(w.message)]
    assert (
        "fired before" in message
        and "learning rate" in message
        and "callbacks=[lightning_tlbptt.OutputWindow()]" in message
    )


def test_transposing_network_with_reset_inside_forward(make_trainer):
    """SpikingJelly's memopt-example style: reset_net and [B, T] -> [T, B] inside the network's own forward."""

    class TransposingNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = conv_net()[:6]
            self.classifier = nn.Sequential(layer.Linear(8 * 2 * 2, 4, step_mode="m"))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            functional.reset_net(self)
            x = x.transpose(0, 1).contiguous()
            return self.classifier(torch.flatten(self.features(x), 2))

    class Module(UserModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TransposingNet()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    torch.manual_seed(0)
    reference = Module()
    chunked = copy.deepcopy(reference)
    loader = event_batches(n=8, T=4, batch_size=8)
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=2, n=99), max_steps=2)
    trainer.fit(chunked, loader)

    # by hand: the state carries over from the first chunk into the second despite the reset in forward
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x, y = next(iter(loader))
    functional.reset_net(reference.net)
    h = x.transpose(0, 1)
    for start in (0, 2):
        out = reference.net.classifier(torch.flatten(reference.net.features(h[start : start + 2]), 2))
        F.cross_entropy(out.mean(0) * 4, y).backward()
        opt.step()
        opt.zero_grad()
        functional.detach_net(reference.net)
    for a, b in zip(chunked.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
