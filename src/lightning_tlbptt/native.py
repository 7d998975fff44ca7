"""The Rect LIF kernel's step loops compiled from C at first use: one pass over memory per step instead of several.

:class:`~lightning_tlbptt.neurons.RectLIFFunction` runs its step loops as torch ops, four to seven elementwise passes
per step, each a trip through memory plus a fixed dispatch cost. On a CPU the same loops in C (``rect_lif.c``, next
to this file) make one pass: they keep a tile of the layer's voltage in cache across all steps, write spikes and the
surrogate's window bits as they go, and compute every value with the same float32 operations in the same order, so
spikes and voltages stay bit-identical to the torch path and to SpikingJelly.

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

__all__ = ["Settings", "available", "backward", "forward", "usable"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("rect_lif.c")
#: exact IEEE float32 arithmetic as written: no fast-math, no fused multiply-add (bit-identical spikes)
_FLAGS = ["-O3", "-std=c99", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]
#: neurons per thread below which a layer runs on one thread (splitting costs more than it saves)
_MIN_PER_THREAD = 1 << 15

_float_p, _uint8_p = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_uint8)
_i64, _int, _float = ctypes.c_int64, ctypes.c_int, ctypes.c_float


class Settings(NamedTuple):
    """A Rect LIF neuron's settings, in :class:`~lightning_tlbptt.neurons.RectLIFFunction`'s order."""

    tau: float
    decay_input: bool
    v_threshold: float
    v_reset: float | None  # None: soft reset
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
    library.rect_lif_forward.restype = None
    library.rect_lif_forward.argtypes = [_float_p, _float_p, _float_p, _float_p, _uint8_p, _uint8_p]
    library.rect_lif_forward.argtypes += [_i64] * 4 + [_float, _int, _float, _int, _float, _float]
    library.rect_lif_backward.restype = None
    library.rect_lif_backward.argtypes = [_float_p, _float_p, _float_p, _uint8_p, _uint8_p, _float_p]
    library.rect_lif_backward.argtypes += [_i64] * 4 + [_float, _int, _float, _int, _float, _float, _int, _float]
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
    target = cache_home / "lightning_tlbptt" / f"rect_lif-{key}.so"
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


def usable(x_seq: Tensor) -> bool:
    """Whether ``x_seq [T, ...]`` can take the compiled path: float32 on the CPU, whole bytes of bits per step."""
    return (
        x_seq.device.type == "cpu"
        and x_seq.dtype == torch.float32
        and x_seq[0].numel() % 8 == 0
        and _library() is not None
    )


def forward(
    x_seq: Tensor,
    spike_seq: Tensor,
    v: Tensor,
    h_seq: Tensor | None,
    window: Tensor | None,
    fired: Tensor | None,
    neuron: Settings,
) -> None:
    """The forward step loop over ``x_seq [T, ...]``: writes ``spike_seq``, ``v`` (in place, from the state before
    the first step), and when given ``h_seq`` (charged voltages, float), ``window`` and ``fired`` (bits)."""
    library = _loaded()
    steps, numel = x_seq.shape[0], v.numel()
    common = (*_common(neuron), 0.5 / neuron.alpha)
    pointers = (_p(x_seq), _p(spike_seq), _p(v), _p(h_seq), _p(window, _uint8_p), _p(fired, _uint8_p))
    _split(numel, lambda begin, end: library.rect_lif_forward(*pointers, steps, numel, begin, end, *common))


def backward(
    grad_spike_seq: Tensor,
    grad_x_seq: Tensor,
    carry: Tensor,
    window: Tensor,
    fired: Tensor | None,
    h_seq: Tensor | None,
    neuron: Settings,
) -> None:
    """The backward step loop: writes ``grad_x_seq`` (may be ``grad_spike_seq`` itself) and ``carry`` (dL/dv,
    in place, from dL/dv_T to what flows to the state before the first step)."""
    library = _loaded()
    steps, numel = grad_spike_seq.shape[0], carry.numel()
    common = (*_common(neuron), neuron.alpha, int(neuron.detach_reset), 1.0 - 1.0 / neuron.tau)
    pointers = (_p(grad_spike_seq), _p(grad_x_seq), _p(carry), _p(window, _uint8_p), _p(fired, _uint8_p), _p(h_seq))
    _split(numel, lambda begin, end: library.rect_lif_backward(*pointers, steps, numel, begin, end, *common))


def _common(neuron: Settings) -> tuple[float, int, float, int, float]:
    """The C loops' leading settings: tau, decay_input, v_threshold, hard, v_reset."""
    hard = neuron.v_reset is not None
    return neuron.tau, int(neuron.decay_input), neuron.v_threshold, int(hard), neuron.v_reset if hard else 0.0


def _loaded() -> ctypes.CDLL:
    library = _library()
    if library is None:
        raise RuntimeError("the C neuron kernel is not available here: check native.usable(x_seq) first")
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
