"""Shared machinery of the benchmarks: workloads, the ways of training them, and how each is measured.

Every method trains the same network (same initial weights), on the same in-memory batches, with the same
optimizer and loss, so that the only difference between two rows of a table is the training method:

* ``a``: the plain SpikingJelly BPTT loop a user writes today (no Lightning);
* ``aL``: the same BPTT through a Lightning ``Trainer`` with its default strategy (what Lightning costs);
* ``b``: ``TruncatedLocalBPTT(k=T)`` with one block: exactly BPTT, so its cost over ``a`` is the plug-in's;
* ``c``: ``TruncatedLocalBPTT(k, n)`` at the paper's settings;
* ``bs``, ``cs``: ``b`` and ``c`` (first setting) with ``fast_neurons=False``, i.e. SpikingJelly's own LIF loop,
  to separate what the strategy's neuron kernel and what the method contribute;
* ``d``: ``a`` after SpikingJelly's ``memopt.optimize_memory`` (checkpointing + spike compression, exact
  gradients);
* ``e``: ``c`` on the network of ``d``: memopt checkpoints pieces that start at spikes (bit-compressed), and the
  strategy forms its blocks on them, as SpikingJelly's own example applies memopt in ``on_fit_start``;
* ``bw``, ``cw``: ``b`` and ``c`` with every layer run over the whole chunk at once (``slice_bytes=None``; the
  strategy's rows walk wide layers in time slices of ``Method.slice_bytes``, the strategy's default 2 MiB);
* ``ap``, ``bp``, ``cp``: ``a``, ``b`` and ``c`` (first setting) with binary saved tensors packed to bits
  (:func:`lightning_tlbptt.packing.binary_saved_tensors` around each batch's forward and backward; for ``bp`` and
  ``cp`` through ``TruncatedLocalBPTT(pack_spikes=True)``, per chunk).

Speed and memory are measured in separate passes, since the memory meters slow training down. Every run is
a fresh training in a fresh child process, so that no run inherits another's heap, caches or process group;
speed runs go round after round in a rotating order, so that load from other jobs on the machine falls on
all methods alike.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import ctypes.util
import logging
import multiprocessing as mp
import os
import re
import resource
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from spikingjelly.activation_based import functional, memopt, neuron
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_tlbptt import SavedTensorsMeter, SpikingClassifier, TruncatedLocalBPTT, packing
from lightning_tlbptt.memory import TensorMemoryMeter, training_state_bytes
from lightning_tlbptt.paper import ARCHITECTURES, build_model
from tlbptt.compare import quiet_trainer

__all__ = [
    "RESULTS",
    "WORKLOADS",
    "Memory",
    "Method",
    "Speed",
    "TensorMemoryMeter",
    "Workload",
    "add_run_options",
    "build_network",
    "configure",
    "format_table",
    "machine",
    "measure_memory",
    "measure_speed",
    "methods_for",
    "one_epoch_trainer",
    "quiet",
    "save",
    "start",
    "workload",
    "workload_fields",
    "write_csv",
]

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20
Batches = list[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Workload:
    """A network of the paper (Table 2), the shape of its data (Table 1) and how far it is scaled down.

    Attributes:
        network: ``lenet2``, ``alexnet`` or ``resnet18``.
        T: time steps per sample.
        batch: samples per batch.
        input_size: side of the square event frames (the datasets' 128 x 128 or 64 x 64, scaled down).
        width: every channel and FC width of Table 2 is divided by this (1 = the paper's network).
        settings: the ``(k, n)`` pairs run as method ``c``; ``e`` uses the first.
        in_channels: event polarities.
        num_classes: classes of the dataset the network is shaped for.
        loss: ``"mse"`` (LeNet, AlexNet: Eq. 3) or ``"ce"`` (ResNet18), as in the paper.
        optimizer: SGD with momentum 0.9 (LeNet, AlexNet) or Adam (ResNet18), as in the paper.
        lr: learning rate (irrelevant to speed and memory, but a sane one keeps spikes alive).
        density: fraction of ones in the random binary event frames.
    """

    network: str
    T: int
    batch: int
    input_size: int
    width: int
    settings: tuple[tuple[int, int], ...]
    in_channels: int = 2
    num_classes: int = 10
    loss: Literal["mse", "ce"] = "mse"
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.05
    density: float = 0.15

    def describe(self, steps: bool = True) -> str:
        scale = "Table 2 widths" if self.width == 1 else f"Table 2 widths / {self.width}"
        return (
            f"{self.network}: {f'T={self.T}, ' if steps else ''}batch {self.batch}, input {self.in_channels}x"
            f"{self.input_size}x{self.input_size} at density {self.density}, {scale}, {self.num_classes} classes, "
            f"{self.loss}, {self.optimizer}"
        )


# The paper's settings (Table 1) scaled to run in seconds per batch on 2 CPU cores; see docs/benchmarks.md.
WORKLOADS: dict[str, Workload] = {
    "lenet2": Workload("lenet2", T=60, batch=32, input_size=28, width=2, settings=((10, 1), (5, 2)), num_classes=11),
    "alexnet": Workload("alexnet", T=100, batch=128, input_size=8, width=4, settings=((10, 1), (5, 2))),
    "resnet18": Workload(
        "resnet18",
        T=8,
        batch=32,
        input_size=16,
        width=1,
        settings=((4, 1), (2, 2)),
        num_classes=200,
        loss="ce",
        optimizer="adam",
        lr=1e-3,
    ),
}

# --quick: the same networks on shorter sequences and smaller batches, to check that everything runs.
QUICK: dict[str, dict[str, Any]] = {
    "lenet2": {"T": 20, "batch": 8},
    "alexnet": {"T": 20, "batch": 16},
    "resnet18": {"T": 4, "batch": 8, "settings": ((2, 1), (1, 2))},
}


def workload(name: str, *, quick: bool = False, **overrides: Any) -> Workload:
    """The named workload, shrunk for ``--quick``, with explicit overrides (``None`` values are ignored)."""
    base = WORKLOADS[name]
    if quick:
        base = replace(base, **QUICK[name])
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def build_network(w: Workload, seed: int = 0) -> nn.Sequential:
    """Table 2's network for ``w``, every width divided by ``w.width``, initialised from ``seed``.

    Built by :func:`lightning_tlbptt.paper.build_model` with its own layers narrowed (``arch=``), so ``width=1``
    gives exactly ``build_model(w.network, ...)``: the paper's neuron, padding, batch norm and output layer.
    """
    arch = ARCHITECTURES[w.network].arch
    scaled = re.sub(r"(\d+)(C|AP|FC|RB)", lambda m: f"{max(1, int(m[1]) // w.width)}{m[2]}", arch)
    torch.manual_seed(seed)
    return build_model(
        w.network,
        in_channels=w.in_channels,
        num_classes=w.num_classes,
        input_size=w.input_size,
        dropout=0.0,
        spiking_pool=True,
        arch=scaled,
    )


def make_batches(w: Workload, n_batches: int, seed: int = 0) -> Batches:
    """Batches of random binary event frames ``[B, T, C, H, W]`` (tonic's layout) and random labels.

    Speed and memory depend on shapes, not values, except through spike rates; a fixed input density keeps
    those the same for every method. The batches are made up front and served as they are (no collation),
    so no method waits for a loader and no meter counts the input batch, which is data, not training memory.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (w.batch, w.T, w.in_channels, w.input_size, w.input_size)
    return [
        ((torch.rand(shape, generator=g) < w.density).float(), torch.randint(0, w.num_classes, (w.batch,), generator=g))
        for _ in range(n_batches)
    ]


@dataclass(frozen=True)
class Method:
    """One row of a table. ``kind`` is one of ``a, aL, b, c, d, e`` (see the module docstring)."""

    kind: str
    k: int | None = None
    n: int | None = None
    fast_neurons: bool = True
    pack: bool = False
    slice_bytes: str | None = "2MiB"

    @property
    def label(self) -> str:
        names = {
            "a": "(a) SpikingJelly BPTT loop",
            "aL": "(a') Lightning BPTT",
            "b": "(b) ours, k=T, one block" + ("" if self.fast_neurons else ", SJ LIF"),
            "c": f"(c) ours, k={self.k}, n={self.n}" + ("" if self.fast_neurons else ", SJ LIF"),
            "d": "(d) BPTT + memopt",
            "e": f"(e) ours k={self.k}, n={self.n} + memopt",
        }
        sliced = {"2MiB": "", None: ", unsliced"}.get(self.slice_bytes, f", slices {self.slice_bytes}")
        return names[self.kind] + (", packed" if self.pack else "") + sliced


def methods_for(w: Workload, kinds: Sequence[str]) -> list[Method]:
    """The rows for ``w``: ``c`` once per ``(k, n)`` of ``w.settings``, ``e`` at the first setting."""
    rows: list[Method] = []
    for kind in kinds:
        if kind == "c":
            rows += [Method("c", k, n) for k, n in w.settings]
        elif kind == "cs":
            rows.append(Method("c", *w.settings[0], fast_neurons=False))
        elif kind == "e":
            rows.append(Method("e", *w.settings[0]))
        elif kind in ("b", "bs"):
            rows.append(Method("b", w.T, None, fast_neurons=kind == "b"))  # n=None: one block
        elif kind in ("a", "aL", "d"):
            rows.append(Method(kind))
        elif kind == "ap":
            rows.append(Method("a", pack=True))
        elif kind == "bp":
            rows.append(Method("b", w.T, None, pack=True))
        elif kind == "cp":
            rows.append(Method("c", *w.settings[0], pack=True))
        elif kind == "bw":
            rows.append(Method("b", w.T, None, slice_bytes=None))
        elif kind == "cw":
            rows += [Method("c", k, n, slice_bytes=None) for k, n in w.settings]
        else:
            raise ValueError(f"unknown method {kind!r}; choose among a, aL, ap, b, bs, bp, bw, c, cs, cp, cw, d, e")
    return rows


def _loss(w: Workload, out_seq: Tensor, y: Tensor) -> Tensor:
    """The loss a user writes on the output averaged over time (the firing rate, or the mean logits)."""
    rate = out_seq.mean(0)
    if w.loss == "ce":
        return F.cross_entropy(rate, y)
    return F.mse_loss(rate, F.one_hot(y, w.num_classes).to(rate.dtype))


def _optimizer(w: Workload, params: Any) -> torch.optim.Optimizer:
    if w.optimizer == "adam":
        return torch.optim.Adam(params, lr=w.lr)
    return torch.optim.SGD(params, lr=w.lr, momentum=0.9)


class _Piece(nn.Sequential):
    """A run of modules ending at a spiking neuron: the unit that memopt checkpoints (method ``d``)."""


def _split_at_neurons(modules: Sequence[nn.Module]) -> list[list[nn.Module]]:
    """Cut a chain of modules after every module that holds a spiking neuron.

    Each piece but the first then starts with the previous piece's spikes, which a checkpoint can keep as
    one bit each, and recomputing one piece in backward holds only that piece's activations. It is the
    finest cut at which every stored input is a spike tensor, what memopt's level-2 search converges to on
    CUDA for conv-neuron networks; on CPU only level 1 runs, so the pieces are given to it.
    """
    pieces: list[list[nn.Module]] = [[]]
    for module in modules:
        pieces[-1].append(module)
        if any(isinstance(m, neuron.BaseNode) for m in module.modules()):
            pieces.append([])
    if not pieces[-1]:
        pieces.pop()
    return pieces


def memopt_network(net: nn.Sequential, example: Tensor) -> nn.Sequential:
    """``net`` cut into pieces (:func:`_split_at_neurons`) and passed through ``memopt.optimize_memory``.

    Level 1 checkpoints every target module and compresses its first input when the probe finds it binary;
    levels 2-4 search over CUDA peak memory and refuse to run on CPU.
    """
    grouped = nn.Sequential(*(_Piece(*piece) for piece in _split_at_neurons(list(net))))

    def forward(model: nn.Module) -> Tensor:
        functional.reset_net(model)
        return model(example)

    memopt.optimize_memory(grouped, _Piece, forward, level=1, checkpoint_budget="memory", compress=True)
    functional.reset_net(grouped)
    return grouped


class _FirstBatch(Callback):
    """Calls ``function`` once, when the first training batch starts."""

    def __init__(self, function: Callable[[], None]) -> None:
        self.function: Callable[[], None] | None = function

    def on_train_batch_start(self, *args: Any) -> None:
        if self.function is not None:
            self.function()
            self.function = None


class _BatchTimer(Callback):
    """Wall and CPU seconds from ``on_train_batch_start`` to ``on_train_batch_end`` of every batch."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds: list[tuple[float, float]] = []
        self._start = (0.0, 0.0)

    def on_train_batch_start(self, *args: Any) -> None:
        self.sync()
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, *args: Any) -> None:
        self.sync()
        self.seconds.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


@dataclass
class Run:
    """What one training run leaves: ``(wall, cpu)`` seconds per batch, and the objects to measure."""

    seconds: list[tuple[float, float]]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer


def train(
    method: Method,
    w: Workload,
    batches: Batches,
    device: torch.device,
    seed: int = 0,
    at_first_batch: Callable[[], None] | None = None,
) -> Run:
    """Train ``method`` on ``batches`` from the same initial weights; time each batch.

    ``at_first_batch`` is called when the first batch starts, after the setup (the strategy's probe of the network).
    """
    net = build_network(w, seed)
    loader = DataLoader(batches, batch_size=None)
    if method.kind in ("d", "e"):  # e: memopt's checkpoints, then the strategy forms blocks on them
        net = memopt_network(net, batches[0][0][:2].transpose(0, 1))
    if method.kind in ("a", "d"):
        if at_first_batch is not None:
            at_first_batch()
        return _train_plain(net, w, loader, device, method.pack)
    return _train_lightning(method, net, w, loader, device, at_first_batch)


def _train_plain(net: nn.Module, w: Workload, loader: DataLoader, device: torch.device, pack: bool = False) -> Run:
    """The loop of a SpikingJelly user: reset, forward over all T, loss on the mean output, backward, step.

    The step is a function, as in most training scripts: its locals (the output sequence and the loss,
    whose graph holds tens of thousands of autograd nodes here) die with it. Written inline, they live on
    into the next forward, and with glibc's default heap trimming that made the step up to 1.4x slower here.
    """
    net.to(device)
    optimizer = _optimizer(w, net.parameters())
    sync = _sync(device)

    def step(x: Tensor, y: Tensor) -> None:
        functional.reset_net(net)
        with packing.binary_saved_tensors(net) if pack else contextlib.nullcontext():
            out_seq = net(x.transpose(0, 1))  # [B, T, ...] -> [T, B, ...]
            loss = _loss(w, out_seq, y)
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()

    seconds = []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        sync()
        start = (time.perf_counter(), time.process_time())
        step(x, y)
        sync()
        seconds.append((time.perf_counter() - start[0], time.process_time() - start[1]))
    functional.reset_net(net)
    return Run(seconds, list(net.parameters()), optimizer)


def _train_lightning(
    method: Method,
    net: nn.Module,
    w: Workload,
    loader: DataLoader,
    device: torch.device,
    at_first_batch: Callable[[], None] | None = None,
) -> Run:
    module = SpikingClassifier(net, loss=w.loss, optimizer=w.optimizer, lr=w.lr, lr_step_epochs=0)
    timer = _BatchTimer(_sync(device))
    callbacks: list[Callback] = [timer] if at_first_batch is None else [_FirstBatch(at_first_batch), timer]
    strategy: Any = "auto"
    if method.kind != "aL":
        assert method.k is not None
        strategy = TruncatedLocalBPTT(
            k=method.k,
            n=method.n,
            loss=w.loss,
            fast_neurons=method.fast_neurons,
            pack_spikes=method.pack,
            slice_bytes=method.slice_bytes,
        )
    trainer = one_epoch_trainer(strategy, device, callbacks)
    trainer.fit(module, train_dataloaders=loader)
    return Run(timer.seconds, list(module.parameters()), trainer.optimizers[0])


@dataclass
class Memory:
    """Peak memory of one method over a short training run (see :func:`measure_memory`), in bytes.

    ``saved``, ``tensors`` and ``cuda_max`` are peaks over the whole run; ``setup_*`` and ``batches_*`` split the
    saved and true peaks (``peak``'s figure) at the start of the first batch: before it, the strategy's setup runs
    one chunk through the network to cut it into blocks (the plain loop has no setup).
    """

    saved: int
    state: int
    tensors: int
    input_batch: int
    rss_delta: int
    cuda_max: int | None
    setup_saved: int = 0
    setup_peak: int = 0
    batches_saved: int = 0
    batches_peak: int = 0

    @property
    def saved_plus_state(self) -> int:
        """The issue's CPU definition: peak saved activations plus parameters, gradients, optimizer state."""
        return self.saved + self.state

    @property
    def peak(self) -> int:
        """The figure compared between methods: CUDA's allocator peak, else the peak of all live tensors."""
        return self.cuda_max if self.cuda_max is not None else self.tensors


def _measure(method: Method, w: Workload, device: torch.device, n_batches: int) -> Memory:
    batches = make_batches(w, n_batches)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    setup: dict[str, int] = {}
    with SavedTensorsMeter() as saved, TensorMemoryMeter() as tensors:

        def split_peaks() -> None:
            setup.update(saved=saved.peak_bytes, tensors=tensors.peak_bytes)
            saved.reset_peak()
            tensors.peak_bytes = tensors.current_bytes
            if cuda:
                setup["cuda"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()

        run = train(method, w, batches, device, at_first_batch=split_peaks)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda_batches = torch.cuda.max_memory_allocated() if cuda else None
    return Memory(
        saved=max(setup["saved"], saved.peak_bytes),
        state=training_state_bytes(run.params, run.optimizer),
        tensors=max(setup["tensors"], tensors.peak_bytes),
        input_batch=batches[0][0].numel() * batches[0][0].element_size(),
        rss_delta=(rss_after - rss_before) * 1024,  # Linux reports kilobytes
        cuda_max=max(setup["cuda"], cuda_batches) if cuda_batches is not None else None,
        setup_saved=setup["saved"],
        setup_peak=setup["cuda"] if cuda else setup["tensors"],
        batches_saved=saved.peak_bytes,
        batches_peak=cuda_batches if cuda_batches is not None else tensors.peak_bytes,
    )


def _in_child(function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function(*args)`` in a fresh child process and return its result.

    Every run then starts from the same process state: the allocator's heap, oneDNN's caches, Lightning's
    process group and thread settings of one run cannot leak into the next (a DDP-based strategy, for one,
    leaves a process group behind). A forked child starts at once with this process's small heap; CUDA
    needs a spawned one.
    """
    context = mp.get_context("spawn" if torch.cuda.is_available() else "fork")
    with context.Pool(1) as pool:
        return pool.apply(function, args)


def measure_memory(method: Method, w: Workload, device: torch.device, n_batches: int = 1) -> Memory:
    """Peak memory of ``method`` over ``n_batches`` training batches, in a fresh child process.

    Three figures (see docs/benchmarks.md): ``tensors``, the peak of all live tensors (the CPU counterpart
    of CUDA's ``max_memory_allocated``, which is taken instead on CUDA); ``saved + state``, the issue's CPU
    definition, blind inside checkpoints; and ``rss_delta``, the growth of the child's resident-set
    high-water mark during training, which adds the allocator's, oneDNN's and Lightning's own memory. The
    input batch is data, made before the meters start, and is reported apart.
    """
    return _in_child(_measure, method, w, device, n_batches)


@dataclass
class Speed:
    """Per-round median ``(wall, cpu)`` seconds per batch of each method, from :func:`measure_speed`."""

    rounds: dict[Method, list[tuple[float, float]]]

    def samples_per_s(self, method: Method, batch: int, clock: int = 0) -> float:
        return batch / statistics.median(r[clock] for r in self.rounds[method])

    def ratio(self, method: Method, base: Method, clock: int = 0) -> float:
        """Speed of ``method`` over ``base``: the median over rounds of their time ratio in that round."""
        pairs = zip(self.rounds[base], self.rounds[method], strict=True)
        return statistics.median(b[clock] / m[clock] for b, m in pairs)


def _time(method: Method, w: Workload, device: torch.device, timed: int) -> tuple[float, float]:
    timings = train(method, w, make_batches(w, 1 + timed), device).seconds[1:]
    return statistics.median(t[0] for t in timings), statistics.median(t[1] for t in timings)


def measure_speed(methods: Sequence[Method], w: Workload, device: torch.device, rounds: int, timed: int) -> Speed:
    """Time every method ``rounds`` times, interleaved, rotating the order each round, one child per run.

    Each run is a fresh training of ``1 + timed`` batches; the first is a warm-up (lazy layers, oneDNN
    primitive caches, the strategy's first-batch checks) and is not timed. Wall time is what a user waits;
    CPU time (user + system of the process) is given too, since on a shared machine it does not count the
    time other jobs hold the cores.
    """
    result = Speed({m: [] for m in methods})
    for r in range(rounds):
        shift = r % len(methods)
        for method in [*methods[shift:], *methods[:shift]]:
            wall, cpu = _in_child(_time, method, w, device, timed)
            result.rounds[method].append((wall, cpu))
            print(f"  round {r + 1}/{rounds}  {method.label:<32} {wall:7.3f} s wall {cpu:7.3f} s cpu", flush=True)
    return result


MALLOC_POLICIES = ("fixed", "glibc", "heap")


def one_epoch_trainer(strategy: Any, device: torch.device, callbacks: list[Callback]) -> L.Trainer:
    """The measured runs' Trainer: one device, one epoch over the given batches, nothing else (no validation, logger,
    checkpoint, progress bar or summary)."""
    return quiet_trainer(strategy, accelerator=device.type, max_epochs=1, limit_val_batches=0, callbacks=callbacks)


def add_run_options(parser: Any) -> None:
    """The options every benchmark script shares: threads, allocator policy, device, CSV tag."""
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1, see docs)")
    parser.add_argument("--malloc", choices=MALLOC_POLICIES, default="fixed", help="allocator policy (see docs)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--tag", default="", help="suffix of the CSV name, e.g. for a run of a patched package")


def start(args: Any) -> tuple[str, torch.device]:
    """Apply ``add_run_options``' threads and allocator policy, silence the libraries; ``(setup line, device)``."""
    setup = configure(args.threads, args.malloc)
    quiet()
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    return setup, torch.device(auto if args.device == "auto" else args.device)


def configure(threads: int, malloc: str = "fixed") -> str:
    """Set the thread count and the allocator for every run of this process; returns a description.

    ``threads``: Lightning's DDP launcher, which the strategy inherits, calls ``torch.set_num_threads(cpu
    count)`` unless ``OMP_NUM_THREADS`` is set, even on one device, so without the variable the strategy's
    runs would not use the thread count the others use. On a machine shared with other jobs, one thread per
    process is also far steadier than two (threads that wait for each other at every op while the cores are
    taken ran 8-10x slower here).

    ``malloc``: how glibc serves tensor memory, which on this VM moves step times by up to 1.5x (every 4 KiB
    page handed out fresh by the kernel costs about a microsecond to fault in):

    * ``"fixed"`` (default): blocks up to 32 MiB from a heap that is never trimmed, larger ones mmapped as by
      default (so fresh pages each time). With glibc's own moving thresholds, whether a step's tensors are
      faulted in again depends on incidental allocations: the same BPTT step ran up to 1.4x slower in one
      loop than in another with ten times the page faults. Fixed thresholds give every method the same rules.
    * ``"glibc"``: glibc's defaults, what a user's process gets.
    * ``"heap"``: no mmap at all, one heap that is never trimmed: after the first batch every allocation
      reuses resident memory, as CUDA's caching allocator does on a GPU. Tensors longer than 32 MiB
      (T-long activations of BPTT) then cost no page faults, which takes from truncation part of its CPU
      speed advantage (docs/benchmarks.md).
    """
    if malloc not in MALLOC_POLICIES:
        raise ValueError(f"malloc must be one of {MALLOC_POLICIES}, got {malloc!r}")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path) if path else None
    if malloc == "glibc" or libc is None or not hasattr(libc, "mallopt"):
        return f"{threads} thread(s), glibc malloc defaults"
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
    if malloc == "heap":
        applied = libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)
        description = "malloc: one heap, never trimmed, no mmap"
    else:
        applied = libc.mallopt(m_mmap_threshold, 32 * MiB) and libc.mallopt(m_trim_threshold, 2**31 - 1)
        description = "malloc: no heap trimming, mmap above 32 MiB"
    if not applied:
        return f"{threads} thread(s), glibc malloc defaults (mallopt refused)"
    return f"{threads} thread(s), {description}"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def workload_fields(w: Workload) -> dict[str, Any]:
    """The workload as CSV columns."""
    return {k: v for k, v in asdict(w).items() if k != "settings"}


def save(stem: str, rows: Sequence[dict[str, Any]], *parts: str) -> Path:
    """Write ``rows`` to ``results/<stem>[_<part>...].csv`` (empty parts left out, e.g. ``quick``, a tag); say where."""
    path = RESULTS / f"{stem}{''.join(f'_{part}' for part in parts if part)}.csv"
    write_csv(path, rows)
    print(f"wrote {path}")
    return path


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` are ``(key, header, format spec)``, ``None`` cells print as ``-``."""
    cells = [[format(row[key], spec) if row[key] is not None else "-" for key, _, spec in columns] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(widths[0]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(values))

    header = line([h for _, h, _ in columns])
    return "\n".join([header, "-" * len(header), *(line(c) for c in cells)])


def quiet() -> None:
    """Keep Lightning's per-fit banners and its known harmless warnings out of the output."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
