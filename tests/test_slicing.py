"""Layers walked in time slices: the same forward, the same gradients, less memory."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
from spikingjelly.activation_based import functional, layer, monitor, neuron
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_tlbptt import SpikingClassifier, TruncatedLocalBPTT, neurons, packing, slicing
from lightning_tlbptt.memory import TensorMemoryMeter
from lightning_tlbptt.partitioning import observe

from snn_fixtures import conv_net, event_batches, lif, wide_net


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    # runs compared for equality must add in the same order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _runs(net: nn.Module, x: torch.Tensor, slice_bytes: int = 1, **kwargs: Any) -> list[slicing.Run]:
    found = observe(net, None, (x,), {})
    return slicing.find_runs(net, [layer.modules for layer in found.partition.layers], slice_bytes, **kwargs)


def _x(T: int = 6, B: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, 1, 8, 8, generator=g) < 0.3).float()


def test_runs_are_the_step_wise_stretches_of_each_layer_with_a_neuron() -> None:
    net = wide_net()
    x = _x()
    layers = observe(net, None, (x,), {}).partition.layers
    runs = _runs(net, x)
    # every module of this network works step by step, so each layer is one run
    assert [r.modules for r in runs] == [layer.modules for layer in layers]
    assert [(r.start, r.stop) for r in runs][-1] == (9, 11)
    assert [r.following for r in runs] == [net[r.stop] for r in runs[:-1]] + [None]  # what each run's output feeds

    net = conv_net()  # its second layer nests conv and LIF in a Sequential of their own
    runs = _runs(net, _x())
    assert [(type(r.parent[r.start]).__name__, r.stop - r.start) for r in runs][:2] == [("Conv2d", 3), ("Conv2d", 2)]


def test_what_does_not_work_step_by_step_ends_a_run() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1, step_mode="m"),
        layer.BatchNorm2d(4, step_mode="m"),  # statistics over all k * B samples
        lif(),
        layer.AvgPool2d(2, step_mode="m"),
        layer.Conv2d(4, 4, 3, padding=1, step_mode="m"),
        lif(store_v_seq=True),  # would record only the last slice's voltages
        layer.Flatten(step_mode="m"),
        layer.Linear(64, 4, step_mode="m"),
        lif(),
    )
    assert [(r.start, r.stop) for r in _runs(net, _x())] == [(2, 4), (7, 9)]
    assert not slicing.steps_independently(nn.Dropout(0.1))  # a fresh mask per call, unlike SpikingJelly's
    assert slicing.steps_independently(layer.Dropout(0.1, step_mode="m"))


def _forward_backward(net: nn.Module, x: torch.Tensor, runs: list[slicing.Run] | None) -> tuple[Any, ...]:
    functional.reset_net(net)
    torch.manual_seed(3)  # the same dropout mask
    if runs is None:
        out = net(x)
    else:
        with slicing.installed(runs):
            out = net(x)
    out.sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("fast", [True, False], ids=["kernel", "spikingjelly-lif"])
@pytest.mark.usefixtures("finest_slices")
def test_sliced_forward_and_gradients_equal_the_whole_chunks(fast: bool) -> None:
    whole, sliced = wide_net(), wide_net()
    if fast:
        neurons.accelerate(whole), neurons.accelerate(sliced)
    x = _x()
    runs = _runs(sliced, x)
    out_whole, grads_whole = _forward_backward(whole, x, None)
    out_sliced, grads_sliced = _forward_backward(sliced, x, runs)
    assert all(run.needs and {run.plan.steps(run, need, len(x)) for need in run.needs.values()} == {1} for run in runs)
    assert torch.equal(out_sliced, out_whole) and out_whole.sum() > 0
    for name, g in grads_whole.items():
        assert g.abs().sum() > 0, f"{name}: no gradient, the comparison proves nothing"
        torch.testing.assert_close(grads_sliced[name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.usefixtures("finest_slices")
def test_backward_puts_the_slices_gradients_together_once() -> None:
    """A run whose input needs a gradient (inside a block) hands that gradient back in one piece: not one
    zero-filled tensor of the whole input per slice (which made k = T training 1.5x slower)."""
    net = wide_net()
    x = _x(T=8).requires_grad_()
    runs = _runs(net, x)
    whole_input = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape == x.shape:
                whole_input.append(func)
            return out

    with slicing.installed(runs):
        y = net(x)
    with Count():
        y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert len(whole_input) <= 2, whole_input  # the split's concatenation (and the first step's own split)


def test_slices_follow_the_byte_size() -> None:
    net = wide_net(channels=16)
    x = _x(T=10, B=4)
    per_step = 4 * 16 * 8 * 8 * 4  # the widest tensor of the first run: conv output of one step, float32
    runs = _runs(net, x, slice_bytes=3 * per_step)
    with slicing.installed(runs):
        net(x)
    assert runs[0].needs[(tuple(x.shape[1:]), x.dtype, x.device)].finest == 3
    functional.reset_net(net)
    runs = _runs(net, x, slice_bytes=10**9)
    with slicing.installed(runs):
        net(x)
    assert {need.finest for need in runs[0].needs.values()} == {10**9 // per_step}


def test_narrower_layers_take_longer_slices_within_the_peak_of_the_widest() -> None:
    """The widest layer sets the peak in its finest slices; a narrower one takes longer slices within that peak."""
    x = _x(T=16, B=16)

    def walk(coarsen: bool) -> tuple[torch.Tensor, list[int], int]:
        net = wide_net(channels=32, dropout=False)
        neurons.accelerate(net)
        runs = _runs(net, x, coarsen=coarsen)  # slice_bytes=1: one step is every run's finest slice
        assert {run.plan.coarsen for run in runs} == {coarsen}  # the plan's own setting, not a class switch
        calls = [0] * len(net)
        for i, module in enumerate(net):
            module.register_forward_hook(lambda m, a, y, i=i: calls.__setitem__(i, calls[i] + 1))
        with slicing.installed(runs), packing.binary_saved_tensors(net, bits=False):
            net(x).sum().backward()  # the first call measures every run
            functional.reset_net(net)
            calls[:] = [0] * len(net)
            with TensorMemoryMeter() as meter:
                out = net(x)
                out.sum().backward()
        return out.detach(), calls, meter.peak_bytes

    out_finest, calls_finest, peak_finest = walk(False)
    out, calls, peak = walk(True)
    assert torch.equal(out, out_finest)
    assert calls_finest[0] == calls[0] == len(x)  # the widest conv: one step per slice either way
    assert calls_finest[5] == len(x) and calls[5] < len(x) / 2, calls  # the second conv, a quarter as wide
    assert peak <= 1.05 * peak_finest, (peak, peak_finest)


def test_slicing_lowers_the_peak_of_a_wide_layer() -> None:
    x = _x(T=16, B=16)

    def peak(runs: bool) -> int:
        net = wide_net(channels=32)
        neurons.accelerate(net)
        installed = _runs(net, x) if runs else []
        functional.reset_net(net)
        with TensorMemoryMeter() as meter, slicing.installed(installed), packing.binary_saved_tensors(net, bits=False):
            net(x).sum().backward()
        return meter.peak_bytes

    whole, sliced = peak(False), peak(True)
    assert sliced < 0.6 * whole, (sliced, whole)


@pytest.mark.usefixtures("finest_slices")
def test_monitors_see_every_slice_and_the_module_is_handed_back_unchanged() -> None:
    net = wide_net()
    reference = copy.deepcopy(net)
    x = _x()
    runs = _runs(net, x)
    spikes = monitor.OutputMonitor(net, neuron.LIFNode)
    with slicing.installed(runs):
        net(x)
    assert "forward" not in vars(net)
    functional.reset_net(reference)
    expected = monitor.OutputMonitor(reference, neuron.LIFNode)
    reference(x)
    # SpikingJelly's monitor records once per call: the first neuron's slices, in order, are its whole chunk's spikes
    assert len(spikes["1"]) == len(x) and len(expected["1"]) == 1
    assert torch.equal(torch.cat(spikes["1"]), expected["1"][0])
    spikes.remove_hooks(), expected.remove_hooks()


def test_a_layer_that_drops_the_time_axis_is_named() -> None:
    class TimeSum(layer.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).sum(0)

    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Flatten(step_mode="m"), layer.Linear(64, 8, step_mode="m"), lif(), TimeSum(8, 4, step_mode="m")
    )
    x = _x()
    run = slicing.Run(net, 1, 4, slice_bytes=1)
    match = r"Sequential\[1:4\].*time as its first axis.*slice_bytes=None"
    with pytest.raises(RuntimeError, match=match), slicing.installed([run]):
        net(x)


@pytest.mark.parametrize("value", [0, -1, "abc", "0MiB"])
def test_a_wrong_slice_size_is_named(value: Any) -> None:
    with pytest.raises(ValueError, match=r"slice_bytes must be"):
        TruncatedLocalBPTT(k=2, n=1, slice_bytes=value)


@pytest.mark.usefixtures("finest_slices")
def test_spikes_made_in_slices_are_packed() -> None:
    net = wide_net(dropout=False)  # the second conv reads the first run's spikes, concatenated from slices
    x = _x()
    runs = _runs(net, x)
    with packing.binary_saved_tensors(net) as stats, slicing.installed(runs):
        out = net(x)
    assert packing.is_marked(out)
    assert stats.packed == len(x)  # the second conv's input, saved once per slice, packed each time


class OptimizerGrads(L.Callback):
    """Every gradient the optimizer steps with, before each step: the module's parameters by name, the others (the
    strategy's local classifiers, wherever it keeps them) as ``readout.<group>.<index>``."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        names = {id(p): name for name, p in pl_module.named_parameters()}
        step = {}
        for g, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    step[names.get(id(p), f"readout.{g}.{i}")] = p.grad.detach().clone()
        self.steps.append(step)


