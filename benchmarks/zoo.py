"""Users' networks: SpikingJelly model-zoo networks with their default neurons, trained as a user trains them.

    .venv/bin/python benchmarks/zoo.py                                   # the documented run (see docs/benchmarks.md)
    .venv/bin/python benchmarks/zoo.py --networks spiking_resnet18_T8 --rounds 1     # one network, one round
    .venv/bin/python benchmarks/zoo.py --summary                         # the table from the CSVs written so far
    .venv/bin/python benchmarks/zoo.py --profile spiking_resnet18_T8     # where the time of (c) goes against (a)
    .venv/bin/python benchmarks/zoo.py --adam                            # one Adam step over each network

Every network is a SpikingJelly zoo network built as its tutorials build it (``LIFNode`` with ``surrogate.ATan()``
and ``detach_reset=True``; one net of ``IFNode``, one of ``ParametricLIFNode``), put in multi-step mode with
``functional.set_step_mode(net, 'm')``, inside a plain user ``LightningModule`` (:class:`UserModule`: cross-entropy
on the time-mean output, Adam, ``self.log`` of its loss). Only the Trainer's ``strategy`` changes between rows:

* ``a``: plain Lightning, no strategy (BPTT over all ``T``);
* ``b``: ``TruncatedLocalBPTT(k=T, n=None)``, one block (exactly BPTT);
* ``c1``, ``c2``: ``TruncatedLocalBPTT(k=T // 4, n=1)`` and ``n=2``, the strategy's defaults otherwise;
* ``e1``: ``TruncatedLocalBPTT(k=T // 4, n=1, step_every="batch")``, one optimizer step per batch (opt-in, not
  Algorithm 1);
* ``p1``: ``TruncatedLocalBPTT(k=T // 4, n=1, pack_spikes=True)``, spikes saved for backward at one bit;
* ``d``: plain Lightning on the network after SpikingJelly's ``memopt.optimize_memory`` (level 1, the level that
  runs on a CPU): residual blocks, or a ``Sequential``'s runs ending at a neuron, checkpointed;
* ``m1``: the network of ``d`` under ``c1``'s strategy (recomputing what truncation still stores).

Speed: every run is a fresh training in a fresh (forked) child process: one warm-up batch (the strategy's probe,
oneDNN's caches), then ``--timed-batches`` timed batches (``on_train_batch_start`` to ``on_train_batch_end``).
Runs go in rounds, every method of a network once per round in a rotated order, and each ratio is the median
over rounds of the same-round ratio against (a), in wall and in CPU time (the latter does not count the time
other jobs hold the cores). Memory: one fresh child per method and batch size, two batches each; the second
batch's peak of all live tensors (``TensorMemoryMeter``, the CPU counterpart of ``max_memory_allocated``) and of
saved activations (``SavedTensorsMeter``), and the child's RSS growth, at two batch sizes: the slope over the
batch size is the memory per sample (what a larger batch costs), free of parameters and optimizer state. The
live-tensor peak is taken outside Adam's update (:class:`_Peaks`; the peak with it is in the CSV too).

Rows are appended to ``benchmarks/results/zoo_speed[_tag].csv`` and ``zoo_memory[_tag].csv`` as they come; a
rerun skips what is there (resumable). ``zoo[_tag].csv`` is the summary. ``--profile`` writes
``zoo_profile_<network>.csv``, ``--adam`` ``zoo_adam.csv``.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import importlib
import logging
import os
import pstats
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness as H
import lightning as L
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, memopt, neuron, surrogate
from spikingjelly.activation_based.model import parametric_lif_net, sew_resnet, spiking_resnet, spiking_vgg
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_tlbptt import SavedTensorsMeter, TruncatedLocalBPTT
from lightning_tlbptt.memory import TensorMemoryMeter

MiB = 2**20


@dataclass(frozen=True)
class Network:
    """One workload: a zoo network, its input, ``T`` and the ``k`` of rows ``c1``/``c2`` (``T // 4``).

    Attributes:
        name: the row's name (``<network>_T<T>``).
        family: which builder (:func:`build`).
        T: time steps.
        shape: one sample's input, ``[C, H, W]``: a static image repeated over ``T`` by the module (``static``), or
            one step of event frames ``[B, T, C, H, W]``.
        static: images (repeated over ``T``, SpikingJelly's CIFAR-10 tutorials) or event frames.
        batch: the speed runs' batch size; memory is measured at ``batch // 2`` and ``batch``.
        classes: the network's output classes.
    """

    name: str
    family: str
    T: int
    shape: tuple[int, ...]
    static: bool
    batch: int
    classes: int = 10

    @property
    def k(self) -> int:
        return max(1, self.T // 4)


NETWORKS: dict[str, Network] = {
    n.name: n
    for n in (
        Network("spiking_resnet18_T8", "spiking_resnet18", 8, (3, 32, 32), True, 12),
        Network("spiking_resnet18_T16", "spiking_resnet18", 16, (3, 32, 32), True, 12),
        Network("sew_resnet18_T8", "sew_resnet18", 8, (3, 32, 32), True, 12),
        Network("sew_resnet18_T16", "sew_resnet18", 16, (3, 32, 32), True, 12),
        Network("dvs_gesture_T16", "dvs_gesture", 16, (2, 128, 128), False, 8, classes=11),
        Network("spiking_vgg11_bn_T8", "spiking_vgg11_bn", 8, (3, 32, 32), True, 12),
        Network("nmnist_if_T16", "nmnist_if", 16, (2, 34, 34), False, 20),
        Network("cifar10_plif_T8", "cifar10_plif", 8, (3, 32, 32), True, 20),
    )
}

DESCRIPTIONS = {
    "spiking_resnet18": "spiking_resnet.spiking_resnet18, LIFNode",
    "sew_resnet18": "sew_resnet.sew_resnet18(cnf='ADD'), LIFNode",
    "dvs_gesture": "parametric_lif_net.DVSGestureNet(channels=16), LIFNode",
    "spiking_vgg11_bn": "spiking_vgg.spiking_vgg11_bn, LIFNode",
    "nmnist_if": "parametric_lif_net.NMNISTNet(channels=32), IFNode",
    "cifar10_plif": "parametric_lif_net.CIFAR10Net(channels=32), ParametricLIFNode",
}

METHODS: dict[str, str] = {
    "a": "(a) plain Lightning (BPTT)",
    "b": "(b) ours, k=T, n=None",
    "c1": "(c) ours, k=T/4, n=1",
    "c2": "(c) ours, k=T/4, n=2",
    "e1": "(e) ours, k=T/4, n=1, step_every='batch'",
    "p1": "(p) ours, k=T/4, n=1, pack_spikes=True",
    "d": "(d) memopt level 1, plain Lightning",
    "m1": "(m) memopt level 1, then ours, k=T/4, n=1",
}


def build(net: Network, seed: int = 0) -> nn.Module:
    """The zoo network as SpikingJelly's tutorials build it, in multi-step mode, initialised from ``seed``."""
    torch.manual_seed(seed)
    common: dict[str, Any] = {"surrogate_function": surrogate.ATan(), "detach_reset": True}
    family = net.family
    model: nn.Module
    if family == "spiking_resnet18":
        model = spiking_resnet.spiking_resnet18(spiking_neuron=neuron.LIFNode, num_classes=net.classes, **common)
    elif family == "sew_resnet18":
        model = sew_resnet.sew_resnet18(spiking_neuron=neuron.LIFNode, cnf="ADD", num_classes=net.classes, **common)
    elif family == "spiking_vgg11_bn":
        model = spiking_vgg.spiking_vgg11_bn(spiking_neuron=neuron.LIFNode, num_classes=net.classes, **common)
    elif family == "dvs_gesture":
        model = parametric_lif_net.DVSGestureNet(channels=16, spiking_neuron=neuron.LIFNode, **common)
    elif family == "nmnist_if":
        model = parametric_lif_net.NMNISTNet(channels=32, spiking_neuron=neuron.IFNode, **common)
    elif family == "cifar10_plif":
        model = parametric_lif_net.CIFAR10Net(channels=32, spiking_neuron=neuron.ParametricLIFNode, **common)
    else:
        raise ValueError(f"unknown network family {family!r}")
    functional.set_step_mode(model, "m")
    return model


class UserModule(L.LightningModule):
    """What a user writes: reset, the network over ``[T, B, ...]``, cross-entropy on the time-mean output, Adam."""

    def __init__(self, net: nn.Module, T: int, static: bool, lr: float = 1e-3) -> None:
        super().__init__()
        self.net, self.T, self.static, self.lr = net, T, static, lr

    def forward(self, x: Tensor) -> Tensor:
        functional.reset_net(self.net)
        x_seq = x.unsqueeze(0).repeat(self.T, *([1] * x.dim())) if self.static else x.transpose(0, 1)
        return self.net(x_seq).mean(0)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def batches(net: Network, batch: int, n: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Random inputs made before any timing: images ``[B, C, H, W]`` (normal) or binary event frames
    ``[B, T, C, H, W]`` at density 0.1; random labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if net.static:
            x = torch.randn((batch, *net.shape), generator=g)
        else:
            x = (torch.rand((batch, net.T, *net.shape), generator=g) < 0.1).float()
        out.append((x, torch.randint(0, net.classes, (batch,), generator=g)))
    return out


# --- memopt (d) -----------------------------------------------------------------------------------------------------


def with_memopt(model: nn.Module, net: Network) -> nn.Module:
    """SpikingJelly's ``memopt.optimize_memory`` at level 1 as a user applies it: the residual blocks are the targets
    of a ResNet; a network built of ``Sequential`` stages (VGG, the parametric-LIF nets) has each stage cut into runs
    that end at a neuron (harness.memopt_network's rule), which become the targets."""
    targets: tuple[type, ...]
    if net.family == "spiking_resnet18":
        targets = (spiking_resnet.BasicBlock,)
    elif net.family == "sew_resnet18":
        targets = (sew_resnet.BasicBlock,)
    else:
        for name, child in list(model.named_children()):
            if isinstance(child, nn.Sequential) and any(isinstance(m, neuron.BaseNode) for m in child.modules()):
                pieces = H._split_at_neurons(list(child))
                setattr(model, name, nn.Sequential(*(H._Piece(*piece) for piece in pieces)))
        targets = (H._Piece,)
    example = batches(net, 2, 1, seed=1)[0][0]
    x_seq = example.unsqueeze(0).repeat(net.T, *([1] * example.dim())) if net.static else example.transpose(0, 1)

    def forward(m: nn.Module) -> Tensor:
        functional.reset_net(m)
        return m(x_seq)

    memopt.optimize_memory(model, targets, forward, level=1, checkpoint_budget="memory", compress=True)
    functional.reset_net(model)
    return model


# --- one run --------------------------------------------------------------------------------------------------------


def strategy_for(method: str, net: Network) -> Any:
    if method in ("a", "d"):
        return "auto"
    if method == "b":
        return TruncatedLocalBPTT(k=net.T, n=None)
    if method in ("c1", "c2"):
        return TruncatedLocalBPTT(k=net.k, n=int(method[1]))
    if method == "e1":
        return TruncatedLocalBPTT(k=net.k, n=1, step_every="batch")
    if method == "p1":
        return TruncatedLocalBPTT(k=net.k, n=1, pack_spikes=True)
    if method == "m1":
        return TruncatedLocalBPTT(k=net.k, n=1)
    raise ValueError(f"unknown method {method!r}; choose among {', '.join(METHODS)}")


def module_for(method: str, net: Network) -> UserModule:
    model = build(net)
    if method in ("d", "m1"):
        model = with_memopt(model, net)
    return UserModule(model, net.T, net.static)


def fit(method: str, net: Network, data: list[tuple[Tensor, Tensor]], callbacks: Sequence[Any] = ()) -> Any:
    """Train one epoch over ``data``; returns the trainer and the batch timer."""
    module = module_for(method, net)
    timer = H._BatchTimer(lambda: None)
    trainer = H.one_epoch_trainer(strategy_for(method, net), torch.device("cpu"), [*callbacks, timer])
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    return trainer, timer, module


def _time(method: str, net: Network, batch: int, timed: int) -> dict[str, Any]:
    load = os.getloadavg()[0]
    trainer, timer, _ = fit(method, net, batches(net, batch, 1 + timed))
    walls = [s[0] for s in timer.seconds[1:]]
    cpus = [s[1] for s in timer.seconds[1:]]
    return {
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "first_batch_wall_s": timer.seconds[0][0],
        "optimizer_steps": trainer.global_step,
        "load_1min": load,
    }


class _Peaks:
    """Live-tensor peaks of a run, split at the optimizer's update: the update of a large network (Adam's moments and
    its parameter-sized temporaries) can set the peak of the whole run, which then says nothing about activations.

    ``outside``: the peak outside Adam's update (forward, backward, the strategy's work: what grows with the batch);
    ``full``: the peak of everything. Both restart when the second batch starts (the first ran the strategy's probe);
    ``first`` keeps the first batch's full peak."""

    def __init__(self, live: TensorMemoryMeter) -> None:
        self.live = live
        self.outside = self.full = self.first = 0

    def install(self) -> Callable[[], None]:
        module = importlib.import_module("torch.optim.adam")  # the submodule: torch.optim.adam is the class's name
        original = module.adam

        def adam(*args: Any, **kwargs: Any) -> Any:
            self.outside = max(self.outside, self.live.peak_bytes)
            self.full = max(self.full, self.live.peak_bytes)
            self.live.peak_bytes = self.live.current_bytes
            try:
                return original(*args, **kwargs)
            finally:
                self.full = max(self.full, self.live.peak_bytes)
                self.live.peak_bytes = self.live.current_bytes

        module.adam = adam  # Adam.step looks the function up at every call

        def uninstall() -> None:
            module.adam = original

        return uninstall

    def finish(self) -> None:
        self.outside = max(self.outside, self.live.peak_bytes)
        self.full = max(self.full, self.outside)


class _SecondBatch(L.Callback):
    """Restarts the peaks when the second batch starts."""

    def __init__(self, peaks: _Peaks, saved: SavedTensorsMeter) -> None:
        self.peaks, self.saved = peaks, saved

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 1:
            self.peaks.finish()
            self.peaks.first = self.peaks.full
            self.peaks.outside = self.peaks.full = 0
            self.peaks.live.peak_bytes = self.peaks.live.current_bytes
            self.saved.reset_peak()


def _memory(method: str, net: Network, batch: int) -> dict[str, Any]:
    data = batches(net, batch, 2)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with SavedTensorsMeter() as saved, TensorMemoryMeter() as live:
        peaks = _Peaks(live)
        uninstall = peaks.install()
        try:
            trainer, _, module = fit(method, net, data, [_SecondBatch(peaks, saved)])
        finally:
            uninstall()
        peaks.finish()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    return {
        "live_peak_mib": peaks.outside / MiB,
        "live_peak_with_update_mib": peaks.full / MiB,
        "saved_peak_mib": saved.peak_bytes / MiB,
        "first_batch_live_peak_mib": peaks.first / MiB,
        "rss_delta_mib": (rss_after - rss_before) / 1024,  # ru_maxrss is in KiB on Linux
        "params_mib": params / MiB,
        "optimizer_steps": trainer.global_step,
    }


# --- CSVs -----------------------------------------------------------------------------------------------------------


def _path(stem: str, tag: str) -> Path:
    return H.RESULTS / f"{stem}{'_' + tag if tag else ''}.csv"


def _read(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _append(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _common(net: Network, method: str, setup: str) -> dict[str, Any]:
    machine = H.machine()
    return {
        "network": net.name,
        "method": method,
        "label": METHODS[method],
        "T": net.T,
        "k": net.T if method == "b" else net.k if method in ("c1", "c2", "e1", "p1", "m1") else None,
        "n": int(method[1]) if method in ("c1", "c2", "e1", "p1", "m1") else None,
        "input": "x".join(map(str, net.shape)) + (" image" if net.static else " events"),
        "description": DESCRIPTIONS[net.family],
        "setup": setup,
        "cpu": machine["cpu"],
        "cores": machine["cores"],
        "torch": machine["torch"],
    }


# --- the runs -------------------------------------------------------------------------------------------------------


def run_memory(nets: Sequence[Network], methods: Sequence[str], tag: str, setup: str) -> None:
    path = _path("zoo_memory", tag)
    done = {(r["network"], r["method"], r["batch"]) for r in _read(path)}
    for net in nets:
        for method in methods:
            for batch in (net.batch // 2, net.batch):
                if (net.name, method, str(batch)) in done:
                    continue
                start = time.perf_counter()
                try:
                    result = H._in_child(_memory, method, net, batch)
                except Exception as err:  # one broken method must not take the other rows
                    print(f"  memory {net.name:<22} {method:<3} B={batch:<3} FAILED: {type(err).__name__}: {err}")
                    continue
                row = {**_common(net, method, setup), "batch": batch, **result, "run_s": time.perf_counter() - start}
                _append(path, row)
                print(
                    f"  memory {net.name:<22} {method:<3} B={batch:<3} live peak {result['live_peak_mib']:8.1f} MiB"
                    f"  saved {result['saved_peak_mib']:8.1f} MiB  RSS +{result['rss_delta_mib']:6.0f} MiB",
                    flush=True,
                )


def run_speed(
    nets: Sequence[Network], methods: Sequence[str], rounds: int, timed: int, tag: str, setup: str, batch: int | None
) -> None:
    path = _path("zoo_speed", tag)
    done = {(r["network"], r["method"], r["round"]) for r in _read(path)}
    for net in nets:
        b = batch or net.batch
        for r in range(rounds):
            shift = r % len(methods)
            for position, method in enumerate([*methods[shift:], *methods[:shift]]):
                if (net.name, method, str(r)) in done:
                    continue
                try:
                    result = H._in_child(_time, method, net, b, timed)
                except Exception as err:
                    print(f"  speed  {net.name:<22} {method:<3} round {r + 1} FAILED: {type(err).__name__}: {err}")
                    continue
                row = {
                    **_common(net, method, setup),
                    "batch": b,
                    "round": r,
                    "position": position,
                    "timed_batches": timed,
                    **result,
                }
                _append(path, row)
                print(
                    f"  speed  {net.name:<22} {method:<3} round {r + 1}/{rounds}  {result['wall_s']:7.3f} s wall "
                    f"{result['cpu_s']:7.3f} s cpu ({result['optimizer_steps']} steps, load {result['load_1min']:.1f})",
                    flush=True,
                )


# --- the summary ----------------------------------------------------------------------------------------------------


def _ratio(rows: list[dict[str, str]], network: str, method: str, clock: str) -> float | None:
    """Median over rounds of (a)'s time over ``method``'s in the same round."""
    by_round: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["network"] == network:
            by_round.setdefault(r["round"], {})[r["method"]] = float(r[clock])
    pairs = [v["a"] / v[method] for v in by_round.values() if "a" in v and method in v]
    return statistics.median(pairs) if pairs else None


def _slope(rows: list[dict[str, str]], network: str, method: str, key: str) -> float | None:
    """MiB per sample: the growth of ``key`` between the two batch sizes, per sample."""
    found = sorted((int(r["batch"]), float(r[key])) for r in rows if r["network"] == network and r["method"] == method)
    if len(found) < 2 or found[0][0] == found[-1][0]:
        return None
    (b0, m0), (b1, m1) = found[0], found[-1]
    return (m1 - m0) / (b1 - b0)


def summarize(nets: Sequence[Network], tag: str) -> list[dict[str, Any]]:
    speed, memory = _read(_path("zoo_speed", tag)), _read(_path("zoo_memory", tag))
    rows: list[dict[str, Any]] = []
    for net in nets:
        if not any(r["network"] == net.name for r in speed + memory):
            continue
        plain_wall = [float(r["wall_s"]) for r in speed if r["network"] == net.name and r["method"] == "a"]
        live_a = _slope(memory, net.name, "a", "live_peak_mib")
        rss_a = _slope(memory, net.name, "a", "rss_delta_mib")
        row: dict[str, Any] = {
            "network": net.name,
            "T": net.T,
            "k": net.k,
            "batch": next((int(r["batch"]) for r in speed if r["network"] == net.name), net.batch),
            "rounds": len(plain_wall),
            "plain_s_per_batch": statistics.median(plain_wall) if plain_wall else None,
            "plain_mib_per_sample": live_a,
        }
        for method in ("b", "c1", "c2", "e1", "p1", "m1", "d"):
            row[f"{method}_speed"] = _ratio(speed, net.name, method, "wall_s")
            row[f"{method}_speed_cpu"] = _ratio(speed, net.name, method, "cpu_s")
            live = _slope(memory, net.name, method, "live_peak_mib")
            rss = _slope(memory, net.name, method, "rss_delta_mib")
            row[f"{method}_mem"] = live / live_a if live is not None and live_a else None
            row[f"{method}_rss"] = rss / rss_a if rss is not None and rss_a and rss_a > 0 else None
        loads = [float(r["load_1min"]) for r in speed if r["network"] == net.name]
        row["load_min"], row["load_max"] = (min(loads), max(loads)) if loads else (None, None)
        rows.append(row)
    return rows


SUMMARY_COLUMNS = (
    ("network", "network", "s"),
    ("plain_s_per_batch", "(a) s/batch", ".2f"),
    ("plain_mib_per_sample", "(a) MiB/sample", ".1f"),
    ("b_speed", "k=T speed", ".2f"),
    ("b_speed_cpu", "(cpu)", ".2f"),
    ("b_mem", "k=T mem", ".2f"),
    ("c1_speed", "n=1 speed", ".2f"),
    ("c1_speed_cpu", "(cpu)", ".2f"),
    ("c1_mem", "n=1 mem", ".3f"),
    ("c1_rss", "n=1 RSS", ".2f"),
    ("c2_speed", "n=2 speed", ".2f"),
    ("c2_mem", "n=2 mem", ".3f"),
    ("e1_speed", "n=1 per batch speed", ".2f"),
    ("e1_speed_cpu", "(cpu)", ".2f"),
    ("e1_mem", "n=1 per batch mem", ".3f"),
    ("p1_speed", "n=1 packed speed", ".2f"),
    ("p1_mem", "n=1 packed mem", ".3f"),
    ("m1_mem", "memopt + n=1 mem", ".3f"),
    ("d_speed", "memopt speed", ".2f"),
    ("d_mem", "memopt mem", ".2f"),
)


def print_summary(nets: Sequence[Network], tag: str) -> None:
    rows = summarize(nets, tag)
    if not rows:
        print("no results yet")
        return
    print(H.format_table(rows, SUMMARY_COLUMNS))
    loads = [v for r in rows for v in (r["load_min"], r["load_max"]) if v is not None]
    if loads:
        print(f"host load average (1 min) during the speed runs: {min(loads):.1f} - {max(loads):.1f}")
    print(
        "speed: median over rounds of the same-round ratio (a) time / method time (> 1 is faster than plain); "
        "mem: live-tensor peak per sample (slope over batch size) against (a)'s; RSS: the same for RSS growth"
    )
    H.write_csv(_path("zoo", tag), rows)
    print(f"wrote {_path('zoo', tag)}")


# --- the profile ----------------------------------------------------------------------------------------------------

# cProfile entries (file fragment, function) grouped into the costs the issue asks about; cumulative seconds
PROFILE_REGIONS: tuple[tuple[str, str, str], ...] = (
    ("Adam update (optimizer.step less its closure)", "torch/optim/adam.py", "adam"),
    ("optimizer zero_grad", "torch/optim/optimizer.py", "zero_grad"),
    ("gradient check (check_gradients)", "lightning_tlbptt/checks.py", "check_gradients"),
    ("local gradients added to .grad", "lightning_tlbptt/batch.py", "add_to_grad"),
    ("local loss backward (a block's backward)", "lightning_tlbptt/batch.py", "backward"),
    ("block-boundary hook (classifier + local backward)", "lightning_tlbptt/cuts.py", "boundary"),
    ("local classifier forward", "lightning_tlbptt/classifiers.py", "forward"),
    ("time-cut hook (entry)", "lightning_tlbptt/cuts.py", "entry"),
    ("time slices (slicing.Run.__call__)", "lightning_tlbptt/slicing.py", "__call__"),
    ("neuron states per chunk (states.py)", "lightning_tlbptt/states.py", "*"),
    ("neuron kernel forward (ours)", "lightning_tlbptt/neurons.py", "__call__"),
    ("neuron kernel backward (ours)", "lightning_tlbptt/neurons.py", "backward"),
    ("SpikingJelly neuron forward (multi_step_forward)", "activation_based/neuron", "multi_step_forward"),
    ("SpikingJelly surrogate backward (ATan)", "activation_based/surrogate", "backward"),
    ("user training_step (forward, + local backward in (c))", "benchmarks/zoo.py", "training_step"),
    ("loss backward (autograd engine)", "torch/autograd/__init__.py", "backward"),
    ("Lightning's automatic optimisation run", "loops/optimization/automatic.py", "run"),
)


def _profile_child(method: str, net: Network, batch: int, torch_ops: bool) -> dict[str, Any]:
    """One warm-up batch, then one profiled batch (cProfile, or torch.profiler's op table)."""
    data = batches(net, batch, 2)

    class Profile(L.Callback):
        def __init__(self) -> None:
            self.profiler: Any = None

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 1:
                if torch_ops:
                    self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    self.profiler.__enter__()
                else:
                    self.profiler = cProfile.Profile()
                    self.profiler.enable()

        def on_train_batch_end(self, *args: Any) -> None:
            if self.profiler is not None and args[-1] == 1:
                if torch_ops:
                    self.profiler.__exit__(None, None, None)
                else:
                    self.profiler.disable()

    profile = Profile()
    trainer, timer, _ = fit(method, net, data, [profile])
    out: dict[str, Any] = {"wall_s": timer.seconds[1][0], "steps": trainer.global_step, "rows": []}
    if torch_ops:
        events = profile.profiler.key_averages()
        for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]:
            out["rows"].append(("op", e.key, e.self_cpu_time_total / 1e6, e.count))
        return out
    stats = pstats.Stats(profile.profiler)
    for label, fragment, function in PROFILE_REGIONS:
        seconds, calls = 0.0, 0
        for (filename, _, name), (_, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
            if fragment in filename and (function == "*" or name == function):
                # cumulative time, counted once per outermost call (recursion is rare here)
                seconds += tt if function == "*" else ct
                calls += nc
        out["rows"].append(("region", label, seconds, calls))
    return out


def run_profile(net: Network, methods: Sequence[str], batch: int | None, tag: str = "") -> None:
    b = batch or net.batch
    rows: list[dict[str, Any]] = []
    for torch_ops in (False, True):
        for method in methods:
            result = H._in_child(_profile_child, method, net, b, torch_ops)
            tool = "torch.profiler" if torch_ops else "cProfile"
            print(f"\n{METHODS[method]} on {net.name}, batch {b}: {result['wall_s']:.2f} s under {tool}")
            for kind, name, seconds, calls in result["rows"]:
                print(f"  {seconds:8.3f} s  {calls:7d}  {name}")
                rows.append(
                    {
                        "network": net.name,
                        "method": method,
                        "batch": b,
                        "tool": tool,
                        "kind": kind,
                        "name": name,
                        "seconds": seconds,
                        "calls": calls,
                        "profiled_batch_wall_s": result["wall_s"],
                        "optimizer_steps_2_batches": result["steps"],
                        "load_1min": os.getloadavg()[0],
                    }
                )
    path = _path(f"zoo_profile_{net.name}", "_".join(t for t in (tag, "" if b == net.batch else f"B{b}") if t))
    H.write_csv(path, rows)
    print(f"wrote {path}")


def adam_step_seconds(net: Network, repeats: int = 5, **options: Any) -> float:
    """Median seconds of one Adam step over every parameter of ``net`` (gradients filled, state allocated);
    ``options`` go to ``torch.optim.Adam`` (``foreach=True``, ``fused=True``)."""
    model = build(net)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.Adam(params, lr=1e-3, **options)
    optimizer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _adam(net: Network) -> dict[str, Any]:
    n_params = sum(p.numel() for p in build(net).parameters())
    return {
        "params": n_params,
        "default": adam_step_seconds(net),
        "foreach": adam_step_seconds(net, foreach=True),
        "fused": adam_step_seconds(net, fused=True),
    }


def run_adam(nets: Sequence[Network]) -> None:
    """One Adam step over each network's parameters (the user's default path, foreach and fused), and what Algorithm
    1's ``T / k`` steps per batch cost against one; written to ``zoo_adam.csv``."""
    rows = []
    for net in nets:
        result = H._in_child(_adam, net)
        steps = -(-net.T // net.k)
        rows.append({"network": net.name, "T": net.T, "k": net.k, "steps_per_batch": steps, **result})
        print(
            f"  {net.name:<22} {result['params'] / 1e6:7.1f} M parameters; one Adam step: default "
            f"{result['default']:.3f} s, foreach {result['foreach']:.3f} s, fused {result['fused']:.3f} s; "
            f"x {steps} steps = {steps * result['default']:.3f} s per batch (plain: {result['default']:.3f} s)",
            flush=True,
        )
    H.write_csv(_path("zoo_adam", ""), rows)
    print(f"wrote {_path('zoo_adam', '')}")


# --- main -----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", default=",".join(NETWORKS), help=f"comma-separated among {', '.join(NETWORKS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, a first (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="paired speed rounds per network (default 3)")
    parser.add_argument("--timed-batches", type=int, default=1, help="timed batches per run after a warm-up one")
    parser.add_argument("--batch", type=int, help="the speed runs' batch size (default: the network's)")
    parser.add_argument("--skip-memory", action="store_true", help="speed runs only")
    parser.add_argument("--skip-speed", action="store_true", help="memory runs only")
    parser.add_argument("--summary", action="store_true", help="print the table from the CSVs written so far")
    parser.add_argument("--profile", metavar="NETWORK", help="profile (a) and (c1) on one network, then stop")
    parser.add_argument("--adam", action="store_true", help="time one Adam step over each network's parameters")
    H.add_run_options(parser)
    args = parser.parse_args()

    setup, _ = H.start(args)
    for name in ("lightning_utilities", "lightning", "pytorch_lightning", "lightning_tlbptt"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the per-fit banners and tips of Lightning, in every child
    nets = [NETWORKS[name] for name in args.networks.split(",")]
    methods = args.methods.split(",")
    if methods[0] != "a":
        parser.error("--methods must start with 'a': every ratio is against it")
    print(f"{setup}; load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.profile:
        run_profile(
            NETWORKS[args.profile], [m for m in methods if m in ("a", "c1", "e1")] or ["a", "c1"], args.batch, args.tag
        )
        return
    if args.adam:
        run_adam(nets)
        return
    if not args.summary:
        if not args.skip_memory:
            print("memory (one fresh process per method and batch size, second batch):", flush=True)
            run_memory(nets, methods, args.tag, setup)
        if not args.skip_speed:
            print(f"speed ({args.rounds} paired rounds, {args.timed_batches} timed batch(es) per run):", flush=True)
            run_speed(nets, methods, args.rounds, args.timed_batches, args.tag, setup, args.batch)
    print_summary(nets, args.tag)


if __name__ == "__main__":
    main()
