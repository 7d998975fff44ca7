"""The neuron kernel against SpikingJelly's own IF, LIF and ParametricLIF nodes: same spikes, same gradients, less
saved memory."""

from __future__ import annotations

import copy
import itertools
import pickle

import lightning as L
import pytest
import torch
from spikingjelly.activation_based import functional, neuron, surrogate

from lightning_tlbptt import SavedTensorsMeter, SpikingClassifier, TruncatedLocalBPTT, native
from lightning_tlbptt.neurons import LIFFunction, accelerate, is_accelerated, restore, supports

from snn_fixtures import GradRecorder, conv_net, event_batches

#: every neuron x reset (soft, hard at 0 and below) x decay_input (IF has none) x detach_reset
NEURONS = [
    dict(kind=kind, v_reset=reset, decay_input=decay, detach_reset=detach)
    for kind, reset, decay, detach in itertools.product(
        ("if", "lif", "plif"), (None, 0.0, -0.2), (True, False), (True, False)
    )
    if kind != "if" or decay
]
#: every surrogate the kernel knows, at SpikingJelly's default alpha (Rect at the paper networks' 2.0)
SURROGATES = {
    "atan": surrogate.ATan,
    "sigmoid": surrogate.Sigmoid,
    "rect": lambda: surrogate.Rect(alpha=2.0),
    "piecewise_quadratic": surrogate.PiecewiseQuadratic,
    "piecewise_exp": surrogate.PiecewiseExp,
    "soft_sign": surrogate.SoftSign,
    "super_spike": surrogate.SuperSpike,
    "erf": surrogate.Erf,
}


def _node(kind: str = "lif", function: str = "rect", decay_input: bool = True, **kwargs) -> neuron.BaseNode:
    """A multi-step SpikingJelly neuron; LIF at tau = 3 and ParametricLIF from tau = 3, so that the decay rounds."""
    kwargs = dict(v_threshold=0.5, surrogate_function=SURROGATES[function](), step_mode="m") | kwargs
    if kind == "if":
        return neuron.IFNode(**kwargs)
    if kind == "lif":
        return neuron.LIFNode(tau=kwargs.pop("tau", 3.0), decay_input=decay_input, **kwargs)
    return neuron.ParametricLIFNode(init_tau=3.0, decay_input=decay_input, **kwargs)


def _lif(alpha: float = 2.0, **kwargs) -> neuron.LIFNode:
    return neuron.LIFNode(surrogate_function=surrogate.Rect(alpha=alpha), step_mode="m", **kwargs)


