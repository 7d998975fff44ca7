"""Plug-and-play on code nobody here wrote: SpikingJelly's own Lightning example and its model zoo.

Only the strategy line changes. At ``k = T`` with one block the weights must equal Lightning's own automatic
optimisation of the same module; with ``k < T`` and local blocks every block must learn, the user's own metrics
must be logged, and callbacks monitoring them must work.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import pytest
import spikingjelly
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from spikingjelly.activation_based import functional, memopt, neuron, surrogate
from spikingjelly.activation_based.model import (
    ms_resnet,
    parametric_lif_net,
    sew_resnet,
    spikformer,
    spiking_resnet,
    spiking_vgg,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tlbptt import OutputWindow, TruncatedLocalBPTT, neurons
from lightning_tlbptt.output_window import output_layer

MEMOPT_EXAMPLE = Path(spikingjelly.__file__).parent / "activation_based" / "examples" / "memopt"


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Runs compared for equality must add in the same order: a multi-threaded conv backward may not, and one
    flipped spike in a deep network moves weights far past the tolerance."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _example(name: str) -> ModuleType:
    """Import ``spikingjelly/activation_based/examples/memopt/<name>.py`` from the installed wheel."""
    key = f"spikingjelly_memopt_example_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, MEMOPT_EXAMPLE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


def _example_module(lr: float = 0.05) -> L.LightningModule:
    """SpikingJelly's ClassificationLightningModule with CIFAR10DVSVGG and TETLoss, as its train.py builds it;
    the optimizer LightningCLI would supply is added as configure_optimizers."""

    class Example(_example("lightning_modules").ClassificationLightningModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)

    torch.manual_seed(0)
    net = _example("models").CIFAR10DVSVGG()
    return Example(net, _example("loss").TETLoss(), num_classes=10, y_with_T=True)


def _dvs_batches(n: int = 4, T: int = 4, batch_size: int = 2) -> DataLoader:
    """CIFAR10-DVS-shaped event frames [N, T, 2, 48, 48] (the example model's fixed input size)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(n, T, 2, 48, 48, generator=g) < 0.3).float()
    return DataLoader(TensorDataset(x, torch.arange(n) % 10), batch_size=batch_size)


def _fit(trainer: L.Trainer, module: L.LightningModule, loader: DataLoader) -> L.Trainer:
    torch.manual_seed(1)  # the same dropout masks in both runs that are compared
    trainer.fit(module, loader)
    return trainer


def _assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=atol, rtol=1e-5, msg=f"{name} differs")


def _moved(before: dict[str, torch.Tensor], module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if name in before and not torch.equal(before[name], p)]


def test_spikingjelly_example_at_k_equal_T_is_lightnings_own_step(make_trainer) -> None:
    ours, reference = _example_module(), _example_module()
    _fit(make_trainer(max_steps=2), reference, _dvs_batches())
    trainer = _fit(make_trainer(max_steps=2, strategy=TruncatedLocalBPTT(k=4, n=99)), ours, _dvs_batches())
    assert trainer.global_step == 2
    _assert_same_weights(ours, reference)
    # the user's own metrics, logged by its own training_step, reached Lightning
    assert {"train_loss", "train_acc"} <= set(trainer.callback_metrics)
    assert ours.automatic_optimization and not hasattr(ours, "local_classifiers")


