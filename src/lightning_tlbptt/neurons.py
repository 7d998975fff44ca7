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

from lightning_tlbptt import native
from lightning_tlbptt.packing import pack_bits, unpack_bits

__all__ = ["RectLIFFunction", "accelerate", "is_accelerated", "restore", "supports"]


class RectLIFFunction(torch.autograd.Function):
    """Multi-step LIF with the rectangular surrogate: ``(x_seq [T, ...], v [...]) -> (spike_seq [T, ...], v [...])``.

    Computes what ``spikingjelly.activation_based.functional.lif_multi_step`` computes with
    ``surrogate.Rect(alpha)``, in the same floating-point operations (so spikes and voltages match bit for bit).
    Saves for backward, per block of steps: the surrogate window ``|h - v_threshold| < 0.5 / alpha`` as bits (one
    per neuron-step, ``uint8 [ceil(steps * n / 8)]``); with a hard reset also the spikes as bits, and ``h`` as floats
    when the reset is not detached (its gradient ``(v_reset - h) * sg`` needs the value). Nothing is saved when
    ``record`` is false (no gradient wanted).

    The step loops run only what the recurrence needs (the paper's neuron: four elementwise ops a step forward,
    three backward); masks are made, packed and unpacked once per block. Layers are small in truncated training
    (a chunk, or a time slice of it), so the number of ops, each a pass over memory plus a fixed dispatch cost,
    sets this kernel's time.

    Attributes:
        bits: ``True`` (default) saves masks as bits; ``False`` as one int8 byte per neuron-step, as before bits
            (8x the memory; packing and unpacking cost a few elementwise ops per block, ``benchmarks/packing.py``).
            Read when a forward runs; the gradients are the same bits either way.
        block_bytes: the most bytes of voltage a block of steps holds (default 1 MiB; at least one step). Larger
            blocks cost fewer ops and more scratch memory.
        native: ``True`` (default) runs the step loops in C where :mod:`lightning_tlbptt.native` can (float32 on
            the CPU, masks as bits): one pass over memory per step, the same values. ``False``: always torch ops.
    """

    bits: bool = True
    block_bytes: int = 1 << 20
    native: bool = True

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
        steps = x_seq.shape[0]
        spike_seq = torch.empty_like(x_seq, memory_format=torch.contiguous_format)
        hard = v_reset is not None
        v = v.clone(memory_format=torch.contiguous_format)
        if RectLIFFunction.native and RectLIFFunction.bits and native.usable(x_seq):
            # the same step loop in C, one pass a step: all steps are one block, masks written as bits directly
            numel = v.numel()
            bits = (steps * numel // 8,)
            window = x_seq.new_empty(bits, dtype=torch.uint8) if record else None
            fired = x_seq.new_empty(bits, dtype=torch.uint8) if record and hard else None
            h_seq = torch.empty_like(spike_seq) if record and hard and not detach_reset else None
            neuron = native.Settings(tau, decay_input, v_threshold, v_reset, alpha, detach_reset)
            native.forward(x_seq.contiguous(), spike_seq, v, h_seq, window, fired, neuron)
            ctx.save_for_backward(*(t for t in (window, fired, h_seq) if t is not None))
            ctx.config = (steps, steps, v.shape, tau, decay_input, v_threshold, v_reset, alpha, detach_reset)
            ctx.native = True
            return spike_seq, v
        ctx.native = False
        # The step loop keeps only what the recurrence needs (charge, fire, reset: four ops a step for the paper's
        # neuron); the masks backward needs are computed and stored once per block of steps, from the charged
        # voltages of that block. Blocks are bounded in bytes: the scratch stays small (heap-reused, cache-warm) and
        # what is saved stays in pieces far below glibc's mmap threshold (fresh pages to fault in at every batch).
        block = max(1, min(steps, RectLIFFunction.block_bytes // max(1, v.numel() * v.element_size())))
        h_block = torch.empty((block, *v.shape), dtype=v.dtype, device=v.device)
        tau_ = torch.tensor(tau, dtype=v.dtype, device=v.device)  # addcdiv divides by a tensor only
        windows: list[Tensor] = []
        fired: list[Tensor] = []
        h_seq: list[Tensor] = []
        for start in range(0, steps, block):
            stop = min(steps, start + block)
            for t in range(start, stop):
                h = h_block[t - start]
                # Charge as spikingjelly._ops.lif.reference.charge computes it, for bit-identical voltages, in fewer
                # passes: addcdiv(a, b, tau, value=c) is a + (c * b) / tau, and negating (c = -1) is exact, so it is
                # v - relative / tau (or v + d / tau) to the bit. Subtracting a soft reset's 0.0 changes no bits, so
                # it is skipped; intermediate terms live in h's own buffer.
                relative = torch.sub(v, v_reset, out=h) if hard else v
                if decay_input:
                    torch.addcdiv(v, torch.sub(x_seq[t], relative, out=h), tau_, out=h)
                else:
                    torch.addcdiv(v, relative, tau_, value=-1, out=h).add_(x_seq[t])
                spike = spike_seq[t]
                # heaviside(h - v_threshold) as the surrogate's forward: the sign of an IEEE difference is exact
                torch.ge(h, v_threshold, out=spike)
                if hard:
                    torch.add(spike * v_reset, (1.0 - spike) * h, out=v)
                else:
                    torch.sub(h, spike, alpha=v_threshold, out=v)
            if not record:
                continue
            charged = h_block[: stop - start]
            if hard and not detach_reset:
                h_seq.append(charged.clone())  # the reset's gradient (v_reset - h) * sg needs the value
            if hard:
                fired.append(_save_mask(spike_seq[start:stop]))
            # Masks are computed in float (comparisons writing bool run several times slower on CPU)
            torch.lt(charged.sub_(v_threshold).abs_(), 0.5 / alpha, out=charged)
            windows.append(_save_mask(charged))
        ctx.save_for_backward(*windows, *fired, *h_seq)
        ctx.config = (steps, block, v.shape, tau, decay_input, v_threshold, v_reset, alpha, detach_reset)
        return spike_seq, v

    @staticmethod
    def backward(ctx: Any, grad_spike_seq: Tensor | None, grad_v: Tensor | None) -> tuple[Tensor | None, ...]:
        steps, block, shape, tau, decay_input, v_threshold, v_reset, alpha, detach_reset = ctx.config
        saved = ctx.saved_tensors
        blocks = len(range(0, steps, block))
        windows, fired, h_seq = saved[:blocks], saved[blocks : 2 * blocks], saved[2 * blocks :]
        hard = v_reset is not None
        if grad_spike_seq is None:
            grad_spike_seq = torch.zeros((steps, *shape), dtype=torch.float32, device=windows[0].device)
        elif ctx.native:
            grad_spike_seq = grad_spike_seq.contiguous()
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
            carry = grad_v.clone(memory_format=torch.contiguous_format)
        if ctx.native:
            native.backward(
                grad_spike_seq,
                grad_x_seq,
                carry,
                windows[0],
                fired[0] if hard else None,
                h_seq[0] if h_seq else None,
                native.Settings(tau, decay_input, v_threshold, v_reset, alpha, detach_reset),
            )
            return grad_x_seq, carry, None, None, None, None, None, None, None
        numel = carry.numel()
        # a block's masks, unpacked into float buffers: the surrogate's window, and for a hard reset dv_t/dh_t = 1 - s_t
        window_buffer = _MaskBuffer(block, numel, shape, carry)
        fired_buffer = _MaskBuffer(block, numel, shape, carry) if hard else None
        keep = 1.0 - 1.0 / tau
        for index in range(blocks - 1, -1, -1):
            start = index * block
            stop = min(steps, start + block)
            window = window_buffer.load(windows[index], stop - start)
            if fired_buffer is not None:
                not_fired = fired_buffer.load(fired[index], stop - start).neg_().add_(1.0)
            for t in range(stop - 1, start - 1, -1):
                grad = grad_x_seq[t]  # dL/ds_t first, then dL/dh_t, then dL/dx_t: no buffer of its own
                # dL/ds_t: the output's gradient plus, unless the reset is detached, the reset's dependence on s_t
                if detach_reset:
                    if not own:
                        grad.copy_(grad_spike_seq[t])
                elif not hard:
                    torch.add(grad_spike_seq[t], carry, alpha=-v_threshold, out=grad)
                else:
                    torch.addcmul(grad_spike_seq[t], carry, v_reset - h_seq[index][t - start], out=grad)
                if fired_buffer is not None:
                    carry.mul_(not_fired[t - start])
                # dL/dh_t = carry * dv_t/dh_t + dL/ds_t * surrogate' (alpha inside the window, 0 outside)
                torch.addcmul(carry, grad, window[t - start], value=alpha, out=grad)
                torch.mul(grad, keep, out=carry)
                if decay_input:
                    grad.div_(tau)
        return grad_x_seq, carry, None, None, None, None, None, None, None


def _save_mask(mask: Tensor) -> Tensor:
    """A float 0/1 mask as backward keeps it: bits (:attr:`RectLIFFunction.bits`) or one int8 byte per value."""
    return pack_bits(mask) if RectLIFFunction.bits else mask.to(torch.int8).flatten()


class _MaskBuffer:
    """Float scratch a saved block of masks (bits or int8, :func:`_save_mask`) is unpacked into: ``[steps, ...]``."""

    def __init__(self, block: int, numel: int, shape: torch.Size, like: Tensor) -> None:
        self.numel, self.shape = numel, shape
        # padded to whole bytes of bits: unpack_bits writes 8 values per saved byte
        self.padded = torch.empty(8 * ((block * numel + 7) // 8), dtype=like.dtype, device=like.device)

    def load(self, saved: Tensor, steps: int) -> Tensor:
        count = steps * self.numel
        if saved.dtype == torch.uint8:
            unpack_bits(saved, count, self.padded.dtype, out=self.padded[: 8 * saved.numel()])
        else:
            self.padded[:count].copy_(saved)
        return self.padded[:count].view(steps, *self.shape)


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