def _run(node: neuron.BaseNode, x: torch.Tensor, w: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two calls carrying the state in one graph (as a chunk after a chunk), a loss on spikes and final voltage.
    Returns the spikes and final voltage, and the gradients of ``x`` and, for ParametricLIF, of ``w``."""
    x = x.clone().requires_grad_()
    first = node(x)
    second = node(0.7 * x)
    loss = (first * w).sum() + (second * w.flip(0)).sum() + 0.3 * node.v.sum()
    loss.backward()
    return [first, second, node.v.detach()], [x.grad, *([node.w.grad] if hasattr(node, "w") else [])]


@pytest.mark.parametrize("path", ["torch", "torch-blocks-of-3", "c"])
@pytest.mark.parametrize("function", SURROGATES)
@pytest.mark.parametrize("config", NEURONS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_spikes_bit_identical_and_gradients_equal_spikingjelly(config, function, path, monkeypatch):
    """Against SpikingJelly's own multi-step loop on the CPU. The torch path also in blocks of 3 steps: 7 = 3 + 3 + 1,
    and 63 neurons a step, so a block's bits do not end on a byte; the compiled C loops (lightning_tlbptt.native)
    on 72 neurons a step for Rect (whole bytes of bits) and 63 for the others (no bits)."""
    if path == "c" and not native.available():
        pytest.skip("no C compiler here: the C loops are not built")
    calls = _count_native_calls(monkeypatch)
    torch.manual_seed(0)
    x = torch.randn(7, 3, 24 if path == "c" and function == "rect" else 21) * 0.8
    w = torch.randn(x.shape)
    reference, fast = _node(function=function, **config), _node(function=function, **config)
    block_bytes = 3 * 63 * 4 if path == "torch-blocks-of-3" else 1 << 20
    assert accelerate(fast, native=path == "c", block_bytes=block_bytes) == [fast]
    assert accelerate(reference) == [reference]
    restore(reference)
    ref_out, ref_grads = _run(reference, x, w)
    fast_out, fast_grads = _run(fast, x, w)
    assert calls == ({"forward": 2, "backward": 2} if path == "c" else {})
    for a, b in zip(ref_out, fast_out, strict=True):
        assert torch.equal(a, b)
    assert ref_out[0].sum() > 0  # the comparison is not between zeros
    for ours, theirs in zip(fast_grads, ref_grads, strict=True):  # x's, and ParametricLIF's w
        assert theirs.abs().sum() > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _count_native_calls(monkeypatch) -> dict[str, int]:
    """Calls of the C loops from now on, by direction."""
    calls: dict[str, int] = {}

    def counting(name: str, run):
        def counted(*args):
            calls[name] = calls.get(name, 0) + 1
            return run(*args)

        return counted

    for name in ("forward", "backward"):
        monkeypatch.setattr(native, name, counting(name, getattr(native, name)))
    return calls


def _grad_through(node: neuron.BaseNode, x: torch.Tensor, consume) -> tuple[torch.Tensor, dict[str, int]]:
    """``x``'s gradient through ``node`` and ``consume(spikes)``; data pointers of the two gradients at the node."""
    functional.reset_net(node)
    x = x.clone().requires_grad_()
    ptrs: dict[str, int] = {}
    x.register_hook(lambda g: ptrs.__setitem__("x", g.data_ptr()))
    spikes = node(x)
    spikes.register_hook(lambda g: ptrs.__setitem__("spikes", g.data_ptr()))
    consume(spikes).backward()
    return x.grad, ptrs


def test_backward_overwrites_an_exclusive_gradient_and_never_a_shared_one():
    torch.manual_seed(2)
    x, w = torch.randn(6, 4, 2, 8, 8), torch.randn(6 * 4, 2, 4, 4)
    fast, reference = _lif(), _lif()
    accelerate(fast)

    def pooled(s):  # a multi-step pool: its gradient is a view of a tensor that nothing else holds
        return (torch.nn.functional.avg_pool2d(s.flatten(0, 1), 2) * w).sum()

    expected, _ = _grad_through(reference, x, pooled)
    got, ptrs = _grad_through(fast, x, pooled)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert ptrs["x"] == ptrs["spikes"]  # dL/dx written over dL/ds: one buffer, not two

    # add hands one gradient to both inputs. The other input's backward (q's MulBackward, created before the
    # neuron's node) runs after the neuron's, so the gradient is still needed when the kernel gets it.
    leaf = torch.randn(6, 4, 2, 8, 8, requires_grad=True)
    upstream = torch.randn(6, 4, 2, 8, 8)
    q = leaf * 3.0
    expected, _ = _grad_through(reference, x, lambda s: ((s + q) * upstream).sum())
    leaf.grad = None
    q = leaf * 3.0
    got, ptrs = _grad_through(fast, x, lambda s: ((s + q) * upstream).sum())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(leaf.grad, 3.0 * upstream) and ptrs["x"] != ptrs["spikes"]


@pytest.mark.parametrize(("kind", "function"), [("lif", "rect"), ("plif", "atan"), ("if", "sigmoid")])
def test_gradient_reaches_an_initial_voltage_that_requires_grad(kind, function):
    torch.manual_seed(1)
    x = torch.randn(5, 4, 6)
    start = torch.rand(4, 6) * 0.3
    grads = []
    for accelerated in (False, True):
        node = _node(kind, function, decay_input=False, v_reset=None, v_threshold=0.4)
        if accelerated:
            accelerate(node)
        v0 = start.clone().requires_grad_()
        node.v = v0
        node(x).sum().backward()
        grads.append(v0.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "function", "floats", "bits"),
    [
        ("lif", "rect", 0, 1),
        ("lif", "atan", 1, 0),
        ("if", "sigmoid", 1, 0),
        ("plif", "rect", 1, 1),
        ("plif", "atan", 2, 0),
    ],
)
def test_saves_a_bit_for_rect_a_float_for_the_others_and_less_than_spikingjelly(kind, function, floats, bits):
    """Soft reset: Rect saves its window, one bit per neuron-step; any other surrogate the float h; ParametricLIF
    adds dh/dq as a float. SpikingJelly saves at least h - v_threshold as a float, and more for ParametricLIF."""
    x = (torch.randn(10, 32, 64) * 0.6).requires_grad_()
    saved = []
    for accelerated in (False, True):
        node = _node(kind, function, decay_input=False, v_reset=None, v_threshold=0.5)
        if accelerated:
            accelerate(node)
        with SavedTensorsMeter() as meter:
            node(x).sum().backward()
        saved.append(meter.peak_bytes)
    sigmoid = 4 if kind == "plif" else 0  # q = sigmoid(w), which autograd keeps for w's gradient
    assert saved[1] == x.numel() * (4 * floats + bits / 8) + sigmoid
    assert saved[1] * (32 if function == "rect" and kind == "lif" else 1) <= saved[0]


