"""Real DDP: 2 processes over gloo on CPU, launched by Lightning itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _run(out: Path, mode: str, expect_ok: bool = True) -> subprocess.CompletedProcess[str]:
    # earlier one-device runs in this process leave MASTER_ADDR/MASTER_PORT set (their gloo store may still hold
    # the port): let the 2-process run pick its own, as a fresh user process would
    inherited = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}
    inherited = {k: v for k, v in inherited.items() if "RANK" not in k}
    # an earlier test's seed_everything leaves PL_GLOBAL_SEED set, and Lightning seeds its DistributedSampler with it
    inherited = {k: v for k, v in inherited.items() if k not in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    env = {
        **inherited,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        # two ranks on a small shared machine: one thread each, or gloo's ranks starve each other
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, str(HERE / "ddp_run.py"), str(out), mode], env=env, capture_output=True, text=True, timeout=600
    )
    assert (result.returncode == 0) == expect_ok, result.stderr[-3000:]
    return result


@pytest.mark.distributed
@pytest.mark.parametrize(("variant", "steps"), [("chunk", 4), ("batch", 2), ("window", 4)])  # 2 batches x 2 chunks
def test_two_process_ddp_matches_single_process_on_the_global_batch(tmp_path, variant, steps):
    """``batch``: step_every="batch"; ``window``: OutputWindow starts a dead output neuron from the global batch (its
    bias and every gradient after it as the single process's, and the same on both ranks)."""
    tail = "" if variant == "chunk" else f"_{variant}"
    _run(tmp_path, "ddp" + tail)
    _run(tmp_path, "single" + tail)
    rank0 = torch.load(tmp_path / f"ddp{tail}_rank0.pt")
    rank1 = torch.load(tmp_path / f"ddp{tail}_rank1.pt")
    single = torch.load(tmp_path / f"single{tail}_rank0.pt")
    assert len(rank0) == len(rank1) == len(single) == steps
    for step, (a, b, ref) in enumerate(zip(rank0, rank1, single, strict=True)):
        assert a.keys() == b.keys() == ref.keys()
        assert any("local_classifiers" in name for name in a)
        for name in a:
            assert torch.equal(a[name], b[name]), f"ranks disagree on {name} at step {step}"
            torch.testing.assert_close(a[name], ref[name], atol=1e-6, rtol=1e-5, msg=f"{name} at step {step}")


@pytest.mark.distributed
def test_ranks_with_different_T_fail_together_at_once_instead_of_hanging(tmp_path):
    started = time.monotonic()
    result = _run(tmp_path, "ragged", expect_ok=False)
    assert time.monotonic() - started < 300  # the gradient all-reduce would wait for the 1800 s timeout
    assert "ranks disagree on the number of chunks of batch 0: between 2 and 3" in result.stderr
