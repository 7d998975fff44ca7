"""A lean multi-step kernel for SpikingJelly's LIF neuron with the rectangular surrogate (the paper's neuron).

SpikingJelly 2.0 has fused kernels for its smooth surrogates but runs ``surrogate.Rect`` (Eq. 6 of the paper) through
its PyTorch reference: a Python loop over ``T`` that records about seven autograd nodes per step, saves the float
``h - v_threshold`` of every neuron-step for the surrogate, and builds the spike sequence twice (a list of steps, then
``torch.stack``). That neuron kernel, not the training method, sets most of truncated training's peak memory.

The rectangular surrogate's derivative is ``alpha`` inside a window and 0 outside, so one bit per neuron-step (inside
the window or not) is all its backward needs: :class:`RectLIFFunction` saves that instead of a float (32x less,
packed eight to a byte by :func:`lightning_tlbptt.packing.pack_bits`), writes spikes straight into the output and
walks back through time in one loop without an autograd graph. Its spikes
and final voltage are bit-identical to SpikingJelly's and its gradients equal them up to float rounding
(``tests/test_neurons.py``).

:func:`accelerate` installs the kernel on the ``LIFNode`` instances of a network that SpikingJelly would run through
its reference path; :class:`~lightning_tlbptt.strategy.TruncatedLocalBPTT` does so for the duration of each
``fit`` (its ``fast_neurons`` argument).
"""

from __future__ import annotations

from typing import Any

import torch
from spikingjelly.activation_based import neuron, surrogate
from torch import Tensor, nn

from lightning_tlbptt.packing import pack_bits, unpack_bits

__all__ = ["RectLIFFunction", "accelerate", "is_accelerated", "restore", "supports"]