@pytest.mark.parametrize(
    "config", NEURONS[1::4], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)  # IF, LIF and ParametricLIF; soft and hard; detached and not
def test_masks_as_bits_or_bytes_give_the_same_bits(config):
    """Rect's masks saved as bits (default) or as int8 bytes: same spikes, same gradients bit for bit, 8x less
    saved."""
    grads = []
    for bits in (False, True):  # in blocks of 4 steps (6 = 4 + 2), whose bits do not end on a byte
        torch.manual_seed(2)
        node = _node(**config)
        accelerate(node, bits=bits, block_bytes=4 * 39 * 4)
        grads.append(_run(node, torch.randn(6, 3, 13) * 0.8, torch.randn(6, 3, 13))[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True)) and grads[1][0].abs().sum() > 0
    torch.manual_seed(2)
    x = torch.randn(6, 3, 13) * 0.8  # 39 neurons: the last byte of bits is padded
    w = torch.randn(6, 3, 13)
    results, saved = [], []
    for bits in (False, True):  # one block
        node = _node(**config)
        accelerate(node, bits=bits)
        results.append(_run(node, x, w))
        functional.reset_net(node)
        with SavedTensorsMeter() as meter:
            node(x.clone().requires_grad_())
        saved.append(meter.current_bytes)
    (out_bytes, grad_bytes), (out_bits, grad_bits) = results
    assert all(torch.equal(a, b) for a, b in zip(out_bytes, out_bits, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grad_bytes, grad_bits, strict=True))
    assert grad_bits[0].abs().sum() > 0
    masks = 1 if config["v_reset"] is None else 2  # the window, and for a hard reset the spikes
    floats = 0 if config["v_reset"] is None or config["detach_reset"] else x.numel() * 4  # h, for a hard reset
    floats += x.numel() * 4 + 4 if config["kind"] == "plif" else 0  # dh/dq, and sigmoid(w) for w's gradient
    assert saved == [masks * x.numel() + floats, masks * 30 + floats]  # 6 x 39 = 234 bits in one block: 30 bytes


class _OwnStep(neuron.LIFNode):
    def multi_step_forward(self, x_seq, *args, **kwargs):
        return super().multi_step_forward(x_seq, *args, **kwargs)


@pytest.mark.parametrize(
    ("node", "reason"),
    [
        (neuron.LIFNode(surrogate_function=surrogate.PiecewiseLeakyReLU(), step_mode="m"), "no derivative formula"),
        (neuron.LIFNode(surrogate_function=surrogate.Rect(), store_v_seq=True, step_mode="m"), "store_v_seq"),
        (neuron.IFNode(surrogate_function=surrogate.ATan(spiking=False), step_mode="m"), "not spiking"),
        (neuron.LIFNode(surrogate_function=surrogate.Sigmoid(alpha=torch.tensor(4.0)), step_mode="m"), "alpha"),
        (neuron.ParametricLIFNode(step_mode="m").double(), "not a float32 scalar"),
        (_OwnStep(step_mode="m"), "overrides LIFNode's step functions"),
        (torch.nn.ReLU(), "not an IFNode, LIFNode or ParametricLIFNode"),
    ],
)
def test_unsupported_neurons_are_left_to_spikingjelly(node, reason):
    assert reason in supports(node)
    assert accelerate(node) == [] and not is_accelerated(node)


def test_default_neurons_of_each_kind_are_supported():
    """SpikingJelly's defaults (Sigmoid surrogate, hard reset to 0) and its most used surrogate (ATan)."""
    for node in (
        neuron.IFNode(),
        neuron.LIFNode(),
        neuron.ParametricLIFNode(),
        neuron.LIFNode(surrogate_function=surrogate.ATan()),
    ):
        assert supports(node) is None


@pytest.mark.parametrize("block_bytes", [0, -1, 1.5, True])
def test_a_block_of_no_bytes_is_refused_with_the_value(block_bytes):
    with pytest.raises(ValueError, match=rf"block_bytes={block_bytes!r}.*positive int"):
        accelerate(_lif(), block_bytes=block_bytes)


def test_restore_hands_back_spikingjelly_and_single_step_is_untouched():
    node = _lif(tau=2.0)
    accelerate(node)
    assert "multi_step_forward" in vars(node)
    restore(node)
    assert "multi_step_forward" not in vars(node) and not is_accelerated(node)

    single = _lif(tau=2.0)
    single.step_mode = "s"
    accelerate(single)
    x = torch.randn(4, 5)
    reference = _lif(tau=2.0)
    reference.step_mode = "s"
    assert torch.equal(single(x), reference(x))