def _fit_grads(
    make_trainer: Any, monkeypatch: pytest.MonkeyPatch, k: int, n: int | None, slice_bytes: int | None, **kwargs: Any
) -> list[dict]:
    module = SpikingClassifier(wide_net(), lr=0.1, lr_step_epochs=0)
    recorder = OptimizerGrads()
    strategy = TruncatedLocalBPTT(k=k, n=n, slice_bytes=slice_bytes, **kwargs)
    found: list[slicing.Run] = []
    find_runs = slicing.find_runs  # the finest_slices fixture's, where a test uses it

    def recording(*args: Any, **kw: Any) -> list[slicing.Run]:
        runs = find_runs(*args, **kw)
        found.extend(runs)
        return runs

    torch.manual_seed(5)
    trainer = make_trainer(strategy=strategy, max_steps=4, callbacks=[recorder])
    with monkeypatch.context() as patch:
        patch.setattr(slicing, "find_runs", recording)
        trainer.fit(module, event_batches(n=16, T=8, batch_size=4))
    # the strategy found runs exactly when slicing is on, and walked them in slices (a run measures its first walk)
    assert bool(found) == (slice_bytes is not None) and all(run.needs for run in found)
    return recorder.steps


@pytest.mark.parametrize(("k", "n"), [(8, None), (4, 1), (2, 1)])
@pytest.mark.usefixtures("finest_slices")
def test_strategy_trains_the_same_with_and_without_slices(
    make_trainer, monkeypatch: pytest.MonkeyPatch, k: int, n: int | None
) -> None:
    """With n = 1 every run ends a block: its local classifier reads it slice by slice."""
    whole = _fit_grads(make_trainer, monkeypatch, k, n, None)
    sliced = _fit_grads(make_trainer, monkeypatch, k, n, 1)
    assert len(whole) == len(sliced) >= 4
    for step, (a, b) in enumerate(zip(whole, sliced, strict=True)):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=f"step {step}: {name}")
    readouts = [g for name, g in whole[0].items() if not name.startswith("net.")]
    assert (n is None) == (readouts == []) and all(g.abs().sum() > 0 for g in readouts)
    assert all(g.abs().sum() > 0 for name, g in whole[0].items() if name.startswith("net.0."))


