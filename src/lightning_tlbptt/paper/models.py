"""The paper's spiking networks (Guo et al. 2023, Table 2) as SpikingJelly multi-step networks.

Every builder returns a flat :class:`torch.nn.Sequential` of ``spikingjelly.activation_based``
modules in multi-step mode: input ``[T, B, C, H, W]``, output ``[T, B, num_classes]``. Flat, so
that a partitioner can cut the network into local blocks between layers; a SEW residual block is
one :class:`~spikingjelly.activation_based.model.sew_resnet.BasicBlock` child and is meant to be
treated as one indivisible layer.

Reading of Table 2 (``C``: conv, ``AP``: average pooling, ``FC``: fully connected, ``RB``: SEW
residual block of two 3x3 convs); the architecture strings below are the table's, minus the output
layer, whose width is ``num_classes``:

* Neurons. Every conv and FC is followed by the paper's LIF neuron
  (:class:`~lightning_tlbptt.paper.neuron.PaperNeuron`). Section
  3.2 says of LeNet that a LIF layer follows *each* layer, pooling included, "so that each layer
  outputs spikes"; we apply that to the average pools of all five networks (``spiking_pool=True``)
  so that every conv after the first receives binary spikes, which is what the paper's addition
  and MAC counts assume. The first conv receives the analog image or event frame (direct
  encoding, section 3.3).
* Output layer. LeNet and AlexNet are trained with the MSE between a one-hot target and the output
  firing rate (Eq. 3), so their output FC is followed by a LIF and the net emits spikes. VGG11 and
  ResNet18 are trained with cross-entropy (section 3.1), so their output FC has no neuron and
  emits real-valued logits per time step (average them over T before the loss).
* Batch norm. Only VGG11 and ResNet18 (Table 2 footnote): after each conv and each hidden FC, not
  after the output FC, whose outputs are logits. Convs and FCs followed by BN have no bias.
* Padding is not given in the paper. LeNet follows LeNet-5: the first conv is padded to "same"
  (LeNet-5 pads 28x28 MNIST to 32x32), later convs are unpadded, so on 28x28 EMNIST
  ``6C5-6AP2-16C5-16AP2-120C5`` gives 28-14-10-5-1 and the last conv yields 120 features, as in
  LeNet-5. The 3x3 convs of AlexNet, VGG11 and ResNet18 are all padded to "same" (on 32x32 CIFAR10,
  AlexNet without padding collapses before its last conv).
* ResNet18: ``32C3`` stem (conv, BN, LIF), then SEW blocks with ``cnf='ADD'`` (Fang et al. 2021);
  a block that changes the width halves the resolution (stride 2) and projects the shortcut with
  a strided 1x1 conv, BN and LIF, as in SpikingJelly's ``sew_resnet``. The global average pool
  feeds the output FC directly, as in SEW-ResNet.
* Dropout (``dropout > 0``): section 3.1 adds a dropout layer after each conv and FC layer; we
  place it after that layer's neuron (after the residual block for ResNet18), never after the
  output layer. SpikingJelly's ``layer.Dropout`` keeps one mask for all time steps of a sequence.

Each network's default input size, output width and neuron are those of the dataset Table 2 trains it on, read
from :data:`~lightning_tlbptt.paper.settings.DATASETS` (Table 1): the paper's values are stored there only.

Feature-map sizes are not computed by hand: each layer is run once on a one-step, one-sample zero
input while the network is built, which sizes the first FC for any input size and reports an input
that is too small for the architecture as a ``ValueError``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from spikingjelly.activation_based import functional, layer
from spikingjelly.activation_based.model import sew_resnet
from spikingjelly.activation_based.neuron import LIFNode
from torch import nn

from lightning_tlbptt.paper.neuron import PaperNeuron
from lightning_tlbptt.paper.settings import DATASETS

__all__ = [
    "ARCHITECTURES",
    "MODELS",
    "Architecture",
    "alexnet",
    "build_model",
    "lenet1",
    "lenet2",
    "resnet18",
    "vgg11",
]

_TOKEN = re.compile(r"^(?:(?P<conv>\d+)C(?P<ck>\d+)|(?P<pool>\d+)AP(?P<pk>\d+)|(?P<fc>\d+)FC|(?P<rb>\d+)RB|AAP)$")


@dataclass(frozen=True)
class Architecture:
    """One network of Table 2 and how it is built.

    Attributes:
        title: the network's name in the paper.
        arch: its layers in Table 2's notation, without the output FC (whose width is the class count).
        dataset: key of :data:`~lightning_tlbptt.paper.settings.DATASETS` the paper trains it on; its input size,
            class count and neuron are the builder's defaults.
        batch_norm: batch norm after each conv and hidden FC (Table 2 footnote), which then have no bias.
        output_neuron: a LIF after the output FC (spikes, MSE on rates, Eq. 3) or none (logits, cross-entropy).
        same_padding_after_first: pad every conv to "same", not only the first.
    """

    title: str
    arch: str
    dataset: str
    batch_norm: bool
    output_neuron: bool
    same_padding_after_first: bool


# fmt: off
ARCHITECTURES: dict[str, Architecture] = {
    # name:     Architecture(title, Table 2 without the output FC, dataset, batch_norm, output_neuron, same padding)
    "lenet1":   Architecture("LeNet-1", "6C5-6AP2-16C5-16AP2-120C5-128FC", "emnist", False, True, False),
    "lenet2":   Architecture("LeNet-2", "64C5-64AP2-128C5-128AP2-128C5-256FC", "dvs_gesture", False, True, False),
    "alexnet":  Architecture("AlexNet", "96C3-256C3-256AP2-384C3-384AP2-512C3-384C3-256C3-4096FC-1024FC",
                             "cifar10", False, True, True),
    "vgg11":    Architecture("VGG11 with batch norm",
                             "32C3-32AP2-64C3-64AP2-128C3-128C3-128AP2-256C3-256C3-256AP2-"
                             "512C3-512C3-512AP2-1024FC-1024FC",
                             "n_caltech101", True, False, True),
    "resnet18": Architecture("SEW-ResNet18 with batch norm", "32C3-32RB-32RB-64RB-64RB-128RB-128RB-256RB-256RB-AAP",
                             "tiny_es_imagenet", True, False, True),
}
# fmt: on


class _Builder:
    """Appends layers while pushing a ``[1, 1, C, H, W]`` zero input through each new one.

    The dummy forward sizes the first FC and turns a too-small input into a clear error instead
    of a shape error deep inside a conv.
    """

    def __init__(
        self, name: str, in_channels: int, input_size: tuple[int, int], neuron: PaperNeuron, dropout: float
    ) -> None:
        self.name = name
        self.input_size = input_size
        self.neuron = neuron
        self.dropout = dropout
        self.layers: list[nn.Module] = []
        self.x = torch.zeros(1, 1, in_channels, *input_size)

    @property
    def channels(self) -> int:
        return self.x.shape[2]

    def add(self, module: nn.Module) -> None:
        functional.set_step_mode(module, "m")
        was_training = module.training
        # Eval mode so that the dummy input leaves no trace in batch-norm running statistics.
        module.train(False)
        with torch.no_grad():
            self.x = module(self.x)
        module.train(was_training)
        self.layers.append(module)

    def spike(self) -> None:
        self.add(self.neuron.make())

    def regularise(self) -> None:
        if self.dropout > 0:
            self.add(layer.Dropout(self.dropout))

    def check_fits(self, token: str, kernel: int, padding: int) -> None:
        h, w = self.x.shape[-2:]
        if min(h, w) + 2 * padding < kernel:
            raise ValueError(
                f"{self.name}: input_size={self.input_size} is too small: layer {token!r} receives a "
                f"{h}x{w} feature map but needs at least {kernel - 2 * padding}x{kernel - 2 * padding}"
            )

    def flatten(self) -> None:
        if self.x.dim() > 3:
            self.add(layer.Flatten())

    def build(self) -> nn.Sequential:
        net = nn.Sequential(*self.layers)
        functional.reset_net(net)
        return net


def _assemble(
    name: str,
    net: Architecture,
    arch: str,
    *,
    in_channels: int,
    num_classes: int,
    input_size: int | tuple[int, int],
    neuron: PaperNeuron,
    dropout: float,
    spiking_pool: bool,
) -> nn.Sequential:
    """Build ``arch`` (Table 2 notation) the way ``net`` is built, followed by an output FC of ``num_classes``."""
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name}: input_size must be a positive int or (H, W), got {input_size!r}")
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"{name}: in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must lie in [0, 1), got {dropout}")

    b = _Builder(name, in_channels, size, neuron, dropout)
    first_conv = True
    for token in arch.split("-"):
        m = _TOKEN.match(token)
        if m is None:
            raise ValueError(f"{name}: cannot parse architecture token {token!r}")
        if m["conv"]:
            out, k = int(m["conv"]), int(m["ck"])
            padding = k // 2 if first_conv or net.same_padding_after_first else 0
            first_conv = False
            b.check_fits(token, k, padding)
            b.add(layer.Conv2d(b.channels, out, k, padding=padding, bias=not net.batch_norm))
            if net.batch_norm:
                b.add(layer.BatchNorm2d(out))
            b.spike()
            b.regularise()
        elif m["pool"]:
            k = int(m["pk"])
            b.check_fits(token, k, 0)
            b.add(layer.AvgPool2d(k))
            if spiking_pool:
                b.spike()
        elif m["rb"]:
            out = int(m["rb"])
            stride = 1 if out == b.channels else 2
            b.check_fits(token, 3, 1)
            shortcut = None
            if stride != 1:
                shortcut = nn.Sequential(sew_resnet.conv1x1(b.channels, out, stride), layer.BatchNorm2d(out))
            b.add(
                sew_resnet.BasicBlock(
                    b.channels,
                    out,
                    stride=stride,
                    downsample=shortcut,
                    norm_layer=layer.BatchNorm2d,
                    cnf="ADD",
                    spiking_neuron=LIFNode,
                    **neuron.lif_kwargs(),
                )
            )
            b.regularise()
        elif m["fc"]:
            out = int(m["fc"])
            b.flatten()
            b.add(layer.Linear(b.x.shape[-1], out, bias=not net.batch_norm))
            if net.batch_norm:
                b.add(layer.BatchNorm1d(out))
            b.spike()
            b.regularise()
        else:  # AAP: global average pooling
            b.add(layer.AdaptiveAvgPool2d((1, 1)))
    b.flatten()
    b.add(layer.Linear(b.x.shape[-1], num_classes))
    if net.output_neuron:
        b.spike()
    return b.build()


def build_model(
    name: str,
    in_channels: int | None = None,
    num_classes: int | None = None,
    input_size: int | tuple[int, int] | None = None,
    *,
    neuron: PaperNeuron | None = None,
    dropout: float = 0.0,
    spiking_pool: bool = True,
    arch: str | None = None,
) -> nn.Sequential:
    """Build the Table 2 network ``name`` (a key of :data:`ARCHITECTURES`).

    Args:
        name: ``lenet1``, ``lenet2``, ``alexnet``, ``vgg11`` or ``resnet18``.
        in_channels: ``C`` of the input; default: the paper's dataset for this network (``Architecture.dataset``).
        num_classes: width of the output layer; default: that dataset's class count.
        input_size: ``(H, W)`` (or a side) of the input; default: that dataset's.
        neuron: the LIF neuron of every layer; default: that dataset's Table 1 neuron.
        dropout: dropout rate after every hidden layer's neuron (0 disables it).
        spiking_pool: a LIF after every average pool, so that every conv after the first receives spikes.
        arch: other layers in Table 2's notation (e.g. narrower ones), built the way ``name`` is.
    """
    try:
        net = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(sorted(ARCHITECTURES))}") from None
    paper = DATASETS[net.dataset]
    return _assemble(
        name,
        net,
        net.arch if arch is None else arch,
        in_channels=paper.in_channels if in_channels is None else in_channels,
        num_classes=paper.num_classes if num_classes is None else num_classes,
        input_size=paper.input_size if input_size is None else input_size,
        neuron=paper.neuron if neuron is None else neuron,
        dropout=dropout,
        spiking_pool=spiking_pool,
    )


def _builder(name: str) -> Callable[..., nn.Sequential]:
    """The public builder of one network: :func:`build_model` with ``name`` fixed, documented from the tables."""
    net = ARCHITECTURES[name]
    output = (
        "spikes (LIF after the output FC; MSE on firing rates, Eq. 3)"
        if net.output_neuron
        else "logits: the output FC has no neuron (cross-entropy, section 3.1)"
    )

    def build(
        in_channels: int | None = None,
        num_classes: int | None = None,
        input_size: int | tuple[int, int] | None = None,
        **options: Any,
    ) -> nn.Sequential:
        return build_model(name, in_channels, num_classes, input_size, **options)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"Spiking {net.title}, ``{net.arch}-{{num_classes}}FC`` (Table 2; the paper trains it on "
        f"``{net.dataset}``, whose input, class count and neuron are the defaults).\n\n"
        f"Output ``[T, B, num_classes]`` {output}. Options: those of :func:`build_model`."
    )
    return build


lenet1 = _builder("lenet1")
lenet2 = _builder("lenet2")
alexnet = _builder("alexnet")
vgg11 = _builder("vgg11")
resnet18 = _builder("resnet18")

MODELS: dict[str, Callable[..., nn.Sequential]] = {
    "lenet1": lenet1,
    "lenet2": lenet2,
    "alexnet": alexnet,
    "vgg11": vgg11,
    "resnet18": resnet18,
}
"""The public builders by name."""
