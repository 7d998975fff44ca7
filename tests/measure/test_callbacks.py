"""Cost callbacks in real Lightning runs: W&B offline end to end, CSV, BPTT baseline, measured memory and density."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from spikingjelly.activation_based import functional
from torch.utils.data import DataLoader, TensorDataset

from lightning_tlbptt import SpikingClassifier, TruncatedLocalBPTT
from lightning_tlbptt.measure.callbacks import CostMonitor, MemoryMonitor, OpCounterMonitor, SpikeDensityMonitor
from lightning_tlbptt.measure.costs import figure_of_merit, profile

from snn_fixtures import conv_net, event_batches

COST_KEYS = {
    f"cost/{p}{name}"
    for p in ("", "bptt/")
    for name in ("reads", "writes", "memory_access", "additions", "macs", "memory_estimate_bytes")
} | {f"cost/ratio/{name}" for name in ("reads", "writes", "memory_access", "additions", "macs", "memory_estimate")}
MEMORY_KEYS = {
    f"cost/memory/{name}_bytes" for name in ("saved_activations", "params", "grads", "optimizer_state", "total")
}
OPS_KEYS = {
    f"ops/{phase}/{name}"
    for phase in ("forward", "backward")
    for name in ("flops", "macs", "acs", "memory_access_bytes")
}
LBP1_KEYS = (
    COST_KEYS
    | MEMORY_KEYS
    | OPS_KEYS
    | {f"density/layer{i}" for i in range(4)}
    | {"density/classifier0", "density/classifier1", "cost/block0/macs", "cost/block2/memory_access"}
    | {"cost/fom", "cost/accuracy_loss", "cost/fom_memory_ratio"}
)


def monitors(every: int = 1) -> list[L.Callback]:
    return [
        MemoryMonitor(every),
        SpikeDensityMonitor(every),
        CostMonitor(every, reference_accuracy=0.5),
        OpCounterMonitor(every),
    ]


def fit(
    make_trainer: Callable[..., L.Trainer],
    callbacks: list[L.Callback],
    strategy: Any = "auto",
    logger: Any = False,
    **module: Any,
) -> L.Trainer:
    torch.manual_seed(0)
    trainer = make_trainer(strategy=strategy, callbacks=callbacks, logger=logger)
    trainer.fit(
        SpikingClassifier(conv_net(), lr_step_epochs=0, **module),
        event_batches(n=16),
        event_batches(n=8, seed=1),
    )
    return trainer


def wandb_records(path: Path) -> Iterator[bytes]:
    """Records of a W&B transaction log (``run-*.wandb``): a LevelDB log of 32 KiB blocks after a 7-byte header."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # FULL, FIRST
            pending = chunk
        elif kind in (3, 4):  # MIDDLE, LAST
            pending += chunk
        if kind in (1, 4):
            yield pending


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)  # W&B splits keys holding "/" into a nested key


