"""Partitioning by observation (``observe``): layers, blocks and cuts of real SpikingJelly networks."""

from __future__ import annotations

import pytest
import torch
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from spikingjelly.activation_based.examples.memopt.models import CIFAR10DVSVGG
from spikingjelly.activation_based.model import sew_resnet, spiking_resnet, spiking_vgg
from torch import nn

from lightning_tlbptt import PartitionError, find_network, observe
from lightning_tlbptt.partitioning import block_groups

from snn_fixtures import conv_net, lif


def _zoo(factory, **kwargs) -> nn.Module:
    net = factory(num_classes=10, spiking_neuron=neuron.IFNode, surrogate_function=surrogate.ATan(), **kwargs)
    functional.set_step_mode(net, "m")
    return net


def test_nested_sequential_layers_and_blocks():
    x = torch.zeros(4, 2, 1, 8, 8)
    found = observe(conv_net(), 1, (x,))
    p = found.partition
    assert [layer.names for layer in p.layers] == [("0", "1", "2"), ("3.0", "3.1", "4", "5"), ("6", "7"), ("8", "9")]
    assert [b.names for b in p.blocks] == [("0", "1", "2"), ("3.0", "3.1", "4", "5"), ("6", "7", "8", "9")]
    assert [b.start.name if b.start else None for b in p.blocks] == [None, "3", "6"]  # the container's call
    assert p.num_classes == 4 and p.step_mode == "m" and p.entry is not None and p.entry.name == "0"
    # the probe ran on one step of two samples: what each later block received then
    assert found.T == 4 and [tuple(h.shape) for h in found.block_inputs] == [(1, 2, 4, 4, 4), (1, 2, 32)]
    assert [len(observe(conv_net(), n, (x,)).partition.blocks) for n in (1, 2, 3, 4, 100, None)] == [3, 2, 1, 1, 1, 1]


def test_block_groups_is_the_one_grouping_rule():
    assert block_groups(5, 1) == [[0], [1], [2], [3, 4]]
    assert block_groups(5, 2) == [[0, 1], [2, 3, 4]]
    assert block_groups(5, None) == block_groups(5, 4) == block_groups(5, 99) == [[0, 1, 2, 3, 4]]
    assert block_groups(1, None) == block_groups(1, 1) == [[0]]  # only an output layer


@pytest.mark.parametrize(
    ("make", "residual"),
    [
        (lambda: _zoo(sew_resnet.sew_resnet18, cnf="ADD"), "layer1.0"),
        (lambda: _zoo(spiking_resnet.spiking_resnet18), "layer1.0"),
        (lambda: _zoo(spiking_vgg.spiking_vgg11_bn), None),
    ],
)
def test_model_zoo_is_cut_between_residual_blocks_and_left_as_it_was(make, residual):
    net = make().eval()
    x = torch.rand(2, 1, 3, 32, 32)
    expected = net(x)
    functional.reset_net(net)
    p = observe(net, 2, (x,)).partition
    names = [name for block in p.blocks for name in block.names]
    assert len(p.blocks) > 1 and p.num_classes == 10
    if residual:
        starts = {b.start.name for b in p.blocks[1:] if b.start}
        assert not any(start.startswith(residual + ".") for start in starts)  # never cut inside a residual block
        assert any(name.startswith(residual + ".") for name in names)
    torch.testing.assert_close(net(x), expected)  # the probe left no state behind


def test_network_that_transposes_and_resets_inside_forward():
    """SpikingJelly's memopt example: its forward transposes [B, T] -> [T, B] and calls reset_net itself."""
    net = CIFAR10DVSVGG(dropout=0.0).eval()
    x = torch.rand(2, 3, 2, 48, 48)  # [B, T, C, H, W]
    found = observe(net, 2, (x,))
    assert found.entry_shape == (3, 2, 2, 48, 48) and found.T == 3  # the entry receives [T, B, ...]
    assert len(found.partition.blocks) > 1


class Custom(nn.Module):
    """A custom module whose forward calls its children with functional glue, a Python loop and a skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = layer.Conv2d(1, 4, 3, padding=1, step_mode="m")
        self.sn1 = lif()
        self.fc = layer.Linear(4 * 8 * 8, 3, step_mode="m")
        self.sn2 = lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sn1(self.conv(x))
        return self.sn2(self.fc(torch.flatten(y + x, 2)))


def test_custom_forward_with_a_skip_and_glue():
    p = observe(Custom(), 1, (torch.rand(3, 2, 1, 8, 8),)).partition
    assert [layer.names for layer in p.layers] == [("conv", "sn1"), ("fc", "sn2")]
    assert [b.names for b in p.blocks] == [("conv", "sn1", "fc", "sn2")]
    assert p.n_hidden == 1 and p.num_classes == 3


def test_errors_name_the_problem_and_tied_weights_stay_together():
    x = torch.zeros(2, 2, 1, 8, 8)
    with pytest.raises(PartitionError, match="n must be a positive int"):
        observe(conv_net(), 0, (x,))
    with pytest.raises(PartitionError, match="no SpikingJelly neuron"):
        observe(nn.Sequential(nn.Linear(2, 2)), 1, (torch.zeros(2, 2, 2),))
    with pytest.raises(PartitionError, match="no weighted layer"):
        observe(nn.Sequential(lif()), 1, (torch.zeros(2, 2, 2),))
    with pytest.raises(PartitionError, match="not time-major data"):
        observe(conv_net(), 1, (torch.zeros(8),))

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = layer.Linear(4, 4, step_mode="m")
            self.out = layer.Linear(4, 2, step_mode="m")
            self.sn1, self.sn2, self.sn3 = lif(), lif(), lif()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.sn3(self.out(self.sn2(self.fc(self.sn1(self.fc(x))))))

    # a parameter used twice is never split between blocks: both calls of fc fall in one layer
    p = observe(Tied(), 1, (torch.zeros(2, 2, 4),)).partition
    assert [layer.names for layer in p.layers] == [("fc", "sn1", "fc", "sn2"), ("out", "sn3")]


def test_find_network():
    holder = nn.Module()
    holder.net = conv_net()
    holder.head = nn.Linear(2, 2)
    assert find_network(holder) == ("net", holder.net)
    holder.other = conv_net()
    with pytest.raises(PartitionError, match="ambiguous"):
        find_network(holder)
    assert find_network(holder, "other")[1] is holder.other


@pytest.mark.parametrize("module", ["spikingjelly", "torch"])
def test_a_layer_starts_at_its_weighted_module_after_an_identity_in_evaluation(module: str) -> None:
    """SpikingJelly's layer.Dropout (and nn.Identity) returns its input itself when observed in eval mode: the
    next conv still starts a layer, and the neuron before stays in the layer it fires for."""
    identity = layer.Dropout(0.1, step_mode="m") if module == "spikingjelly" else nn.Identity()
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1, step_mode="m"),
        neuron.LIFNode(step_mode="m"),
        identity,
        layer.Conv2d(4, 4, 3, padding=1, step_mode="m"),
        neuron.LIFNode(step_mode="m"),
        layer.Flatten(step_mode="m"),
        layer.Linear(4 * 8 * 8, 3, step_mode="m"),
        neuron.LIFNode(step_mode="m"),
    )
    found = observe(net, 1, (torch.rand(4, 2, 1, 8, 8),))
    assert [[type(m).__name__ for m in part.modules] for part in found.partition.layers] == [
        ["Conv2d", "LIFNode", type(identity).__name__],
        ["Conv2d", "LIFNode", "Flatten"],
        ["Linear", "LIFNode"],
    ]
