"""Speed and peak memory of every training method on one network, side by side, with ratios against (a).

    .venv/bin/python benchmarks/speed_memory.py --network alexnet            # a documented run
    .venv/bin/python benchmarks/speed_memory.py --network alexnet --quick    # smoke run, well under 2 minutes

Prints a table and writes ``benchmarks/results/speed_memory_<network>[_quick].csv``. Methods, columns and the
figures of the development machine: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
from typing import Any

import harness as H

COLUMNS = (
    ("label", "method", "s"),
    ("samples_per_s", "samples/s", ".1f"),
    ("speed_vs_a_wall", "vs (a) wall", ".2f"),
    ("speed_vs_a_cpu", "vs (a) cpu", ".2f"),
    ("peak_mib", "peak MiB", ".1f"),
    ("peak_vs_a", "vs (a)", ".3f"),
    ("saved_state_mib", "saved+state MiB", ".1f"),
    ("saved_state_vs_a", "vs (a)", ".3f"),
    ("rss_delta_mib", "RSS delta MiB", ".0f"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", choices=sorted(H.WORKLOADS), default="alexnet")
    parser.add_argument("--quick", action="store_true", help="short sequences and small batches, one round")
    parser.add_argument("--methods", default="a,aL,b,bs,c,cs,d,e", help="comma-separated, a first (default: all)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 3; quick 1)")
    parser.add_argument("--timed-batches", type=int, default=1, help="timed batches per run after a warm-up one")
    parser.add_argument("--T", type=int, help="override the workload's time steps")
    parser.add_argument("--batch", type=int, help="override the batch size")
    parser.add_argument("--input-size", type=int, help="override the frame side")
    parser.add_argument("--width", type=int, help="override the width divisor (1 = Table 2's network)")
    H.add_run_options(parser)
    args = parser.parse_args()

    setup, device = H.start(args)
    sizes = {"T": args.T, "batch": args.batch, "input_size": args.input_size, "width": args.width}
    w = H.workload(args.network, quick=args.quick, **sizes)
    rounds = args.rounds or (1 if args.quick else 3)
    methods = H.methods_for(w, args.methods.split(","))
    if methods[0].kind != "a":
        parser.error("--methods must start with 'a': every ratio is against it")

    print(f"{w.describe()}\ndevice {device}, {setup}", flush=True)
    print("memory (one fresh process per method):", flush=True)
    memory = {}
    for method in methods:
        try:
            memory[method] = H.measure_memory(method, w, device)
        except Exception as err:  # one broken method (e.g. on a new device) should not take the others' rows
            if method is methods[0]:
                raise
            print(f"  {method.label:<32} FAILED, left out: {type(err).__name__}: {str(err)[:300]}", flush=True)
            continue
        print(f"  {method.label:<32} peak {memory[method].peak / H.MiB:9.1f} MiB", flush=True)
    methods = [m for m in methods if m in memory]
    print(f"speed ({rounds} interleaved round(s), {args.timed_batches} timed batch(es) per run):", flush=True)
    speed = H.measure_speed(methods, w, device, rounds, args.timed_batches)

    base = methods[0]
    rows: list[dict[str, Any]] = []
    for method in methods:
        mem = memory[method]
        rows.append(
            {
                "network": w.network,
                "method": method.kind,
                "label": method.label,
                "k": method.k if method.kind in ("b", "c", "e") else None,
                "n": method.n if method.kind in ("c", "e") else None,
                "fast_neurons": method.fast_neurons if method.kind in ("b", "c", "e") else None,
                "samples_per_s": speed.samples_per_s(method, w.batch),
                "samples_per_cpu_s": speed.samples_per_s(method, w.batch, clock=1),
                "speed_vs_a_wall": speed.ratio(method, base),
                "speed_vs_a_cpu": speed.ratio(method, base, clock=1),
                "peak_mib": mem.peak / H.MiB,
                "peak_vs_a": mem.peak / memory[base].peak,
                "saved_state_mib": mem.saved_plus_state / H.MiB,
                "saved_state_vs_a": mem.saved_plus_state / memory[base].saved_plus_state,
                "saved_mib": mem.saved / H.MiB,
                "state_mib": mem.state / H.MiB,
                "rss_delta_mib": mem.rss_delta / H.MiB,
                "cuda_max_mib": None if mem.cuda_max is None else mem.cuda_max / H.MiB,
                "input_batch_mib": mem.input_batch / H.MiB,
                "wall_cpu_s_per_batch_by_round": " ".join(f"{s:.3f}/{c:.3f}" for s, c in speed.rounds[method]),
                **H.workload_fields(w),
                "device": device.type,
                "setup": setup,
                **H.machine(),
                "rounds": rounds,
                "timed_batches": args.timed_batches,
            }
        )
    peak = "CUDA max_memory_allocated" if device.type == "cuda" else "peak of all live tensors"
    print(f"\n{w.describe()}; {setup}\n{H.format_table(rows, COLUMNS)}")
    print(
        f"peak = {peak}; saved+state = SavedTensorsMeter peak + parameters, gradients, optimizer state (blind inside "
        f"memopt checkpoints: too low for (d), (e)); input batch of {rows[0]['input_batch_mib']:.1f} MiB not counted"
    )
    malloc = "" if args.malloc == "fixed" else args.malloc
    H.save(f"speed_memory_{w.network}", rows, "quick" if args.quick else "", malloc, args.tag)


if __name__ == "__main__":
    main()
