"""The Table 2 networks and the paper's neuron (Eqs. 1, 2, 6) in SpikingJelly."""

from __future__ import annotations

import pytest
import torch
from spikingjelly.activation_based import functional, layer
from spikingjelly.activation_based.model.sew_resnet import BasicBlock
from spikingjelly.activation_based.neuron import LIFNode
from torch import nn

from lightning_tlbptt.paper.models import MODELS, PaperNeuron, build_model

# name: (paper input (C, H, W), classes, conv widths, hidden FC widths) from Table 2.
PAPER_NETS = {
    "lenet1": ((1, 28, 28), 47, [6, 16, 120], [128]),
    "lenet2": ((2, 128, 128), 11, [64, 128, 128], [256]),
    "alexnet": ((3, 32, 32), 10, [96, 256, 384, 512, 384, 256], [4096, 1024]),
    "vgg11": ((2, 48, 64), 101, [32, 64, 128, 128, 256, 256, 512, 512], [1024, 1024]),
    "resnet18": ((2, 64, 64), 200, [32], []),
}
SPIKING_OUTPUT = {"lenet1", "lenet2", "alexnet"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _run(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = net(x)
    functional.reset_net(net)
    return out


def test_membrane_follows_eq1():
    # u <- tau_p * u + x with tau_p = 0.8: 1.0, 1.8, 2.44 below threshold.
    lif = PaperNeuron(tau_p=0.8, u_th=10.0).make()
    lif.store_v_seq = True
    spikes = lif(torch.ones(3, 1))
    torch.testing.assert_close(lif.v_seq.flatten(), torch.tensor([1.0, 1.8, 2.44]))
    assert spikes.sum() == 0


def test_soft_reset_subtracts_threshold():
    lif = PaperNeuron(tau_p=0.8, u_th=2.0).make()
    lif.store_v_seq = True
    spikes = lif(torch.ones(4, 1))
    assert spikes.flatten().tolist() == [0.0, 0.0, 1.0, 0.0]
    # 2.44 crosses 2.0 and drops to 0.44; then 0.8 * 0.44 + 1.
    torch.testing.assert_close(lif.v_seq.flatten(), torch.tensor([1.0, 1.8, 0.44, 1.352]))


def test_rectangular_surrogate_eq6():
    # dS/du = 1/a where |u - u_th| < a/2, else 0 (a = 0.5, u_th = 1).
    lif = PaperNeuron(tau_p=0.5, u_th=1.0, a=0.5).make()
    u = torch.tensor([[0.70], [0.80], [1.20], [1.30]]).requires_grad_()
    grads = []
    for row in u:
        functional.reset_net(lif)
        (grad,) = torch.autograd.grad(lif(row.view(1, 1)).sum(), u)
        grads.append(grad.sum().item())
    assert grads == [0.0, 2.0, 2.0, 0.0]


def test_lifnode_mapping():
    lif = PaperNeuron(tau_p=0.9, u_th=0.4, a=0.25).make()
    assert isinstance(lif, LIFNode) and lif.step_mode == "m"
    assert lif.v_reset is None and lif.decay_input is False and lif.v_threshold == 0.4
    assert lif.tau == pytest.approx(10.0) and lif.surrogate_function.alpha == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"tau_p": 1.0}, "tau_p"), ({"tau_p": 0.0}, "tau_p"), ({"u_th": 0.0}, "u_th"), ({"a": -0.5}, "a ")],
)
def test_neuron_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PaperNeuron(**kwargs)


@pytest.mark.parametrize("name", sorted(PAPER_NETS))
def test_paper_architecture(name: str):
    (channels, height, width), classes, convs, hidden = PAPER_NETS[name]
    net = build_model(name, in_channels=channels, num_classes=classes, input_size=(height, width))
    assert isinstance(net, nn.Sequential)
    assert [m.out_channels for m in net if isinstance(m, layer.Conv2d)] == convs
    assert [m.out_features for m in net if isinstance(m, layer.Linear)] == [*hidden, classes]
    assert all(m.step_mode == "m" for m in net.modules() if hasattr(m, "step_mode"))
    if name == "resnet18":
        blocks = [m for m in net if isinstance(m, BasicBlock)]
        assert [b.conv1.out_channels for b in blocks] == [32, 32, 64, 64, 128, 128, 256, 256]
        assert all(b.cnf == "ADD" for b in blocks)
    batch_norm = name in ("vgg11", "resnet18")
    assert any(isinstance(m, (layer.BatchNorm2d, layer.BatchNorm1d)) for m in net) == batch_norm
    # Building ran a dummy forward in eval mode: batch-norm statistics are untouched.
    for bn in (m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        assert bn.num_batches_tracked == 0 and bn.running_mean.abs().sum() == 0

    out = _run(net, torch.rand(2, 1, channels, height, width))
    assert out.shape == (2, 1, classes)
    assert isinstance(net[-1], LIFNode) == (name in SPIKING_OUTPUT)


@pytest.mark.parametrize(
    ("name", "channels", "classes", "size"),
    [
        ("lenet1", 2, 10, (34, 30)),
        ("lenet2", 1, 5, (40, 40)),
        ("alexnet", 2, 7, (20, 12)),
        ("vgg11", 3, 13, (32, 32)),
        ("resnet18", 1, 9, (20, 28)),
    ],
)
def test_any_input_shape(name: str, channels: int, classes: int, size: tuple[int, int]):
    net = build_model(name, in_channels=channels, num_classes=classes, input_size=size, dropout=0.1)
    assert any(isinstance(m, layer.Dropout) for m in net)
    out = _run(net, 2.0 * torch.rand(4, 3, channels, *size))
    assert out.shape == (4, 3, classes)
    if name in SPIKING_OUTPUT:
        assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_hidden_layers_emit_spikes():
    # Every weighted layer is followed by its neuron (pooling too): each LIF output is binary.
    net = build_model("lenet1", num_classes=10)
    x = torch.rand(8, 2, 1, 28, 28)
    with torch.no_grad():
        for module in net:
            x = module(x)
            if isinstance(module, LIFNode):
                assert set(x.unique().tolist()) <= {0.0, 1.0}


def test_layers_are_trainable_end_to_end():
    net = build_model("lenet1", num_classes=10)
    out = net(torch.rand(6, 2, 1, 28, 28) * 3)
    out.mean(0).sum().backward()
    first = net[0].weight.grad
    assert first is not None and first.abs().sum() > 0


@pytest.mark.parametrize(("name", "size"), [("lenet1", 8), ("lenet2", (64, 12)), ("alexnet", 3), ("vgg11", 8)])
def test_too_small_input_is_a_clear_error(name: str, size):
    with pytest.raises(ValueError, match=rf"{name}: input_size=.* is too small: layer '\w+' receives a \d+x\d+"):
        build_model(name, input_size=size)


def test_registry():
    assert set(MODELS) == {"lenet1", "lenet2", "alexnet", "vgg11", "resnet18"}
    with pytest.raises(ValueError, match="available models: alexnet, lenet1"):
        build_model("lenet3")