def test_wandb_offline_end_to_end(tmp_path: Path, make_trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb
    from wandb.proto import wandb_internal_pb2

    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), project="tlbptt-test", offline=True)
    fit(make_trainer, monitors(), TruncatedLocalBPTT(k=2, n=1), logger)
    logger.experiment.finish()
    wandb.teardown()  # wait for the W&B service to flush the run file

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    history, config, summary = set(), {}, {}
    for data in wandb_records(next(run_dir.glob("run-*.wandb"))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {_key(item) for item in record.history.item}
        elif kind == "config":
            config |= {_key(item): json.loads(item.value_json) for item in record.config.update}
        elif kind == "summary":
            summary |= {_key(item): item.value_json for item in record.summary.update}
    assert history >= LBP1_KEYS, LBP1_KEYS - history
    assert {"k": 2, "n": 1, "T": 8, "classifier": "trainable", "loss": "mse"}.items() <= config.items()
    assert json.loads(summary["cost/blocks/_type"]) == "table-file"
    table = json.loads((run_dir / "files" / json.loads(summary["cost/blocks/path"])).read_text())
    assert table["columns"] == ["block", "kind", "reads", "writes", "memory_access", "additions", "macs"]
    kinds = [row[1] for row in table["data"]]
    assert kinds.count("block") == 3 and kinds.count("classifier") == 2 and kinds.count("output") == 1


def test_csv_logger_and_bptt_baseline(tmp_path: Path, make_trainer) -> None:
    """Plain BPTT (no strategy): k = T, one block, no classifier; every ratio to BPTT is 1."""
    cost = CostMonitor(2, reference_accuracy=0.6)
    callbacks = [MemoryMonitor(2), SpikeDensityMonitor(2), cost, OpCounterMonitor(2)]
    fit(make_trainer, callbacks, logger=CSVLogger(tmp_path))
    log_dir = tmp_path / "lightning_logs" / "version_0"
    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {key for row in rows for key, value in row.items() if value}
    expected = COST_KEYS | MEMORY_KEYS | OPS_KEYS | {f"density/layer{i}" for i in range(4)} | {"cost/fom"}
    assert expected <= logged, expected - logged
    assert not any(key.startswith("density/classifier") for key in logged)
    ratios = [float(row["cost/ratio/macs"]) for row in rows if row["cost/ratio/macs"]]
    assert ratios == [1.0]  # batch 2 of 2
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert {"k": 8, "n": 3, "T": 8, "classifier": "none", "loss": "mse"}.items() <= hparams.items()
    accuracy = next(float(row["val/acc"]) for row in rows if row["val/acc"])
    fom = next(float(row["cost/fom"]) for row in rows if row["cost/fom"])
    assert fom == pytest.approx(figure_of_merit(0.6 - accuracy, 1.0, 1.0, 1.0, 1.0))


def test_measured_memory_shrinks_with_truncation(make_trainer) -> None:
    peaks = {}
    for k in (8, 2):
        memory = MemoryMonitor(1)
        fit(make_trainer, [memory], TruncatedLocalBPTT(k=k, n=8))
        peaks[k] = memory.metrics["cost/memory/saved_activations_bytes"]
        assert memory.metrics["cost/memory/params_bytes"] == memory.metrics["cost/memory/grads_bytes"] > 0
    # saved activations are ~k/T of BPTT's; parameters and optimizer state do not change
    assert 0 < peaks[2] < 0.4 * peaks[8]


def test_densities_equal_hand_computed_spike_rates(make_trainer) -> None:
    """With lr = 0 the weights never change, so the chunked forward of the strategy fires exactly the spikes of
    one forward over the whole sequence, which we compute here block by block."""
    T, B = 8, 8
    x = torch.zeros(B, T, 1, 8, 8)
    x.view(B, T, 64)[..., ::4] = 1.0  # every frame: 16 of 64 pixels on
    y = torch.arange(B) % 4
    loader = DataLoader(TensorDataset(torch.cat([x, x]), torch.cat([y, y])), batch_size=B)
    density, cost = SpikeDensityMonitor(2), CostMonitor(2)
    torch.manual_seed(0)
    net = conv_net()
    module = SpikingClassifier(net, lr=0.0, lr_step_epochs=0)
    trainer = make_trainer(strategy=TruncatedLocalBPTT(k=2, n=1), callbacks=[density, cost])
    trainer.fit(module, loader)

    # conv_net's layers start at modules 0, 3, 6 and 8; blocks of one layer end after modules 2 and 5
    rates = []
    for start in (0, 3, 6, 8):
        functional.reset_net(net)
        with torch.no_grad():
            rates.append((net[:start](x.transpose(0, 1)) != 0).float().mean().item())
    expected = {f"density/layer{i}": rate for i, rate in enumerate(rates)}
    expected |= {"density/classifier0": rates[1], "density/classifier1": rates[2]}
    assert rates[0] == 0.25 and min(rates) > 0 and max(rates) < 1
    assert density.metrics == pytest.approx(expected, abs=1e-3)
    # the cost model was fed these densities, one per layer
    assert cost.estimate is not None and cost.estimate.sparsity == density.layer_densities
    assert len(density.layer_densities or ()) == 4
    reference = profile(net, (1, 8, 8)).estimate(T=T, k=2, n=1, batch_size=B, sparsity=density.layer_densities)
    assert cost.estimate == reference


def test_op_counter_counts_one_chunk(make_trainer) -> None:
    """Forward FLOPs of the counted chunk grow with its length k: about twice for k = 4 as for k = 2."""
    flops = {}
    for k in (2, 4):
        ops = OpCounterMonitor(1)
        fit(make_trainer, [ops], TruncatedLocalBPTT(k=k, n=1))
        assert all(ops.metrics[key] > 0 for key in OPS_KEYS - {"ops/backward/acs"})
        flops[k] = ops.metrics["ops/forward/flops"]
    assert 1.6 < flops[4] / flops[2] < 2.4


def test_every_n_steps_is_validated() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        MemoryMonitor(0)
    with pytest.raises(ValueError, match="reference_accuracy"):
        CostMonitor(reference_accuracy=85.0)
