"""Plug-and-play on the LightningModules public projects wrote, each reproduced in tests/clients/<name>/.

Each client is written as its project wrote it (patterns, sizes, losses, logged metrics; see its README.md), with
synthetic data of its shapes. Only the strategy line changes, and for projects written against the standalone
``pytorch_lightning`` package, their one import line (to ``lightning.pytorch``). Per client:

- ``k < T, n = 1``: every block's weights change, and the user's logged metrics reach ``trainer.callback_metrics``;
- ``k = T, n = None``: the weights equal plain Lightning's after a few steps (same seed and data, to 1e-6);
- a plain ``Trainer.fit`` afterwards still trains the module;
- with the project's original ``pytorch_lightning`` import, the strategy trains it too.

What the strategy does not support yet is a strict xfail naming the pattern of issue 22 it hits, so that each flips
to a failure (to be removed) when support lands.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tlbptt import TruncatedLocalBPTT

from snn_fixtures import GradRecorder

CLIENTS = Path(__file__).parent
#: the one change a ``pytorch_lightning`` project makes to run under ``lightning``: its import lines
PORTED_IMPORTS = {
    "import pytorch_lightning as pl": "import lightning.pytorch as pl",
    "from pytorch_lightning import LightningModule": "from lightning.pytorch import LightningModule",
}
#: not in issue 22: plain torch layers called on ``x_seq.flatten(0, 1)`` (``functional.seq_to_ann_forward``)
FOLDED = (
    "time folded into the batch (functional.seq_to_ann_forward on plain torch layers): the entry or a block "
    "boundary receives [T * B, ...] (new pattern, not in issue 22)"
)
LOOP_IN_FORWARD = (
    "single-step network with its time loop in forward (issue 22, pattern 7): refused at setup with the change that "
    "makes it work, or the user's own T check hinted at k (test_single_step_time_loops_get_the_fix_or_a_hint)"
)
LOOP_IN_STEP = (
    "single-step network with its time loop in training_step on a static image: no time axis to cut (issue 22, "
    "pattern 7): refused at setup with the change that makes it work (test_single_step_time_loops_get_the_fix...)"
)


def load(client: str, file: str, package: str = "lightning") -> ModuleType:
    """``tests/clients/<client>/<file>.py`` as a module: as written (``package="pytorch_lightning"``), or with its
    ``pytorch_lightning`` import lines ported to ``lightning.pytorch`` (``package="lightning"``)."""
    key = f"tlbptt_client_{client}_{file}_{package}"
    if key in sys.modules:
        return sys.modules[key]
    path = CLIENTS / client / f"{file}.py"
    source = path.read_text()
    if package == "lightning":
        for original, ported in PORTED_IMPORTS.items():
            source = source.replace(original, ported)
        imports = [line for line in source.splitlines() if line.lstrip().startswith(("import ", "from "))]
        assert not any("pytorch_lightning" in line for line in imports), f"{path}: a pytorch_lightning import is left"
    spec = importlib.util.spec_from_loader(key, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    sys.modules[key] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


@dataclass(frozen=True)
class Client:
    """How the tests build one client and its data.

    Attributes:
        name: the folder under tests/clients.
        file: the file (without ``.py``) defining the LightningModule.
        case: which of its modules (the test id).
        build: the user's module from the loaded file, as the project constructs it.
        data: a small synthetic loader of the project's batch structure and shapes.
        T: time steps the network sees; ``k`` the chunk length of the truncated run.
        metrics: what the user's ``training_step`` logs.
        uses_pytorch_lightning: the project imports the standalone ``pytorch_lightning`` package.
        xfail: per check (``"local"``, ``"exact"``, ``"after"``, ``"pytorch_lightning"``), why the strategy fails it
            today (the pattern of issue 22).
        steps: optimizer steps of each fit.
    """

    name: str
    file: str
    case: str
    build: Callable[[ModuleType], L.LightningModule]
    data: Callable[[], DataLoader]
    T: int
    k: int
    metrics: tuple[str, ...]
    uses_pytorch_lightning: bool = True
    xfail: dict[str, str] = field(default_factory=dict)
    steps: int = 2


def _events(n: int, T: int, shape: tuple[int, ...], classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary event frames ``[n, T, *shape]`` and class labels."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, T, *shape, generator=g) < 0.3).float(), torch.arange(n) % classes


def _lenet5_data() -> DataLoader:
    return DataLoader(TensorDataset(*_events(4, 4, (2, 34, 34), 10)), batch_size=2)


def _images(n: int, shape: tuple[int, ...], classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Static intensities ``[n, *shape]`` in [0, 1] and class labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.arange(n) % classes


#: SEW-ResNet-18's structure at a width and depth that fits the test suite
SMALL_SEW = {"layers": (1, 1, 1, 1), "widths": (8, 16, 32, 64)}


def _views(shape: tuple[int, ...], sample: bool) -> DataLoader:
    """Self-supervised batches of two augmented views of an event sample, ``((X, Y_a, Y_b), label)`` with the sample
    (Barchid/dvs_ssl) or ``((Y_a, Y_b), label)`` (SpikeCLR)."""
    x, y = _events(8, 4, shape, 10)  # two batches of four: BatchNorm1d and batch statistics need several samples
    a, b = _events(8, 4, shape, 10, seed=1)[0], _events(8, 4, shape, 10, seed=2)[0]
    views = [((x[i], a[i], b[i]) if sample else (a[i], b[i]), y[i]) for i in range(len(y))]
    return DataLoader(views, batch_size=4)


def _one_hot(shape: tuple[int, ...], classes: int = 4, n: int = 4) -> DataLoader:
    """Inputs ``[n, *shape]`` with one-hot targets ``[n, classes]`` (Qualia's datasets)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, *shape, generator=g)
    return DataLoader(TensorDataset(x, nn.functional.one_hot(torch.arange(n) % classes, classes).float()), batch_size=2)


def _smlp(m: ModuleType, module: str, T: int) -> L.LightningModule:
    model = m.SMLP(input_shape=(3, 16), output_shape=(4,), units=[32, 32], timesteps=T)
    return getattr(m, module)(model, optimizer={"kind": "Adam", "params": {"lr": 1e-2}}, num_outputs=4)


CLIENT_LIST: list[Client] = [
    Client(
        name="barchid_spikingjelly_lightning",
        file="lenet5",
        case="Lenet5Module",
        build=lambda m: m.Lenet5Module(learning_rate=1e-3, neuron_model="LIF", bias=True, timesteps=4),
        data=_lenet5_data,
        T=4,
        k=2,
        metrics=("train_loss", "train_acc"),
    ),
    Client(
        name="barchid_snn",
        file="mnist_classification",
        case="MNISTClassification",
        build=lambda m: m.MNISTClassification(T=4, learning_rate=1e-3),
        data=lambda: DataLoader(TensorDataset(*_images(4, (1, 28, 28), 10)), batch_size=2),
        T=4,
        k=2,
        metrics=("train_loss", "train_acc"),
    ),
    Client(
        name="barchid_snn_fer",
        file="fer_module",
        case="FerModule",
        build=lambda m: m.FerModule(learning_rate=0.05, timesteps=4, n_classes=7, encoder_sizes=SMALL_SEW),
        data=lambda: DataLoader(TensorDataset(*_events(4, 4, (2, 32, 32), 7)), batch_size=2),
        T=4,
        k=2,
        metrics=("train_loss", "train_acc"),
        xfail={"local": FOLDED, "after": FOLDED},
    ),
    Client(
        name="barchid_dvs_ssl",
        file="ssl_module",
        case="SSLModule",
        build=lambda m: m.SSLModule(learning_rate=0.05, epochs=1, timesteps=4, encoder_sizes=SMALL_SEW),
        data=lambda: _views((2, 32, 32), sample=True),
        T=4,
        k=2,
        metrics=("train_loss",),
        xfail={
            "local": f"{FOLDED}; then two network calls per step (issue 22, pattern 4)",
            "exact": f"{FOLDED}; then two network calls per step, resets held for the batch (issue 22, pattern 4)",
            "after": FOLDED,
        },
    ),
    Client(
        name="spikeclr",
        file="modules",
        case="LitSelfSupervised",
        build=lambda m: m.LitSelfSupervised(m.SpikeCLR(), lr=1e-2),
        data=lambda: _views((2, 16, 16), sample=False),
        T=4,
        k=2,
        metrics=("train_pretrain_loss",),
    ),
    Client(
        name="spikeclr",
        file="modules",
        case="LitSupervised",
        build=lambda m: m.LitSupervised(m.Classifier(), lr=1e-2),
        data=lambda: DataLoader(TensorDataset(*_events(4, 4, (2, 16, 16), 10)), batch_size=2),
        T=4,
        k=2,
        metrics=("train_loss", "train_top1"),
    ),
    Client(
        name="qualia_snn",
        file="trainer_module",
        case="SpikingJelly",
        build=lambda m: _smlp(m, "SpikingJellyTrainerModule", T=4),
        data=lambda: _one_hot((3, 16)),
        T=4,
        k=2,
        metrics=("train_loss", "trainacc"),
        xfail={"local": LOOP_IN_FORWARD, "after": LOOP_IN_FORWARD},
    ),
    Client(
        name="qualia_snn",
        file="trainer_module",
        case="SpikingJellyTimeStepsInData",
        build=lambda m: _smlp(m, "SpikingJellyTimeStepsInDataTrainerModule", T=4),
        data=lambda: _one_hot((4, 3, 16)),
        T=4,
        k=2,
        metrics=("train_loss", "trainacc"),
        xfail={"local": LOOP_IN_FORWARD, "after": LOOP_IN_FORWARD},
    ),
    Client(
        name="fixtures",
        file="binary_head",
        case="BinaryEventClassifier",
        build=lambda m: m.BinaryEventClassifier(pos_weight=2.0, lr=1e-2),
        data=lambda: DataLoader(TensorDataset(*_events(4, 4, (2, 16, 16), 2)), batch_size=2),
        T=4,
        k=2,
        metrics=("train_loss", "train_accuracy"),
        uses_pytorch_lightning=False,
    ),
    Client(
        name="fixtures",
        file="spike_regulariser",
        case="RegularisedClassifier",
        build=lambda m: m.RegularisedClassifier(),
        data=lambda: DataLoader(TensorDataset(*_events(4, 4, (2, 16, 16), 10)), batch_size=2),
        T=4,
        k=2,
        metrics=("train_loss", "train_hidden_rate"),
        uses_pytorch_lightning=False,
    ),
    Client(
        name="fixtures",
        file="poisson_loop",
        case="LightningSNN",
        build=lambda m: m.LightningSNN(learning_rate=1e-2, num_steps=4),
        data=lambda: DataLoader(TensorDataset(*_images(4, (1, 28, 28), 10)), batch_size=2),
        T=4,
        k=2,
        metrics=(),
        uses_pytorch_lightning=False,
        xfail={"local": LOOP_IN_STEP, "after": LOOP_IN_STEP},
    ),
]


def _params(client: Client, module: ModuleType) -> L.LightningModule:
    torch.manual_seed(0)
    return client.build(module)


def _cases(check: str, only_pytorch_lightning: bool = False) -> list[Any]:
    cases = []
    for client in CLIENT_LIST:
        if only_pytorch_lightning and not client.uses_pytorch_lightning:
            continue
        reason = client.xfail.get(check)
        if check == "pytorch_lightning":  # the same local fit as "local", under pytorch_lightning's Trainer
            reason = client.xfail.get(check, client.xfail.get("local"))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        cases.append(pytest.param(client, id=f"{client.name}-{client.case}", marks=marks))
    return cases


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Runs compared for equality must add in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seeded_fit(trainer: Any, module: Any, loader: DataLoader) -> Any:
    L.seed_everything(1, verbose=False)  # the same dropout masks and augmentations in runs that are compared
    trainer.fit(module, loader)
    return trainer


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _moved(before: dict[str, torch.Tensor], module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if name in before and not torch.equal(before[name], p)}


def _fit_local(client: Client, make_trainer: Any) -> tuple[L.LightningModule, L.Trainer, dict[str, torch.Tensor]]:
    user = _params(client, load(client.name, client.file))
    before = _snapshot(user)
    strategy = TruncatedLocalBPTT(k=client.k, n=1)
    trainer = _seeded_fit(
        make_trainer(max_steps=client.steps * client.T // client.k, strategy=strategy), user, client.data()
    )
    return user, trainer, before


@pytest.mark.parametrize("client", _cases("local"))
def test_truncated_local_fit_trains_every_block_and_logs_the_users_metrics(client: Client, make_trainer: Any) -> None:
    user, trainer, before = _fit_local(client, make_trainer)
    strategy = trainer.strategy
    assert isinstance(strategy, TruncatedLocalBPTT) and strategy.partition is not None
    assert len(strategy.partition.blocks) > 1, "n = 1 made one block: nothing local was tested"
    assert trainer.global_step == client.steps * client.T // client.k, "not one optimizer step per chunk of k steps"
    moved = {id(p) for name, p in user.named_parameters() if name in _moved(before, user)}
    for block in strategy.partition.blocks:
        params = [p for layer in block.layers for m in layer.modules for p in m.parameters()]
        assert any(id(p) in moved for p in params), (
            f"block {block.index} ({', '.join(block.names[:3])}...) did not learn"
        )
    missing = set(client.metrics) - set(trainer.callback_metrics)
    assert not missing, f"the user's metrics {sorted(missing)} were not logged"
    assert all(torch.isfinite(torch.as_tensor(trainer.callback_metrics[name])) for name in client.metrics)


@pytest.mark.parametrize("client", _cases("exact"))
def test_k_equal_T_and_one_block_is_plain_lightning(client: Client, make_trainer: Any) -> None:
    """Weights equal plain Lightning's after several steps with every layer run whole (``slice_bytes=None``); with
    the default time slices the first step's gradients are equal (slices sum the weight gradient slice by slice, so
    only up to float order: Adam, which most of these clients use, turns that order into different steps wherever a
    gradient is float noise, e.g. a conv bias before BatchNorm)."""
    file = load(client.name, client.file)
    reference, whole = _params(client, file), _params(client, file)
    initial = _snapshot(reference)
    grads = GradRecorder()
    _seeded_fit(make_trainer(max_steps=client.steps, callbacks=[grads]), reference, client.data())
    strategy = TruncatedLocalBPTT(k=client.T, n=None, slice_bytes=None)
    trainer = _seeded_fit(make_trainer(max_steps=client.steps, strategy=strategy), whole, client.data())
    assert trainer.global_step == client.steps
    assert _moved(initial, reference), "plain Lightning did not train: the comparison proves nothing"
    for (name, p), q in zip(reference.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=f"{name} differs from plain Lightning")

    sliced, sliced_grads = _params(client, file), GradRecorder()
    strategy = TruncatedLocalBPTT(k=client.T, n=None)
    _seeded_fit(make_trainer(max_steps=1, strategy=strategy, callbacks=[sliced_grads]), sliced, client.data())
    scale = max(g.abs().max().item() for g in grads.steps[0].values())  # a gradient that is float noise is noise
    for name, g in grads.steps[0].items():
        torch.testing.assert_close(sliced_grads.steps[0][name], g, atol=1e-6 * scale, rtol=1e-5, msg=name)


@pytest.mark.parametrize("client", _cases("after"))
def test_a_plain_fit_afterwards_trains(client: Client, make_trainer: Any) -> None:
    user, _, _ = _fit_local(client, make_trainer)
    assert not hasattr(user, "local_classifiers")
    before = _snapshot(user)
    trainer = _seeded_fit(make_trainer(max_steps=client.steps), user, client.data())
    assert _moved(before, user), "a plain fit after the strategy's did not train"
    assert all(torch.isfinite(torch.as_tensor(trainer.callback_metrics[name])) for name in client.metrics)


@pytest.mark.parametrize("client", _cases("pytorch_lightning", only_pytorch_lightning=True))
def test_the_original_pytorch_lightning_import_trains(client: Client, tmp_path: Path) -> None:
    import pytorch_lightning

    user = _params(client, load(client.name, client.file, package="pytorch_lightning"))
    assert isinstance(user, pytorch_lightning.LightningModule)
    before = _snapshot(user)
    trainer = pytorch_lightning.Trainer(
        strategy=TruncatedLocalBPTT(k=client.k, n=1),
        max_steps=client.steps * client.T // client.k,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    _seeded_fit(trainer, user, client.data())
    assert _moved(before, user)
    assert set(client.metrics) <= set(trainer.callback_metrics)


@pytest.mark.parametrize(
    ("client", "error", "words"),
    [
        (CLIENT_LIST[i], error, words)
        for i, c in enumerate(CLIENT_LIST)
        for case, error, words in (
            ("SpikingJelly", MisconfigurationException, r"calls it 4 times per batch.*set_step_mode\(net, 'm'\)"),
            ("LightningSNN", MisconfigurationException, r"calls it 4 times per batch.*set_step_mode\(net, 'm'\)"),
            ("SpikingJellyTimeStepsInData", ValueError, r"timesteps differs"),
        )
        if c.case == case
    ],
    ids=lambda v: v.case if isinstance(v, Client) else None,
)
def test_single_step_time_loops_get_the_fix_or_a_hint(
    client: Client, error: type, words: str, make_trainer: Any
) -> None:
    """A static input looped over T in forward or training_step is refused before any step, naming the change that
    makes it work; a time loop over the batch's own steps trains, and the user's own T check hears about k."""
    user = _params(client, load(client.name, client.file))
    before = _snapshot(user)
    with pytest.raises(error, match=words) as raised:
        _seeded_fit(make_trainer(strategy=TruncatedLocalBPTT(k=client.k, n=1)), user, client.data())
    assert not _moved(before, user)
    if error is ValueError:
        assert any(f"k={client.k} time steps" in note for note in getattr(raised.value, "__notes__", []))
