"""The strategy's neuron kernel against SpikingJelly's own neurons, one layer, side by side.

    .venv/bin/python benchmarks/neuron_kernel.py            # both tables below
    .venv/bin/python benchmarks/neuron_kernel.py --table grid --repeats 3   # the neuron x surrogate table only
    .venv/bin/python benchmarks/neuron_kernel.py --quick    # smoke run, seconds

Two tables, each timing forward and backward of one multi-step layer with SpikingJelly's path and with
:class:`lightning_tlbptt.neurons.LIFFunction` (its step loops as torch ops, and in C where a compiler is present),
interleaved repetition by repetition, and counting the bytes each saves for backward (``SavedTensorsMeter``):

1. ``paper``: the paper's neuron (``LIFNode``, soft reset, ``surrogate.Rect``) on AlexNet's largest LIF layer as
   ``benchmarks/speed_memory.py`` runs it (``[T, 128, 64, 8, 8]``), over one chunk of ``k = 10`` steps and over the
   whole ``T = 100`` that BPTT holds; also the peak of all tensors allocated (``harness.TensorMemoryMeter``).
2. ``grid``: SpikingJelly's common neurons as users build them (``IFNode``, ``LIFNode``, ``ParametricLIFNode`` with
   SpikingJelly's defaults: hard reset to 0, ``decay_input``, ``v_threshold=1``) x surrogates (``ATan``, its
   default ``Sigmoid``, ``Rect``), on ``[T, --batch, 64, 8, 8]`` for ``T = 10`` and ``100``; forward plus backward
   time (ParametricLIF's ``w`` gradient included) and the speed ratio against SpikingJelly's loop.

Writes ``benchmarks/results/neuron_kernel[_quick].csv`` and ``neuron_kernel_grid[_quick].csv``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness as H
import torch
from spikingjelly.activation_based import functional, neuron, surrogate

from lightning_tlbptt import SavedTensorsMeter
from lightning_tlbptt.neurons import accelerate
from lightning_tlbptt.paper import PaperNeuron

COLUMNS = (
    ("shape", "input [T, B, C, H, W]", "s"),
    ("kernel", "kernel", "s"),
    ("forward_ms", "forward ms", ".2f"),
    ("backward_ms", "backward ms", ".2f"),
    ("speedup", "speed vs SJ", ".2f"),
    ("saved_mib", "saved MiB", ".2f"),
    ("peak_mib", "peak MiB", ".2f"),
)
GRID_COLUMNS = (
    ("neuron", "neuron", "s"),
    ("surrogate", "surrogate", "s"),
    ("T", "T", "d"),
    ("sj_ms", "SJ ms", ".1f"),
    ("torch_ms", "torch ops ms", ".1f"),
    ("c_ms", "C ms", ".1f"),
    ("torch_speedup", "torch ops vs SJ", ".2f"),
    ("c_speedup", "C vs SJ", ".2f"),
    ("sj_saved_mib", "SJ saved MiB", ".2f"),
    ("saved_mib", "saved MiB", ".2f"),
)

# AlexNet's second conv layer as benchmarks/speed_memory.py runs it (widths / 4, 8x8 input, batch 128):
# one chunk of k = 10 steps, and the whole sequence of T = 100 that BPTT holds.
SHAPES = [(10, 128, 64, 8, 8), (100, 128, 64, 8, 8)]
QUICK_SHAPES = [(10, 16, 64, 8, 8)]
# name: (the strategy's kernel installed, its step loops in C where available)
KERNELS = {"SpikingJelly": (False, False), "LIFFunction, torch ops": (True, False), "LIFFunction": (True, True)}
GRID_KERNELS = {"sj": (False, False), "torch": (True, False), "c": (True, True)}
GRID_NEURONS: dict[str, Callable[..., neuron.BaseNode]] = {
    "IF": neuron.IFNode,
    "LIF": neuron.LIFNode,
    "PLIF": neuron.ParametricLIFNode,
}
GRID_SURROGATES: dict[str, Callable[[], torch.nn.Module]] = {
    "ATan": surrogate.ATan,
    "Sigmoid": surrogate.Sigmoid,
    "Rect": surrogate.Rect,
}


def install(node: torch.nn.Module, fast: bool, native: bool) -> torch.nn.Module:
    if fast:
        assert accelerate(node, native=native) == [node]
    return node


def run(node: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    functional.reset_net(node)
    x = x.clone().requires_grad_()
    start = time.perf_counter()
    out = node(x)
    middle = time.perf_counter()
    out.backward(torch.ones_like(out))
    return middle - start, time.perf_counter() - middle


def memory(node: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    functional.reset_net(node)
    x = x.clone().requires_grad_()
    with SavedTensorsMeter() as saved, H.TensorMemoryMeter() as tensors:
        out = node(x)
        saved_peak = saved.peak_bytes
        out.backward(torch.ones_like(out))
    return saved_peak, tensors.peak_bytes


def interleaved(nodes: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, tuple[float, float]]:
    """Median forward and backward seconds of each node, repetition by repetition in turn, after one warm-up each
    (allocator and oneDNN caches, and the C loops' first compilation)."""
    for node in nodes.values():
        run(node, x)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in nodes}
    for _ in range(repeats):
        for name, node in nodes.items():
            times[name].append(run(node, x))
    return {
        name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)) for name, ts in times.items()
    }


