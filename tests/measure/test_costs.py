"""The analytic cost model (Guo et al. 2023, Sec. 4): hand-computed counts, the paper's quoted figures, the command."""

from __future__ import annotations

import pytest
import torch
from spikingjelly.activation_based import functional, layer
from torch import nn

from lightning_tlbptt.classifiers import LocalClassifier
from lightning_tlbptt.measure.costs import CostEstimate, estimate, figure_of_merit, profile
from lightning_tlbptt.paper import models
from lightning_tlbptt.partitioning import observe
from tlbptt.cli import costs_main

from snn_fixtures import conv_net, lif

BATCH = 128  # Sec. 4.3: "The batch size is kept as 128 for all the cases"


def mlp() -> nn.Sequential:
    """4 -> 3 -> 5 -> 2: two hidden layers and the output layer, small enough to count by hand."""
    return nn.Sequential(
        layer.Linear(4, 3, step_mode="m"),
        lif(),
        layer.Linear(3, 5, step_mode="m"),
        lif(),
        layer.Linear(5, 2, step_mode="m"),
        lif(),
    )


def test_hand_counted_bptt() -> None:
    """Eqs. 11-17 for BPTT (one block; the output layer is its classifier), T = k = 2, batch 1, alpha = 1.

    Layers: W = 12, 15 and output W_c = 10; U = 3, 5 and U_c = 2; M = W for a linear layer and batch 1.
    """
    est = estimate(mlp(), input_shape=(4,), T=2, k=2, n=2, batch_size=1)
    forward_reads = (12 + 3) + (15 + 5) + (10 + 2)  # Eq. 11
    middle_reads = (12 + 2 * 3) + (15 + 2 * 5) + 15 + 2 * 10 + 3 * 2  # Eq. 12
    last_reads = (15 + 3) + 10  # Eq. 14
    assert est.reads == 2 * forward_reads + middle_reads + last_reads == 206
    forward_writes, middle_writes, last_writes = 3 + 5 + 2, (12 + 3) + (15 + 5) + (10 + 2), 12 + 15 + 10
    assert est.writes == 2 * forward_writes + middle_writes + last_writes == 104
    assert est.memory_access == 310
    # Eq. 15 forward; Eq. 16 backward, one addition fewer per state at the interval's last step
    middle_adds = (2 * 3 + 12) + (2 * 5 + 15) + (2 * 2 + 10)
    last_adds = (3 + 12) + (5 + 15) + (2 + 10)
    assert est.additions == 2 * (12 + 15 + 10) + middle_adds + last_adds == 178
    assert est.macs == 2 * (15 + 10) == 50  # Eq. 17: errors cross layer 2 and the classifier, every step
    # Eq. 9: k steps of graph (inputs + states: 4+3, 3+5, 5+2) plus weights and gradients, float32
    assert est.memory == 4 * (2 * 22 + 2 * 37)
    assert [(r.kind, r.block) for r in est.rows] == [("layer", 0), ("layer", 0), ("output", 0)]
    assert sum(r.reads for r in est.rows) == est.reads


@pytest.mark.parametrize(
    ("classifier", "reads", "writes", "additions", "memory"),
    [("trainable", 142, 110, 196, 4 * (15 + 74 + 12)), ("random", 118, 98, 184, 4 * (15 + 74 + 6))],
)
def test_hand_counted_layerwise(classifier: str, reads: int, writes: int, additions: int, memory: int) -> None:
    """LBP1 at k = 1: blocks [layer 0 + local classifier (3 -> 2)] and [layer 1 + output], T = 2, batch 1.

    Every step is an interval's last: block 0 reads W_c = 6 only (Eq. 14, its one layer is the top), writes
    the gradients 12 + 6; block 1 reads 10, writes 15 + 10. Random classifier weights move nowhere.
    """
    est = estimate(mlp(), input_shape=(4,), T=2, k=1, n=1, batch_size=1, classifier=classifier)
    assert est.num_blocks == 2
    assert (est.reads, est.writes, est.additions, est.memory) == (reads, writes, additions, memory)
    assert est.macs == 2 * (6 + 10)  # only the classifiers propagate errors: no layer has one below in its block
    blocks = est.per_block()
    assert [b.block for b in blocks] == [0, 1]
    assert sum(b.memory_access for b in blocks) == est.memory_access