def test_accelerated_network_pickles_and_copies_with_the_kernel():
    net = torch.nn.Sequential(_lif(tau=2.0, v_threshold=0.3), _lif(tau=3.0, v_threshold=0.3))
    accelerate(net)
    x = torch.randn(5, 2, 7)
    expected = net(x)
    for clone in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
        assert all(is_accelerated(m) for m in clone) and clone[0].multi_step_forward.node is clone[0]
        functional.reset_net(clone)
        assert torch.equal(clone(x), expected)
    functional.reset_net(net)


def test_without_grad_saves_nothing_and_spikes_equal():
    x = torch.randn(6, 3, 5)
    fast, reference = _lif(tau=2.0, v_threshold=0.3), _lif(tau=2.0, v_threshold=0.3)
    accelerate(fast)
    with torch.no_grad(), SavedTensorsMeter() as meter:
        spikes = fast(x)
    assert meter.peak_bytes == 0 and not spikes.requires_grad
    assert torch.equal(spikes, reference(x)) and torch.equal(fast.v, reference.v)


@pytest.mark.parametrize(
    ("function", "taken"), [("atan", "spikingjelly"), ("sigmoid", "spikingjelly"), ("rect", "kernel")]
)
def test_off_the_cpu_only_rect_takes_the_kernel(function, taken, monkeypatch):
    """SpikingJelly has fused CUDA kernels for the smooth surrogates (not for Rect); a meta tensor stands in for a
    CUDA one, and both paths are stubbed to say which was taken."""
    node = _node("lif", function)
    accelerate(node)
    calls = []
    monkeypatch.setattr(neuron.LIFNode, "multi_step_forward", lambda self, x_seq: calls.append("spikingjelly") or x_seq)
    monkeypatch.setattr(LIFFunction, "apply", lambda x_seq, v, *args: calls.append("kernel") or (x_seq, v))
    node(torch.zeros(3, 2, 8, device="meta"))
    assert calls == [taken]


def test_half_precision_input_keeps_spikingjelly_path():
    x = torch.randn(4, 3, 5).to(torch.bfloat16)
    fast, reference = _lif(tau=2.0, v_threshold=0.3), _lif(tau=2.0, v_threshold=0.3)
    accelerate(fast)
    assert torch.equal(fast(x), reference(x)) and fast(x).dtype == torch.bfloat16


def _fit(fast_neurons: bool, callbacks: list[L.Callback], make_trainer) -> SpikingClassifier:
    module = SpikingClassifier(conv_net(), lr=0.1, lr_step_epochs=0)
    strategy = TruncatedLocalBPTT(k=3, n=1, fast_neurons=fast_neurons)
    make_trainer(strategy=strategy, max_steps=4, callbacks=callbacks).fit(module, event_batches(n=16, T=6))
    return module


class _SeesKernel(L.Callback):
    def __init__(self) -> None:
        self.accelerated: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.accelerated.append(all(is_accelerated(m) for m in pl_module.net.modules() if supports(m) is None))


def test_strategy_trains_with_the_kernel_and_hands_the_network_back(make_trainer):
    seen, recorder = _SeesKernel(), GradRecorder()
    module = _fit(True, [seen, recorder], make_trainer)
    # two batches, two chunks each: installed by the second batch at the latest (the strategy may install it while it
    # probes the network on the first)
    assert len(seen.accelerated) == 2 and seen.accelerated[-1]
    assert not any(is_accelerated(m) for m in module.modules())

    seen_off, recorder_off = _SeesKernel(), GradRecorder()
    _fit(False, [seen_off, recorder_off], make_trainer)
    assert seen_off.accelerated == [False, False]
    # same training, step for step, with either kernel
    assert len(recorder.steps) == len(recorder_off.steps) == 4
    for got, expected in zip(recorder.steps, recorder_off.steps, strict=True):
        assert got.keys() == expected.keys()
        for name in got:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_kernel_lowers_the_strategys_saved_memory():
    x = (torch.rand(6, 8, 1, 8, 8) < 0.3).float()
    peaks = []
    for fast in (False, True):
        net = conv_net()
        if fast:
            accelerate(net)
        functional.reset_net(net)
        with SavedTensorsMeter() as meter:
            net(x).sum().backward()
        peaks.append(meter.peak_bytes)
    assert peaks[1] < 0.8 * peaks[0]
