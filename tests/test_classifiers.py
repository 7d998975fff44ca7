"""LocalClassifier: what its readout sees, whatever pooling path the feature map takes; how it starts at threshold."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from spikingjelly.activation_based import neuron, surrogate
from torch import nn

from lightning_tlbptt import LocalClassifier
from lightning_tlbptt.classifiers import SequenceMeasure, _shift_bias, balance_bias, threshold_input
from lightning_tlbptt.paper import PaperNeuron

from snn_fixtures import lif

ADAPTIVE = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


@pytest.mark.parametrize(
    "spatial",
    [(8, 8), (12, 8), (10, 10), (16,), (8, 8, 8), (4, 4), (2, 9)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_readout_sees_the_adaptive_average_of_each_window(spatial):
    # Maps whose sides are multiples of the pool size take avg_pool (faster), the others adaptive pooling;
    # both must give the readout the average of the same windows, and pass the same gradient back.
    pool = 4 if len(spatial) < 3 else 2
    x = torch.rand(3, 2, 5, *spatial, requires_grad=True)
    classifier = LocalClassifier(7, lif(), pool=pool)
    seen = []
    classifier.linear.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    classifier(x)
    flat = x.flatten(0, 1)
    expected = ADAPTIVE[len(spatial)](flat, pool) if any(s > pool for s in spatial) else flat
    torch.testing.assert_close(seen[0], expected.flatten(1))

    weights = torch.randn_like(seen[0])
    (grad,) = torch.autograd.grad((seen[0] * weights).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected.flatten(1) * weights).sum(), x)
    torch.testing.assert_close(grad, expected_grad)


# --- starting the readout at its threshold (balance) -----------------------------------------------------------------


def high_threshold_lif() -> neuron.LIFNode:
    """The paper's kind of neuron (soft reset, no input decay, Rect) with a threshold that the default init of a
    readout over [0, 1] features never reaches: every output silent."""
    return neuron.LIFNode(
        tau=2.0, decay_input=False, v_reset=None, v_threshold=2.0, surrogate_function=surrogate.Rect(alpha=1.0),
        step_mode="m",
    )  # fmt: skip


def features(seed: int = 0) -> torch.Tensor:
    """A block's output over a chunk: [k=16, B=64, C=2, 4, 4] values in [0, 1] (pooled spikes)."""
    return torch.rand(16, 64, 2, 4, 4, generator=torch.Generator().manual_seed(seed))


def train_batch(readout: LocalClassifier, x: torch.Tensor) -> torch.Tensor:
    """One training batch of one chunk as the strategy runs it: the readout reset, forward on a block output that
    requires grad, backward."""
    readout.neuron.reset()
    out = readout(x.clone().requires_grad_())
    out.sum().backward()
    return out