def test_spikingjelly_example_trains_every_block_and_checkpoints_on_its_metric(make_trainer, tmp_path: Path) -> None:
    module = _example_module()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train_acc", mode="max", save_top_k=1)
    trainer = make_trainer(
        max_epochs=2, strategy=TruncatedLocalBPTT(k=2, n=1), callbacks=[checkpoint], enable_checkpointing=True
    )
    trainer.fit(module, _dvs_batches())

    assert trainer.global_step == 2 * 2 * 2  # 2 epochs x 2 batches x T/k = 2 chunks
    strategy = trainer.strategy
    assert isinstance(strategy, TruncatedLocalBPTT) and strategy.partition is not None
    # 9 layers (8 VGG blocks, the output layer): 8 hidden layers one per block, the output layer closing the last
    assert len(strategy.partition.blocks) == 8
    weights = [n for n in before if n.endswith("weight") and "neuron" not in n]
    assert not set(weights) - set(_moved(before, module)), "a block did not learn"
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert checkpoint.best_model_path and Path(checkpoint.best_model_path).exists()

    # a plain Trainer validates from that checkpoint, loading it strictly into the unchanged module
    fresh = _example_module()
    make_trainer().validate(fresh, _dvs_batches(), ckpt_path=checkpoint.best_model_path, verbose=False)
    saved = torch.load(checkpoint.best_model_path, weights_only=False)
    assert "tlbptt" in saved and not any(key.startswith("local_classifiers") for key in saved["state_dict"])
    for name, p in fresh.state_dict().items():
        torch.testing.assert_close(p, saved["state_dict"][name], msg=f"{name} was not loaded")


def test_memopt_in_on_fit_start_composes(make_trainer) -> None:
    """SpikingJelly's train.py applies memopt.optimize_memory to the VGG blocks in on_fit_start."""

    def with_memopt(module: L.LightningModule) -> L.LightningModule:
        vgg_block = _example("models").VGGBlock

        def on_fit_start() -> None:
            dummy = torch.zeros(2, 4, 2, 48, 48)
            memopt.optimize_memory(module.net, vgg_block, lambda current: current(dummy), level=1, compress=False)

        module.on_fit_start = on_fit_start  # type: ignore[method-assign]
        return module

    ours, reference = with_memopt(_example_module()), with_memopt(_example_module())
    _fit(make_trainer(max_steps=1), reference, _dvs_batches())
    _fit(make_trainer(max_steps=1, strategy=TruncatedLocalBPTT(k=4, n=99)), ours, _dvs_batches())
    _assert_same_weights(ours, reference)

    local = with_memopt(_example_module())
    trainer = make_trainer(max_steps=2, strategy=TruncatedLocalBPTT(k=2, n=2))
    trainer.fit(local, _dvs_batches())
    assert trainer.strategy.partition is not None
    wrapped = [m for m in local.net.modules() if hasattr(m, "_checkpoint_wrapped_module")]
    assert wrapped, "memopt wrapped nothing: the test would prove nothing"
    starts = {id(b.start.module) for b in trainer.strategy.partition.blocks[1:]}
    assert starts & {id(m) for m in wrapped}, "blocks were not formed on memopt's wrapped modules"


# --- the model zoo -------------------------------------------------------------------------------------------------