def test_blocks_train_in_slices_at_a_lower_peak(make_trainer) -> None:
    """The boundary's readout runs per slice: the block's backward never holds a gradient of its whole output."""
    x_batch = event_batches(n=8, T=16, batch_size=8)

    def peak(slice_bytes: int | None) -> int:
        module = SpikingClassifier(wide_net(channels=32), lr=0.1, lr_step_epochs=0)
        trainer = make_trainer(strategy=TruncatedLocalBPTT(k=16, n=1, slice_bytes=slice_bytes), max_steps=1)
        with TensorMemoryMeter() as meter:
            trainer.fit(module, x_batch)
        return meter.peak_bytes

    assert peak(1) < 0.6 * peak(None)


class ConvBnSpike(nn.Sequential):
    """A user's block template: an ``nn.Sequential`` subclass whose constructor takes its own arguments, so that
    ``nn.Sequential.__getitem__`` with a slice (``type(self)(OrderedDict(...))``) fails. Counts its constructions."""

    built = 0

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(layer.Conv2d(cin, cout, 3, padding=1, step_mode="m"), lif(), layer.AvgPool2d(2, step_mode="m"))
        ConvBnSpike.built += 1


def block_net(seed: int = 0) -> nn.Sequential:
    """[T, B, 1, 8, 8] -> [T, B, 4]: two ConvBnSpike blocks and a spiking output layer."""
    torch.manual_seed(seed)
    return nn.Sequential(
        ConvBnSpike(1, 8), ConvBnSpike(8, 8), layer.Flatten(step_mode="m"), layer.Linear(32, 4, step_mode="m"), lif()
    )


