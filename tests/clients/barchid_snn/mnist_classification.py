"""MNIST rate-coded in the training step into a spiking LeNet-5 of ``nn.Sequential`` blocks, in a
``pytorch_lightning`` module: the pattern of Barchid/SNN (see README.md), written anew.

Patterns: the input is rate-coded (Bernoulli spikes, a fresh draw per call) inside ``training_step``, so every call of
the step draws new spikes; ``ConvBNLIF``/``LinearLIF`` subclass ``nn.Sequential`` with their own constructors; the
time mean of the hidden spikes feeds a non-spiking ``nn.Linear``; ``import pytorch_lightning as pl``.
"""

import pytorch_lightning as pl
import torch
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from torch import nn
from torch.nn import functional as F
from torchmetrics.functional import accuracy


def lif() -> nn.Module:
    # SpikingJelly 2.0: neuron.LIFNode(step_mode="m") instead of neuron.MultiStepLIFNode
    return neuron.LIFNode(
        tau=2.0, v_threshold=1.0, v_reset=0.0, surrogate_function=surrogate.ATan(alpha=2.0, spiking=True), step_mode="m"
    )


class ConvBNLIF(nn.Sequential):
    def __init__(self, in_channels, out_channels, kernel_size=3, dilation=1, stride=1):
        super().__init__()
        padding = kernel_size // 2 + dilation - 1
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False
        )
        self.add_module("conv_bn", layer.SeqToANNContainer(conv, nn.BatchNorm2d(out_channels)))
        self.add_module("lif", lif())


class LinearLIF(nn.Sequential):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.add_module("fc", layer.SeqToANNContainer(nn.Linear(in_channels, out_channels)))
        self.add_module("lif", lif())


class LeNet5(nn.Module):
    """[T, B, 1, 28, 28] spikes -> logits [B, out_channels]."""

    def __init__(self, out_channels):
        super().__init__()
        self.conv1 = ConvBNLIF(1, 12, kernel_size=5)
        self.conv2 = ConvBNLIF(12, 32, kernel_size=3, stride=2)  # 14
        self.conv3 = ConvBNLIF(32, 64, kernel_size=3, stride=2)  # 7
        self.flat = nn.Flatten(2)
        self.fc1 = LinearLIF(64 * 7 * 7, 64)
        self.fc_final = nn.Linear(64, out_channels)

    def forward(self, x):
        x = self.conv3(self.conv2(self.conv1(x)))
        x = self.fc1(self.flat(x))
        return self.fc_final(x.mean(0))


def rate_coding(images: torch.Tensor, timesteps: int = 100) -> torch.Tensor:
    """[B, C, H, W] intensities in [0, 1] -> [T, B, C, H, W] Bernoulli spikes (snntorch's ``spikegen.rate``)."""
    return torch.bernoulli(images.clamp(0, 1).unsqueeze(0).repeat(timesteps, *[1] * images.dim()))


class MNISTClassification(pl.LightningModule):
    def __init__(self, T: int, learning_rate=1e-3):
        super().__init__()
        self.T = T
        self.learning_rate = learning_rate
        self.model = LeNet5(10)

    def forward(self, x):
        functional.reset_net(self.model)
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        rate_x = rate_coding(x, self.T)
        y_hat = self(rate_x)
        loss = F.cross_entropy(y_hat, y)
        preds = torch.argmax(y_hat.clone().detach(), dim=1)
        acc = accuracy(preds, y, task="multiclass", num_classes=10)  # torchmetrics >= 0.11 needs the task
        self.log("train_loss", loss, on_epoch=True, prog_bar=True)
        self.log("train_acc", acc, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate)
