"""Contrastive pre-training on two augmented views and supervised training with CutMix, for a multi-step spiking
backbone: a fixture of the patterns of maxime-vaillant/SpikeCLR (AGPL-3.0, so nothing of it is copied; see README.md).

Patterns: ``LitSelfSupervised`` calls the network once per view with ``reset_net`` after each call and never reads the
label of its ``((x_i, x_j), target)`` batch; ``LitSupervised`` mixes the batch in place with CutMix drawn from numpy in
``training_step`` and trains with a TET-style loss on ``[T, B, C]``; ``from pytorch_lightning import LightningModule``.
"""

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from torch import nn, optim


def lif() -> nn.Module:
    return neuron.LIFNode(tau=2.0, detach_reset=True, surrogate_function=surrogate.ATan())


def backbone(in_channels: int = 2, width: int = 8) -> nn.Sequential:
    """A small spiking VGG: [T, B, C, H, W] -> features [T, B, 2 * width]."""
    return nn.Sequential(
        layer.Conv2d(in_channels, width, 3, padding=1, bias=False),
        layer.BatchNorm2d(width),
        lif(),
        layer.MaxPool2d(2),
        layer.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        layer.BatchNorm2d(2 * width),
        lif(),
        layer.AdaptiveAvgPool2d((1, 1)),
        layer.Flatten(),
    )


class SpikeCLR(nn.Module):
    """Backbone and a spiking projection head; returns the representation and the projection, both [T, B, .]."""

    def __init__(self, n_features: int = 16, projection_dim: int = 8):
        super().__init__()
        self.backbone = backbone()
        self.projection_head = nn.Sequential(
            layer.Linear(n_features, 32), layer.BatchNorm1d(32), lif(), layer.Linear(32, projection_dim),
            layer.BatchNorm1d(projection_dim),
        )  # fmt: skip
        functional.set_step_mode(self, step_mode="m")

    def forward(self, x):
        h = self.backbone(x)
        return h, self.projection_head(h)


class Classifier(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.backbone, self.head = backbone(), layer.Linear(16, num_classes)
        functional.set_step_mode(self, step_mode="m")

    def forward(self, x):
        return self.head(self.backbone(x))  # [T, B, num_classes]


class TemporalNTXentLoss(nn.Module):
    """NT-Xent (SimCLR) on embeddings averaged over time."""

    def __init__(self, temperature: float = 0.5):
        super().__init__()
        self.temperature = temperature

    def forward(self, z_i, z_j):
        z = F.normalize(torch.cat([z_i.mean(0), z_j.mean(0)]), dim=1)
        n = z_i.shape[1]
        similarity = (z @ z.T).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -9e15)
        positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
        return F.cross_entropy(similarity / self.temperature, positives)


class LitSelfSupervised(LightningModule):
    def __init__(self, model, lr=1e-3, weight_decay=0.0, max_epochs=1):
        super().__init__()
        self.model = model
        self.criterion = TemporalNTXentLoss(temperature=0.2)
        self.lr, self.weight_decay, self.max_epochs = lr, weight_decay, max_epochs

    def forward(self, x_i, x_j):
        h_i, z_i = self.model(x_i)
        functional.reset_net(self.model)
        h_j, z_j = self.model(x_j)
        functional.reset_net(self.model)
        return h_i, h_j, z_i, z_j

    def training_step(self, batch, batch_idx):
        (x_i, x_j), _target = batch  # self-supervised: the label is not read
        x_i, x_j = x_i.permute(1, 0, 2, 3, 4), x_j.permute(1, 0, 2, 3, 4)  # [B, T] -> [T, B]
        _, _, z_i, z_j = self(x_i, x_j)
        loss = self.criterion(z_i, z_j)
        self.log("train_pretrain_loss", loss, prog_bar=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        optimizer = optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        scheduler = optim.lr_scheduler.CosineAnnealingLR(optimizer, eta_min=self.lr * 0.01, T_max=self.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def cutmix(batch, targets):
    """CutMix with numpy's random stream, editing ``batch`` [B, T, C, H, W] in place: sample i takes a box of sample
    i + 1; returns the batch, both targets and the kept fraction per sample."""
    n, (h, w) = len(targets), batch.shape[-2:]
    index = torch.arange(1, n + 1) % n
    lambdas = torch.zeros(n)
    for i in range(n):
        ratio = np.random.rand() * 0.9 + 0.1
        ch, cw = int(ratio * h), int(ratio * w)
        y0, x0 = np.random.randint(0, h - ch + 1), np.random.randint(0, w - cw + 1)
        batch[i, ..., y0 : y0 + ch, x0 : x0 + cw] = batch[index[i], ..., y0 : y0 + ch, x0 : x0 + cw]
        lambdas[i] = 1 - ratio**2
    return batch, targets, targets[index], lambdas


def tet_loss(out, targets, targets_b, lambdas):
    """Cross-entropy of the time-averaged logits, mixed as CutMix mixed the inputs."""
    logits = out.mean(0)
    mixed = lambdas * F.cross_entropy(logits, targets, reduction="none")
    return (mixed + (1 - lambdas) * F.cross_entropy(logits, targets_b, reduction="none")).mean()


class LitSupervised(LightningModule):
    def __init__(self, model, lr=1e-3, max_epochs=1):
        super().__init__()
        self.model = model
        self.lr, self.max_epochs = lr, max_epochs

    def forward(self, x):
        y = self.model(x)
        functional.reset_net(self.model)
        return y

    def training_step(self, batch, batch_idx):
        x, target = batch
        x, targets_a, targets_b, lambdas = cutmix(x, target)
        y = self(x.permute(1, 0, 2, 3, 4))
        loss = tet_loss(y, targets_a, targets_b, lambdas)
        self.log("train_loss", loss, prog_bar=True, on_epoch=True)
        self.log("train_top1", (y.mean(0).argmax(1) == target).float().mean(), prog_bar=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        optimizer = optim.AdamW(self.model.parameters(), lr=self.lr)
        return {
            "optimizer": optimizer,
            "lr_scheduler": optim.lr_scheduler.CosineAnnealingLR(optimizer, self.max_epochs),
        }