@pytest.mark.usefixtures("finest_slices")
def test_a_sequential_subclass_with_its_own_constructor_is_sliced_without_building_it() -> None:
    whole, sliced = block_net(), block_net()
    x = _x()
    built = ConvBnSpike.built
    runs = _runs(sliced, x)
    assert [type(run.parent).__name__ for run in runs][:2] == ["ConvBnSpike", "ConvBnSpike"]
    out_whole, grads_whole = _forward_backward(whole, x, None)
    out_sliced, grads_sliced = _forward_backward(sliced, x, runs)
    assert ConvBnSpike.built == built, "slicing called the user's constructor"
    assert all(run.needs for run in runs[:2])  # the blocks' runs were walked in slices
    assert torch.equal(out_sliced, out_whole) and out_whole.sum() > 0
    for name, g in grads_whole.items():
        torch.testing.assert_close(grads_sliced[name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.usefixtures("finest_slices")
def test_a_network_of_sequential_subclasses_trains_through_the_strategy(make_trainer) -> None:
    """k = T, one block equals plain Lightning with every layer walked in slices; k < T, n = 1 trains every block."""

    def fit(strategy: TruncatedLocalBPTT | None, steps: int = 4) -> tuple[SpikingClassifier, L.Trainer]:
        module = SpikingClassifier(block_net(), lr=0.1, lr_step_epochs=0)
        torch.manual_seed(5)
        trainer = make_trainer(max_steps=steps, **({"strategy": strategy} if strategy else {}))
        trainer.fit(module, event_batches(n=16, T=8, batch_size=4))
        return module, trainer

    initial = {name: p.detach().clone() for name, p in block_net().named_parameters()}
    built = ConvBnSpike.built
    reference, _ = fit(None)
    ours, _ = fit(TruncatedLocalBPTT(k=8, n=None, slice_bytes=1))
    for (name, p), q in zip(reference.net.named_parameters(), ours.net.parameters(), strict=True):
        assert not torch.equal(p, initial[name]), f"{name} did not move: the comparison proves nothing"
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)

    local, trainer = fit(TruncatedLocalBPTT(k=2, n=1, slice_bytes=1))
    strategy = trainer.strategy
    assert isinstance(strategy, TruncatedLocalBPTT) and strategy.partition is not None
    assert len(strategy.partition.blocks) == 2  # each ConvBnSpike a layer, the output layer closing the last
    for name, p in local.net.named_parameters():
        assert not torch.equal(p, initial[name]), f"{name} did not learn"
    assert ConvBnSpike.built == built + 3 * 2, "only block_net() builds blocks, never the strategy"
