"""Automatic partitioning of real SpikingJelly networks."""

from __future__ import annotations

import pytest
import torch
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from spikingjelly.activation_based.examples.memopt.models import CIFAR10DVSVGG
from spikingjelly.activation_based.model import sew_resnet, spiking_resnet, spiking_vgg
from torch import nn

from lightning_tlbptt import PartitionError, find_network, partition

from snn_fixtures import conv_net, lif


def _zoo(factory, **kwargs) -> nn.Module:
    net = factory(num_classes=10, spiking_neuron=neuron.IFNode, surrogate_function=surrogate.ATan(), **kwargs)
    functional.set_step_mode(net, "m")
    return net


def _run_blocks(p, x: torch.Tensor) -> torch.Tensor:
    for block in p.blocks:
        x = block.module(x)
    return x


def test_nested_sequential_layers_and_blocks():
    p = partition(conv_net(), n=1)
    assert [layer.names for layer in p.layers] == [("0", "1", "2"), ("3.0", "3.1", "4", "5"), ("6", "7"), ("8", "9")]
    assert [b.names for b in p.blocks] == [("0", "1", "2"), ("3.0", "3.1", "4", "5"), ("6", "7", "8", "9")]
    assert p.num_classes == 4 and p.input_layout == "TB" and p.step_mode == "m"
    assert [len(partition(conv_net(), n).blocks) for n in (1, 2, 3, 4, 100)] == [3, 2, 1, 1, 1]


@pytest.mark.parametrize(
    ("make", "residual"),
    [
        (lambda: _zoo(sew_resnet.sew_resnet18, cnf="ADD"), "layer1.0"),
        (lambda: _zoo(spiking_resnet.spiking_resnet18), "layer1.0"),
        (lambda: _zoo(spiking_vgg.spiking_vgg11_bn), None),
    ],
)
def test_model_zoo_is_cut_between_residual_blocks_and_runs_like_the_network(make, residual):
    net = make().eval()
    p = partition(net, n=2)
    names = [name for block in p.blocks for name in block.names]
    assert "flatten" in names  # the zoo's torch.flatten glue between avgpool and fc is part of a block
    if residual:
        assert residual in names  # a residual block is one indivisible unit
        assert not any(name.startswith(residual + ".") for name in names)
    assert len(p.blocks) > 1
    x = torch.rand(2, 1, 3, 32, 32)
    functional.reset_net(net)
    expected = net(x)
    functional.reset_net(net)
    torch.testing.assert_close(_run_blocks(p, x), expected)


def test_network_that_transposes_and_resets_inside_forward():
    net = CIFAR10DVSVGG(dropout=0.0).eval()
    p = partition(net, n=2)
    assert p.input_layout == "BT"  # its forward does input.transpose(0, 1): blocks take [T, B, ...]
    x = torch.rand(2, 3, 2, 48, 48)  # [B, T, C, H, W]
    expected = net(x)
    functional.reset_net(net)
    torch.testing.assert_close(_run_blocks(p, x.transpose(0, 1)), expected)


class Custom(nn.Module):
    """A custom module whose forward calls its children in order, with functional glue."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = layer.Conv2d(1, 4, 3, padding=1, step_mode="m")
        self.sn1 = lif()
        self.fc = layer.Linear(4 * 8 * 8, 3, step_mode="m")
        self.sn2 = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sn1(self.conv(x))
        return self.sn2(self.fc(torch.flatten(x, 2)))


def test_custom_module_calling_children_in_order():
    p = partition(Custom(), n=1)
    assert [b.names for b in p.blocks] == [("conv", "sn1", "flatten", "fc", "sn2")]
    assert p.n_hidden == 1 and p.num_classes == 3


def test_errors_name_the_problem():
    with pytest.raises(PartitionError, match="n must be a positive int"):
        partition(conv_net(), 0)
    with pytest.raises(PartitionError, match="no SpikingJelly neuron"):
        partition(nn.Sequential(nn.Linear(2, 2)), 1)
    with pytest.raises(PartitionError, match="no weighted layer"):
        partition(nn.Sequential(lif()), 1)

    class TopLevelSkip(Custom):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.sn1(self.conv(x))
            return self.sn2(self.fc(torch.flatten(y + x, 2)))

    with pytest.raises(PartitionError, match="not a chain of layers at its top level"):
        partition(TopLevelSkip(), 1)

    class Loops(Custom):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([self.sn2(self.fc(self.sn1(self.conv(x[t])).flatten(1))) for t in range(x.shape[0])])

    with pytest.raises(PartitionError, match=r"could not trace Loops\.forward"):
        partition(Loops(), 1)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = layer.Linear(4, 4, step_mode="m")
            self.out = layer.Linear(4, 2, step_mode="m")
            self.sn1, self.sn2, self.sn3 = lif(), lif(), lif()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.sn3(self.out(self.sn2(self.fc(self.sn1(self.fc(x))))))

    with pytest.raises(PartitionError, match="gradient would cross the block boundary"):
        partition(Tied(), 1)


def test_find_network():
    holder = nn.Module()
    holder.net = conv_net()
    holder.head = nn.Linear(2, 2)
    assert find_network(holder) == ("net", holder.net)
    holder.other = conv_net()
    with pytest.raises(PartitionError, match="ambiguous"):
        find_network(holder)
    assert find_network(holder, "other")[1] is holder.other
