"""Accuracy study that can rank (k, n): BPTT against TruncatedLocalBPTT over seeds, epochs and both offline datasets.

Every run trains the paper's spiking LeNet-1 (``PaperClassifier``, Table 2) with the paper's recipe (Sec. 4.1,
Table 1): SGD with momentum 0.9 on the MSE of the output firing rates, dropout after each conv/FC layer, the
learning rate halved every fifth of the epochs (``StepLR``), and the package's defaults on top, which this study
found: the learning rate scaled linearly to the batch from the paper's EMNIST column (batch 1,024),
``lr = 0.4 * batch / 1024`` (``paper_setting``), and the output layer's bias balanced from one batch
(``PaperClassifier(balance_output=True)``; ``--init default`` turns it off). The strategy's local readouts start
balanced too (``LocalClassifier(balance=True)``, the default since the third run of this study). Settings: plain
BPTT, ``TruncatedLocalBPTT(k, n)`` at (10, 1), (5, 2), (2, 1) with trainable local classifiers, and (5, 2) with
random (frozen) ones. All settings of one seed start from the same initial weights and see the same batches
(paired).

Runs go to a pool of worker processes (default 2, one torch thread each); the parent writes one CSV row per
finished run (``--out``) and its per-epoch validation curve (``--curves``), so a killed study resumes where it
stopped: a rerun skips every (dataset, setting, seed) already in ``--out``. ``--report`` draws the figures and
prints the tables from the CSVs without training.

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/accuracy_study.py            # the study of docs/results.md
    python benchmarks/accuracy_study.py --report                                 # its tables and figures
    python benchmarks/accuracy_study.py --smoke                                  # 1 epoch of 2 settings, timed
    python benchmarks/accuracy_study.py --diagnose mnist5k BPTT 0                # one run again, per class
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS_IMG = HERE.parent / "docs" / "img"

SETTINGS: dict[str, tuple[int, int, str, str] | None] = {
    "BPTT": None,
    "k10n1": (10, 1, "trainable", "chunk"),
    "k5n2": (5, 2, "trainable", "chunk"),
    "k2n1": (2, 1, "trainable", "chunk"),
    "k5n2-random": (5, 2, "random", "chunk"),
    # step_every="batch" (opt-in, not Algorithm 1): the chunks' gradients summed, one optimizer step per batch
    "k10n1-batch": (10, 1, "trainable", "batch"),
    "k2n1-batch": (2, 1, "trainable", "batch"),
}
LABELS = {
    "BPTT": "BPTT",
    "k10n1": "TLBPTT(k=10, n=1)",
    "k5n2": "TLBPTT(k=5, n=2)",
    "k2n1": "TLBPTT(k=2, n=1)",
    "k5n2-random": "TLBPTT(k=5, n=2, random)",
    "k10n1-batch": "TLBPTT(k=10, n=1), step per batch",
    "k2n1-batch": "TLBPTT(k=2, n=1), step per batch",
}
DATASET_NAMES = {"mnist5k": "MNIST-5k", "event_mnist": "EventMNIST"}

FIELDS = [
    "dataset", "setting", "k", "n", "classifier", "seed", "epochs", "T", "batch_size", "lr", "dropout", "init",
    "readouts", "val_acc", "best_val_acc", "final_train_acc", "peak_bytes", "saved_activation_bytes", "state_bytes",
    "seconds", "seconds_per_epoch", "optimizer_steps", "finished_utc",
]  # fmt: skip
CURVE_FIELDS = ["dataset", "setting", "seed", "epoch", "val_acc", "train_acc", "train_loss", "lr"]


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """Runs in priority order, so that a study cut short keeps what matters most complete.

    0. the first seed on both datasets, every setting;
    1. the other seeds of MNIST-5k, trainable settings and BPTT (the target of the study is on MNIST-5k);
    2. the second seed of EventMNIST (``--event-settings``);
    3. the other seeds of MNIST-5k with random classifiers;
    4. the remaining EventMNIST seeds;
    5. EventMNIST settings outside ``--event-settings`` (extras a later session may finish).
    """
    ranked = []
    for i, seed in enumerate(args.seeds):
        for d in args.datasets:
            for j, s in enumerate(args.settings):
                event = d == "event_mnist"
                cfg = SETTINGS[s]
                random = cfg is not None and cfg[2] == "random"
                if event and (s not in args.event_settings or seed not in args.event_seeds):
                    tier = 5
                elif i == 0:
                    tier = 0
                elif not event:
                    tier = 3 if random else 1
                else:
                    tier = 2 if i == 1 else 4
                ranked.append(((tier, i, not event, j), (d, s, seed)))  # the longer EventMNIST runs first
    return [job for _, job in sorted(ranked)]


def train_one(job: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One run in a worker process: (CSV row, per-epoch curve rows)."""
    import torch

    torch.set_num_threads(1)
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_tlbptt.paper import DATASETS, PaperClassifier, paper_setting
    from lightning_tlbptt.strategy import TruncatedLocalBPTT
    from tlbptt.compare import fit_and_measure

    dataset, name, seed, epochs = job["dataset"], job["setting"], job["seed"], job["epochs"]
    spec = DATASETS[dataset]
    setting = paper_setting(dataset)
    curve: list[dict[str, Any]] = []
    step_epochs = max(1, epochs // 5)  # halve the lr every fifth of the epochs (the paper: 20 of 100)

    class Curve(Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            m = trainer.callback_metrics  # this epoch's validation has run by now (Lightning 2.x)
            curve.append(
                {
                    "dataset": dataset,
                    "setting": name,
                    "seed": seed,
                    "epoch": trainer.current_epoch + 1,
                    "val_acc": float(m["val/acc"]),
                    # BPTT logs epoch means; TruncatedLocalBPTT logs per step only (its last batch then)
                    "train_acc": float(m.get("train/acc_epoch", m.get("train/acc", math.nan))),
                    "train_loss": float(m.get("train/loss_epoch", m.get("train/loss", math.nan))),
                    "lr": job["lr"] * 0.5 ** (trainer.current_epoch // step_epochs),  # the lr this epoch used
                }
            )

    data = spec.make_datamodule(job["data_dir"], batch_size=job["batch_size"])
    L.seed_everything(seed, verbose=False)  # same initial weights and batch order for every setting of a seed
    model = PaperClassifier(
        **{
            **setting,
            "lr": job["lr"],
            "dropout": job["dropout"],
            "lr_step_epochs": step_epochs,
            "lr_gamma": 0.5,
            "balance_output": job["balance"],
        }
    )
    cfg = SETTINGS[name]
    strategy: str | TruncatedLocalBPTT = "auto"
    if cfg is not None:
        strategy = TruncatedLocalBPTT(k=cfg[0], n=cfg[1], classifier=cfg[2], loss=setting["loss"], step_every=cfg[3])
    limits = {"limit_train_batches": job["limit_train_batches"]} if job.get("limit_train_batches") else {}
    result = fit_and_measure(
        LABELS[name], model, data, strategy=strategy, accelerator="cpu", max_epochs=epochs, callbacks=[Curve()],
        **limits,
    )  # fmt: skip
    if job.get("diagnose"):
        per_class(model, data)
    row = {
        "dataset": dataset,
        "setting": name,
        "k": "" if cfg is None else cfg[0],
        "n": "" if cfg is None else cfg[1],
        "classifier": "" if cfg is None else cfg[2],
        "seed": seed,
        "epochs": epochs,
        "T": spec.n_steps,
        "batch_size": job["batch_size"],
        "lr": job["lr"],
        "dropout": job["dropout"],
        "init": "balanced" if job["balance"] else "default",
        "readouts": "" if cfg is None else "balanced",  # LocalClassifier's default
        "val_acc": result.val_acc,
        "best_val_acc": max(c["val_acc"] for c in curve),
        "final_train_acc": curve[-1]["train_acc"],
        "peak_bytes": result.peak_bytes,
        "saved_activation_bytes": result.saved_activation_bytes,
        "state_bytes": result.state_bytes,
        "seconds": round(result.seconds, 1),
        "seconds_per_epoch": round(result.seconds / epochs, 2),
        "optimizer_steps": result.optimizer_steps,
        "finished_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }
    return row, curve


def per_class(model: Any, data: Any) -> None:
    """Print each class's validation accuracy and the mean firing rate of its output neuron on its own digits."""
    import torch

    model.eval()
    correct, total, rate = torch.zeros(10), torch.zeros(10), torch.zeros(10)
    with torch.no_grad():
        for x, y in data.val_dataloader():
            out = model(x).mean(0)  # output firing rates [B, classes]
            pred = out.argmax(-1)
            for c in range(10):
                mask = y == c
                total[c] += mask.sum()
                correct[c] += (pred[mask] == c).sum()
                rate[c] += out[mask, c].sum()
    print("per-class validation accuracy:", [round(v, 3) for v in (correct / total).tolist()])
    print("mean rate of each class's output neuron on its digits:", [round(v, 3) for v in (rate / total).tolist()])


def _append(path: Path, fields: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        if new:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def _read(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run_study(args: argparse.Namespace) -> int:
    import multiprocessing as mp

    rows = _read(args.out)
    _check_recipe(rows, args)
    done = {(r["dataset"], r["setting"], int(r["seed"])) for r in rows}
    jobs = []
    for dataset, name, seed in plan(args):
        if (dataset, name, seed) in done:
            continue
        jobs.append(
            {
                "dataset": dataset,
                "setting": name,
                "seed": seed,
                "epochs": args.epochs[dataset],
                "batch_size": args.batch_size,
                "lr": args.lr,
                "dropout": args.dropout,
                "balance": args.init == "balanced",
                "data_dir": args.data_dir,
                "limit_train_batches": args.limit_train_batches,
            }
        )
    print(f"{len(done)} runs already in {args.out}; {len(jobs)} to run on {args.workers} worker(s)", flush=True)
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        for row, curve in pool.imap_unordered(train_one, jobs):
            _append(args.out, FIELDS, [row])
            _append(args.curves, CURVE_FIELDS, curve)
            print(
                f"[{time.perf_counter() - start:6.0f} s] {row['dataset']} {row['setting']} seed {row['seed']}: "
                f"val acc {row['val_acc']:.1%} (best {row['best_val_acc']:.1%}), {row['seconds']} s",
                flush=True,
            )
    return 0


def _check_recipe(rows: Sequence[dict[str, str]], args: argparse.Namespace) -> None:
    """Refuse to resume a study whose finished runs used another recipe: they would be paired with the new runs."""
    asked = {
        "batch_size": str(args.batch_size),
        "lr": str(args.lr),
        "dropout": str(args.dropout),
        "init": args.init,
    }
    for row in rows:
        bptt = row["setting"] == "BPTT"
        wanted = {**asked, "epochs": str(args.epochs[row["dataset"]]), "readouts": "" if bptt else "balanced"}
        # rows from before the readouts were balanced have no such column: their readouts had the default init
        had = {**row, "readouts": row.get("readouts", "" if bptt else "default")}
        wrong = {key: (had[key], value) for key, value in wanted.items() if had[key] != value}
        if wrong:
            differences = ", ".join(f"{key} {had} (asked {value})" for key, (had, value) in wrong.items())
            raise SystemExit(
                f"{args.out} holds {row['dataset']} {row['setting']} seed {row['seed']} trained with {differences}: "
                "a resumed study pairs every run with the ones already there. Pass the same options, or another "
                "--out and --curves for a new study."
            )


# --------------------------------------------------------------------------------------------------- report


def _stats(values: Sequence[float]) -> tuple[float, float, float, float]:
    """mean, sample standard deviation (0 for one value), min, max."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, sd, min(values), max(values)


def report(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

    rows = _read(args.out)
    curves = _read(args.curves)
    if not rows:
        print(f"no rows in {args.out}")
        return 1
    # datasets this study has not re-run yet are shown from an earlier one (--earlier), and titled so
    earlier: set[str] = set()
    if args.earlier:
        out, curves_file = args.earlier
        have = {r["dataset"] for r in rows}
        rows += [r for r in _read(out) if r["dataset"] not in have]
        curves += [c for c in _read(curves_file) if c["dataset"] not in have]
        earlier = {r["dataset"] for r in rows} - have

    def title(d: str) -> str:
        return DATASET_NAMES[d] + (" (earlier run)" if d in earlier else "")

    args.img.mkdir(parents=True, exist_ok=True)
    datasets = [d for d in DATASET_NAMES if any(r["dataset"] == d for r in rows)]
    palette = ["black", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:cyan", "tab:olive"]
    colors = dict(zip(SETTINGS, palette, strict=True))

    # tables
    for d in datasets:
        by = {s: [r for r in rows if r["dataset"] == d and r["setting"] == s] for s in SETTINGS}
        base = by["BPTT"]
        base_acc = {int(r["seed"]): float(r["val_acc"]) for r in base}
        base_mem = statistics.fmean(float(r["peak_bytes"]) for r in base) if base else math.nan
        base_sec = statistics.fmean(float(r["seconds_per_epoch"]) for r in base) if base else math.nan
        first = next(r for r in rows if r["dataset"] == d)
        print(
            f"\n### {title(d)}: T = {first['T']}, batch {first['batch_size']}, lr {float(first['lr']):g}, "
            f"dropout {first['dropout']}, {first['epochs']} epochs\n"
        )
        print(
            "| run | seeds | val acc, mean ± sd | min-max | vs BPTT (paired), mean ± sd | best epoch acc, mean "
            "| peak memory | vs BPTT | time / epoch | vs BPTT | steps / epoch |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s, runs in by.items():
            if not runs:
                continue
            accs = [float(r["val_acc"]) for r in runs]
            mean, sd, lo, hi = _stats(accs)
            deltas = [float(r["val_acc"]) - base_acc[int(r["seed"])] for r in runs if int(r["seed"]) in base_acc]
            delta = (
                ""
                if s == "BPTT" or not deltas
                else "{:+.1f} ± {:.1f} pt".format(*[100 * v for v in _stats(deltas)[:2]])
            )
            best = statistics.fmean(float(r["best_val_acc"]) for r in runs)
            mem = float(runs[0]["peak_bytes"])
            sec = statistics.fmean(float(r["seconds_per_epoch"]) for r in runs)
            steps = int(runs[0]["optimizer_steps"]) // int(runs[0]["epochs"])
            print(
                f"| {LABELS[s]} | {len(runs)} | {100 * mean:.1f} ± {100 * sd:.1f}% | {100 * lo:.1f}-{100 * hi:.1f}% "
                f"| {delta} | {100 * best:.1f}% | {mem / 2**20:.1f} MiB | {mem / base_mem:.2f} | {sec:.1f} s "
                f"| {sec / base_sec:.2f} | {steps} |"
            )

    # (a) validation curves
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        for s in SETTINGS:
            seeds = sorted({int(c["seed"]) for c in curves if c["dataset"] == d and c["setting"] == s})
            for i, seed in enumerate(seeds):
                pts = [c for c in curves if c["dataset"] == d and c["setting"] == s and int(c["seed"]) == seed]
                ax.plot(
                    [int(c["epoch"]) for c in pts],
                    [100 * float(c["val_acc"]) for c in pts],
                    color=colors[s],
                    lw=2.0 if s == "BPTT" else 1.2,
                    alpha=0.8,
                    label=LABELS[s] if i == 0 else None,
                )
        ax.set_title(f"{title(d)}: validation accuracy per epoch (one line per seed)", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(args.img / "study_curves.png", dpi=110)
    plt.close(fig)

    # (b) accuracy against peak training memory
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        for s in SETTINGS:
            runs = [r for r in rows if r["dataset"] == d and r["setting"] == s]
            if not runs:
                continue
            mem = float(runs[0]["peak_bytes"]) / 2**20
            accs = [100 * float(r["val_acc"]) for r in runs]
            ax.scatter([mem] * len(accs), accs, color=colors[s], alpha=0.35, s=18)
            mean, sd, _, _ = _stats(accs)
            ax.errorbar(mem, mean, yerr=sd, fmt="o", color=colors[s], capsize=4, ms=7, label=LABELS[s])
        ax.set_xscale("log")
        ax.set_xticks([10, 20, 50, 100, 200, 500])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{title(d)}: accuracy against training memory", fontsize=10)
        ax.set_xlabel("peak training memory, MiB (saved activations + state; log scale)")
        ax.set_ylabel("final validation accuracy (%)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(args.img / "study_pareto.png", dpi=110)
    plt.close(fig)

    # (c) accuracy against k, one line per n (trainable classifiers), BPTT (k = T) as a reference
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        base = [100 * float(r["val_acc"]) for r in rows if r["dataset"] == d and r["setting"] == "BPTT"]
        if base:
            mean, sd, _, _ = _stats(base)
            ax.axhline(mean, color="black", lw=1.5, label="BPTT, mean ± sd")
            ax.axhspan(mean - sd, mean + sd, color="black", alpha=0.1)
        for kind, marker in (("trainable", "o"), ("random", "s")):
            for n in sorted({int(r["n"]) for r in rows if r["dataset"] == d and r["classifier"] == kind}):
                pts = []
                for k in sorted({int(r["k"]) for r in rows if r["dataset"] == d and r["n"] == str(n)}):
                    accs = [
                        100 * float(r["val_acc"])
                        for r in rows
                        if r["dataset"] == d and r["classifier"] == kind and r["n"] == str(n) and r["k"] == str(k)
                    ]
                    if accs:
                        pts.append((k, *_stats(accs)))
                if not pts:
                    continue
                color = {1: "tab:blue", 2: "tab:orange"}.get(n, "tab:gray") if kind == "trainable" else "tab:red"
                ax.errorbar(
                    [p[0] + (0.15 if kind == "random" else 0.0) for p in pts],  # beside the trainable point
                    [p[1] for p in pts],
                    yerr=[[p[1] - p[3] for p in pts], [p[4] - p[1] for p in pts]],
                    fmt=f"-{marker}",
                    color=color,
                    capsize=4,
                    label=f"n = {n}, {kind}",
                )
        ax.set_title(f"{title(d)}: accuracy against k (mean, bars min-max)", fontsize=10)
        ax.set_xlabel("k (time steps per truncated chunk)")
        ax.set_ylabel("final validation accuracy (%)")
        ax.set_xticks([2, 5, 10])
        ax.set_xlim(1, 11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", framealpha=0.6)
    fig.tight_layout()
    fig.savefig(args.img / "study_accuracy_vs_k.png", dpi=110)
    plt.close(fig)
    print(f"\nfigures in {args.img}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASET_NAMES), default=list(DATASET_NAMES))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--event-settings", nargs="+", choices=list(SETTINGS), default=["BPTT", "k10n1", "k5n2", "k2n1"],
        help="EventMNIST settings run with the MNIST-5k ones; the others are queued after them",
    )  # fmt: skip
    parser.add_argument("--event-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs-mnist", type=int, default=10)
    parser.add_argument("--epochs-event", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--lr", type=float, default=None,
        help="learning rate; default: the package's recipe scaled to --batch-size (paper_setting: 0.4 * batch / 1024)",
    )  # fmt: skip
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument(
        "--init", choices=["balanced", "default"], default="balanced",
        help="output-layer bias: balanced from one batch (PaperClassifier's balance_output) or PyTorch's default",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit-train-batches", type=int, default=0, help="0: the whole training set")
    parser.add_argument("--data-dir", default=str(HERE.parent / "data"), help="cache of the simulated events")
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy_study.csv")
    parser.add_argument("--curves", type=Path, default=RESULTS / "accuracy_study_curves.csv")
    parser.add_argument("--img", type=Path, default=DOCS_IMG)
    parser.add_argument(
        "--earlier", type=Path, nargs=2, metavar=("OUT", "CURVES"),
        help="--report: an earlier study's CSVs, for the datasets --out has no rows of (titled 'earlier run')",
    )  # fmt: skip
    parser.add_argument("--report", action="store_true", help="tables and figures from the CSVs; no training")
    parser.add_argument("--smoke", action="store_true", help="time BPTT and k2n1 for one epoch on each dataset")
    parser.add_argument(
        "--diagnose", nargs=3, metavar=("DATASET", "SETTING", "SEED"),
        help="rerun one run of the study (deterministic on CPU) and print per-class accuracy and output rates",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.epochs = {"mnist5k": args.epochs_mnist, "event_mnist": args.epochs_event}
    if args.lr is None:  # the package's recipe: the paper's EMNIST learning rate scaled to the batch
        from lightning_tlbptt.paper import paper_setting

        args.lr = paper_setting("mnist5k", batch_size=args.batch_size)["lr"]
    if args.report:
        return report(args)
    if args.diagnose:
        dataset, name, seed = args.diagnose[0], args.diagnose[1], int(args.diagnose[2])
        job = {
            "dataset": dataset, "setting": name, "seed": seed, "epochs": args.epochs[dataset],
            "batch_size": args.batch_size, "lr": args.lr, "dropout": args.dropout,
            "balance": args.init == "balanced", "data_dir": args.data_dir,
            "limit_train_batches": args.limit_train_batches, "diagnose": True,
        }  # fmt: skip
        row, _ = train_one(job)
        print(f"val acc {row['val_acc']:.1%}")
        return 0
    if args.smoke:
        for dataset in args.datasets:
            for name in ("BPTT", "k2n1"):
                job = {
                    "dataset": dataset, "setting": name, "seed": 0, "epochs": 1, "batch_size": args.batch_size,
                    "lr": args.lr, "dropout": args.dropout,
                    "balance": args.init == "balanced", "data_dir": args.data_dir,
                    "limit_train_batches": args.limit_train_batches,
                }  # fmt: skip
                t0 = time.perf_counter()
                row, _ = train_one(job)
                print(dataset, name, f"{time.perf_counter() - t0:.1f} s total", row, flush=True)
        return 0
    return run_study(args)


if __name__ == "__main__":
    sys.exit(main())