class RectLIFFunction(torch.autograd.Function):
    """Multi-step LIF with the rectangular surrogate: ``(x_seq [T, ...], v [...]) -> (spike_seq [T, ...], v [...])``.

    Computes what ``spikingjelly.activation_based.functional.lif_multi_step`` computes with
    ``surrogate.Rect(alpha)``, in the same floating-point operations (so spikes and voltages match bit for bit).
    Saves for backward, per step: the surrogate window ``|h - v_threshold| < 0.5 / alpha`` as bits (one per neuron,
    ``uint8 [ceil(n / 8)]``); with a hard reset also the spikes as bits, and ``h`` as floats when the reset is not
    detached (its gradient ``(v_reset - h) * sg`` needs the value). Nothing is saved when ``record`` is false (no
    gradient wanted).

    Attributes:
        bits: ``True`` (default) saves masks as bits; ``False`` as one int8 byte per neuron-step, as before bits
            (8x the memory; about 10-15 % less time in this layer on one CPU thread: packing and unpacking cost a
            few elementwise ops per step, ``benchmarks/packing.py``). Read when a forward runs; the gradients are the
            same bits either way.
    """

    bits: bool = True

    @staticmethod
    def forward(
        ctx: Any,
        x_seq: Tensor,
        v: Tensor,
        tau: float,
        decay_input: bool,
        v_threshold: float,
        v_reset: float | None,
        alpha: float,
        detach_reset: bool,
        record: bool,
    ) -> tuple[Tensor, Tensor]:
        # Masks are computed into float scratch and stored as bits (or int8): comparisons writing bool (or reading it
        # in masked_fill_/where) run several times slower than float ops on CPU.
        # What backward needs is kept per step, not in [T, ...] tensors: small blocks are reused from the heap,
        # while blocks past glibc's mmap threshold (32 MiB at most) are fresh pages to fault in at every batch.
        spike_seq = torch.empty_like(x_seq, memory_format=torch.contiguous_format)
        hard = v_reset is not None
        windows: list[Tensor] = []
        fired: list[Tensor] = []
        h_seq: list[Tensor] = []
        half_width = 0.5 / alpha
        # h (the charged voltage) is computed in v's own buffer: the old v is not needed once h exists
        h = v = v.clone(memory_format=torch.contiguous_format)
        scratch = torch.empty_like(v)
        for t in range(x_seq.shape[0]):
            # Charge as spikingjelly._ops.lif.reference.charge writes it, op for op, for bit-identical voltages
            # (subtracting a soft reset's 0.0 changes no bits, so it is skipped; v + d and d + v are the same sum).
            relative = torch.sub(v, v_reset, out=scratch) if hard else v
            if decay_input:
                h.add_(torch.sub(x_seq[t], relative, out=scratch).div_(tau))
            else:
                h.sub_(torch.div(relative, tau, out=scratch)).add_(x_seq[t])
            spike = spike_seq[t]
            # heaviside(h - v_threshold) as the surrogate's forward: the sign of an IEEE difference is exact
            torch.ge(h, v_threshold, out=spike)
            torch.lt(torch.sub(h, v_threshold, out=scratch).abs_(), half_width, out=scratch)
            if record:
                windows.append(pack_bits(scratch) if RectLIFFunction.bits else scratch.to(torch.int8))
            if not hard:
                torch.sub(h, spike, alpha=v_threshold, out=v)
                continue
            if record:
                fired.append(pack_bits(spike) if RectLIFFunction.bits else spike.to(torch.int8))
                if not detach_reset:
                    h_seq.append(h.clone())
            torch.add(spike * v_reset, (1.0 - spike) * h, out=v)
        ctx.save_for_backward(*windows, *fired, *h_seq)
        ctx.config = (x_seq.shape[0], v.shape, tau, decay_input, v_threshold, v_reset, alpha, detach_reset)
        return spike_seq, v

    @staticmethod
    def backward(ctx: Any, grad_spike_seq: Tensor | None, grad_v: Tensor | None) -> tuple[Tensor | None, ...]:
        steps, shape, tau, decay_input, v_threshold, v_reset, alpha, detach_reset = ctx.config
        saved = ctx.saved_tensors
        windows, fired, h_seq = saved[:steps], saved[steps : 2 * steps], saved[2 * steps :]
        if grad_spike_seq is None:
            grad_spike_seq = torch.zeros((steps, *shape), dtype=torch.float32, device=windows[0].device)
        # dL/dx_t overwrites dL/ds_t where nothing else holds that gradient: one chunk-sized buffer instead of two
        # at the moment that sets the peak of truncated training (a pool's backward feeding this one).
        own = _exclusive(grad_spike_seq)
        grad_x_seq = grad_spike_seq if own else torch.empty_like(grad_spike_seq, memory_format=torch.contiguous_format)
        # dL/dv carried back through time: in the incoming dL/dv_T itself when it is ours alone (a layer walked in time
        # slices hands each slice the carry the next slice returned)
        if grad_v is None:
            carry = torch.zeros_like(grad_x_seq[0])
        elif _exclusive(grad_v):
            carry = grad_v
        else:
            carry = grad_v.clone()
        numel = carry.numel()
        bits = windows[0].dtype == torch.uint8
        # a mask of one step, unpacked from bits into a buffer padded to whole bytes (or converted from int8)
        padded = torch.empty(8 * windows[0].numel() if bits else numel, dtype=carry.dtype, device=carry.device)
        scratch = padded[:numel].view(shape)

        def load(saved_mask: Tensor) -> Tensor:
            if bits:
                unpack_bits(saved_mask, numel, scratch.dtype, out=padded)
                return scratch
            return scratch.copy_(saved_mask)

        keep = 1.0 - 1.0 / tau
        for t in range(steps - 1, -1, -1):
            grad = grad_x_seq[t]  # dL/ds_t first, then dL/dh_t, then dL/dx_t: no buffer of its own
            # dL/ds_t: the output's gradient plus, unless the reset is detached, the reset's dependence on s_t
            if detach_reset:
                if not own:
                    grad.copy_(grad_spike_seq[t])
            elif v_reset is None:
                torch.add(grad_spike_seq[t], carry, alpha=-v_threshold, out=grad)
            else:
                torch.addcmul(grad_spike_seq[t], carry, v_reset - h_seq[t], out=grad)
            grad.mul_(load(windows[t]))  # the surrogate: alpha inside the window, 0 outside
            if v_reset is not None:
                carry.mul_(load(fired[t]).neg_().add_(1.0))  # dv_t/dh_t = 1 - s_t
            torch.add(carry, grad, alpha=alpha, out=grad)
            torch.mul(grad, keep, out=carry)
            if decay_input:
                grad.div_(tau)
        return grad_x_seq, carry, None, None, None, None, None, None, None


