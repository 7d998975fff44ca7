"""Peak memory at a fixed truncation length k as the sequence length T grows, against BPTT at the same T.

    .venv/bin/python benchmarks/memory_vs_T.py --network alexnet             # T = 20, 50, 100, 200 at k = 10, n = 1
    .venv/bin/python benchmarks/memory_vs_T.py --network alexnet --quick     # smoke run, well under 2 minutes

Truncated BPTT keeps at most k steps of activations, so its training memory should not depend on T; BPTT's
grows linearly. Prints a table with the growth of each figure from the shortest to the longest T and writes
``benchmarks/results/memory_vs_T_<network>[_quick].csv``. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
from typing import Any

import harness as H

COLUMNS = (
    ("T", "T", "d"),
    ("a_peak_mib", "(a) peak MiB", ".1f"),
    ("c_peak_mib", "(c) peak MiB", ".1f"),
    ("c_vs_a", "(c)/(a)", ".3f"),
    ("c_saved_state_mib", "(c) saved+state MiB", ".1f"),
    ("input_batch_mib", "input batch MiB", ".1f"),
    ("c_rss_delta_mib", "(c) RSS delta MiB", ".0f"),
)


def growth(rows: list[dict[str, Any]], key: str) -> float:
    """Relative change of ``key`` from the first (shortest T) to the last row."""
    return rows[-1][key] / rows[0][key] - 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", choices=sorted(H.WORKLOADS), default="alexnet")
    parser.add_argument("--quick", action="store_true", help="T = 20, 40, 80 on small batches")
    parser.add_argument("--T", help="comma-separated sequence lengths (default 20,50,100,200)")
    parser.add_argument("--k", type=int, default=10, help="time steps per chunk (default 10)")
    parser.add_argument("--n", type=int, default=1, help="layers per block (default 1)")
    H.add_run_options(parser)
    args = parser.parse_args()

    setup, device = H.start(args)
    steps = [int(t) for t in (args.T or ("20,40,80" if args.quick else "20,50,100,200")).split(",")]
    if min(steps) < args.k:
        parser.error(f"every T must be at least k={args.k}")
    base = H.workload(args.network, quick=args.quick)
    print(f"{base.describe(steps=False)}; T varied\ndevice {device}, {setup}", flush=True)

    rows: list[dict[str, Any]] = []
    for T in steps:
        w = H.workload(args.network, quick=args.quick, T=T)
        a = H.measure_memory(H.Method("a"), w, device)
        c = H.measure_memory(H.Method("c", args.k, args.n), w, device)
        rows.append(
            {
                "network": w.network,
                "T": T,
                "k": args.k,
                "n": args.n,
                "a_peak_mib": a.peak / H.MiB,
                "c_peak_mib": c.peak / H.MiB,
                "c_vs_a": c.peak / a.peak,
                "a_saved_state_mib": a.saved_plus_state / H.MiB,
                "c_saved_state_mib": c.saved_plus_state / H.MiB,
                "input_batch_mib": c.input_batch / H.MiB,
                "a_rss_delta_mib": a.rss_delta / H.MiB,
                "c_rss_delta_mib": c.rss_delta / H.MiB,
                "c_cuda_max_mib": None if c.cuda_max is None else c.cuda_max / H.MiB,
                **{f: v for f, v in H.workload_fields(w).items() if f != "T"},
                "device": device.type,
                "setup": setup,
                **H.machine(),
            }
        )
        print(f"  T={T:<4} (a) {rows[-1]['a_peak_mib']:8.1f} MiB   (c) {rows[-1]['c_peak_mib']:6.1f} MiB", flush=True)

    peak = "CUDA max_memory_allocated" if device.type == "cuda" else "peak of all live tensors"
    print(f"\n(c) = TruncatedLocalBPTT(k={args.k}, n={args.n}); {base.describe(steps=False)}; {setup}")
    print(H.format_table(rows, COLUMNS))
    print(
        f"growth of (c) from T={steps[0]} to T={steps[-1]}: peak {growth(rows, 'c_peak_mib'):+.1%}, saved+state "
        f"{growth(rows, 'c_saved_state_mib'):+.1%}, RSS delta {growth(rows, 'c_rss_delta_mib'):+.1%} "
        f"(input batch {growth(rows, 'input_batch_mib'):+.0%}, not counted); (a) peak {growth(rows, 'a_peak_mib'):+.0%}"
    )
    print(f"peak = {peak}")
    H.save(f"memory_vs_T_{base.network}", rows, "quick" if args.quick else "", args.tag)


if __name__ == "__main__":
    main()
