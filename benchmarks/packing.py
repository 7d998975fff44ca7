"""Binary saved tensors at one bit (``lightning_tlbptt.packing``): memory and time with and without, side by side.

    .venv/bin/python benchmarks/packing.py                   # AlexNet workload of speed_memory.py, 3 rounds
    .venv/bin/python benchmarks/packing.py --quick           # smoke run, about a minute
    .venv/bin/python benchmarks/packing.py --device cuda     # on a GPU: peak = torch.cuda.max_memory_allocated

Two tables:

1. **Networks.** Each method of ``benchmarks/speed_memory.py`` given (default ``a, b, c``: the SpikingJelly loop,
   the strategy at ``k = T``, the strategy at the workload's first ``(k, n)``) runs once as it is and once with
   ``packing.binary_saved_tensors`` around each batch (rows ``ap, bp, cp`` of ``harness.py``), on the same weights
   and batches, each run in a fresh process. Columns: saved-for-backward peak (``SavedTensorsMeter``, which sees
   packed tensors at their packed size) and true peak (all live tensors on CPU, ``max_memory_allocated`` on CUDA)
   over the training batches, the same two before the first batch (the strategy's setup runs one chunk through the
   whole network with gradients, to cut it into blocks), and speed; ratios are unpacked over packed (memory: times
   less; speed: above 1 is faster).
2. **Kernel masks.** One LIF layer of the workload (``[k, B, 64, 8, 8]``, the AlexNet benchmark's second layer over
   one chunk) through ``LIFFunction`` with its masks saved as int8 bytes and as bits: saved bytes, forward and
   backward time, interleaved repetitions.

Writes ``packing_<network>[_quick][_<device>].csv`` and ``packing_kernel[_quick][_<device>].csv`` to ``--out``
(default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import harness as H
import torch
from spikingjelly.activation_based import functional

from lightning_tlbptt import SavedTensorsMeter
from lightning_tlbptt.neurons import accelerate
from lightning_tlbptt.paper import PaperNeuron

NETWORK_COLUMNS = (
    ("label", "method", "s"),
    ("batches_saved_mib", "saved MiB", ".2f"),
    ("batches_saved_ratio", "x less", ".2f"),
    ("batches_peak_mib", "peak MiB", ".1f"),
    ("batches_peak_ratio", "x less", ".2f"),
    ("setup_saved_mib", "setup saved", ".2f"),
    ("setup_peak_mib", "setup peak", ".1f"),
    ("samples_per_s", "samples/s", ".1f"),
    ("speed_ratio", "speed", ".2f"),
    ("peak_vs_a", "peak vs (a)", ".3f"),
)
KERNEL_COLUMNS = (
    ("shape", "input [T, B, C, H, W]", "s"),
    ("masks", "masks", "s"),
    ("saved_mib", "saved MiB", ".3f"),
    ("saved_ratio", "x less", ".1f"),
    ("forward_ms", "forward ms", ".2f"),
    ("backward_ms", "backward ms", ".2f"),
    ("speed_ratio", "speed", ".2f"),
)


def network_rows(args: argparse.Namespace, device: torch.device, setup: str) -> list[dict[str, Any]]:
    sizes = {"T": args.T, "batch": args.batch}
    w = H.workload(args.network, quick=args.quick, **sizes)
    kinds = args.methods.split(",")
    packed = H.methods_for(w, [f"{kind}p" for kind in kinds])  # c: at the workload's first (k, n)
    plain = [replace(method, pack=False) for method in packed]
    methods = [m for pair in zip(plain, packed, strict=True) for m in pair]
    rounds = args.rounds or (1 if args.quick else 3)
    print(f"{w.describe()}\ndevice {device}, {setup}", flush=True)
    print("memory (one fresh process per method):", flush=True)
    memory = {}
    for method in methods:
        try:
            memory[method] = H.measure_memory(method, w, device)
        except Exception as err:  # one broken method should not take the others' rows
            print(f"  {method.label:<40} FAILED, left out: {type(err).__name__}: {str(err)[:300]}", flush=True)
            continue
        mem = memory[method]
        print(f"  {method.label:<40} saved {mem.batches_saved / H.MiB:9.2f} MiB (setup {mem.setup_saved / H.MiB:.2f})")
    pairs = [(p, q) for p, q in zip(plain, packed, strict=True) if p in memory and q in memory]
    if not pairs:
        raise RuntimeError("every method failed (above)")
    plain, packed = [p for p, _ in pairs], [q for _, q in pairs]
    methods = [m for pair in pairs for m in pair]
    print(f"speed ({rounds} interleaved round(s), {args.timed_batches} timed batch(es) per run):", flush=True)
    speed = H.measure_speed(methods, w, device, rounds, args.timed_batches)
    base = plain[0] if plain[0].kind == "a" else None
    rows = []
    for method in methods:
        mem = memory[method]
        unpacked = plain[packed.index(method)] if method.pack else method
        rows.append(
            {
                "network": w.network,
                "method": method.kind + ("p" if method.pack else ""),
                "label": method.label,
                "k": method.k,
                "n": method.n if method.kind == "c" else None,
                "pack": method.pack,
                "batches_saved_mib": mem.batches_saved / H.MiB,
                "batches_saved_ratio": memory[unpacked].batches_saved / mem.batches_saved,
                "batches_peak_mib": mem.batches_peak / H.MiB,
                "batches_peak_ratio": memory[unpacked].batches_peak / mem.batches_peak,
                "setup_saved_mib": mem.setup_saved / H.MiB,
                "setup_peak_mib": mem.setup_peak / H.MiB,
                "saved_mib": mem.saved / H.MiB,
                "saved_ratio": memory[unpacked].saved / mem.saved,
                "peak_mib": mem.peak / H.MiB,
                "peak_ratio": memory[unpacked].peak / mem.peak,
                "samples_per_s": speed.samples_per_s(method, w.batch),
                "speed_ratio": speed.ratio(method, unpacked),
                "speed_ratio_cpu": speed.ratio(method, unpacked, clock=1),
                "peak_vs_a": mem.peak / memory[base].peak if base else None,
                "state_mib": mem.state / H.MiB,
                "cuda_max_mib": None if mem.cuda_max is None else mem.cuda_max / H.MiB,
                "tensors_peak_mib": mem.tensors / H.MiB,
                "wall_cpu_s_per_batch_by_round": " ".join(f"{s:.3f}/{c:.3f}" for s, c in speed.rounds[method]),
                **H.workload_fields(w),
                "device": device.type,
                "setup": setup,
                **H.machine(),
                "rounds": rounds,
                "timed_batches": args.timed_batches,
            }
        )
    print(f"\n{w.describe()}; {setup}\n{H.format_table(rows, NETWORK_COLUMNS)}")
    peak = "CUDA max_memory_allocated" if device.type == "cuda" else "peak of all live tensors"
    print(
        f"saved = SavedTensorsMeter peak, peak = {peak}, both over the training batches; setup = the same peaks "
        "before the first batch (the strategy's probe of the network, packed too). x less and speed: unpacked row "
        "over packed row; peak vs (a): whole-run peaks"
    )
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layer_step(node: torch.nn.Module, x: torch.Tensor, device: torch.device) -> tuple[float, float]:
    functional.reset_net(node)
    x = x.clone().requires_grad_()
    _sync(device)
    start = time.perf_counter()
    out = node(x)
    _sync(device)
    middle = time.perf_counter()
    out.backward(torch.ones_like(out))
    _sync(device)
    return middle - start, time.perf_counter() - middle


def _layer_saved(node: torch.nn.Module, x: torch.Tensor) -> int:
    functional.reset_net(node)
    with SavedTensorsMeter() as meter:
        out = node(x.clone().requires_grad_())
    saved = meter.current_bytes
    del out
    return saved


def kernel_rows(args: argparse.Namespace, device: torch.device, setup: str) -> list[dict[str, Any]]:
    w = H.workload(args.network, quick=args.quick, T=args.T, batch=args.batch)
    shape = (w.settings[0][0], w.batch, 64, 8, 8)
    repeats = args.repeats or (3 if args.quick else 11)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).mul_(0.5).to(device)
    nodes = {bits: PaperNeuron(tau_p=0.8, u_th=0.4).make().to(device) for bits in (False, True)}
    for bits, node in nodes.items():
        accelerate(node, bits=bits)
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    saved = {}
    for bits, node in nodes.items():  # warm-up
        _layer_step(node, x, device)
        saved[bits] = _layer_saved(node, x)
    for _ in range(repeats):
        for bits, node in nodes.items():
            times[bits].append(_layer_step(node, x, device))
    rows = []
    for bits in (False, True):
        forward = statistics.median(t[0] for t in times[bits])
        backward = statistics.median(t[1] for t in times[bits])
        rows.append(
            {
                "shape": "x".join(map(str, shape)),
                "masks": "bits" if bits else "int8",
                "saved_mib": saved[bits] / H.MiB,
                "saved_ratio": saved[False] / saved[bits],
                "forward_ms": forward * 1e3,
                "backward_ms": backward * 1e3,
                "device": device.type,
                "setup": setup,
                "repeats": repeats,
                **H.machine(),
            }
        )
    total = [r["forward_ms"] + r["backward_ms"] for r in rows]
    for row, t in zip(rows, total, strict=True):
        row["speed_ratio"] = total[0] / t
    print(f"\none PaperNeuron(tau_p=0.8, u_th=0.4) layer through LIFFunction, {repeats} interleaved repetitions")
    print(H.format_table(rows, KERNEL_COLUMNS))
    print("x less and speed: int8 row over bits row")
    return rows


def check(device: torch.device) -> bool:
    """Exactness on ``device``: every byte pattern round-trips, and a small SpikingJelly network (Rect and ATan
    surrogates, kernel and SpikingJelly LIF) gives bit-identical gradients with and without packing."""
    from spikingjelly.activation_based import layer, neuron, surrogate
    from torch import nn

    from lightning_tlbptt import packing

    every_byte = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).float().to(device)
    ok = torch.equal(packing.pack_bits(every_byte).cpu(), torch.arange(256, dtype=torch.uint8))
    ok &= torch.equal(
        packing.unpack_bits(torch.arange(256, dtype=torch.uint8, device=device), 2048, torch.float32),
        every_byte.view(-1),
    )
    print(f"check on {device}: bits round trip {'ok' if ok else 'WRONG'}")
    x = (torch.rand(6, 8, 2, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.3).float().to(device)
    for function in (surrogate.Rect(alpha=1.0), surrogate.ATan()):
        for fast in (False, True):
            grads = []
            for pack in (False, True):
                torch.manual_seed(0)
                lif = [
                    neuron.LIFNode(
                        tau=2.0,
                        decay_input=False,
                        v_reset=None,
                        v_threshold=0.2,
                        surrogate_function=function,
                        step_mode="m",
                    )
                    for _ in range(3)
                ]
                net = nn.Sequential(
                    layer.Conv2d(2, 16, 3, padding=1, step_mode="m"),
                    lif[0],
                    layer.MaxPool2d(2, step_mode="m"),
                    layer.Conv2d(16, 16, 3, padding=1, step_mode="m"),
                    lif[1],
                    layer.AvgPool2d(2, step_mode="m"),
                    layer.Flatten(step_mode="m"),
                    layer.Linear(16 * 4 * 4, 10, step_mode="m"),
                    lif[2],
                ).to(device)
                if fast:
                    accelerate(net)
                with packing.binary_saved_tensors(net) if pack else torch.enable_grad() as stats:
                    net(x).sum().backward()
                grads.append([p.grad for p in net.parameters()])
            same = all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
            ok &= same
            print(
                f"  {type(function).__name__:<5} {'kernel' if fast else 'SJ'} LIF: gradients "
                f"{'bit-identical' if same else 'DIFFER'} ({stats.packed} tensors packed)"
            )
    return bool(ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", choices=sorted(H.WORKLOADS), default="alexnet")
    parser.add_argument("--quick", action="store_true", help="short sequences and small batches, one round")
    parser.add_argument("--methods", default="a,b,c", help="comma-separated among a, b, c (each also run packed)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 3; quick 1)")
    parser.add_argument("--timed-batches", type=int, default=1, help="timed batches per run after a warm-up one")
    parser.add_argument("--repeats", type=int, help="kernel table: interleaved repetitions (default 11; quick 3)")
    parser.add_argument("--T", type=int, help="override the workload's time steps")
    parser.add_argument("--batch", type=int, help="override the batch size")
    parser.add_argument("--skip", choices=("networks", "kernel"), help="leave out one of the two tables")
    parser.add_argument("--out", type=Path, default=H.RESULTS, help="folder for the CSVs (default benchmarks/results)")
    parser.add_argument("--check", action="store_true", help="only check exactness on the device (exit 1 if not)")
    H.add_run_options(parser)
    args = parser.parse_args()
    if not set(args.methods.split(",")) <= {"a", "b", "c"}:
        parser.error("--methods: choose among a, b, c")

    setup, device = H.start(args)
    if args.check:
        raise SystemExit(0 if check(device) else 1)
    suffix = ("_quick" if args.quick else "") + ("" if device.type == "cpu" else f"_{device.type}")
    suffix += "" if args.malloc == "fixed" else f"_{args.malloc}"
    if args.skip != "networks":
        path = args.out / f"packing_{args.network}{suffix}.csv"
        H.write_csv(path, network_rows(args, device, setup))
        print(f"wrote {path}", flush=True)
    if args.skip != "kernel":
        path = args.out / f"packing_kernel{suffix}.csv"
        H.write_csv(path, kernel_rows(args, device, setup))
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
