"""Faults and careless use (issue 11): a clear error naming the cause and the fix, or the right result.

One test per fault; each asserts the error type and what the message names, or that the result is right.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from spikingjelly.activation_based import base, layer, neuron, surrogate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tlbptt import SpikingClassifier, TruncatedLocalBPTT

from snn_fixtures import conv_net, event_batches, lif


def _frames(n: int = 16, T: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, T, 1, 8, 8, generator=g) < 0.4).float(), torch.arange(n) % 4


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_nan_in_one_input_sample_never_reaches_the_weights(make_trainer):
    x, y = _frames()
    x[11, 2] = float("nan")  # batch 1, sample 3, time step 2: chunk 1 at k = 2
    module = SpikingClassifier(conv_net(), lr_step_epochs=0)
    with pytest.raises(
        FloatingPointError, match=r"non-finite gradient of net\.\S+ \(block \d\) at chunk 1 .* of batch 1"
    ):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1)).fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_label_out_of_range_in_a_later_batch_names_label_classes_and_batch(make_trainer):
    x, y = _frames()
    y[12] = 9
    with pytest.raises(ValueError, match=r"batch 1 has label 9, but the network has 4 outputs.*\[0, 4\)"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1)).fit(
            SpikingClassifier(conv_net()), DataLoader(TensorDataset(x, y), batch_size=8)
        )


def test_empty_batch_is_refused_clearly(make_trainer):
    x, y = _frames(n=8)
    batches = DataLoader([(x, y), (x[:0], y[:0])], batch_size=None)
    with pytest.raises(ValueError, match=r"batch 1 is empty.*drop_last"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1)).fit(SpikingClassifier(conv_net()), batches)


def test_random_classifiers_freeze_every_parameter_also_a_parametric_neuron(make_trainer):
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Flatten(step_mode="m"),
        layer.Linear(64, 32, step_mode="m"),
        neuron.ParametricLIFNode(surrogate_function=surrogate.ATan(), step_mode="m"),
        layer.Linear(32, 32, step_mode="m"),
        neuron.ParametricLIFNode(surrogate_function=surrogate.ATan(), step_mode="m"),
        layer.Linear(32, 4, step_mode="m"),
        neuron.ParametricLIFNode(surrogate_function=surrogate.ATan(), step_mode="m"),
    )
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1, classifier="random"), max_epochs=1)
    strategy = trainer.strategy
    assert isinstance(strategy, TruncatedLocalBPTT)
    trainer.fit(SpikingClassifier(net, lr_step_epochs=0), event_batches(n=16, T=4))
    classifiers = strategy.local_classifiers
    assert classifiers is not None and len(classifiers) == 1  # 2 hidden layers at n = 1: 2 blocks
    assert all(not p.requires_grad for p in classifiers.parameters())
    assert any("neuron.w" in name for name, _ in classifiers.named_parameters())  # the parametric decay exists


def test_a_trainer_fitting_a_second_module_sets_everything_up_again(make_trainer):
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=4, n=1), max_epochs=1)
    trainer.fit(SpikingClassifier(conv_net()), event_batches(n=8, T=8))
    trainer.fit_loop.max_epochs = 2  # one more epoch to train: the network is probed at its first batch
    with pytest.raises(ValueError, match=r"k=4 is larger than the number of time steps T=2"):
        trainer.fit(SpikingClassifier(conv_net()), event_batches(n=8, T=2))


def test_resume_with_another_classifier_pool_names_the_setting(make_trainer, tmp_path: Path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1), callbacks=[checkpoint], enable_checkpointing=True).fit(
        SpikingClassifier(conv_net()), event_batches(n=8, T=4)
    )
    with pytest.raises(MisconfigurationException, match=r"classifier_pool=4 in the checkpoint but classifier_pool=1"):
        make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1, classifier_pool=1), max_epochs=2).fit(
            SpikingClassifier(conv_net()), event_batches(n=8, T=4), ckpt_path=str(tmp_path / "last.ckpt")
        )


def test_recurrent_container_is_one_unit_whose_state_is_detached_between_chunks(make_trainer):
    torch.manual_seed(0)
    inner = neuron.LIFNode(tau=2.0, v_threshold=0.2, decay_input=False, surrogate_function=surrogate.ATan())
    recurrent = layer.LinearRecurrentContainer(inner, 16, 16, step_mode="m")  # its neuron in 's', as required
    net = nn.Sequential(
        layer.Flatten(step_mode="m"), layer.Linear(64, 16, step_mode="m"), recurrent, layer.Linear(16, 4), lif()
    )
    module = SpikingClassifier(net, lr_step_epochs=0)
    before = _weights(module)
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1), max_epochs=1)
    trainer.fit(module, event_batches(n=16, T=6))
    assert trainer.global_step == 6
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    part = trainer.strategy.partition
    assert part is not None and any(recurrent in layer_.modules for layer_ in part.layers)


def test_as_many_time_steps_as_samples_is_warned_about(make_trainer):
    with pytest.warns(UserWarning, match=r"receives \[8, 8, 1, 8, 8\]: as many time steps as samples"):
        make_trainer(strategy=TruncatedLocalBPTT(k=4, n=1), max_steps=1).fit(
            SpikingClassifier(conv_net()), event_batches(n=8, T=8, batch_size=8)
        )


class _Stop:
    """Raises inside the user's training_step at the given call, after earlier chunks stepped."""

    def __init__(self, module: SpikingClassifier, at_call: int, error: BaseException) -> None:
        self.calls = 0
        self.stepped: list[torch.Tensor] = []
        original = module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == at_call:
                self.stepped = _weights(module.net)  # what the complete chunks before made of the weights
            out = original(*args, **kwargs)
            if self.calls == at_call:
                raise error
            return out

        module.training_step = training_step  # type: ignore[method-assign]


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("boom in training_step")])
def test_interrupt_mid_chunk_leaves_no_half_step_and_no_hooks(make_trainer, error):
    module = SpikingClassifier(conv_net(), lr_step_epochs=0)
    initial = _weights(module.net)
    # call 1 is the strategy's probe at setup (it stops at the network's input), 2 the first chunk, 3 the second:
    # its forward and local losses ran, its optimizer step did not
    stop = _Stop(module, at_call=3, error=error)
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1), max_epochs=1)
    with pytest.raises((SystemExit, RuntimeError)):  # Lightning turns a KeyboardInterrupt into exit(1)
        trainer.fit(module, event_batches(n=8, T=4))
    assert any(not torch.equal(a, b) for a, b in zip(initial, stop.stepped, strict=True))  # chunk 0 did step
    for a, b in zip(stop.stepped, module.net.parameters(), strict=True):
        assert torch.equal(a, b)  # nothing of the interrupted chunk reached the weights
    for m in module.net.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks, f"hook left on {type(m).__name__}"
        if isinstance(m, base.MemoryModule):
            assert "reset" not in vars(m)
    assert module.automatic_optimization and not hasattr(module, "local_classifiers")


def test_no_tensor_hook_or_graph_is_kept_across_batches(make_trainer):
    """Memory must not creep: after warm-up the number of live tensors is the same after 10 and 30 batches."""

    class Count(L.Callback):
        def __init__(self) -> None:
            self.live: dict[int, int] = {}

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step in (20, 60):
                gc.collect()
                self.live[trainer.global_step] = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    count = Count()
    loader = event_batches(n=8, T=4, batch_size=4)
    make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1), max_epochs=15, callbacks=[count]).fit(
        SpikingClassifier(conv_net(), lr=0.01, lr_step_epochs=0), loader
    )
    assert count.live[60] == count.live[20], count.live
