"""The neuron kernel's step loops compiled from C at first use: one pass over memory per step instead of several.

:class:`~lightning_tlbptt.neurons.LIFFunction` runs its step loops as torch ops, four to ten elementwise passes per
step, each a trip through memory plus a fixed dispatch cost. On a CPU the same loops in C (``lif.c``, next to this
file) make one pass: they keep a tile of the layer's voltage in cache across all steps, write spikes, the charged
voltages and the surrogate's window bits as they go, and compute every forward value with the same float32
operations in the same order, so spikes and voltages stay bit-identical to the torch path and to SpikingJelly. The
backward computes the surrogate's derivative with the same formulas (a vectorizable ``e^x`` to about 1 ulp), so
gradients equal the torch path's up to float rounding.

The source is compiled once per machine with the system's C compiler (``$CC``, else ``cc``) into
``$XDG_CACHE_HOME/lightning_tlbptt`` (``~/.cache/lightning_tlbptt``), named by a hash of the source, the flags and
the CPU, and loaded with :mod:`ctypes`; several processes (DDP ranks) may compile at once. Without a compiler, on
other devices than the CPU, or with ``LIGHTNING_TLBPTT_NATIVE=0`` in the environment, the torch path runs: the same
results, more passes.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["CHARGES", "SURROGATES", "Settings", "available", "backward", "forward", "usable"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("lif.c")
#: exact IEEE float32 arithmetic as written: no fast-math, no fused multiply-add (bit-identical spikes); exceptions
#: not observed, so that loops with selects vectorize (the same values)
_FLAGS = ["-O3", "-std=c99", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-shared", "-fPIC"]
#: neurons per thread below which a layer runs on one thread (splitting costs more than it saves)
_MIN_PER_THREAD = 1 << 15

#: how a neuron charges (``lif.c``'s enum, in order): IF ``h = v + x``, LIF divides by ``tau``, ParametricLIF
#: multiplies by ``sigmoid(w)``
CHARGES = ("if", "lif", "plif")
#: the surrogates whose derivative the loops compute (``lif.c``'s enum, in order): SpikingJelly's seven with a
#: closed-form derivative in ``spikingjelly._ops.surrogate``, then the rectangular window
SURROGATES = ("sigmoid", "atan", "piecewise_quadratic", "piecewise_exp", "soft_sign", "super_spike", "erf", "rect")

_float_p, _uint8_p = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_uint8)
_i64, _int, _float, _double = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_double


class Settings(NamedTuple):
    """A neuron's settings, as :class:`~lightning_tlbptt.neurons.LIFFunction` and the C loops read them.

    The decay itself (LIF's ``tau``, ParametricLIF's ``sigmoid(w)``) is not among them: it is an input of the
    function, a tensor with a gradient for ParametricLIF.
    """

    charge: str  # one of CHARGES
    decay_input: bool  # False for IF, which has no decay
    v_threshold: float
    v_reset: float | None  # None: soft reset
    surrogate: str  # one of SURROGATES
    alpha: float
    detach_reset: bool


def available() -> bool:
    """Whether the compiled loops can run here (compiling them at the first call)."""
    return _library() is not None


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LIGHTNING_TLBPTT_NATIVE", "1") == "0":
        return None
    try:
        library = ctypes.CDLL(str(_compiled()))
    except (OSError, subprocess.SubprocessError) as error:
        log.info("lightning_tlbptt: the C neuron kernel is not available (%s); the torch path runs", error)
        return None
    library.lif_forward.restype = None
    library.lif_forward.argtypes = [_float_p] * 5 + [_uint8_p] * 2 + [_i64] * 4
    library.lif_forward.argtypes += [_int, _float, _int, _float, _int, _float, _float]
    library.lif_backward.restype = None
    library.lif_backward.argtypes = [_float_p] * 4 + [_uint8_p] * 2 + [_float_p] * 2 + [_i64] * 4
    library.lif_backward.argtypes += [_int, _float, _int, _float, _int, _float, _int, _double, _int, _float]
    return library


def _compiled() -> Path:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise OSError("no C compiler (set CC, or install one)")
    flags = list(_FLAGS)
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")  # vector units of this CPU; the cache name holds the CPU's flags
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (_SOURCE.read_text(), " ".join(flags), version, _cpu()))
    ).hexdigest()[:16]
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = cache_home / "lightning_tlbptt" / f"lif-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run(
            [compiler, *flags, str(_SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)  # atomic: a process compiling at the same time loads one whole file
    return target


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable(x_seq: Tensor, masks: bool) -> bool:
    """Whether ``x_seq [T, ...]`` can take the compiled path: float32 on the CPU, and where ``masks`` (bits) are
    written, whole bytes of them per step (neurons per step a multiple of 8)."""
    return (
        x_seq.device.type == "cpu"
        and x_seq.dtype == torch.float32
        and (not masks or x_seq[0].numel() % 8 == 0)
        and _library() is not None
    )


def forward(
    x_seq: Tensor,
    spike_seq: Tensor,
    v: Tensor,
    h_seq: Tensor | None,
    lever: Tensor | None,
    window: Tensor | None,
    fired: Tensor | None,
    neuron: Settings,
    decay: float,
) -> None:
    """The forward step loop over ``x_seq [T, ...]``: writes ``spike_seq [T, ...]``, ``v [...]`` (in place, from the
    state before the first step) and, when given, the charged voltages ``h_seq [T, ...]``, ParametricLIF's
    ``lever [T, ...]`` (``x - (v - v_reset)`` with ``decay_input``, else ``v - v_reset``), and as bits
    (``uint8 [T * numel / 8]``) Rect's ``window`` ``|h - v_threshold| < 0.5 / alpha`` and the ``fired`` spikes."""
    library = _loaded()
    steps, numel = x_seq.shape[0], v.numel()
    common = (*_common(neuron, decay), 0.5 / neuron.alpha)
    pointers = (_p(x_seq), _p(spike_seq), _p(v), _p(h_seq), _p(lever), _p(window, _uint8_p), _p(fired, _uint8_p))
    _split(numel, lambda begin, end: library.lif_forward(*pointers, steps, numel, begin, end, *common))


