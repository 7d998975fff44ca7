"""Partitioning by observation (``observe``): layers, blocks and cuts of real SpikingJelly networks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from spikingjelly.activation_based.examples.memopt.models import CIFAR10DVSVGG
from spikingjelly.activation_based.model import sew_resnet, spiking_resnet, spiking_vgg
from torch import nn
from torch._dynamo import OptimizedModule

from lightning_tlbptt import PartitionError, SpikingClassifier, TruncatedLocalBPTT, find_network, observe
from lightning_tlbptt.partitioning import block_groups, original

from snn_fixtures import conv_net, event_batches, lif


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


class ConvBnSpike(nn.Sequential):
    """A user's block template whose constructor takes its own arguments; counts its constructions."""

    built = 0

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(layer.Conv2d(cin, cout, 3, padding=1, step_mode="m"), lif(), layer.AvgPool2d(2, step_mode="m"))
        ConvBnSpike.built += 1


class Head(nn.Module):
    """A user's module with a required constructor argument and a forward of its own."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc, self.sn = layer.Linear(width, 4, step_mode="m"), lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn(self.fc(x.flatten(2)))


def _block_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(ConvBnSpike(1, 4), ConvBnSpike(4, 8), Head(32))


def test_sequential_subclasses_with_their_own_constructor_are_partitioned_without_building_them():
    net = _block_net()
    built = ConvBnSpike.built
    p = observe(net, 1, (torch.rand(3, 2, 1, 8, 8),)).partition
    assert [layer.names for layer in p.layers] == [("0.0", "0.1", "0.2"), ("1.0", "1.1", "1.2"), ("2.fc", "2.sn")]
    assert [b.start.name if b.start else None for b in p.blocks] == [None, "1"]  # the head closes the last
    assert ConvBnSpike.built == built


def _refuse(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
    """A torch.compile backend that fails if anything is compiled: the probe must run the original eagerly."""
    raise AssertionError("torch.compile compiled a graph")


def test_a_compiled_network_is_partitioned_through_its_original():
    x = torch.rand(4, 2, 1, 8, 8)
    expected = observe(conv_net(), 1, (x,))
    net = conv_net()
    compiled = torch.compile(net, backend=_refuse)
    found = observe(compiled, 1, (x,))
    assert [layer.names for layer in found.partition.layers] == [layer.names for layer in expected.partition.layers]
    assert [b.start.name for b in found.partition.blocks[1:] if b.start] == ["3", "6"]
    assert all(b.start.module is net[int(b.start.name)] for b in found.partition.blocks[1:] if b.start)
    for a, b in zip(found.block_inputs, expected.block_inputs, strict=True):
        torch.testing.assert_close(a, b)

    holder = nn.Module()
    holder.net = compiled
    assert find_network(holder) == ("net", net)  # the original, under the compiled one's attribute name
    assert find_network(holder, "net") == ("net", net)

    # compiled in place or in parts: the probe runs every compiled function eagerly, and compiles nothing
    inner = conv_net()
    inner.compile(backend=_refuse)
    inner[3] = torch.compile(inner[3], backend=_refuse)
    found = observe(inner, 1, (x,))
    assert len(found.partition.blocks) == 3 and found.partition.num_classes == 4


def test_a_compiled_network_trains_through_the_strategy_and_stays_compiled(make_trainer):
    def fit(compiled: bool, strategy: TruncatedLocalBPTT | None) -> SpikingClassifier:
        net = conv_net()
        module = SpikingClassifier(torch.compile(net, backend=_refuse) if compiled else net, lr=0.1, lr_step_epochs=0)
        torch.manual_seed(5)
        make_trainer(max_steps=2, **({"strategy": strategy} if strategy else {})).fit(module, event_batches(T=4))
        return module

    initial = dict(conv_net().named_parameters())
    reference = fit(False, None)
    exact = fit(True, TruncatedLocalBPTT(k=4, n=None))
    for (name, p), q in zip(reference.net.named_parameters(), exact.net.parameters(), strict=True):
        assert not torch.equal(p, initial[name]), f"{name} did not move: the comparison proves nothing"
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)
    local = fit(True, TruncatedLocalBPTT(k=2, n=1))
    assert isinstance(local.net, OptimizedModule)  # handed back compiled
    for name, p in original(local.net).named_parameters():
        assert not torch.equal(p, initial[name]), f"{name} did not learn"
