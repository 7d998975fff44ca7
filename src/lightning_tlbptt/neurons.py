"""A lean multi-step kernel for SpikingJelly's common neurons: IF, LIF and ParametricLIF with closed-form surrogates.

SpikingJelly 2.0 runs these neurons on the CPU (and ``surrogate.Rect``, the paper's Eq. 6, on every device) as a
Python loop over ``T`` under autograd: about seven autograd nodes per step, the float ``h - v_threshold`` of every
neuron-step saved for the surrogate (and more for the reset and a learnt decay), and the spike sequence built twice
(a list of steps, then ``torch.stack``). That loop, not the training method, sets most of truncated training's peak
memory and a large part of its time.

:class:`LIFFunction` is the whole multi-step forward as one autograd function. Forward, step by step, in
SpikingJelly's own float operations and order (so spikes and voltages are bit-identical to its loop):

- charge: IF ``h = v + x``; LIF ``h = v + (x - (v - v_reset)) / tau``, or ``v - (v - v_reset) / tau + x`` without
  ``decay_input``; ParametricLIF the same with ``* q`` for ``/ tau``, ``q = sigmoid(w)``;
- fire: ``s = h >= v_threshold`` (the surrogate's heaviside; the sign of an IEEE difference is exact);
- reset: hard ``v = s * v_reset + (1 - s) * h``, soft (``v_reset=None``) ``v = h - s * v_threshold``.

It saves only what the backward needs. ``surrogate.Rect``'s derivative is ``alpha`` inside a window and 0 outside,
so one bit per neuron-step (inside or not) does: 32x less than a float, packed eight to a byte by
:func:`lightning_tlbptt.packing.pack_bits`; a hard reset adds the spikes as bits and, unless it is detached, ``h``
(its gradient ``(v_reset - h) * sg`` needs the value). Every other surrogate (the table ``_SURROGATES``: Sigmoid,
ATan, PiecewiseQuadratic, PiecewiseExp, SoftSign, SuperSpike, Erf) keeps the float ``h``, from which the backward
recomputes ``h - v_threshold``, the derivative and a hard reset's spikes. ParametricLIF also keeps ``dh/dq`` per
neuron-step (``x - (v - v_reset)``; without ``decay_input`` its negative, ``v - v_reset``).

Backward walks back through time in one loop without an autograd graph: ``dL/ds_t`` (plus the reset's dependence on
``s_t`` unless detached), ``dL/dh_t = dL/dv_t * dv_t/dh_t + dL/ds_t * sg'(h_t - v_threshold)``,
``dL/dv_(t-1) = dL/dh_t * dh_t/dv_(t-1)``, ``dL/dx_t = dL/dh_t * dh_t/dx_t`` and, for ParametricLIF,
``dL/dq = sum over t and neurons of dL/dh_t * dh_t/dq``, which autograd carries through the sigmoid to ``w``.
Gradients equal SpikingJelly's up to float rounding (``tests/test_neurons.py``).

:func:`accelerate` installs the kernel on the supported neurons of a network (:func:`supports`);
:class:`~lightning_tlbptt.strategy.TruncatedLocalBPTT` does so for the duration of each ``fit`` (its
``fast_neurons`` argument).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from spikingjelly.activation_based import neuron, surrogate
from torch import Tensor, nn

from lightning_tlbptt import native
from lightning_tlbptt.packing import pack_bits, unpack_bits

__all__ = ["LIFFunction", "Options", "accelerate", "is_accelerated", "restore", "supports"]


class Options(NamedTuple):
    """How an installed kernel runs (:func:`accelerate`'s keywords); the values it computes are the same either way.

    Attributes:
        native: ``True`` runs the step loops in C where :mod:`lightning_tlbptt.native` can (float32 on the CPU):
            one pass over memory per step. ``False``: always torch ops.
        bits: ``True`` saves Rect's masks as bits; ``False`` as one int8 byte per neuron-step (8x the memory;
            packing and unpacking cost a few elementwise ops per block, ``benchmarks/packing.py``; the C loops
            write bits only, so Rect then takes the torch path).
        block_bytes: the most bytes of voltage a block of steps of the torch path holds (at least one step).
            Larger blocks cost fewer ops and more scratch memory.
    """

    native: bool = True
    bits: bool = True
    block_bytes: int = 1 << 20


def _sigmoid(x: Tensor, alpha: float) -> Tensor:
    s = torch.sigmoid(alpha * x)
    return (1 - s) * s * alpha


def _atan(x: Tensor, alpha: float) -> Tensor:
    z = x * (math.pi / 2 * alpha)
    return (alpha / 2) / (1 + z * z)


def _piecewise_quadratic(x: Tensor, alpha: float) -> Tensor:
    return (alpha - alpha * alpha * x.abs()).clamp_min(0)


def _piecewise_exp(x: Tensor, alpha: float) -> Tensor:
    return (alpha / 2) * torch.exp(-alpha * x.abs())


def _soft_sign(x: Tensor, alpha: float) -> Tensor:
    z = 1 / alpha + x.abs()
    return 1 / (2 * alpha * z * z)


def _super_spike(x: Tensor, alpha: float) -> Tensor:
    z = 1 + x.abs()
    return alpha / (z * z)


def _erf(x: Tensor, alpha: float) -> Tensor:
    z = alpha * x
    return (alpha / math.sqrt(math.pi)) * torch.exp(-z * z)


#: The surrogates the kernel knows: class -> (its name in native.SURROGATES, its derivative at ``h - v_threshold``,
#: written as SpikingJelly's ``spikingjelly._ops.surrogate._surrogate_gradient`` computes it; ``lif.c`` has the same
#: formulas). Rect's derivative is its window, saved as bits instead.
_SURROGATES: dict[type[nn.Module], tuple[str, Callable[[Tensor, float], Tensor] | None]] = {
    surrogate.Sigmoid: ("sigmoid", _sigmoid),
    surrogate.ATan: ("atan", _atan),
    surrogate.PiecewiseQuadratic: ("piecewise_quadratic", _piecewise_quadratic),
    surrogate.PiecewiseExp: ("piecewise_exp", _piecewise_exp),
    surrogate.SoftSign: ("soft_sign", _soft_sign),
    surrogate.SuperSpike: ("super_spike", _super_spike),
    surrogate.Erf: ("erf", _erf),
    surrogate.Rect: ("rect", None),
}
_DERIVATIVES = {name: derivative for name, derivative in _SURROGATES.values()}

#: The neurons the kernel runs, with how each charges (native.CHARGES)
_NEURONS: tuple[tuple[type[neuron.BaseNode], str], ...] = (
    (neuron.ParametricLIFNode, "plif"),
    (neuron.LIFNode, "lif"),
    (neuron.IFNode, "if"),
)


class LIFFunction(torch.autograd.Function):
    """A multi-step IF, LIF or ParametricLIF layer: ``(x_seq [T, ...], v [...]) -> (spike_seq [T, ...], v [...])``.

    Computes what SpikingJelly's ``functional.if_multi_step``, ``lif_multi_step`` and ``plif_multi_step`` compute
    on the CPU (its PyTorch reference loops), in the same floating-point operations, so spikes and voltages match
    bit for bit. Arguments after ``v``: ``decay`` (LIF: ``tau``, a float; ParametricLIF: ``sigmoid(w)``, a 0-dim
    tensor that receives a gradient; IF: unused), the neuron's :class:`~lightning_tlbptt.native.Settings`, the
    :class:`Options`, and ``record`` (false: no gradient wanted, nothing is saved).

    Saved for backward, per block of steps (one block in C): Rect's window ``|h - v_threshold| < 0.5 / alpha`` as
    bits (``uint8 [ceil(steps * n / 8)]``), with a hard reset also the spikes as bits and ``h [steps, ...]`` when the
    reset is not detached; any other surrogate ``h [steps, ...]``; ParametricLIF also ``dh/dq`` (or its negative)
    ``[steps, ...]``.

    The torch path's step loops run only what the recurrence needs (the paper's neuron: four elementwise ops a step
    forward, three backward); masks and surrogate derivatives are made once per block. Layers are small in truncated
    training (a chunk, or a time slice of it), so the number of ops, each a pass over memory plus a fixed dispatch
    cost, sets this kernel's time; the C loops (:mod:`lightning_tlbptt.native`) make one pass per step.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x_seq: Tensor,
        v: Tensor,
        decay: float | Tensor,
        neuron: native.Settings,
        options: Options,
        record: bool,
    ) -> tuple[Tensor, Tensor]:
        steps, shape = x_seq.shape[0], x_seq.shape[1:]
        rect, hard, plif = neuron.surrogate == "rect", neuron.v_reset is not None, neuron.charge == "plif"
        spike_seq = torch.empty_like(x_seq, memory_format=torch.contiguous_format)
        v = v.clone(memory_format=torch.contiguous_format)
        # h is kept where the backward needs its value: every smooth surrogate's derivative, a hard reset's gradient
        keep_h = record and (not rect or (hard and not neuron.detach_reset))
        ctx.neuron, ctx.steps, ctx.shape = neuron, steps, shape
        ctx.decay = decay.detach() if isinstance(decay, Tensor) else decay
        if options.native and (options.bits or not rect) and native.usable(x_seq, masks=record and rect):
            # the same step loop in C, one pass a step: all steps are one block, masks written as bits directly
            bits = (steps * v.numel() // 8,)
            windows = [x_seq.new_empty(bits, dtype=torch.uint8)] if record and rect else []
            fired = [x_seq.new_empty(bits, dtype=torch.uint8)] if record and rect and hard else []
            h_seq = [torch.empty_like(spike_seq)] if keep_h else []
            levers = [torch.empty_like(spike_seq)] if record and plif else []
            native.forward(
                x_seq.contiguous(), spike_seq, v, *map(_only, (h_seq, levers, windows, fired)), neuron, float(decay)
            )
            _save(ctx, steps, windows, fired, h_seq, levers, native=True)
            return spike_seq, v
        # The step loop keeps only what the recurrence needs (charge, fire, reset: four ops a step for the paper's
        # neuron); Rect's masks are computed and stored once per block of steps, from the charged voltages of that
        # block. Blocks are bounded in bytes: the scratch stays small (heap-reused, cache-warm) and what is saved
        # stays in pieces far below glibc's mmap threshold (fresh pages to fault in at every batch).
        block = max(1, min(steps, options.block_bytes // max(1, v.numel() * v.element_size())))
        scratch = torch.empty((block, *shape), dtype=v.dtype, device=v.device) if rect or not keep_h else None
        if neuron.charge == "lif":
            decay = torch.tensor(decay, dtype=v.dtype, device=v.device)  # addcdiv divides by a tensor only
        windows: list[Tensor] = []
        fired: list[Tensor] = []
        h_seq: list[Tensor] = []
        levers: list[Tensor] = []
        for start in range(0, steps, block):
            stop = min(steps, start + block)
            piece = (stop - start, *shape)
            charged = torch.empty(piece, dtype=v.dtype, device=v.device) if keep_h else scratch[: stop - start]
            lever = torch.empty(piece, dtype=v.dtype, device=v.device) if record and plif else None
            for t in range(start, stop):
                h = charged[t - start]
                _charge(h, v, x_seq[t], decay, neuron, None if lever is None else lever[t - start])
                spike = spike_seq[t]
                # heaviside(h - v_threshold) as the surrogate's forward: the sign of an IEEE difference is exact
                torch.ge(h, neuron.v_threshold, out=spike)
                if hard:
                    torch.add(spike * neuron.v_reset, (1.0 - spike) * h, out=v)
                else:
                    torch.sub(h, spike, alpha=neuron.v_threshold, out=v)
            if not record:
                continue
            if keep_h:
                h_seq.append(charged)
            if lever is not None:
                levers.append(lever)
            if rect:
                if hard:
                    fired.append(_save_mask(spike_seq[start:stop], options.bits))
                # Masks are computed in float (comparisons writing bool run several times slower on CPU)
                mask = torch.sub(charged, neuron.v_threshold, out=scratch[: stop - start]).abs_()
                windows.append(_save_mask(torch.lt(mask, 0.5 / neuron.alpha, out=mask), options.bits))
        _save(ctx, block, windows, fired, h_seq, levers, native=False)
        return spike_seq, v

    @staticmethod
    def backward(ctx: Any, grad_spike_seq: Tensor | None, grad_v: Tensor | None) -> tuple[Tensor | None, ...]:
        neuron, shape, decay, block = ctx.neuron, ctx.shape, ctx.decay, ctx.block
        saved = iter(ctx.saved_tensors)
        windows, fired, h_seq, levers = ([next(saved) for _ in range(count)] for count in ctx.counts)
        rect, hard, steps = neuron.surrogate == "rect", neuron.v_reset is not None, ctx.steps
        if grad_spike_seq is None:
            grad_spike_seq = torch.zeros((steps, *shape), dtype=torch.float32, device=(h_seq or windows)[0].device)
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
        # ParametricLIF's dL/dq, summed per neuron over the steps, then over the neurons
        grad_decay = torch.zeros_like(carry) if levers and ctx.needs_input_grad[2] else None
        # dh_t/dv_(t-1): LIF 1 - 1/tau, ParametricLIF 1 - q, IF 1
        keep = 1.0 - 1.0 / decay if neuron.charge == "lif" else 1.0 - decay if neuron.charge == "plif" else 1.0
        if ctx.native:
            native.backward(
                grad_spike_seq,
                grad_x_seq,
                carry,
                grad_decay,
                *map(_only, (windows, fired, h_seq)),
                _only(levers) if grad_decay is not None else None,
                neuron,
                float(decay),
                float(keep),
            )
            return grad_x_seq, carry, _decay_gradient(grad_decay, decay, neuron), None, None, None
        numel = carry.numel()
        # a block's masks, unpacked into float buffers: the surrogate's window, and for a hard reset dv_t/dh_t = 1 - s_t
        window_buffer = _MaskBuffer(block, numel, shape, carry) if rect else None
        fired_buffer = _MaskBuffer(block, numel, shape, carry) if hard else None
        derivative = _DERIVATIVES[neuron.surrogate]
        # Rect: dL/dh gets alpha * dL/ds * window, the window 0 or 1; the others dL/ds * sg'(h - v_threshold)
        scale = neuron.alpha if rect else 1.0
        for index in range(len(range(0, steps, block)) - 1, -1, -1):
            start = index * block
            stop = min(steps, start + block)
            if window_buffer is not None:
                slope = window_buffer.load(windows[index], stop - start)
                if fired_buffer is not None:
                    not_fired = fired_buffer.load(fired[index], stop - start).neg_().add_(1.0)
            else:
                assert derivative is not None
                slope = derivative(h_seq[index] - neuron.v_threshold, neuron.alpha)
                if fired_buffer is not None:
                    not_fired = torch.lt(h_seq[index], neuron.v_threshold, out=fired_buffer.floats(stop - start))
            for t in range(stop - 1, start - 1, -1):
                i = t - start
                grad = grad_x_seq[t]  # dL/ds_t first, then dL/dh_t, then dL/dx_t: no buffer of its own
                # dL/ds_t: the output's gradient plus, unless the reset is detached, the reset's dependence on s_t
                if neuron.detach_reset:
                    if not own:
                        grad.copy_(grad_spike_seq[t])
                elif not hard:
                    torch.add(grad_spike_seq[t], carry, alpha=-neuron.v_threshold, out=grad)
                else:
                    torch.addcmul(grad_spike_seq[t], carry, neuron.v_reset - h_seq[index][i], out=grad)
                if hard:
                    carry.mul_(not_fired[i])
                torch.addcmul(carry, grad, slope[i], value=scale, out=grad)  # dL/dh_t
                if grad_decay is not None:
                    grad_decay.addcmul_(grad, levers[index][i])
                if neuron.charge == "if":
                    carry.copy_(grad)
                else:
                    torch.mul(grad, keep, out=carry)
                if neuron.decay_input:
                    if neuron.charge == "lif":
                        grad.div_(decay)
                    else:
                        grad.mul_(decay)
        return grad_x_seq, carry, _decay_gradient(grad_decay, decay, neuron), None, None, None


def _charge(h: Tensor, v: Tensor, x: Tensor, decay: Tensor, neuron: native.Settings, lever: Tensor | None) -> None:
    """Write into ``h [...]`` the voltage charged from ``v`` by ``x``, as SpikingJelly's reference computes it to the
    bit (LIF's ``decay`` the tensor ``tau``, ParametricLIF's ``q``); ParametricLIF's ``dh/dq`` (without
    ``decay_input``, ``v - v_reset``) into ``lever`` when given."""
    if neuron.charge == "if":
        torch.add(v, x, out=h)
        return
    hard = neuron.v_reset is not None
    if neuron.charge == "lif":
        # addcdiv(a, b, tau, value=c) is a + (c * b) / tau, and negating (c = -1) is exact, so it is v - relative / tau
        # (or v + d / tau) to the bit. Subtracting a soft reset's 0.0 changes no bits, so it is skipped; intermediate
        # terms live in h's own buffer.
        relative = torch.sub(v, neuron.v_reset, out=h) if hard else v
        if neuron.decay_input:
            torch.addcdiv(v, torch.sub(x, relative, out=h), decay, out=h)
        else:
            torch.addcdiv(v, relative, decay, value=-1, out=h).add_(x)
        return
    # ParametricLIF: v + (x - relative) * q, or v - relative * q + x; separate ops, as a fused multiply-add would
    # round once where SpikingJelly rounds twice. Addition commutes exactly, so "+ v" may come last.
    buffer = h if lever is None else lever
    relative = torch.sub(v, neuron.v_reset, out=buffer) if hard else v
    if neuron.decay_input:
        torch.mul(torch.sub(x, relative, out=buffer), decay, out=h).add_(v)
        return
    if lever is not None and not hard:
        lever.copy_(v)
    torch.sub(v, torch.mul(relative, decay, out=h), out=h).add_(x)


def _only(tensors: list[Tensor]) -> Tensor | None:
    """The one tensor of a list the C path saves (one block), or ``None`` when it saves none of that kind."""
    return tensors[0] if tensors else None


def _save(ctx: Any, block: int, *saved: list[Tensor], native: bool) -> None:
    """Save the lists (windows, fired, h, levers: one entry per block each, or none) for backward."""
    ctx.save_for_backward(*(t for tensors in saved for t in tensors))
    ctx.counts = tuple(len(tensors) for tensors in saved)
    ctx.block, ctx.native = block, native


def _decay_gradient(grad_decay: Tensor | None, decay: float | Tensor, neuron: native.Settings) -> Tensor | None:
    """ParametricLIF's dL/dq from the per-neuron sums (levers without ``decay_input`` are ``-dh/dq``)."""
    if grad_decay is None:
        return None
    assert isinstance(decay, Tensor)
    total = grad_decay.sum()
    return (total if neuron.decay_input else -total).reshape(decay.shape)


def _save_mask(mask: Tensor, bits: bool) -> Tensor:
    """A float 0/1 mask as backward keeps it: bits (:attr:`Options.bits`) or one int8 byte per value."""
    return pack_bits(mask) if bits else mask.to(torch.int8).flatten()


class _MaskBuffer:
    """Float scratch a saved block of masks (bits or int8, :func:`_save_mask`) is unpacked into: ``[steps, ...]``."""

    def __init__(self, block: int, numel: int, shape: torch.Size, like: Tensor) -> None:
        self.numel, self.shape = numel, shape
        # padded to whole bytes of bits: unpack_bits writes 8 values per saved byte
        self.padded = torch.empty(8 * ((block * numel + 7) // 8), dtype=like.dtype, device=like.device)

    def floats(self, steps: int) -> Tensor:
        """The buffer as ``[steps, ...]`` floats, for a mask computed in place."""
        return self.padded[: steps * self.numel].view(steps, *self.shape)

    def load(self, saved: Tensor, steps: int) -> Tensor:
        count = steps * self.numel
        if saved.dtype == torch.uint8:
            unpack_bits(saved, count, self.padded.dtype, out=self.padded[: 8 * saved.numel()])
        else:
            self.padded[:count].copy_(saved)
        return self.floats(steps)


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

    The kernel covers ``neuron.IFNode``, ``neuron.LIFNode`` and ``neuron.ParametricLIFNode`` (a float32 scalar
    ``w``), and subclasses that keep their step functions, with a surrogate of the table ``_SURROGATES`` (exactly
    that class, spiking, a float ``alpha``), without ``store_v_seq`` or a neuron precision setting.
    """
    kind = _kind(node)
    if kind is None:
        return "not an IFNode, LIFNode or ParametricLIFNode"
    base = kind[0]
    if any(
        getattr(type(node), name) is not getattr(base, name)
        for name in ("multi_step_forward", "single_step_functional_forward", "multi_step_functional_forward")
    ):
        return f"its class overrides {base.__name__}'s step functions"
    function = node.surrogate_function
    if type(function) not in _SURROGATES:
        known = ", ".join(f"surrogate.{cls.__name__}" for cls in _SURROGATES)
        return f"its surrogate {type(function).__name__} has no derivative formula in the kernel (it knows {known})"
    if not function.spiking:
        return f"its surrogate {type(function).__name__} is not spiking (spiking=False)"
    if not isinstance(function.alpha, (int, float)):
        return f"its surrogate's alpha is a {type(function.alpha).__name__}, not a float"
    if node.store_v_seq:
        return "store_v_seq=True"
    if node._neuron_precision is not None:
        return "it has a neuron precision setting"
    if kind[1] == "plif" and (node.w.ndim != 0 or node.w.dtype != torch.float32):
        return f"its decay w is a {node.w.dtype} tensor of shape {tuple(node.w.shape)}, not a float32 scalar"
    return None


def _kind(node: nn.Module) -> tuple[type[neuron.BaseNode], str] | None:
    """The neuron class among :data:`_NEURONS` that ``node`` is, with its charge."""
    return next(((cls, charge) for cls, charge in _NEURONS if isinstance(node, cls)), None)


class _Kernel:
    """A node's ``multi_step_forward`` while the kernel is installed on it, with the :class:`Options` it runs with.

    A callable object rather than a bound method so that an accelerated network still pickles and deep-copies
    (``torch.save(model)`` in the middle of ``fit``), with the kernel installed on the copy.
    """

    def __init__(self, node: neuron.BaseNode, options: Options) -> None:
        self.node, self.options = node, options

    def __call__(self, x_seq: Tensor, *args: Tensor, **kwargs: object) -> Tensor:
        node = self.node
        (v,) = node.materialize_states((x_seq, *args), tuple(node._memories.values()), "m")
        function = node.surrogate_function
        name = _SURROGATES[type(function)][0]
        if (
            args
            or kwargs
            or x_seq.dtype != torch.float32
            or v.dtype != torch.float32
            or x_seq.shape[0] == 0
            or (x_seq.device.type != "cpu" and name != "rect")
        ):
            # Mixed precision and unusual calls keep SpikingJelly's own path, and so do the smooth surrogates off the
            # CPU: there SpikingJelly has fused kernels (CUDA, Triton) that run a layer's steps in one launch, where
            # the torch path takes several launches per step, and that save h as the kernel would (and their input).
            return type(node).multi_step_forward(node, x_seq, *args, **kwargs)
        kind = _kind(node)
        assert kind is not None
        charge = kind[1]
        # the decay as SpikingJelly's charge applies it: LIF divides by tau, ParametricLIF multiplies by sigmoid(w)
        decay = node.w.sigmoid() if charge == "plif" else node.tau if charge == "lif" else 1.0
        settings = native.Settings(
            charge,
            charge != "if" and node.decay_input,
            node.v_threshold,
            node.v_reset,
            name,
            float(function.alpha),
            node.detach_reset,
        )
        wants_grad = x_seq.requires_grad or v.requires_grad or (isinstance(decay, Tensor) and decay.requires_grad)
        # without a gradient wanted (evaluation) nothing is saved
        spike_seq, v = LIFFunction.apply(
            x_seq, v, decay, settings, self.options, torch.is_grad_enabled() and wants_grad
        )
        node._memories["v"] = v
        return spike_seq


def accelerate(
    net: nn.Module, *, native: bool = True, bits: bool = True, block_bytes: int = 1 << 20
) -> list[nn.Module]:
    """Run the multi-step forward of every supported neuron in ``net`` (:func:`supports`) through
    :class:`LIFFunction`, with the given :class:`Options` (``native``, ``bits``, ``block_bytes``).

    The override is per instance (the class and other networks are untouched) and undone by :func:`restore`; nodes
    already accelerated keep their kernel and its options (restore them first to change those). Single-step mode
    (``step_mode='s'``), inputs other than float32 and, off the CPU, the surrogates other than Rect (SpikingJelly has
    fused kernels for them there) keep SpikingJelly's path, call by call. Returns the nodes it was installed on.
    """
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 1:
        raise ValueError(
            f"block_bytes={block_bytes!r}: the torch path's blocks of steps are bounded by this many bytes of "
            "voltage and need a positive int (default 1 MiB = 1 << 20; a block holds at least one step)"
        )
    options = Options(native=native, bits=bits, block_bytes=block_bytes)
    installed = []
    for module in net.modules():
        if is_accelerated(module) or supports(module) is not None:
            continue
        module.multi_step_forward = _Kernel(module, options)
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
