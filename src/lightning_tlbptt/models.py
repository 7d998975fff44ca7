"""The paper's spiking networks (Guo et al. 2023, Table 2) as SpikingJelly multi-step networks.

Every builder returns a flat :class:`torch.nn.Sequential` of ``spikingjelly.activation_based``
modules in multi-step mode: input ``[T, B, C, H, W]``, output ``[T, B, num_classes]``. Flat, so
that a partitioner can cut the network into local blocks between layers; a SEW residual block is
one :class:`~spikingjelly.activation_based.model.sew_resnet.BasicBlock` child and is meant to be
treated as one indivisible layer.

Reading of Table 2 (``C``: conv, ``AP``: average pooling, ``FC``: fully connected, ``RB``: SEW
residual block of two 3x3 convs); the architecture strings below are the table's, minus the output
layer, whose width is ``num_classes``:

* Neurons. Every conv and FC is followed by the paper's LIF neuron (:class:`PaperNeuron`). Section
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
from spikingjelly.activation_based import functional, layer, surrogate
from spikingjelly.activation_based.model import sew_resnet
from spikingjelly.activation_based.neuron import LIFNode
from torch import nn

__all__ = [
    "MODELS",
    "PaperNeuron",
    "alexnet",
    "build_model",
    "lenet1",
    "lenet2",
    "resnet18",
    "vgg11",
]

# Table 2, without the output FC (its width is the class count of the dataset).
LENET1_ARCH = "6C5-6AP2-16C5-16AP2-120C5-128FC"
LENET2_ARCH = "64C5-64AP2-128C5-128AP2-128C5-256FC"
ALEXNET_ARCH = "96C3-256C3-256AP2-384C3-384AP2-512C3-384C3-256C3-4096FC-1024FC"
VGG11_ARCH = "32C3-32AP2-64C3-64AP2-128C3-128C3-128AP2-256C3-256C3-256AP2-512C3-512C3-512AP2-1024FC-1024FC"
RESNET18_ARCH = "32C3-32RB-32RB-64RB-64RB-128RB-128RB-256RB-256RB-AAP"

_TOKEN = re.compile(r"^(?:(?P<conv>\d+)C(?P<ck>\d+)|(?P<pool>\d+)AP(?P<pk>\d+)|(?P<fc>\d+)FC|(?P<rb>\d+)RB|AAP)$")


@dataclass(frozen=True)
class PaperNeuron:
    """The paper's LIF neuron (Eqs. 1, 2, 6) as SpikingJelly ``LIFNode`` settings.

    The paper's leaky constant is a decay factor: ``u <- tau_p * u + W s`` (Eq. 1). SpikingJelly's
    ``LIFNode(tau, decay_input=False, v_reset=None)`` computes ``u <- (1 - 1/tau) * u + x``, so
    ``tau = 1 / (1 - tau_p)``. ``v_reset=None`` is the soft reset, which subtracts the threshold:
    the paper's reset constant theta is taken equal to ``u_th``. The rectangular surrogate of width
    ``a`` and height ``1/a`` (Eq. 6) is ``surrogate.Rect(alpha=1/a)``.

    Args:
        tau_p: leaky constant (decay factor per time step), in (0, 1). Table 1 uses 0.3-0.9.
        u_th: firing threshold, > 0.
        a: width of the rectangular surrogate gradient window, > 0 (0.5 in all of Table 1).
        detach_reset: detach the reset term from the graph; ``False`` back-propagates through it,
            as Eq. 4 (its ``-theta`` term) does.
    """

    tau_p: float = 0.8
    u_th: float = 0.5
    a: float = 0.5
    detach_reset: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.tau_p < 1.0:
            raise ValueError(f"tau_p must lie in (0, 1) (decay factor per step), got {self.tau_p}")
        if not self.u_th > 0.0:
            raise ValueError(f"u_th (firing threshold) must be > 0, got {self.u_th}")
        if not self.a > 0.0:
            raise ValueError(f"a (surrogate gradient width) must be > 0, got {self.a}")

    def lif_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``neuron.LIFNode`` for this neuron, in multi-step mode."""
        return {
            # SpikingJelly asserts python floats with tau > 1.
            "tau": float(1.0 / (1.0 - self.tau_p)),
            "decay_input": False,
            "v_threshold": float(self.u_th),
            "v_reset": None,
            "surrogate_function": surrogate.Rect(alpha=1.0 / self.a),
            "detach_reset": self.detach_reset,
            "step_mode": "m",
        }

    def make(self) -> LIFNode:
        """A new ``LIFNode`` in multi-step mode (input ``[T, ...]``)."""
        return LIFNode(**self.lif_kwargs())


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


def _build(
    name: str,
    arch: str,
    *,
    in_channels: int,
    num_classes: int,
    input_size: int | tuple[int, int],
    neuron: PaperNeuron,
    dropout: float,
    batch_norm: bool,
    output_neuron: bool,
    spiking_pool: bool,
    same_padding_after_first: bool,
) -> nn.Sequential:
    """Build ``arch`` (Table 2 notation) followed by an output FC of ``num_classes`` units."""
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
            padding = k // 2 if first_conv or same_padding_after_first else 0
            first_conv = False
            b.check_fits(token, k, padding)
            b.add(layer.Conv2d(b.channels, out, k, padding=padding, bias=not batch_norm))
            if batch_norm:
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
            b.add(layer.Linear(b.x.shape[-1], out, bias=not batch_norm))
            if batch_norm:
                b.add(layer.BatchNorm1d(out))
            b.spike()
            b.regularise()
        else:  # AAP: global average pooling
            b.add(layer.AdaptiveAvgPool2d((1, 1)))
    b.flatten()
    b.add(layer.Linear(b.x.shape[-1], num_classes))
    if output_neuron:
        b.spike()
    return b.build()