@pytest.mark.parametrize("kind", ["trainable", "random"])
def test_a_silent_readout_fires_from_its_first_training_batch_and_is_recentred_after_it(kind: str) -> None:
    x = features()
    silent = LocalClassifier(10, high_threshold_lif(), kind=kind, balance=False)
    assert silent(x).sum() == 0  # the default init leaves every output neuron silent on these features

    readout = LocalClassifier(10, high_threshold_lif(), kind=kind)
    currents = []
    readout.linear.register_forward_hook(lambda _m, _a, out: currents.append(out))
    assert (train_batch(readout, x).sum((0, 1)) > 0).all()  # every output neuron fires in the first batch
    assert not bool(readout.balanced)  # re-centred on the whole first batch when the next starts
    out = train_batch(readout, x)
    assert bool(readout.balanced)
    assert (out.sum((0, 1)) > 0).all()
    # its mean input is the one that holds the membrane at threshold: u_th / tau = 1
    torch.testing.assert_close(currents[-1].mean(0), torch.full((10,), 1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(readout.linear.weight, silent.linear.weight)  # only the bias moves
    assert readout.linear.bias.requires_grad == (kind == "trainable")


def test_the_balance_is_the_first_batchs_mean_whether_it_comes_whole_in_chunks_or_in_time_slices() -> None:
    x = features()
    whole, chunked = LocalClassifier(10, high_threshold_lif()), LocalClassifier(10, high_threshold_lif())
    train_batch(whole, x)
    # the strategy's chunks: states carried (detached) between them, one backward each; the last in time slices
    for chunk in x.split([4, 12]):
        parts = chunk.split([1, 2, 9]) if len(chunk) == 12 else [chunk]
        torch.cat([chunked(part) for part in (p.clone().requires_grad_() for p in parts)]).sum().backward()
        chunked.neuron.v = chunked.neuron.v.detach()
    currents = []
    for readout in (whole, chunked):
        assert not bool(readout.balanced)
        handle = readout.linear.register_forward_hook(lambda _m, _a, out: currents.append(out.detach()))
        train_batch(readout, x)  # the next batch: re-centred first, on the mean over all 16 steps of the first
        handle.remove()
    torch.testing.assert_close(chunked.linear.bias, whole.linear.bias)
    torch.testing.assert_close(currents[0].mean(0), torch.full((10,), 1.0), atol=1e-5, rtol=0)


def test_the_no_grad_probe_and_evaluation_do_not_balance() -> None:
    x = features()
    plain = LocalClassifier(10, high_threshold_lif(), balance=False)
    plain(x)
    readout = LocalClassifier(10, high_threshold_lif())
    for _ in range(2):
        with torch.no_grad():
            readout(x)  # the strategy's setup call: sizes the lazy layer only
    readout.eval()
    train_batch(readout, x)
    train_batch(readout, x)
    assert not bool(readout.balanced)
    torch.testing.assert_close(readout.linear.bias, plain.linear.bias)
    readout.train()
    train_batch(readout, x)
    train_batch(readout, x)
    assert bool(readout.balanced)


def test_the_balanced_buffer_survives_a_state_dict_round_trip_and_prevents_a_second_balancing() -> None:
    readout = LocalClassifier(10, high_threshold_lif())
    train_batch(readout, features(0))
    train_batch(readout, features(0))
    state = readout.state_dict()
    assert state["balanced"].item() is True

    resumed = LocalClassifier(10, high_threshold_lif(), seed=7)
    resumed.load_state_dict(state)
    for seed in (1, 2):  # other batches would give another bias, were it balanced again
        train_batch(resumed, features(seed))
    torch.testing.assert_close(resumed.linear.bias, state["linear.bias"])

    # a state_dict saved before the buffer existed is a trained readout: it loads as balanced
    old = {key: value for key, value in state.items() if key != "balanced"}
    loaded = LocalClassifier(10, high_threshold_lif())
    loaded.load_state_dict(old)
    assert bool(loaded.balanced)


def test_balance_false_keeps_the_seeded_init() -> None:
    readout = LocalClassifier(10, high_threshold_lif(), balance=False)
    twin = LocalClassifier(10, high_threshold_lif(), balance=False)
    for seed in (0, 1):
        train_batch(readout, features(seed))
    with torch.no_grad():
        twin(features(1))
    torch.testing.assert_close(readout.linear.bias, twin.linear.bias)
    assert not bool(readout.balanced)


def test_a_neuron_of_unknown_dynamics_keeps_the_default_init_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="QIFNode.*balance=False"):
        readout = LocalClassifier(4, neuron.QIFNode(step_mode="m"))
    assert not readout.balance


@pytest.mark.parametrize(
    "node",
    [
        neuron.LIFNode(tau=5.0, decay_input=False, v_reset=None, v_threshold=0.5),  # the paper's (tau_p = 0.8)
        neuron.LIFNode(tau=5.0, decay_input=True, v_reset=None, v_threshold=0.5),
        neuron.LIFNode(tau=3.0, decay_input=False, v_reset=0.1, v_threshold=0.7),
        neuron.LIFNode(tau=3.0, decay_input=True, v_reset=-0.2, v_threshold=0.7),
        neuron.ParametricLIFNode(init_tau=4.0, decay_input=False, v_reset=None, v_threshold=0.5),
        neuron.ParametricLIFNode(init_tau=4.0, decay_input=True, v_reset=0.0, v_threshold=0.5),
    ],
    ids=["lif-paper", "lif-decay-input", "lif-hard-reset", "lif-decay-input-hard-reset", "plif", "plif-decay-input"],
)
def test_threshold_input_settles_the_membrane_at_threshold(node: neuron.BaseNode) -> None:
    # Simulated, not derived again: the neuron's own step function, fed threshold_input for many steps from rest,
    # converges to its threshold from below (it never quite fires).
    x = threshold_input(node)
    node.step_mode = "s"
    node.reset()
    for _ in range(300):
        spike = node(torch.full((1,), x))
        assert spike.item() == 0
    assert abs(float(node.v.detach()) - node.v_threshold) < 1e-4


def test_threshold_input_of_the_paper_neuron_and_of_if() -> None:
    assert threshold_input(PaperNeuron(tau_p=0.9, u_th=0.5).make()) == pytest.approx(0.5 * (1 - 0.9))
    node = neuron.IFNode(v_threshold=1.0, v_reset=None)
    assert threshold_input(node) == 0.0  # no leak: zero input holds any membrane, the threshold included
    node(torch.full((1,), 0.999))
    assert node(torch.zeros(1)).item() == 0 and float(node.v) == pytest.approx(0.999)


def test_balance_bias_names_a_missing_bias_and_a_misfit_current() -> None:
    with pytest.raises(ValueError, match="bias=False"):
        balance_bias(nn.Linear(3, 2, bias=False), lif(), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"\[4, 3\].*2 outputs"):
        balance_bias(nn.Linear(3, 2), lif(), torch.zeros(4, 3))


def _balance_on_rank(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        linear = nn.Linear(3, 2)
        current = torch.full((4, 2), float(rank))  # rank 0 sees 0, rank 1 sees 1: mean 0.5 over both
        balance_bias(linear, lif(), current)
        torch.save(linear.bias.detach(), f"{out}{rank}.pt")
        # only outputs silent on every rank move: output 0 spiked on rank 1 alone, output 1 nowhere
        fired = torch.tensor([float(rank), 0.0])
        torch.save(_shift_bias(linear, lif(), current.sum(0), 4, fired), f"{out}{rank}_silent.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_balance_bias_averages_the_mean_input_over_ranks(tmp_path) -> None:
    mp.spawn(_balance_on_rank, args=(str(tmp_path / "init"), str(tmp_path / "bias")), nprocs=2)
    torch.manual_seed(0)
    expected = nn.Linear(3, 2).bias.detach() + threshold_input(lif()) - 0.5
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"bias{rank}.pt"), expected)
        shift = torch.load(tmp_path / f"bias{rank}_silent.pt")
        assert shift[0] == 0 and shift[1] == pytest.approx(threshold_input(lif()) - 0.5)


@pytest.mark.parametrize("kind", ["trainable", "random"])
def test_a_readout_output_silent_for_a_whole_batch_is_recentred_and_the_others_stay(kind: str) -> None:
    x = features()
    readout = LocalClassifier(10, high_threshold_lif(), kind=kind)
    train_batch(readout, x)
    train_batch(readout, x)  # balanced
    assert bool(readout.balanced)
    with torch.no_grad():  # the blocks moved: output 3 is pushed far out of its window, the rest fire
        readout.linear.bias[3] -= 100.0
    trained = readout.linear.bias.detach().clone()
    assert train_batch(readout, x)[..., 3].sum() == 0
    resumed = LocalClassifier(10, high_threshold_lif(), kind=kind)
    resumed.load_state_dict(readout.state_dict())  # a checkpoint between the two batches carries the measure
    out = train_batch(readout, x)  # the next batch starts with output 3 back at its threshold
    train_batch(resumed, x)
    torch.testing.assert_close(resumed.linear.bias, readout.linear.bias)
    assert out[..., 3].sum() > 0
    torch.testing.assert_close(readout.linear.bias[:3], trained[:3])
    torch.testing.assert_close(readout.linear.bias[4:], trained[4:])

    stays = LocalClassifier(10, high_threshold_lif(), kind=kind, balance=False)
    with torch.no_grad():
        stays(x)  # sized
        stays.linear.bias[3] -= 100.0
    for _ in range(3):
        assert train_batch(stays, x)[..., 3].sum() == 0  # balance=False: nothing keeps it inside


def test_a_sequence_measure_without_spikes_cannot_tell_the_silent_outputs() -> None:
    measure = SequenceMeasure()
    assert not measure
    measure.add_current(torch.randn(4, 3, 10))
    assert measure and measure.rows == 12
    linear = nn.Linear(5, 10)
    with pytest.raises(ValueError, match="needs the spikes: call add_spikes"):
        measure.shift(linear, lif(), silent_only=True)
    before = linear.bias.detach().clone()
    shift = measure.shift(linear, lif(), silent_only=False)  # every output, as the first balance does
    torch.testing.assert_close(linear.bias.detach(), before + shift)
    assert not measure and measure.state() is None