class ZooModule(L.LightningModule):
    """A user's module around a model-zoo network: CE on the time-mean output, its own logged loss."""

    def __init__(self, net: nn.Module, static: bool = False) -> None:
        super().__init__()
        self.net = net
        self.static = static

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self.net)
        return self.net(x if self.static else x.transpose(0, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        logits = out.mean(0) if out.dim() == 3 else out  # ms_resnet averages over time itself
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _plif(net_cls: type, channels: int = 4) -> nn.Module:
    net = net_cls(channels=channels, spiking_neuron=neuron.ParametricLIFNode, surrogate_function=surrogate.ATan())
    functional.set_step_mode(net, "m")
    return net


def _resnet(
    factory: Any, spiking_neuron: type = neuron.IFNode, surrogate_function: Any = None, **kwargs: Any
) -> nn.Module:
    surrogate_function = surrogate.ATan() if surrogate_function is None else surrogate_function
    net = factory(num_classes=10, spiking_neuron=spiking_neuron, surrogate_function=surrogate_function, **kwargs)
    functional.set_step_mode(net, "m")
    return net


def _spikformer() -> nn.Module:
    return spikformer.Spikformer(
        T=2, in_channels=3, img_size_h=32, img_size_w=32, patch_size=4, num_classes=10, embed_dims=16,
        num_heads=2, mlp_ratio=2.0, depths=2,
    )  # fmt: skip


# name: (factory, input shape per sample (static) or per step, static)
ZOO: dict[str, tuple[Any, tuple[int, ...], bool]] = {
    "MNISTNet": (lambda: _plif(parametric_lif_net.MNISTNet), (1, 28, 28), False),
    "FashionMNISTNet": (lambda: _plif(parametric_lif_net.FashionMNISTNet), (1, 28, 28), False),
    "NMNISTNet": (lambda: _plif(parametric_lif_net.NMNISTNet), (2, 34, 34), False),
    "CIFAR10Net": (lambda: _plif(parametric_lif_net.CIFAR10Net), (3, 32, 32), False),
    "CIFAR10DVSNet": (lambda: _plif(parametric_lif_net.CIFAR10DVSNet), (2, 128, 128), False),
    "DVSGestureNet": (lambda: _plif(parametric_lif_net.DVSGestureNet), (2, 128, 128), False),
    "spiking_resnet18": (lambda: _resnet(spiking_resnet.spiking_resnet18), (3, 16, 16), False),
    "sew_resnet18": (lambda: _resnet(sew_resnet.sew_resnet18, cnf="ADD"), (3, 16, 16), False),
    "ms_resnet18": (lambda: _resnet(ms_resnet.ms_resnet18, T=2), (3, 16, 16), True),
    "spikformer": (_spikformer, (3, 32, 32), True),
}
SLOW_ZOO: dict[str, tuple[Any, tuple[int, ...], bool]] = {
    **{
        name: (functools.partial(_resnet, getattr(spiking_resnet, name)), (3, 16, 16), False)
        for name in spiking_resnet.__all__
        if name.startswith("spiking_") and name != "spiking_resnet18"
    },
    **{
        name: (functools.partial(_resnet, getattr(sew_resnet, name), cnf="ADD"), (3, 16, 16), False)
        for name in sew_resnet.__all__
        if name.startswith("sew_") and name != "sew_resnet18"
    },
    **{
        name: (functools.partial(_resnet, getattr(spiking_vgg, name)), (3, 32, 32), False)
        for name in spiking_vgg.__all__
        if name.startswith("spiking_vgg")
    },
    "ms_resnet34": (lambda: _resnet(ms_resnet.ms_resnet34, T=2), (3, 16, 16), True),
}


def _zoo_batches(shape: tuple[int, ...], static: bool, n: int = 4, T: int = 2) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, *shape, generator=g) if static else (torch.rand(n, T, *shape, generator=g) < 0.3).float()
    return DataLoader(TensorDataset(x, torch.arange(n) % 10), batch_size=2)


def _check_zoo_model(name: str, spec: tuple[Any, tuple[int, ...], bool], make_trainer: Any) -> None:
    factory, shape, static = spec
    torch.manual_seed(0)
    net = factory()
    reference, ours = ZooModule(copy.deepcopy(net), static), ZooModule(copy.deepcopy(net), static)
    _fit(make_trainer(max_steps=2), reference, _zoo_batches(shape, static))
    # slice_bytes=1 and finest_slices: every stretch of step-wise modules with a neuron (a neuron and its pool, ...)
    # runs one step at a time, so the comparison covers layers walked in time slices on code nobody here wrote
    strategy = TruncatedLocalBPTT(k=2, n=99, slice_bytes=1)
    _fit(make_trainer(max_steps=2, strategy=strategy), ours, _zoo_batches(shape, static))
    _assert_same_weights(ours, reference, atol=1e-5)

    local = ZooModule(copy.deepcopy(net), static)
    before = {n: p.detach().clone() for n, p in local.named_parameters()}
    trainer = make_trainer(max_steps=4, strategy=TruncatedLocalBPTT(k=1, n=1))
    trainer.fit(local, _zoo_batches(shape, static))
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    part = trainer.strategy.partition
    # the network's real output width: the VotingLayer heads pool 100 -> 10 (DVSGestureNet: 110 -> 11)
    assert part is not None and part.num_classes == (11 if name == "DVSGestureNet" else 10)
    moved = {id(p) for n, p in local.named_parameters() if n in set(_moved(before, local))}
    for block in part.blocks:
        params = [p for layer in block.layers for m in layer.modules for p in m.parameters()]
        assert any(id(p) in moved for p in params), f"{name}: block {block.index} ({block.names[:3]}...) did not learn"


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.usefixtures("finest_slices")
def test_model_zoo_exact_at_k_equal_T_and_trains_per_block(name: str, make_trainer) -> None:
    _check_zoo_model(name, ZOO[name], make_trainer)


def test_kernel_leaves_the_gradient_sew_resnet_shares_with_its_shortcut_alone(make_trainer) -> None:
    """SEW ResNet's residual ADD hands one gradient to a neuron and to the shortcut. With LIFNode and the Rect surrogate
    the strategy runs the neuron through its kernel, which overwrites an incoming gradient only when autograd gave it
    to the kernel alone: at k = T the weights must still equal Lightning's step through SpikingJelly's own LIF."""
    torch.manual_seed(0)
    # a low threshold and a wide window, so that gradients reach every layer through the rectangular surrogate
    net = _resnet(sew_resnet.sew_resnet18, neuron.LIFNode, surrogate.Rect(alpha=0.5), cnf="ADD", v_threshold=0.1)
    assert any(neurons.supports(m) is None for m in net.modules())  # the kernel applies
    reference, ours = ZooModule(copy.deepcopy(net), False), ZooModule(copy.deepcopy(net), False)
    _fit(make_trainer(max_steps=2), reference, _zoo_batches((3, 16, 16), False))
    _fit(make_trainer(max_steps=2, strategy=TruncatedLocalBPTT(k=2, n=None)), ours, _zoo_batches((3, 16, 16), False))
    assert _moved({n: p.detach() for n, p in net.named_parameters()}, reference.net)  # the comparison is not at rest
    _assert_same_weights(ours, reference, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a 152-layer ResNet fitted three times on two shared cores
@pytest.mark.parametrize("name", list(SLOW_ZOO))
@pytest.mark.usefixtures("finest_slices")
def test_whole_model_zoo(name: str, make_trainer) -> None:
    _check_zoo_model(name, SLOW_ZOO[name], make_trainer)


@pytest.mark.parametrize("name", ["MNISTNet", "NMNISTNet"])
def test_output_window_on_zoo_spiking_outputs_keeps_k_equal_T_equal_to_lightning(name: str, make_trainer) -> None:
    """The zoo's parametric-LIF nets end in Linear -> ParametricLIFNode -> VotingLayer: OutputWindow finds that layer
    by itself, starts it from the first batch, and plain Lightning and the strategy at k = T, one block, still end
    with the same weights (the callback sees the same training forwards under both)."""
    factory, shape, static = ZOO[name]
    torch.manual_seed(0)
    net = factory()
    reference, ours = ZooModule(copy.deepcopy(net), static), ZooModule(copy.deepcopy(net), static)
    _fit(make_trainer(max_steps=2, callbacks=[OutputWindow()]), reference, _zoo_batches(shape, static))
    window = OutputWindow()
    _fit(make_trainer(max_steps=2, strategy=TruncatedLocalBPTT(k=2, n=None), callbacks=[window]), ours,
         _zoo_batches(shape, static))  # fmt: skip
    assert window._output[0].out_features == 100  # the 100-wide head the VotingLayer pools to 10
    assert window.started  # started on the first batch and re-centred when the second began
    untouched = ZooModule(copy.deepcopy(net), static)
    assert not torch.allclose(output_layer(untouched)[0].bias, output_layer(ours)[0].bias)  # the window moved it
    _assert_same_weights(ours, reference, atol=1e-5)
