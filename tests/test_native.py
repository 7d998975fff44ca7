"""The neuron loops compiled from C: the torch path's values bit for bit, on any thread count, or not at all."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from lightning_tlbptt import native
from lightning_tlbptt.neurons import LIFFunction, Options

needs_compiler = pytest.mark.skipif(not native.available(), reason="no C compiler here: the C loops are not built")


@pytest.fixture
def fresh_library() -> Iterator[None]:
    """Forget the loaded library before and after, so that a test's environment decides (and does not leak)."""
    native._library.cache_clear()
    yield
    native._library.cache_clear()


def _forward_backward(
    x: torch.Tensor, grad: torch.Tensor, use_native: bool, charge: str = "lif", **config: object
) -> tuple[torch.Tensor, ...]:
    """Spikes, final voltage, and the gradients of x, of the initial voltage and (ParametricLIF) of q = sigmoid(w)."""
    x = x.clone().requires_grad_()
    v0 = torch.full(x.shape[1:], 0.1, requires_grad=True)
    decay = torch.tensor(0.4, requires_grad=True) if charge == "plif" else 2.0
    settings = dict(decay_input=charge != "if", v_threshold=0.5, v_reset=None, surrogate="rect", alpha=2.0)
    settings.update(config, detach_reset=False)
    spikes, v = LIFFunction.apply(x, v0, decay, native.Settings(charge, **settings), Options(native=use_native), True)
    (spikes * grad).sum().add(v.sum()).backward()
    grads = (x.grad, v0.grad, *([decay.grad] if charge == "plif" else []))
    return spikes.detach(), v.detach(), *grads


@needs_compiler
@pytest.mark.parametrize(
    ("charge", "surrogate"), [("lif", "rect"), ("lif", "atan"), ("plif", "sigmoid"), ("if", "erf")]
)
@pytest.mark.parametrize("v_reset", [None, -0.1], ids=["soft", "hard"])
@pytest.mark.parametrize("threads", [1, 2])
def test_c_loops_equal_the_torch_path_on_one_thread_and_split_over_two(
    charge: str, surrogate: str, v_reset: float | None, threads: int
) -> None:
    # 65536 neurons a step: two threads split the layer into two ranges of whole bytes of bits
    torch.manual_seed(0)
    x = torch.randn(3, 16, 64, 8, 8) * 0.8
    grad = torch.randn(x.shape)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        config = dict(charge=charge, v_reset=v_reset, surrogate=surrogate)
        reference = _forward_backward(x, grad, False, **config)
        compiled = _forward_backward(x, grad, True, **config)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(compiled[0], reference[0]) and torch.equal(compiled[1], reference[1])
    assert reference[0].sum() > 0
    for ours, theirs in zip(compiled[2:], reference[2:], strict=True):  # x's, v0's and ParametricLIF's q
        assert theirs.abs().sum() > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@needs_compiler
def test_layers_without_whole_bytes_of_bits_and_other_dtypes_take_the_torch_path() -> None:
    assert native.usable(torch.zeros(4, 2, 8), masks=True)
    assert not native.usable(torch.zeros(4, 3, 7), masks=True)  # 21 neurons a step: bits would not end on a byte
    assert native.usable(torch.zeros(4, 3, 7), masks=False)  # without masks (smooth surrogates) any layer
    assert not native.usable(torch.zeros(4, 2, 8, dtype=torch.float64), masks=False)


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch, fresh_library: None) -> None:
    monkeypatch.setenv("LIGHTNING_TLBPTT_NATIVE", "0")
    assert not native.available() and not native.usable(torch.zeros(4, 2, 8), masks=False)
    with pytest.raises(RuntimeError, match=r"not available here.*usable"):
        native.forward(*[None] * 9)


def test_without_a_compiler_the_torch_path_runs_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture, fresh_library: None
) -> None:
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="lightning_tlbptt.native"):
        assert not native.available()
    assert "no C compiler" in caplog.text
    torch.manual_seed(1)
    x, grad = torch.randn(5, 4, 8), torch.randn(5, 4, 8)
    asked = _forward_backward(x, grad, True)  # asks for C, gets torch
    reference = _forward_backward(x, grad, False)
    assert asked[0].sum() > 0
    for ours, theirs in zip(asked, reference, strict=True):
        assert torch.equal(ours, theirs)


@needs_compiler
def test_compiled_once_per_machine_into_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path, fresh_library) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.available()
    built = list((tmp_path / "lightning_tlbptt").glob("lif-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native._library.cache_clear()
    assert native.available() and built[0].stat().st_mtime_ns == stamp  # loaded, not compiled again