def paper_rows(args: argparse.Namespace, repeats: int) -> list[dict[str, Any]]:
    print("one PaperNeuron(tau_p=0.8, u_th=0.4) layer, input drawn from N(0, 0.25)", flush=True)
    rows: list[dict[str, Any]] = []
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.5
        nodes = {name: install(PaperNeuron(tau_p=0.8, u_th=0.4).make(), *flags) for name, flags in KERNELS.items()}
        times = interleaved(nodes, x, repeats)
        first = len(rows)
        for name, node in nodes.items():
            saved, peak = memory(node, x)
            rows.append(
                {
                    "shape": "x".join(map(str, shape)),
                    "kernel": name,
                    "forward_ms": times[name][0] * 1e3,
                    "backward_ms": times[name][1] * 1e3,
                    "saved_mib": saved / H.MiB,
                    "peak_mib": peak / H.MiB,
                    "malloc": args.malloc,
                    **H.machine(),
                }
            )
        total = rows[first]["forward_ms"] + rows[first]["backward_ms"]
        for row in rows[first:]:
            row["speedup"] = total / (row["forward_ms"] + row["backward_ms"])
    print(H.format_table(rows, COLUMNS))
    return rows


def grid_rows(args: argparse.Namespace, repeats: int) -> list[dict[str, Any]]:
    batch = 4 if args.quick else args.batch
    print(
        f"\nSpikingJelly's neurons with their defaults (hard reset to 0, decay_input, v_threshold 1), one layer "
        f"[T, {batch}, 64, 8, 8], input drawn from N(0, 1); forward + backward, median of {repeats}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for steps in (10,) if args.quick else (10, 100):
        x = torch.randn((steps, batch, 64, 8, 8), generator=torch.Generator().manual_seed(0))
        for (neuron_name, make), (surrogate_name, function) in (
            (n, s) for n in GRID_NEURONS.items() for s in GRID_SURROGATES.items()
        ):
            nodes = {
                name: install(make(surrogate_function=function(), step_mode="m"), *flags)
                for name, flags in GRID_KERNELS.items()
            }
            times = {name: sum(t) * 1e3 for name, t in interleaved(nodes, x, repeats).items()}
            rows.append(
                {
                    "neuron": neuron_name,
                    "surrogate": surrogate_name,
                    "T": steps,
                    "batch": batch,
                    "sj_ms": times["sj"],
                    "torch_ms": times["torch"],
                    "c_ms": times["c"],
                    "torch_speedup": times["sj"] / times["torch"],
                    "c_speedup": times["sj"] / times["c"],
                    "sj_saved_mib": memory(nodes["sj"], x)[0] / H.MiB,
                    "saved_mib": memory(nodes["c"], x)[0] / H.MiB,
                    "malloc": args.malloc,
                    **H.machine(),
                }
            )
            print(H.format_table(rows[-1:], GRID_COLUMNS).splitlines()[-1], flush=True)
    print(H.format_table(rows, GRID_COLUMNS))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--table", choices=("paper", "grid", "both"), default="both", help="which table (default both)")
    parser.add_argument("--batch", type=int, default=32, help="the grid's batch (default 32)")
    parser.add_argument("--repeats", type=int, help="interleaved repetitions (default 11, grid 5; quick 3)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--malloc", choices=H.MALLOC_POLICIES, default="fixed", help="allocator policy (see docs)")
    args = parser.parse_args()
    print(H.configure(args.threads, args.malloc), flush=True)
    suffix = ("_quick" if args.quick else "") + ("" if args.malloc == "fixed" else f"_{args.malloc}")
    results = Path(__file__).parent / "results"
    if args.table in ("paper", "both"):
        path = results / f"neuron_kernel{suffix}.csv"
        H.write_csv(path, paper_rows(args, args.repeats or (3 if args.quick else 11)))
        print(f"wrote {path}")
    if args.table in ("grid", "both"):
        path = results / f"neuron_kernel_grid{suffix}.csv"
        H.write_csv(path, grid_rows(args, args.repeats or (3 if args.quick else 5)))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