def _exclusive(grad: Tensor) -> bool:
    """Whether autograd handed ``grad`` to this backward alone, so that it may be overwritten in place.

    The check autograd's own ``AccumulateGrad`` makes before it steals a gradient: one reference to the tensor and
    none but its own to the storage. A gradient that is also another branch's (an ``add`` passes one tensor to
    both inputs), a view of a larger one, kept by a hook or ``retain_grad``, or needed by a double backward is
    shared, and a fresh buffer is used.
    """
    use_count = getattr(grad, "_use_count", None)
    storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None or storage_use_count is None or grad.requires_grad or grad.dtype != torch.float32:
        return False
    if not grad.is_contiguous() or grad.storage_offset() != 0 or use_count() != 1:
        return False
    storage = storage_use_count(grad.untyped_storage()._cdata)
    base = grad._base
    if base is None:
        return storage <= _STORAGE_BASE_COUNT
    # A multi-step layer hands back its gradient as a view ([T * B, ...] -> [T, B, ...]) of a tensor that only
    # the view holds (one reference from the view, one from the name ``base`` here).
    return base.numel() == grad.numel() and base._use_count() <= 2 and storage <= _STORAGE_BASE_COUNT + 1


def _storage_base_count() -> int:
    # References to the storage of a tensor that nothing else holds, as this torch counts them (the tensor's
    # own, and the Python storage object made to ask): the threshold of _exclusive.
    fresh = torch.empty(1)
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count(fresh.untyped_storage()._cdata) if count is not None else 0


_STORAGE_BASE_COUNT = _storage_base_count()


def supports(node: nn.Module) -> str | None:
    """Why :func:`accelerate` leaves ``node`` to SpikingJelly, or ``None`` when the kernel applies.

    The kernel covers ``neuron.LIFNode`` itself and subclasses that keep its step functions, with
    ``surrogate.Rect`` (spiking, a float ``alpha``), without ``store_v_seq`` or a neuron precision setting.
    """
    if not isinstance(node, neuron.LIFNode):
        return "not a LIFNode"
    if (
        type(node).multi_step_forward is not neuron.LIFNode.multi_step_forward
        or type(node).single_step_functional_forward is not neuron.LIFNode.single_step_functional_forward
        or type(node).multi_step_functional_forward is not neuron.LIFNode.multi_step_functional_forward
    ):
        return "its class overrides LIFNode's step functions"
    function = node.surrogate_function
    if type(function) is not surrogate.Rect or not function.spiking or not isinstance(function.alpha, (int, float)):
        return "its surrogate is not surrogate.Rect (SpikingJelly has fused kernels for its smooth surrogates)"
    if node.store_v_seq:
        return "store_v_seq=True"
    if node._neuron_precision is not None:
        return "it has a neuron precision setting"
    return None


class _Kernel:
    """A node's ``multi_step_forward`` while the kernel is installed on it.

    A callable object rather than a bound method so that an accelerated network still pickles and deep-copies
    (``torch.save(model)`` in the middle of ``fit``), with the kernel installed on the copy.
    """

    def __init__(self, node: neuron.LIFNode) -> None:
        self.node = node

    def __call__(self, x_seq: Tensor, *args: Tensor, **kwargs: object) -> Tensor:
        node = self.node
        (v,) = node.materialize_states((x_seq, *args), tuple(node._memories.values()), "m")
        if args or kwargs or x_seq.dtype != torch.float32 or v.dtype != torch.float32 or x_seq.shape[0] == 0:
            # Mixed precision and unusual calls keep SpikingJelly's own path.
            return type(node).multi_step_forward(node, x_seq, *args, **kwargs)
        spike_seq, v = RectLIFFunction.apply(
            x_seq,
            v,
            node.tau,
            node.decay_input,
            node.v_threshold,
            node.v_reset,
            float(node.surrogate_function.alpha),
            node.detach_reset,
            torch.is_grad_enabled() and (x_seq.requires_grad or v.requires_grad),  # else nothing to save (evaluation)
        )
        node._memories["v"] = v
        return spike_seq


def accelerate(net: nn.Module) -> list[nn.Module]:
    """Run the multi-step forward of every supported ``LIFNode`` in ``net`` through :class:`RectLIFFunction`.

    The override is per instance (the class and other networks are untouched) and undone by :func:`restore`.
    Single-step mode (``step_mode='s'``) and inputs other than float32 keep SpikingJelly's path. Returns the nodes
    it was installed on.
    """
    installed = []
    for module in net.modules():
        if is_accelerated(module) or supports(module) is not None:
            continue
        module.multi_step_forward = _Kernel(module)
        installed.append(module)
    return installed


def restore(net: nn.Module) -> None:
    """Undo :func:`accelerate` on every node of ``net``."""
    for module in net.modules():
        if is_accelerated(module):
            del module.multi_step_forward


def is_accelerated(module: nn.Module) -> bool:
    """Whether :func:`accelerate` installed the kernel on ``module``."""
    return isinstance(vars(module).get("multi_step_forward"), _Kernel)
