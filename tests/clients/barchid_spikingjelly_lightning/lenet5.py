"""A spiking LeNet-5 for N-MNIST built from ``nn.Sequential`` blocks with their own constructors, in a
``pytorch_lightning`` module: the pattern of Barchid/spikingjelly-lightning (see README.md), written anew.

Patterns: ``import pytorch_lightning as pl``; ``ConvBnSpike(in, out, ...)`` subclasses ``nn.Sequential`` and fills
itself with ``add_module`` (slicing such a Sequential calls this constructor); conv + BatchNorm inside a
``SeqToANNContainer``; the network averages its hidden spikes over time before a non-spiking ``nn.Linear`` head.
"""

import pytorch_lightning as pl
import torch
import torchmetrics
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from torch import nn
from torch.nn import functional as F

NEURONS = {"LIF": neuron.LIFNode, "PLIF": neuron.ParametricLIFNode, "IF": neuron.IFNode}


def spiking(neuron_model: str) -> nn.Module:
    # SpikingJelly 2.0: one class per neuron with step_mode="m" instead of MultiStep*Node
    return NEURONS[neuron_model](
        detach_reset=True, surrogate_function=surrogate.ATan(alpha=2.0, spiking=True), step_mode="m"
    )


class ConvBnSpike(nn.Sequential):
    """Conv (no bias) + BatchNorm + spiking neuron, on [T, B, C, H, W]."""

    def __init__(self, in_channels, out_channels, kernel_size=3, dilation=1, stride=1, neuron_model="LIF"):
        super().__init__()
        padding = kernel_size // 2 + dilation - 1
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False
        )
        self.add_module("conv_bn", layer.SeqToANNContainer(conv, nn.BatchNorm2d(out_channels)))
        self.add_module("spike", spiking(neuron_model))


class ConvSpike(nn.Sequential):
    """Conv (optional bias) + BatchNorm + spiking neuron: the strided convolutions that replace max pooling."""

    def __init__(self, in_channels, out_channels, kernel_size=3, dilation=1, stride=1, bias=True, neuron_model="LIF"):
        super().__init__()
        padding = kernel_size // 2 + dilation - 1
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=bias
        )
        self.add_module("conv_bn", layer.SeqToANNContainer(conv, nn.BatchNorm2d(out_channels)))
        self.add_module("spike", spiking(neuron_model))


class LinearSpike(nn.Sequential):
    """Linear + spiking neuron, on [T, B, C]."""

    def __init__(self, in_channels, out_channels, bias=True, neuron_model="LIF"):
        super().__init__()
        self.add_module("fc", layer.SeqToANNContainer(nn.Linear(in_channels, out_channels, bias=bias)))
        self.add_module("spike", spiking(neuron_model))


class SpikingLeNet5(nn.Module):
    """[T, B, C, 34, 34] -> logits [B, num_classes]: strided convolutions instead of pooling."""

    def __init__(self, in_channels: int, num_classes: int, neuron_model: str = "LIF", bias=True):
        super().__init__()
        self.conv1 = ConvBnSpike(in_channels, 20, kernel_size=5, neuron_model=neuron_model)
        self.stride1 = ConvSpike(20, 20, kernel_size=3, stride=2, bias=bias, neuron_model=neuron_model)
        self.conv2 = ConvBnSpike(20, 50, kernel_size=5, neuron_model=neuron_model)
        self.stride2 = ConvSpike(50, 50, kernel_size=3, stride=2, bias=bias, neuron_model=neuron_model)
        self.flat = nn.Flatten(start_dim=2)  # [T, B, C, H, W] -> [T, B, C*H*W]
        self.fc1 = LinearSpike(50 * 9 * 9, 120, bias=bias, neuron_model=neuron_model)  # 34x34 N-MNIST frames
        self.fc_final = nn.Linear(120, num_classes, bias=True)

    def forward(self, x):
        x = self.stride1(self.conv1(x))
        x = self.stride2(self.conv2(x))
        x = self.fc1(self.flat(x))
        return self.fc_final(x.mean(0))  # spike rates over time, then a non-spiking classifier


class Lenet5Module(pl.LightningModule):
    def __init__(self, learning_rate: float, neuron_model: str, bias: bool, timesteps: int, **kwargs):
        super().__init__()
        self.save_hyperparameters(ignore=["timesteps"])
        self.model = SpikingLeNet5(
            in_channels=2, num_classes=10, neuron_model=self.hparams.neuron_model, bias=self.hparams.bias
        )

    def forward(self, x):
        x = x.permute(1, 0, 2, 3, 4)  # [B, T, C, H, W] -> [T, B, C, H, W]
        functional.reset_net(self.model)
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        y_hat = self(x)
        loss = F.cross_entropy(y_hat, y)
        # torchmetrics >= 0.11 needs the task
        acc = torchmetrics.functional.accuracy(y_hat.clone().detach(), y, task="multiclass", num_classes=10)
        self.log("train_loss", loss, on_epoch=True, prog_bar=False)
        self.log("train_acc", acc, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)
