"""Binary saved tensors at one bit: exact gradients, less saved memory, nothing else touched."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from torch import nn

from lightning_tlbptt import SavedTensorsMeter, SpikingClassifier, TruncatedLocalBPTT, packing
from lightning_tlbptt.neurons import accelerate

from snn_fixtures import GradRecorder, conv_net, event_batches


def _lif(function: nn.Module) -> neuron.LIFNode:
    return neuron.LIFNode(
        tau=2.0, decay_input=False, v_reset=None, v_threshold=0.2, surrogate_function=function, step_mode="m"
    )


def _net(function: nn.Module, seed: int = 0) -> nn.Sequential:
    """[T, B, 2, 8, 8] -> [T, B, 5]: convs and a linear that read spikes through max pool, avg pool and flatten."""
    torch.manual_seed(seed)
    return nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1, step_mode="m"),
        _lif(function),
        layer.MaxPool2d(2, step_mode="m"),  # max of spikes: spikes, marked by the pool's hook
        layer.Conv2d(8, 8, 3, padding=1, step_mode="m"),
        _lif(function),
        layer.AvgPool2d(2, step_mode="m"),  # saves its (spike) input for backward
        _lif(function),
        layer.Flatten(step_mode="m"),  # a view of the spikes
        layer.Linear(8 * 2 * 2, 5, step_mode="m"),
        _lif(function),
    )


def _events(T: int = 6, B: int = 4) -> torch.Tensor:
    return (torch.rand(T, B, 2, 8, 8, generator=torch.Generator().manual_seed(3)) < 0.3).float()


def _train_step(net: nn.Module, x: torch.Tensor, pack: bool, mark_input: bool = False) -> dict:
    """One forward and backward; gradients, the peak saved bytes (meter outside the packing) and the stats."""
    functional.reset_net(net)
    x = x.clone().requires_grad_()
    stats = None
    with SavedTensorsMeter() as meter:
        if pack:
            with packing.binary_saved_tensors(net) as stats:
                if mark_input:
                    packing.mark(x)
                out = net(x)
        else:
            out = net(x)
        saved_at_end_of_forward = meter.current_bytes
        (out * torch.linspace(0.5, 1.5, out.shape[-1])).sum().backward()
    grads = {name: p.grad for name, p in net.named_parameters()} | {"input": x.grad}
    return {"grads": grads, "saved": saved_at_end_of_forward, "stats": stats, "out": out.detach()}


@pytest.mark.parametrize("fast", [False, True], ids=["spikingjelly-lif", "kernel-lif"])
@pytest.mark.parametrize("function", [surrogate.Rect(alpha=1.0), surrogate.ATan()], ids=["rect", "atan"])
def test_gradients_bit_identical_with_and_without_packing(function, fast):
    x = _events()
    runs = []
    for pack in (False, True):
        net = _net(function)
        if fast:
            accelerate(net)  # installs the kernel for both surrogates
        runs.append(_train_step(net, x, pack, mark_input=True))
    plain, packed = runs
    assert torch.equal(plain["out"], packed["out"])
    assert plain["grads"].keys() == packed["grads"].keys()
    for name, grad in plain["grads"].items():
        assert grad.abs().sum() > 0, name  # every layer receives gradient: the comparison is not between zeros
        assert torch.equal(grad, packed["grads"][name]), name
    # conv 1 input (marked by hand), max pool input, conv 2 input, linear input; the avg pool's input as its shape
    assert (packed["stats"].packed, packed["stats"].shape_only) == (4, 1)


def test_saved_memory_shrinks_by_the_packed_bytes():
    """The meter outside the packing sees packed copies: saved bytes fall by exactly what packing removed."""
    x = _events(T=8, B=8)
    net = _net(surrogate.Rect(alpha=1.0))
    accelerate(net)
    plain = _train_step(net, x, pack=False)
    packed = _train_step(net, x, pack=True, mark_input=True)
    stats = packed["stats"]
    assert stats.ratio == 32  # float32 values, whole bytes (every size here is a multiple of 8)
    assert stats.shape_only == 1  # the avg pool's input: its backward needs the shape alone
    assert plain["saved"] - packed["saved"] == stats.unpacked_bytes - stats.packed_bytes + stats.shape_only_bytes
    # the spikes that convs, pools and the linear read are most of what this net saves: 3.9x less in all (what is
    # left is mostly the max pool's int64 indices and the kernel's bits)
    assert packed["saved"] * 3.5 < plain["saved"]


@pytest.mark.parametrize(
    "pool", [nn.AvgPool2d(2), nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True), nn.AdaptiveAvgPool2d(3)]
)
def test_average_pool_keeps_only_the_shape_of_any_input_and_its_gradient_is_exact(pool):
    x = torch.randn(4, 3, 8, 8, requires_grad=True)  # real values, unmarked: the pool reads only their shape
    weight = torch.randn(pool(x).shape)
    (pool(x) * weight).sum().backward()
    expected, x.grad = x.grad, None
    with packing.binary_saved_tensors() as stats:
        y = pool(x)
    (y * weight).sum().backward()
    assert stats.shape_only == 1 and stats.shape_only_bytes == x.numel() * 4 and stats.packed == 0
    assert torch.equal(x.grad, expected)


def test_average_pool_of_a_channels_last_input_is_saved_whole():
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    with packing.binary_saved_tensors() as stats:
        y = nn.AvgPool2d(2)(x)
    y.sum().backward()
    assert stats.shape_only == 0 and x.grad.stride() == x.stride()


def test_unmarked_tensors_pass_through_untouched():
    a = torch.randn(4, 8, requires_grad=True)
    zeros_and_ones = (torch.rand(4, 8) < 0.5).float()  # binary, but nobody marked it: not scanned, not packed
    with packing.binary_saved_tensors() as stats:
        y = a.exp()  # saves its output
        z = a * zeros_and_ones  # saves zeros_and_ones
    assert stats.saved == 2 and stats.packed == 0
    saved_output, saved_other = y.grad_fn._saved_result, z.grad_fn._saved_other
    assert saved_output.data_ptr() == y.data_ptr() and torch.equal(saved_output, y)
    assert saved_other.data_ptr() == zeros_and_ones.data_ptr()
    (y.sum() + z.sum()).backward()
    torch.testing.assert_close(a.grad, a.detach().exp() + zeros_and_ones, rtol=0, atol=0)


def test_views_of_spikes_are_packed_copies_and_changed_spikes_are_not():
    node = _lif(surrogate.Rect(alpha=1.0))
    scale = torch.randn(16, requires_grad=True)
    x = torch.randn(6, 4, 16) * 0.5
    with packing.binary_saved_tensors(node) as stats:
        spikes = node(x)  # [T, B, 16], marked by the neuron hook
        assert packing.is_marked(spikes)
        views = [spikes.flatten(0, 1), spikes.transpose(0, 1), spikes[2:4], spikes.reshape(24, 16)]
        assert all(packing.is_marked(v) for v in views)
        products = [v * scale for v in views]  # each saves its view (for the gradient of scale): all four packed
        assert stats.packed == 4
        copy = spikes.transpose(0, 1).contiguous()  # a copy: not known to be binary (matmul makes such copies)
        assert not packing.is_marked(copy)
        spikes.mul_(2.0)  # changed in place after marking: the mark no longer holds
        assert not packing.is_marked(spikes) and not packing.is_marked(views[0])
    sum(p.sum() for p in products).backward()
    before = spikes / 2  # the values that were saved (packed before the in-place change)
    assert torch.equal(scale.grad, 3 * before.sum((0, 1)) + before[2:4].sum((0, 1)))


def test_sparse_saved_tensors_pass_through():
    dense = torch.randn(4, 3, requires_grad=True)
    sparse = torch.eye(4).to_sparse().requires_grad_()
    with packing.binary_saved_tensors() as stats:
        out = torch.sparse.mm(sparse, dense)  # saves the sparse tensor and the dense one
    assert stats.saved >= 1 and stats.packed == 0
    out.sum().backward()
    assert torch.equal(dense.grad, torch.ones(4, 3))


def test_transposed_spikes_unpack_with_their_strides():
    spikes = (torch.rand(3, 4, 5) < 0.5).float()
    packing.mark(spikes)
    view = spikes.permute(2, 0, 1)
    w = torch.randn(4, requires_grad=True)
    with packing.binary_saved_tensors() as stats:
        out = view * w  # saves the permuted view for w's gradient
    assert stats.packed == 1
    unpacked = out.grad_fn._saved_self
    assert torch.equal(unpacked, view) and unpacked.stride() == view.stride()


def test_bool_saved_tensors_are_packed_by_dtype():
    a = torch.randn(6, 10, requires_grad=True)
    condition = torch.rand(6, 10) < 0.5
    with packing.binary_saved_tensors() as stats:
        y = torch.where(condition, a, -2 * a)
    assert stats.packed == 1 and stats.unpacked_bytes == 60 and stats.packed_bytes == 8
    y.sum().backward()
    assert torch.equal(a.grad, torch.where(condition, 1.0, -2.0))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.bool, torch.int8, torch.uint8]
)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 2048 + 3, 2048])
def test_pack_bits_round_trips(dtype, n):
    values = (torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.4).to(dtype)
    before = values.clone()
    bits = packing.pack_bits(values)
    assert torch.equal(values, before)  # the input is never packed in place (int8 needs no conversion)
    assert bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8
    assert torch.equal(packing.unpack_bits(bits, n, dtype), values)
    strided = torch.stack([values, values], 1)[:, 0]  # not contiguous
    assert torch.equal(packing.pack_bits(strided), bits)
    out = torch.empty(8 * bits.numel(), dtype=dtype)
    assert torch.equal(packing.unpack_bits(bits, n, dtype, out=out), values)


def test_pack_bits_layout_is_little_endian_per_byte():
    every_byte = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).float()  # row b: the bits of b
    assert torch.equal(packing.pack_bits(every_byte), torch.arange(256, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unpack to 16 contiguous"):
        packing.unpack_bits(torch.zeros(2, dtype=torch.uint8), 9, torch.float32, out=torch.empty(9))


def test_a_marked_tensor_that_is_not_binary_is_caught_with_validate():
    counts = torch.tensor([0.0, 1.0, 2.0, 1.0])
    with pytest.raises(packing.NotBinaryError, match=r"by mark\(\) holds 2.0"):
        packing.mark(counts, validate=True)
    # Wrong use without validate is not detected (packing never reads values to decide): 2.0 is saved as 1.0.
    packing.mark(counts)
    a = torch.ones(4, requires_grad=True)
    with packing.binary_saved_tensors() as stats:
        y = a * counts
    assert stats.packed == 1
    with pytest.raises(packing.NotBinaryError, match="mark"), packing.binary_saved_tensors(validate=True):
        a * counts
    y.sum().backward()
    assert not torch.equal(a.grad, counts)  # documented: a wrong gradient (a 2 is not a bit: it spoils its byte)


@pytest.mark.parametrize("node", [neuron.ILIFNode(step_mode="m"), neuron.TernaryLIFNode(step_mode="m")])
def test_neurons_that_emit_counts_or_signs_are_not_marked(node):
    with packing.binary_saved_tensors(node):
        out = node(torch.randn(6, 3, 5) * 3)
    assert not packing.is_marked(out)
    assert ((out != 0) & (out != 1)).any()  # indeed not binary


def test_non_spiking_surrogate_output_is_not_marked():
    node = _lif(surrogate.Sigmoid(spiking=False))
    with packing.binary_saved_tensors(node):
        out = node(torch.randn(4, 2, 3))
    assert not packing.is_marked(out)


def test_in_place_change_of_a_passed_through_tensor_still_raises():
    """Under saved-tensor hooks autograd skips its version check; the context does it for what it passes through."""
    a = torch.randn(5, requires_grad=True)
    with packing.binary_saved_tensors():
        y = a.exp()
    y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_hooks_removed_on_exit_and_the_context_is_not_reentrant():
    net = _net(surrogate.Rect(alpha=1.0))
    global_hooks = nn.modules.module._global_forward_hooks
    before = len(global_hooks)
    context = packing.binary_saved_tensors(net)
    with context:
        assert len(global_hooks) == before + 1
        with pytest.raises(RuntimeError, match="already active"):
            context.__enter__()
    assert len(global_hooks) == before
    with context:  # once exited, it can be entered again
        pass


def test_modules_copied_inside_the_context_carry_nothing_of_it():
    """The strategy deep-copies a neuron for each local classifier, possibly inside the context."""
    net = _net(surrogate.Rect(alpha=1.0))
    with packing.binary_saved_tensors(net):
        copied = copy.deepcopy(net[1])
    assert not copied._forward_hooks and not any(m._forward_hooks for m in net.modules())


def test_only_the_given_modules_mark():
    inside, outside = _lif(surrogate.Rect(alpha=1.0)), _lif(surrogate.Rect(alpha=1.0))
    x = torch.randn(4, 2, 3)
    with packing.binary_saved_tensors(inside):
        assert packing.is_marked(inside(x)) and not packing.is_marked(outside(x))
    assert not packing.is_marked(inside(x))  # no marking outside the context


class _PackEachBatch(L.Callback):
    """Packing around each training batch, as the strategy's chunk loop would enter it around each chunk."""

    def __init__(self) -> None:
        self.context: packing.BinaryPacking | None = None
        self.packed = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.context = packing.binary_saved_tensors(pl_module)
        self.context.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert self.context is not None
        self.context.__exit__(None, None, None)
        self.packed += self.context.stats.packed


def test_truncated_local_training_is_bit_identical_with_packing(make_trainer):
    steps, packed = [], []
    for pack in (False, True):
        recorder = GradRecorder()
        callbacks: list[L.Callback] = [recorder, _PackEachBatch()] if pack else [recorder]
        module = SpikingClassifier(conv_net(), lr=0.1, lr_step_epochs=0)
        trainer = make_trainer(strategy=TruncatedLocalBPTT(k=3, n=1), max_steps=4, callbacks=callbacks)
        trainer.fit(module, event_batches(n=16, T=6))
        steps.append(recorder.steps)
        packed.append(callbacks[-1].packed if pack else 0)
    assert len(steps[0]) == len(steps[1]) == 4 and packed[1] > 0
    for plain, with_packing in zip(*steps, strict=True):
        assert plain.keys() == with_packing.keys()
        assert all(torch.equal(plain[name], with_packing[name]) for name in plain)