def backward(
    grad_spike_seq: Tensor,
    grad_x_seq: Tensor,
    carry: Tensor,
    grad_decay: Tensor | None,
    window: Tensor | None,
    fired: Tensor | None,
    h_seq: Tensor | None,
    lever: Tensor | None,
    neuron: Settings,
    decay: float,
    keep: float,
) -> None:
    """The backward step loop: writes ``grad_x_seq [T, ...]`` (may be ``grad_spike_seq`` itself), ``carry [...]``
    (dL/dv, in place, from dL/dv_T to what flows to the state before the first step) and, for ParametricLIF, adds
    ``sum over t of dL/dh_t * lever_t`` into ``grad_decay [...]``. ``keep`` is dh_t/dv_(t-1)."""
    library = _loaded()
    steps, numel = grad_spike_seq.shape[0], carry.numel()
    surrogate = SURROGATES.index(neuron.surrogate)
    common = (*_common(neuron, decay), surrogate, neuron.alpha, int(neuron.detach_reset), keep)
    pointers = (_p(grad_spike_seq), _p(grad_x_seq), _p(carry), _p(grad_decay))
    pointers += (_p(window, _uint8_p), _p(fired, _uint8_p), _p(h_seq), _p(lever))
    _split(numel, lambda begin, end: library.lif_backward(*pointers, steps, numel, begin, end, *common))


def _common(neuron: Settings, decay: float) -> tuple[int, float, int, float, int, float]:
    """The C loops' leading settings: charge, decay, decay_input, v_threshold, hard, v_reset."""
    hard = neuron.v_reset is not None
    charge = CHARGES.index(neuron.charge)
    return charge, decay, int(neuron.decay_input), neuron.v_threshold, int(hard), neuron.v_reset if hard else 0.0


def _loaded() -> ctypes.CDLL:
    library = _library()
    if library is None:
        raise RuntimeError("the C neuron kernel is not available here: check native.usable(x_seq, masks) first")
    return library


def _p(tensor: Tensor | None, kind: Any = _float_p) -> Any:
    if tensor is None:
        return None
    if not tensor.is_contiguous():
        raise ValueError("the C neuron kernel needs contiguous tensors")
    return ctypes.cast(tensor.data_ptr(), kind)


def _split(numel: int, run: Any) -> None:
    """``run(begin, end)`` over neuron ranges: one per torch thread (ctypes releases the GIL), in whole bytes."""
    threads = min(torch.get_num_threads(), numel // _MIN_PER_THREAD)
    if threads <= 1:
        run(0, numel)
        return
    bounds = [numel * i // threads // 8 * 8 for i in range(threads)] + [numel]
    list(_pool(threads).map(run, bounds[:-1], bounds[1:]))


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="tlbptt-lif")
