"""A multi-step SEW ResNet whose torch layers run through ``functional.seq_to_ann_forward`` and whose output is the
membrane potential of a non-firing integrator at the last step: the encoder pattern of Barchid/dvs_ssl and
Barchid/snn-fer (``project/models/sew_resnet.py``, ``MultiStepSEWResNet``; see README.md), written anew.

Patterns: plain ``nn.Conv2d``/``nn.BatchNorm2d``/pooling modules called on ``x_seq.flatten(0, 1)`` (time folded into
the batch) rather than SpikingJelly's multi-step layers; SEW residual blocks (``ADD``); an ``IFNode`` with an infinite
threshold integrates the last ``nn.Linear`` over time and the network returns its ``v_seq[-1]``, ``[B, D]``.
"""

import torch
from spikingjelly.activation_based import functional, neuron, surrogate
from torch import nn


def if_node(**kwargs) -> nn.Module:
    # SpikingJelly 2.0: neuron.IFNode(step_mode="m") instead of neuron.MultiStepIFNode
    return neuron.IFNode(step_mode="m", **kwargs)


def sew_function(x: torch.Tensor, y: torch.Tensor, cnf: str) -> torch.Tensor:
    if cnf == "ADD":
        return x + y
    if cnf == "AND":
        return x * y
    if cnf == "IAND":
        return x * (1.0 - y)
    raise NotImplementedError(cnf)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class MultiStepBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, cnf="ADD", **kwargs):
        super().__init__()
        self.conv1, self.bn1, self.sn1 = conv3x3(inplanes, planes, stride), nn.BatchNorm2d(planes), if_node(**kwargs)
        self.conv2, self.bn2, self.sn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes), if_node(**kwargs)
        self.downsample = downsample
        if downsample is not None:
            self.downsample_sn = if_node(**kwargs)
        self.cnf = cnf

    def forward(self, x_seq):
        out = self.sn1(functional.seq_to_ann_forward(x_seq, [self.conv1, self.bn1]))
        out = self.sn2(functional.seq_to_ann_forward(out, [self.conv2, self.bn2]))
        identity = x_seq
        if self.downsample is not None:
            identity = self.downsample_sn(functional.seq_to_ann_forward(x_seq, self.downsample))
        return sew_function(identity, out, self.cnf)


class MultiStepSEWResNet(nn.Module):
    """[T, N, C, H, W] -> [N, D] (``output_all=False``: the integrator's last membrane potential) or [T, N, D] spikes.

    ``widths`` and ``layers`` default to SEW-ResNet-18's; the tests shrink them.
    """

    def __init__(
        self, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), zero_init_residual=False, output_all=False,
        T=None, cnf="ADD", fc_dropout=False, **kwargs,
    ):  # fmt: skip
        super().__init__()
        self.output_all, self.T = output_all, T
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.sn1 = if_node(**kwargs)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], layers[0], 1, cnf, **kwargs)
        self.layer2 = self._make_layer(widths[1], layers[1], 2, cnf, **kwargs)
        self.layer3 = self._make_layer(widths[2], layers[2], 2, cnf, **kwargs)
        self.layer4 = self._make_layer(widths[3], layers[3], 2, cnf, **kwargs)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        fc = nn.Linear(widths[3], widths[3])
        self.fc = nn.Sequential(fc, nn.Dropout()) if fc_dropout else fc  # snn-fer adds dropout, dvs_ssl does not
        self.final_neurons = if_node(
            v_threshold=1.0 if output_all else float("inf"),  # a pure integrator unless every step is output
            v_reset=0.0,
            detach_reset=True,
            surrogate_function=surrogate.ATan(),
            store_v_seq=True,  # SpikingJelly 2.0 records v_seq only when asked
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, MultiStepBasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, planes, blocks, stride, cnf, **kwargs):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [MultiStepBasicBlock(self.inplanes, planes, stride, downsample, cnf, **kwargs)]
        self.inplanes = planes
        layers += [MultiStepBasicBlock(planes, planes, cnf=cnf, **kwargs) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        if x.dim() == 5:  # [T, N, C, H, W]
            x_seq = functional.seq_to_ann_forward(x, [self.conv1, self.bn1])
        else:  # [N, C, H, W]: the stem runs once, its output repeated over T
            assert self.T is not None, "When x.shape is [N, C, H, W], self.T can not be None."
            x_seq = self.bn1(self.conv1(x)).unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        x_seq = functional.seq_to_ann_forward(self.sn1(x_seq), self.maxpool)
        x_seq = self.layer4(self.layer3(self.layer2(self.layer1(x_seq))))
        x_seq = torch.flatten(functional.seq_to_ann_forward(x_seq, self.avgpool), 2)
        x_seq = self.final_neurons(functional.seq_to_ann_forward(x_seq, self.fc))
        if self.output_all:
            return x_seq
        return self.final_neurons.v_seq[-1]


def get_encoder_snn(in_channels: int, T: int, output_all: bool, **sizes) -> MultiStepSEWResNet:
    """SEW-ResNet-18 (IF neurons, ATan, detach_reset) with its first conv for ``in_channels`` (2 for events)."""
    resnet = MultiStepSEWResNet(
        zero_init_residual=True, T=T, cnf="ADD", detach_reset=True, surrogate_function=surrogate.ATan(),
        output_all=output_all, **sizes,
    )  # fmt: skip
    if in_channels != 3:
        resnet.conv1 = nn.Conv2d(in_channels, resnet.conv1.out_channels, 7, stride=2, padding=3, bias=False)
    return resnet