def lenet1(
    in_channels: int = 1,
    num_classes: int = 47,
    input_size: int | tuple[int, int] = (28, 28),
    *,
    neuron: PaperNeuron = PaperNeuron(tau_p=0.9),
    dropout: float = 0.0,
    spiking_pool: bool = True,
) -> nn.Sequential:
    """Spiking LeNet-1, ``6C5-6AP2-16C5-16AP2-120C5-128FC-{num_classes}FC`` (EMNIST in the paper).

    Output ``[T, B, num_classes]`` spikes (LIF after the output FC; MSE on firing rates, Eq. 3).
    """
    return _build(
        "lenet1",
        LENET1_ARCH,
        in_channels=in_channels,
        num_classes=num_classes,
        input_size=input_size,
        neuron=neuron,
        dropout=dropout,
        batch_norm=False,
        output_neuron=True,
        spiking_pool=spiking_pool,
        same_padding_after_first=False,
    )


def lenet2(
    in_channels: int = 2,
    num_classes: int = 11,
    input_size: int | tuple[int, int] = (128, 128),
    *,
    neuron: PaperNeuron = PaperNeuron(tau_p=0.3, u_th=0.35),
    dropout: float = 0.0,
    spiking_pool: bool = True,
) -> nn.Sequential:
    """Spiking LeNet-2, ``64C5-64AP2-128C5-128AP2-128C5-256FC-{num_classes}FC`` (DvsGesture).

    Output ``[T, B, num_classes]`` spikes (LIF after the output FC; MSE on firing rates, Eq. 3).
    """
    return _build(
        "lenet2",
        LENET2_ARCH,
        in_channels=in_channels,
        num_classes=num_classes,
        input_size=input_size,
        neuron=neuron,
        dropout=dropout,
        batch_norm=False,
        output_neuron=True,
        spiking_pool=spiking_pool,
        same_padding_after_first=False,
    )


def alexnet(
    in_channels: int = 3,
    num_classes: int = 10,
    input_size: int | tuple[int, int] = (32, 32),
    *,
    neuron: PaperNeuron = PaperNeuron(tau_p=0.8, u_th=0.4),
    dropout: float = 0.0,
    spiking_pool: bool = True,
) -> nn.Sequential:
    """Spiking AlexNet, ``96C3-256C3-256AP2-384C3-384AP2-512C3-384C3-256C3-4096FC-1024FC-{n}FC``.

    CIFAR10 and CIFAR10-DVS in the paper. Output ``[T, B, num_classes]`` spikes (LIF after the
    output FC; MSE on firing rates, Eq. 3).
    """
    return _build(
        "alexnet",
        ALEXNET_ARCH,
        in_channels=in_channels,
        num_classes=num_classes,
        input_size=input_size,
        neuron=neuron,
        dropout=dropout,
        batch_norm=False,
        output_neuron=True,
        spiking_pool=spiking_pool,
        same_padding_after_first=True,
    )


def vgg11(
    in_channels: int = 2,
    num_classes: int = 101,
    input_size: int | tuple[int, int] = (48, 64),
    *,
    neuron: PaperNeuron = PaperNeuron(tau_p=0.5, u_th=0.5),
    dropout: float = 0.0,
    spiking_pool: bool = True,
) -> nn.Sequential:
    """Spiking VGG11 with batch norm (N-Caltech101 in the paper).

    ``32C3-32AP2-64C3-64AP2-128C3x2-128AP2-256C3x2-256AP2-512C3x2-512AP2-1024FC-1024FC-{n}FC``.
    Output ``[T, B, num_classes]`` logits: the output FC has no neuron (cross-entropy, section 3.1).
    """
    return _build(
        "vgg11",
        VGG11_ARCH,
        in_channels=in_channels,
        num_classes=num_classes,
        input_size=input_size,
        neuron=neuron,
        dropout=dropout,
        batch_norm=True,
        output_neuron=False,
        spiking_pool=spiking_pool,
        same_padding_after_first=True,
    )


def resnet18(
    in_channels: int = 2,
    num_classes: int = 200,
    input_size: int | tuple[int, int] = (64, 64),
    *,
    neuron: PaperNeuron = PaperNeuron(tau_p=0.5, u_th=0.65),
    dropout: float = 0.0,
    spiking_pool: bool = True,
) -> nn.Sequential:
    """Spiking SEW-ResNet18 with batch norm, ``32C3-32RBx2-64RBx2-128RBx2-256RBx2-AdaptiveAP-{n}FC``.

    Tiny-ES-ImageNet in the paper. Each ``RB`` is one SpikingJelly SEW ``BasicBlock`` (two 3x3
    convs, ``cnf='ADD'``). Output ``[T, B, num_classes]`` logits: the output FC has no neuron
    (cross-entropy, section 3.1). ``spiking_pool`` is accepted for a uniform signature; ResNet18
    has no ``AP2`` layer and its global pool feeds the output FC directly.
    """
    return _build(
        "resnet18",
        RESNET18_ARCH,
        in_channels=in_channels,
        num_classes=num_classes,
        input_size=input_size,
        neuron=neuron,
        dropout=dropout,
        batch_norm=True,
        output_neuron=False,
        spiking_pool=spiking_pool,
        same_padding_after_first=True,
    )


MODELS: dict[str, Callable[..., nn.Sequential]] = {
    "lenet1": lenet1,
    "lenet2": lenet2,
    "alexnet": alexnet,
    "vgg11": vgg11,
    "resnet18": resnet18,
}


def build_model(name: str, **kwargs: Any) -> nn.Sequential:
    """Build the network ``name`` from :data:`MODELS`, passing ``kwargs`` to its builder."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(sorted(MODELS))}") from None
    return builder(**kwargs)
