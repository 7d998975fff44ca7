"""The strategy's LIF kernel against SpikingJelly's own LIFNode, one layer, side by side.

    .venv/bin/python benchmarks/neuron_kernel.py            # AlexNet's largest LIF layer, one chunk and all of T
    .venv/bin/python benchmarks/neuron_kernel.py --quick    # smoke run, seconds

Times forward and backward of one multi-step ``LIFNode`` (the paper's neuron: soft reset, ``surrogate.Rect``)
with SpikingJelly's path and with :class:`lightning_tlbptt.neurons.RectLIFFunction` (its step loops as torch ops,
and in C where a compiler is present), interleaved repetition by repetition, and counts the bytes each saves for
backward (``SavedTensorsMeter``) and the peak of all tensors it allocates (``harness.TensorMemoryMeter``). Prints a
table and writes ``benchmarks/results/neuron_kernel[_quick].csv``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import harness as H
import torch
from spikingjelly.activation_based import functional

from lightning_tlbptt import SavedTensorsMeter
from lightning_tlbptt.neurons import RectLIFFunction, accelerate
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

# AlexNet's second conv layer as benchmarks/speed_memory.py runs it (widths / 4, 8x8 input, batch 128):
# one chunk of k = 10 steps, and the whole sequence of T = 100 that BPTT holds.
SHAPES = [(10, 128, 64, 8, 8), (100, 128, 64, 8, 8)]
QUICK_SHAPES = [(10, 16, 64, 8, 8)]
# name: (the strategy's kernel installed, its step loops in C where available)
KERNELS = {"SpikingJelly": (False, False), "RectLIFFunction, torch ops": (True, False), "RectLIFFunction": (True, True)}


def make_node(fast: bool) -> torch.nn.Module:
    node = PaperNeuron(tau_p=0.8, u_th=0.4).make()
    if fast:
        accelerate(node)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small shape, few repetitions")
    parser.add_argument("--repeats", type=int, help="interleaved repetitions (default 11; quick 3)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--malloc", choices=H.MALLOC_POLICIES, default="fixed", help="allocator policy (see docs)")
    args = parser.parse_args()
    setup = H.configure(args.threads, args.malloc)
    repeats = args.repeats or (3 if args.quick else 11)
    print(f"one PaperNeuron(tau_p=0.8, u_th=0.4) layer, input drawn from N(0, 0.25); {setup}", flush=True)

    rows: list[dict[str, Any]] = []
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.5
        nodes = {name: make_node(fast) for name, (fast, _) in KERNELS.items()}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in nodes}
        for name, node in nodes.items():
            RectLIFFunction.native = KERNELS[name][1]
            run(node, x)  # warm-up: allocator and oneDNN caches (and the C loops' first compilation)
        for _ in range(repeats):
            for name, node in nodes.items():
                RectLIFFunction.native = KERNELS[name][1]
                times[name].append(run(node, x))
        first = len(rows)
        for name, node in nodes.items():
            RectLIFFunction.native = KERNELS[name][1]
            forward = statistics.median(t[0] for t in times[name])
            backward = statistics.median(t[1] for t in times[name])
            saved, peak = memory(node, x)
            rows.append(
                {
                    "shape": "x".join(map(str, shape)),
                    "kernel": name,
                    "forward_ms": forward * 1e3,
                    "backward_ms": backward * 1e3,
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
    suffix = ("_quick" if args.quick else "") + ("" if args.malloc == "fixed" else f"_{args.malloc}")
    path = Path(__file__).parent / "results" / f"neuron_kernel{suffix}.csv"
    H.write_csv(path, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