def test_sparsity_scales_the_inputs_of_each_layer() -> None:
    est = estimate(mlp(), input_shape=(4,), T=2, k=2, n=2, batch_size=1, sparsity=(1.0, 0.5, 0.25))
    forward = 12 * 1.0 + 15 * 0.5 + 10 * 0.25
    middle = (2 * 3 + 12 * 1.0) + (2 * 5 + 15 * 0.5) + (2 * 2 + 10 * 0.25)
    last = (3 + 12 * 1.0) + (5 + 15 * 0.5) + (2 + 10 * 0.25)
    assert est.additions == pytest.approx(2 * forward + middle + last)
    assert est.sparsity == (1.0, 0.5, 0.25)
    with pytest.raises(ValueError, match="3 layers"):
        estimate(mlp(), input_shape=(4,), T=2, k=2, n=2, batch_size=1, sparsity=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        estimate(mlp(), input_shape=(4,), T=2, k=2, n=2, batch_size=1, sparsity=1.5)


def test_uneven_last_chunk_and_bptt_reference() -> None:
    prof = profile(mlp(), (4,))
    # T = 5, k = 2: intervals of 2, 2, 1 steps: 5 forward steps, 2 middle and 3 last backward steps
    est = prof.estimate(T=5, k=2, n=2, batch_size=1)
    assert est.writes == 5 * 10 + 2 * 47 + 3 * 37
    bptt = prof.bptt(T=5, batch_size=1)
    assert (bptt.k, bptt.n, bptt.num_blocks) == (5, 2, 1)
    # the whole sequence and one block are spelled None, or any k >= T and n >= n_hidden
    assert prof.estimate(T=5, k=9, n=7, batch_size=1) == bptt == prof.estimate(T=5, k=None, n=None, batch_size=1)
    ratios = prof.estimate(T=5, k=5, n=2, batch_size=1).relative_to(bptt)
    assert ratios.memory_access == ratios.macs == ratios.memory == 1.0


def test_single_step_networks_cost_the_same() -> None:
    net = mlp()
    functional.set_step_mode(net, "s")
    assert estimate(net, input_shape=(4,), T=3, k=1, n=1, batch_size=2) == estimate(
        mlp(), input_shape=(4,), T=3, k=1, n=1, batch_size=2
    )


def test_profile_of_lenet1() -> None:
    """Table 2's LeNet-1 on 28x28 EMNIST: conv1 padded to 'same', later convs unpadded (28-14-10-5-1)."""
    prof = profile(models.lenet1(), (1, 28, 28), classifier_pool=None)
    assert [(s.weights, s.dense_macs) for s in prof.layers] == [
        (1 * 25 * 6, 25 * 6 * 28 * 28),
        (6 * 25 * 16, 6 * 25 * 16 * 10 * 10),
        (16 * 25 * 120, 16 * 25 * 120),
        (120 * 128, 120 * 128),
        (128 * 47, 128 * 47),
    ]
    # every LIF of the layer holds states: the conv's and the pooling layer's
    assert [s.states for s in prof.layers] == [6 * 28 * 28 + 6 * 14 * 14, 16 * 10 * 10 + 16 * 5 * 5, 120, 128, 47]
    assert prof.classifier_inputs == (6 * 14 * 14, 16 * 5 * 5, 120)
    assert profile(models.lenet1(), (1, 28, 28), classifier_pool=4).classifier_inputs == (6 * 16, 16 * 16, 120)
    assert prof.num_classes == 47


@pytest.mark.parametrize("n", [1, 2, 3, 4, 9, None])
def test_layers_and_blocks_are_the_strategys(n: int | None) -> None:
    net = conv_net()
    found = observe(net, n, (torch.zeros(4, 2, 1, 8, 8),))
    prof = profile(net, (1, 8, 8))
    assert [s.name for s in prof.layers] == [layer.names[0] for layer in found.partition.layers]
    assert list(prof.blocks(n)) == [tuple(layer.index for layer in block.layers) for block in found.partition.blocks]


@pytest.mark.parametrize("pool", [1, 2, 4])
def test_classifier_width_matches_local_classifier(pool: int) -> None:
    """The width the model counts is the input width of the classifier the strategy builds on the same block."""
    net = conv_net()
    prof = profile(net, (1, 8, 8), classifier_pool=pool)
    found = observe(net, 1, (torch.zeros(3, 2, 1, 8, 8),))
    for h, width in zip(found.block_inputs, prof.classifier_inputs, strict=True):
        readout = LocalClassifier(4, lif(), pool=pool)
        readout(h)
        assert readout.linear.in_features == width


def test_probe_leaves_the_network_as_it_was() -> None:
    net = nn.Sequential(
        layer.Conv2d(1, 4, 3, step_mode="m"),
        layer.BatchNorm2d(4, step_mode="m"),
        lif(),
        layer.Flatten(step_mode="m"),
        layer.Linear(4 * 6 * 6, 3, step_mode="m"),
        lif(),
    )
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    profile(net, (1, 8, 8))
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(not isinstance(m.v, torch.Tensor) for m in net.modules() if hasattr(m, "v"))


def test_works_on_the_meta_device() -> None:
    """CIFAR10-DVS AlexNet at 128x128 has a 1.07e9-weight FC layer: estimate it without allocating it."""
    with torch.device("meta"):
        net = models.alexnet(in_channels=2, input_size=128)
    est = estimate(net, input_shape=(2, 128, 128), T=100, k=10, n=1, batch_size=BATCH)
    assert est.num_blocks == 8 and est.macs > 0
    assert profile(net, (2, 128, 128)).layers[6].weights == 256 * 32 * 32 * 4096


def test_figure_of_merit() -> None:
    assert figure_of_merit(0.0, 1.0, 1.0, 1.0, 1.0) == 1.0  # BPTT against itself
    assert figure_of_merit(0.02, 0.2, 0.6, 1.01, 0.01) == pytest.approx(0.02 + 0.25 * 1.82)
    prof = profile(mlp(), (4,))
    ratios = prof.estimate(T=4, k=1, n=1, batch_size=2).relative_to(prof.bptt(T=4, batch_size=2))
    assert ratios.figure_of_merit(-0.01) == pytest.approx(
        -0.01 + 0.25 * (ratios.memory + ratios.memory_access + ratios.additions + ratios.macs)
    )
    assert ratios.figure_of_merit(0.0, memory=0.5) == pytest.approx(
        0.25 * (0.5 + ratios.memory_access + ratios.additions + ratios.macs)
    )


# ------------------------------------------------------------------------------------- the paper's figures
# Paper networks (Table 2) on their datasets' inputs, built on the meta device. The paper's classifier reads
# the fully flattened block output (classifier_pool=None); alpha = 1 (see docs/costs.md for both readings).
TASKS = {
    "EMNIST": (lambda: models.lenet1(), (1, 28, 28), 20, (20, 10, 5, 2, 1), 4),
    "DvsGesture": (lambda: models.lenet2(), (2, 128, 128), 60, (60, 30, 20, 10, 5, 1), 4),
    "CIFAR10": (lambda: models.alexnet(), (3, 32, 32), 10, (10, 5, 2, 1), 8),
    "CIFAR10-DVS": (lambda: models.alexnet(in_channels=2, input_size=128), (2, 128, 128), 100, (100, 50, 20, 10, 1), 8),
}
FEW_POINTS = 0.03


class Task:
    def __init__(self, name: str) -> None:
        build, shape, self.T, self.ks, self.bp = TASKS[name]
        with torch.device("meta"):
            self.profile = profile(build(), shape, classifier_pool=None)

    def __call__(self, k: int, n: int, classifier: str = "trainable") -> CostEstimate:
        return self.profile.estimate(T=self.T, k=k, n=n, batch_size=BATCH, classifier=classifier)

    def reduction(self, metric: str, a: tuple, b: tuple) -> float:
        return 1 - getattr(self(*a), metric) / getattr(self(*b), metric)


@pytest.fixture(scope="module")
def task() -> dict[str, Task]:
    return {name: Task(name) for name in TASKS}


@pytest.mark.parametrize(
    ("name", "paper"), [("EMNIST", 0.72), ("DvsGesture", 0.99), ("CIFAR10", 0.99), ("CIFAR10-DVS", 0.99)]
)
def test_paper_mac_reduction_of_lbp1(task: dict[str, Task], name: str, paper: float) -> None:
    """Sec. 4.4: "LBP1 leads to a 72% reduction in LeNet-1 and a 99% reduction in both LeNet-2 and AlexNet";
    MACs do not depend on k or the classifier type (Fig. 13)."""
    t = task[name]
    for k in t.ks:
        assert t.reduction("macs", (k, 1), (k, t.bp)) == pytest.approx(
            paper, abs=FEW_POINTS / 3 if paper > 0.9 else FEW_POINTS
        )
        assert t(k, 1, "random").macs == t(k, 1).macs


def test_paper_memory_access_emnist(task: dict[str, Task]) -> None:
    """Sec. 4.3 on EMNIST: truncation ~55% for LBP1 with either classifier; LBP1 vs BP at k = 1: ~23% (trainable)
    and ~29% (random); trainable LBPs access more than BP at large k, random ones less at every k."""
    t = task["EMNIST"]
    for classifier in ("trainable", "random"):
        assert t.reduction("memory_access", (1, 1, classifier), (t.T, 1, classifier)) == pytest.approx(
            0.55, abs=FEW_POINTS
        )
    assert t.reduction("memory_access", (1, 1), (1, t.bp)) == pytest.approx(0.23, abs=FEW_POINTS)
    assert t.reduction("memory_access", (1, 1, "random"), (1, t.bp)) == pytest.approx(0.29, abs=FEW_POINTS)
    assert t(t.T, 1).memory_access > t(t.T, t.bp).memory_access
    assert all(t(k, n, "random").memory_access <= t(k, t.bp).memory_access for k in t.ks for n in (1, 2))


def test_paper_memory_access_cifar10(task: dict[str, Task]) -> None:
    """Sec. 4.3 on CIFAR10: truncation up to ~50% in LBP1; LBP1 vs BP up to 31% (trainable) and 33% (random);
    LBPs access less than BP at all intervals."""
    t = task["CIFAR10"]
    assert t.reduction("memory_access", (1, 1), (t.T, 1)) == pytest.approx(0.50, abs=FEW_POINTS)
    for classifier, paper in (("trainable", 0.31), ("random", 0.33)):
        best = max(t.reduction("memory_access", (k, 1, classifier), (k, t.bp)) for k in t.ks)
        assert best == pytest.approx(paper, abs=FEW_POINTS)
    assert all(
        t(k, n, c).memory_access < t(k, t.bp).memory_access
        for k in t.ks
        for n in (1, 2, 4)
        for c in ("trainable", "random")
    )


@pytest.mark.parametrize(
    ("name", "classifier", "paper", "tolerance"),
    [
        ("EMNIST", "trainable", 0.32, FEW_POINTS),
        ("EMNIST", "random", 0.16, FEW_POINTS),
        ("DvsGesture", "trainable", 0.01, 0.002),
        ("CIFAR10", "trainable", 0.0066, 0.001),
    ],
)
def test_paper_addition_overhead(
    task: dict[str, Task], name: str, classifier: str, paper: float, tolerance: float
) -> None:
    """Sec. 4.4: "LBPs cause more additions than BP, up to 32% in LeNet-1, only 1% in LeNet-2 and 0.66% in AlexNet
    ... random classifiers can reduce the overhead to 16% in LeNet-1"."""
    t = task[name]
    overhead = max(t(k, 1, classifier).additions / t(k, t.bp).additions - 1 for k in t.ks)
    assert overhead == pytest.approx(paper, abs=tolerance)


@pytest.mark.parametrize(("name", "bound"), [("EMNIST", 0.05), ("DvsGesture", 0.007), ("CIFAR10", 0.003)])
def test_paper_truncation_barely_changes_additions(task: dict[str, Task], name: str, bound: float) -> None:
    """Sec. 4.4: "Temporal truncation does not lead to a notable reduction, less than 5%/0.7% in LeNet-1/2 and
    0.3% reduction in AlexNet at maximum"."""
    t = task[name]
    for n in (1, 2, t.bp):
        assert 0 < t.reduction("additions", (1, n), (t.T, n)) < bound


def test_paper_best_designs_against_bptt(task: dict[str, Task]) -> None:
    """Sec. 5.2 / Fig. 15, best (k, n) per dataset: memory access down >40% on two datasets (EMNIST, CIFAR10),
    GPU memory down >80% and MACs down >99% "in most cases" (all but EMNIST's LBP2 here)."""
    best = {"EMNIST": (1, 2), "DvsGesture": (10, 1), "CIFAR10": (1, 1), "CIFAR10-DVS": (10, 1)}
    access, memory, macs = {}, {}, {}
    for name, (k, n) in best.items():
        t = task[name]
        access[name] = t.reduction("memory_access", (k, n), (t.T, t.bp))
        memory[name] = t.reduction("memory", (k, n), (t.T, t.bp))
        macs[name] = t.reduction("macs", (k, n), (t.T, t.bp))
    assert {name for name, r in access.items() if r > 0.4} == {"EMNIST", "CIFAR10"}
    assert all(r > 0.8 for r in memory.values())
    assert {name for name, r in macs.items() if r > 0.99} == {"DvsGesture", "CIFAR10", "CIFAR10-DVS"}


# --------------------------------------------------------------------------------------------- the command
def test_costs_command_prints_the_grid(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        costs_main(
            [
                "lenet1",
                "--T",
                "20",
                "--k",
                "20,1",
                "--n",
                "4,1",
                "--classifier",
                "trainable,random",
                "--classifier-pool",
                "none",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    rows = [dict(zip(header, line.split(), strict=True)) for line in lines[2:]]
    assert len(rows) == 1 + 2 * 2 * 2
    assert rows[0]["classifier"] == "BPTT" and rows[0]["MACs/BPTT"] == "1.0000"
    lbp1 = next(r for r in rows if (r["classifier"], r["k"], r["n"]) == ("trainable", "1", "1"))
    assert float(lbp1["MACs/BPTT"]) == pytest.approx(1 - 0.72, abs=FEW_POINTS)
    assert lbp1["blocks"] == "4"


def test_costs_command_takes_a_factory_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert costs_main(["snn_fixtures:conv_net", "--input-shape", "1,8,8", "--T", "8", "--k", "4", "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "snn_fixtures:conv_net input [1, 8, 8] T=8" in out
    assert costs_main(["nope", "--T", "8"]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err
