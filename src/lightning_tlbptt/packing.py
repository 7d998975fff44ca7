"""Binary tensors saved for backward at one bit per value.

Spikes are 0 or 1, but a conv or linear layer that reads them saves its input for backward as it got it, in
float32: 32 bits for one bit of information. Within :func:`binary_saved_tensors`, every tensor that autograd saves
and that is *known* to be binary is packed, eight values per byte, and unpacked exactly (same dtype, shape, strides,
values) when backward needs it, so gradients are bit-identical with and without packing. An average pool saves its
input only for its shape (``avg_pool*_backward`` reads the sizes, never the values): inside an average pool
(:data:`SHAPE_ONLY`) a contiguous saved input is kept as its shape alone and comes back as a zero-stride tensor of
that shape, binary or not. Everything else passes through as it is.

How a tensor is known to be binary, without reading it:

1. **Marks.** The outputs of spiking neurons (:data:`BINARY_NEURONS`: SpikingJelly's ``LIFNode``, ``IFNode``,
   ``ParametricLIFNode``, ... with a spiking surrogate; the strategy's neuron kernel runs inside ``LIFNode`` and is
   covered) are marked by a forward hook that the context installs while it is active. A mark is on the
   output's *storage*, with the tensor's version counter and dtype: any view of a marked tensor (``flatten``,
   ``reshape``, ``transpose``, ``[T, B] -> [T * B]`` in SpikingJelly's multi-step layers) that lies inside the
   marked extent counts as marked; a copy does not (``.contiguous()`` of a transpose, a cast to half precision),
   and an in-place change after marking (which bumps the version counter) drops the mark. Modules that keep
   binary inputs binary (:data:`BINARY_PRESERVING`: max pooling, flatten, identity) pass a mark on from their
   input to their output. :func:`mark` marks any tensor by hand (e.g. event frames that are known to be 0/1).
2. **dtype.** ``torch.bool`` tensors are binary by type and are packed too (unless ``pack_bool=False``).

Packing (:func:`pack_bits`) writes the values as int8 into a buffer padded to a multiple of 8, reads each group of
eight bytes as one little-endian int64 and gathers its eight low bits into the top byte with one multiplication by
``0x0102040810204080`` (the eight partial products land on distinct bit positions, so nothing carries into the top
byte). Unpacking (:func:`unpack_bits`) reverses it: each byte times ``0x0101010101010101``, masked with
``0x8040201008040201``, holds bit ``i`` in byte ``i``, and ``!= 0`` writes it as 0 or 1 in the target dtype. Both are
plain torch ops on the tensor's own device; nothing goes through numpy or the host. Packed copies are shared: two
ops that save the same marked tensor hold one packed copy.

The hooks nest: pack hooks that are active when the context is entered (e.g.
:class:`~lightning_tlbptt.memory.SavedTensorsMeter`, the ``MemoryMonitor`` callback) still see every saved tensor,
the packed ones as their packed bytes, so meters report what is really kept. Inside ``torch.utils.checkpoint``
(and SpikingJelly's ``memopt``) only the checkpoint's own hooks run, as for any saved-tensor hook.

Wrong use: a marked tensor that is not 0/1 (a custom neuron emitting -1/0/1 or counts, marked by hand) would be
packed to wrong values (a 2 is not a bit: it spoils the whole byte). Packing never reads values to decide, so this
is not detected by default; with ``validate=True`` every mark and every packed tensor is checked (one extra pass
and, on CUDA, a synchronisation each) and a :class:`NotBinaryError` names the tensor's origin. Only neurons of the
exact classes in :data:`BINARY_NEURONS` are marked, not their subclasses: SpikingJelly's ``ILIFNode`` (counts) and
``LIAFNode`` (analog values) subclass ``LIFNode``.

Example::

    from lightning_tlbptt import packing

    with packing.binary_saved_tensors(net) as stats:
        loss = loss_fn(net(x_seq), y)
        loss.backward()
    stats.packed_bytes, stats.unpacked_bytes
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from spikingjelly.activation_based import neuron
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "BINARY_NEURONS",
    "BINARY_PRESERVING",
    "SHAPE_ONLY",
    "BinaryPacking",
    "NotBinaryError",
    "PackingStats",
    "binary_saved_tensors",
    "is_marked",
    "mark",
    "pack_bits",
    "unpack_bits",
]

#: Neuron classes whose output is 0/1 when their surrogate is spiking. Exact classes: subclasses are not trusted
#: (SpikingJelly's ``ILIFNode`` and ``LIAFNode`` subclass ``LIFNode`` and emit counts and analog values).
BINARY_NEURONS: tuple[type[nn.Module], ...] = (
    neuron.IFNode,
    neuron.LIFNode,
    neuron.ParametricLIFNode,
    neuron.QIFNode,
    neuron.EIFNode,
    neuron.IzhikevichNode,
    neuron.KLIFNode,
    neuron.CUBALIFNode,
)

#: Modules whose output is binary when their input is (SpikingJelly's ``layer.MaxPool2d`` etc. subclass these).
BINARY_PRESERVING: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
)

#: Modules whose backward reads only the shape of the input they save (average pooling): within the context that
#: input is saved as its shape alone, and backward gets a zero-stride tensor of that shape.
SHAPE_ONLY: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)

_MAGIC = 0x0102040810204080  # sum of 2**(7 * (k + 1)), k = 0..7: byte i of a word lands on bit 56 + i
_SPREAD = 0x0101010101010101  # a byte repeated in all eight bytes of a word
_SELECT = 0x8040201008040201 - 2**64  # bit i of byte i (as a signed int64)


class NotBinaryError(ValueError):
    """A tensor marked as binary holds a value other than 0 and 1 (found with ``validate=True``)."""


# ---------------------------------------------------------------------------------------------------------------
# Bits


def pack_bits(values: Tensor) -> Tensor:
    """Pack a tensor of 0/1 values, 8 per byte: ``values [...]`` (any shape, strides, dtype) -> ``uint8 [ceil(n / 8)]``.

    Bit ``j`` (least significant first) of byte ``i`` is element ``8 * i + j`` of ``values`` in row-major order;
    the last byte is padded with zeros. Values must be exactly 0 or 1 (or ``bool``); others give wrong bits and are
    not checked here.
    """
    n = values.numel()
    # float -> int8 is several times faster than float -> uint8 on CPU; 0 and 1 are the same byte either way
    if n % 8 == 0 and values.is_contiguous():
        buffer = values.to(torch.int8, copy=True).view(-1)  # one op where whole words need no padding (the usual case)
    else:
        buffer = torch.empty((n + 7) // 8 * 8, dtype=torch.int8, device=values.device)
        buffer[n:].zero_()
        buffer[:n].view(values.shape).copy_(values)
    return buffer.view(torch.int64).mul_(_MAGIC).bitwise_right_shift_(56).to(torch.uint8)


def unpack_bits(bits: Tensor, numel: int, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """Inverse of :func:`pack_bits`: ``uint8 [m]`` -> ``dtype [numel]`` (1-D, contiguous) of 0s and 1s.

    Args:
        bits: packed bytes, ``m >= ceil(numel / 8)``.
        numel: number of values to return.
        dtype: their dtype (``bool``, a float or an integer type).
        out: optional contiguous buffer of ``8 * m`` elements of ``dtype`` to write into (a reused scratch); the
            result is then its first ``numel`` elements.
    """
    size = 8 * bits.numel()
    if out is None:
        out = torch.empty(size, dtype=dtype, device=bits.device)
    elif out.numel() != size or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"unpack_bits: out has {out.numel()} {out.dtype} elements (contiguous: {out.is_contiguous()}); "
            f"{bits.numel()} packed bytes unpack to {size} contiguous {dtype} elements: allocate out with that many, "
            "or pass out=None"
        )
    # Each byte b becomes one int64 word: b * 0x0101..01 repeats it in all eight bytes, the mask keeps bit i in
    # byte i, and "byte != 0" turns each byte into 0 or 1 of the target dtype.
    words = bits.to(torch.int64).mul_(_SPREAD).bitwise_and_(_SELECT)
    torch.ne(words.view(torch.int8), 0, out=out.view(-1))
    return out.view(-1)[:numel]


def _dense_order(tensor: Tensor) -> list[int] | None:
    """A permutation of the dims that makes ``tensor`` contiguous without a copy, or ``None`` if it has gaps or
    overlaps (a strided slice, an expanded tensor)."""
    order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d))
    expected = 1
    for d in reversed(order):
        if tensor.size(d) != 1 and tensor.stride(d) != expected:
            return None
        expected *= tensor.size(d)
    return order


# ---------------------------------------------------------------------------------------------------------------
# Marks


@dataclass(frozen=True)
class _Mark:
    start: int  # element offsets in the storage: the marked extent is [start, stop)
    stop: int
    dtype: torch.dtype
    version: int
    origin: str


# Marks live as long as the storage they describe (the key is the storage's Python object, which torch keeps for
# the storage's lifetime); a freed storage takes its marks with it, so a later tensor that reuses its memory is
# never taken for binary.
_MARKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _extent(tensor: Tensor) -> tuple[int, int]:
    start = tensor.storage_offset()
    return start, start + 1 + sum((s - 1) * st for s, st in zip(tensor.shape, tensor.stride(), strict=True))


def mark(tensor: Tensor, origin: str = "mark()", validate: bool = False) -> bool:
    """Declare that ``tensor`` holds only 0s and 1s, so that :func:`binary_saved_tensors` packs it (and its views).

    The caller vouches for the values; they are read only when ``validate`` is true. The mark covers the tensor's
    extent in its storage, is dropped by an in-place change of the tensor, and dies with the storage.

    Returns:
        Whether the tensor was marked: only floating-point tensors that are dense in some order of their dims (no
        gaps, no overlaps) with at least one element are; others are left unmarked (and so unpacked).

    Raises:
        NotBinaryError: with ``validate=True``, when a value is not 0 or 1.
    """
    if not _strided_float(tensor) or _dense_order(tensor) is None:
        return False
    if validate:
        _check_binary(tensor, origin)
    start, stop = _extent(tensor)
    storage = tensor.untyped_storage()
    marks = _MARKS.get(storage)
    if marks is None:
        marks = _MARKS[storage] = []
    marks.append(_Mark(start, stop, tensor.dtype, tensor._version, origin))
    return True


def is_marked(tensor: Tensor) -> bool:
    """Whether ``tensor`` lies inside a marked extent of its storage, with the marked dtype and version."""
    return _mark_of(tensor) is not None


def _strided_float(tensor: Tensor) -> bool:
    """A float tensor with elements in an ordinary storage (not sparse, nested or a tensor subclass without one)."""
    return tensor.layout == torch.strided and tensor.is_floating_point() and tensor.numel() > 0 and not tensor.is_meta


def _mark_of(tensor: Tensor) -> _Mark | None:
    if not _strided_float(tensor):
        return None
    marks = _MARKS.get(tensor.untyped_storage())
    if not marks:
        return None
    start, stop = _extent(tensor)
    for m in marks:
        if m.start <= start and stop <= m.stop and m.dtype == tensor.dtype and m.version == tensor._version:
            return m
    return None


def _check_binary(tensor: Tensor, origin: str) -> None:
    bad = (tensor != 0) & (tensor != 1)
    if bool(bad.any()):
        value = tensor[bad].flatten()[0].item()
        raise NotBinaryError(
            f"a tensor marked as binary by {origin} holds {value!r} ({int(bad.sum())} of {tensor.numel()} values "
            "are not 0 or 1): packing it to bits would change the gradients. Mark only spike tensors: leave this "
            "module's class out of BINARY_NEURONS / BINARY_PRESERVING, or do not call mark() on it"
        )


# ---------------------------------------------------------------------------------------------------------------
# The context


@dataclass
class PackingStats:
    """What one :class:`BinaryPacking` context did, cumulative over its saves.

    Attributes:
        saved: tensors autograd saved while the context was active.
        packed: of which packed (a shared packed copy counts once per save).
        unpacked_bytes: bytes the packed tensors take unpacked (their own elements, once per packed copy).
        packed_bytes: bytes their packed copies take.
        shape_only: of the saved tensors, those kept as their shape alone (inputs of :data:`SHAPE_ONLY` modules).
        shape_only_bytes: bytes those would have taken.
    """

    saved: int = 0
    packed: int = 0
    unpacked_bytes: int = 0
    packed_bytes: int = 0
    shape_only: int = 0
    shape_only_bytes: int = 0

    @property
    def ratio(self) -> float:
        """``unpacked_bytes / packed_bytes`` (32 for float32 spikes, up to padding); 1.0 when nothing was packed."""
        return self.unpacked_bytes / self.packed_bytes if self.packed_bytes else 1.0


class _Packed:
    """A packed saved tensor: its bits (or what an outer pack hook made of them) and how to rebuild it."""

    __slots__ = ("dtype", "inverse", "numel", "permuted_shape", "stored")

    def __init__(self, stored: Any, tensor: Tensor, order: list[int]) -> None:
        self.stored = stored
        self.dtype = tensor.dtype
        self.numel = tensor.numel()
        self.permuted_shape = [tensor.size(d) for d in order]
        self.inverse = sorted(range(len(order)), key=order.__getitem__)


class _ShapeOnly:
    """A saved tensor whose values its backward never reads: its shape, dtype and device."""

    __slots__ = ("device", "dtype", "shape")

    def __init__(self, tensor: Tensor) -> None:
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device


class _Outer:
    """A saved tensor an outer saved-tensor hook (a meter, another packing context) keeps: what it returned."""

    __slots__ = ("stored",)

    def __init__(self, stored: Any) -> None:
        self.stored = stored


class _Kept:
    """A saved tensor passed through, with the version it was saved at (autograd's own check is off under hooks)."""

    __slots__ = ("stored", "version")

    def __init__(self, stored: Any, version: int) -> None:
        self.stored = stored
        self.version = version


class BinaryPacking:
    """Context manager that saves known-binary tensors at one bit each (see the module docstring).

    Use :func:`binary_saved_tensors` to build one. The context may be entered again (once at a time): hooks are
    installed on enter and removed on exit. Backward may run after exit: what was packed inside is unpacked then.

    The marking hook is one global module forward hook (``torch.nn.modules.module.register_module_forward_hook``)
    while the context is active, not a hook on each module: nothing is stored on the modules, so a module that is
    deep-copied or pickled inside the context (the strategy copies a neuron for each local classifier) copies no
    hook and no reference to the context.

    Args:
        modules: the modules whose outputs may be marked (each with all its submodules, as found on entering);
            none: every module.
        validate: check that every marked and every packed float tensor is 0/1 (slow; for debugging a custom
            neuron list).
        pack_bool: also pack ``torch.bool`` saved tensors (binary by dtype).
        bits: pack binary tensors at all; ``False`` keeps only the shape-only saves of average pools.
    """

    def __init__(self, *modules: nn.Module, validate: bool = False, pack_bool: bool = True, bits: bool = True) -> None:
        self.modules = modules
        self.bits = bits
        self.validate = validate
        self.pack_bool = pack_bool
        self.stats = PackingStats()
        self._handle: Any = None
        self._scope: set[int] | None = None
        self._outer: tuple[Any, Any] | None = None
        self._shared: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._pre_handle: Any = None
        self._shape_only = 0  # depth of SHAPE_ONLY modules whose forward is running

    # marking hooks ----------------------------------------------------------------------------------------------
    def _in_scope(self, module: nn.Module) -> bool:
        return self._scope is None or id(module) in self._scope

    def _forward_pre_hook(self, module: nn.Module, args: Any) -> None:
        if isinstance(module, SHAPE_ONLY) and self._in_scope(module):
            self._shape_only += 1

    def _forward_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._in_scope(module):
            return
        if isinstance(module, SHAPE_ONLY):
            self._shape_only -= 1
            return
        if not self.bits:
            return
        if type(module) in BINARY_NEURONS:
            function = getattr(module, "surrogate_function", None)
            if isinstance(output, Tensor) and getattr(function, "spiking", True):
                mark(output, f"{type(module).__name__} output", self.validate)
        elif isinstance(module, BINARY_PRESERVING) and args and isinstance(args[0], Tensor) and is_marked(args[0]):
            out = output[0] if isinstance(output, tuple) else output  # max pooling with return_indices
            if isinstance(out, Tensor):
                mark(out, f"{type(module).__name__} of spikes", self.validate)

    # saved-tensor hooks ----------------------------------------------------------------------------------------
    def _pack(self, tensor: Tensor) -> Any:
        self.stats.saved += 1
        if self._shape_only and _strided_float(tensor) and tensor.is_contiguous():
            # an average pool's input: its backward (avg_pool*_backward) reads the input's sizes, never its values
            self.stats.shape_only += 1
            self.stats.shape_only_bytes += tensor.numel() * tensor.element_size()
            return _ShapeOnly(tensor)
        packed = self._packed(tensor) if self.bits else None
        if packed is not None:
            return packed
        if self._outer is not None:
            # the outer hook keeps it (and checks it, if it checks: it may have packed it, so the tensor it gives
            # back is not the one saved and has a version of its own)
            return _Outer(self._outer[0](tensor))
        # returning the tensor itself would tie a saved output to its own grad_fn; parameters stay as they are
        stored = tensor if tensor.is_leaf and tensor.requires_grad else tensor.detach()
        return _Kept(stored, tensor._version)

    def _packed(self, tensor: Tensor) -> _Packed | None:
        if tensor.dtype == torch.bool:
            if not self.pack_bool or tensor.numel() == 0 or tensor.layout != torch.strided or tensor.is_meta:
                return None
            origin = None
        else:
            found = _mark_of(tensor)
            if found is None:
                return None
            origin = found.origin
        order = _dense_order(tensor)
        if order is None:
            return None
        storage = tensor.untyped_storage()
        key = (tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor._version)
        shared = self._shared.get(storage)
        if shared is not None and key in shared:
            self.stats.packed += 1
            return shared[key]
        if origin is not None and self.validate:
            _check_binary(tensor, origin)
        bits = pack_bits(tensor.permute(order))
        self.stats.packed += 1
        self.stats.unpacked_bytes += tensor.numel() * tensor.element_size()
        self.stats.packed_bytes += bits.numel()
        packed = _Packed(self._outer[0](bits) if self._outer is not None else bits, tensor, order)
        if shared is None:
            shared = self._shared[storage] = {}
        shared[key] = packed
        return packed

    def _unpack(self, saved: Any) -> Tensor:
        if isinstance(saved, _ShapeOnly):
            return torch.zeros((), dtype=saved.dtype, device=saved.device).expand(saved.shape)
        if isinstance(saved, _Packed):
            bits = self._outer[1](saved.stored) if self._outer is not None else saved.stored
            values = unpack_bits(bits, saved.numel, saved.dtype)
            return values.view(saved.permuted_shape).permute(saved.inverse)
        if isinstance(saved, _Outer):
            assert self._outer is not None
            return self._outer[1](saved.stored)
        tensor = saved.stored
        if tensor._version != saved.version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"a saved {tuple(tensor.shape)} {tensor.dtype} tensor is at version {tensor._version}, it was saved "
                f"at version {saved.version} (autograd's own check does not run under saved-tensor hooks, this is "
                "it). Fix the in-place operation, e.g. use its out-of-place form"
            )
        return tensor

    # context ---------------------------------------------------------------------------------------------------
    def __enter__(self) -> PackingStats:
        if self._hooks is not None:
            raise RuntimeError(
                "this BinaryPacking context is already active: it cannot be entered twice at once. Exit it first, "
                "or build another with binary_saved_tensors(...)"
            )
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        self._outer = top(False) if top is not None else None
        self._scope = {id(m) for root in self.modules for m in root.modules()} if self.modules else None
        self._handle = nn.modules.module.register_module_forward_hook(self._forward_hook)
        self._pre_handle = nn.modules.module.register_module_forward_pre_hook(self._forward_pre_hook)
        self._shape_only = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self.stats

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(exc_type, exc, tb)
        self._hooks = None
        self._handle.remove()
        self._pre_handle.remove()
        self._handle = self._pre_handle = self._scope = None
        self._shared = WeakIdKeyDictionary()


def binary_saved_tensors(
    *modules: nn.Module, validate: bool = False, pack_bool: bool = True, bits: bool = True
) -> BinaryPacking:
    """Save known-binary tensors at one bit each while the context is active; yields its :class:`PackingStats`.

    ``modules``: the network(s) whose spiking neurons (and max pools, flattens) mark their outputs as binary (none:
    all modules). Enter it around a forward and its backward (the strategy: around each chunk); gradients are
    bit-identical to those without it. See :class:`BinaryPacking` for the options.
    """
    return BinaryPacking(*modules, validate=validate, pack_bool=pack_bool, bits=bits)
