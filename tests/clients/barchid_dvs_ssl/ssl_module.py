"""Self-supervised Barlow Twins on two augmented views of event data through one spiking encoder: the pattern of
Barchid/dvs_ssl (``project/ssl_module.py``, ``SSLModule`` with ``enc1 == enc2 == "snn"``; see README.md), written anew.

Patterns: the encoder is called twice per step, ``reset_net`` before each view; the batch is
``((X, Y_a, Y_b), label)`` and the loss never reads the label; a non-spiking MLP projector with ``BatchNorm1d`` on the
encoder's ``[B, 512]`` output; ``import pytorch_lightning as pl``.
"""

import pytorch_lightning as pl
import torch
from spikingjelly.activation_based import functional
from torch import nn

from barchid_dvs_ssl.sew_resnet import get_encoder_snn


def get_projector(in_channels: int = 512) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_channels, 3 * in_channels),
        nn.BatchNorm1d(3 * in_channels),
        nn.ReLU(),
        nn.Linear(3 * in_channels, 3 * in_channels),
        nn.BatchNorm1d(3 * in_channels),
        nn.ReLU(),
        nn.Linear(3 * in_channels, 3 * in_channels),
    )


class BarlowTwinsLoss(nn.Module):
    def __init__(self, lambda_coeff=5e-3):
        super().__init__()
        self.lambda_coeff = lambda_coeff

    def _off_diagonal(self, x):
        n, m = x.shape
        assert n == m
        return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()

    def forward(self, Z_a, Z_b):
        batch_size = Z_a.shape[0]
        Z_a = (Z_a - Z_a.mean(0)) / (Z_a.std(0) + 1e-5)  # normalised along the batch
        Z_b = (Z_b - Z_b.mean(0)) / (Z_b.std(0) + 1e-5)
        cross_corr = torch.matmul(Z_a.T, Z_b) / batch_size
        on_diag = torch.diagonal(cross_corr).add(-1).pow(2).sum()
        off_diag = self._off_diagonal(cross_corr).pow(2).sum()
        return on_diag + self.lambda_coeff * off_diag


class SSLModule(pl.LightningModule):
    def __init__(self, learning_rate: float, epochs: int, timesteps: int, encoder_sizes: dict | None = None, **kwargs):
        super().__init__()
        self.save_hyperparameters(ignore=["epochs", "timesteps", "encoder_sizes"])
        self.epochs = epochs
        sizes = encoder_sizes or {}
        self.encoder = get_encoder_snn(2, timesteps, output_all=False, **sizes)
        self.projector = get_projector(sizes.get("widths", (512,))[-1])
        self.criterion = BarlowTwinsLoss()

    def forward(self, Y):
        Y = Y.permute(1, 0, 2, 3, 4)  # [B, T, C, H, W] -> [T, B, C, H, W]
        functional.reset_net(self.encoder)
        return self.encoder(Y)

    def shared_step(self, batch):
        (_X, Y_a, Y_b), _label = batch  # the label is not read: self-supervised
        Z_a = self.projector(self(Y_a))
        Z_b = self.projector(self(Y_b))
        return self.criterion(Z_a, Z_b)

    def training_step(self, batch, batch_idx):
        loss = self.shared_step(batch)
        self.log("train_loss", loss, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate, momentum=0.9, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.epochs)
        return [optimizer], [scheduler]

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):  # Lightning 2: no optimizer_idx
        optimizer.zero_grad(set_to_none=True)
