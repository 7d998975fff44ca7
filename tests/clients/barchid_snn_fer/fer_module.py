"""Facial-expression classification of event frames with a SEW ResNet whose output is an integrator's membrane
potential: the pattern of Barchid/snn-fer (``project/fer_module.py``, ``project/models/snn_models.py``; see
README.md), written anew.

Patterns: the network (``SNNModule``) permutes ``[B, T] -> [T, B]`` and calls ``reset_net`` in its own ``forward``; the
encoder folds time into the batch for plain torch layers (``seq_to_ann_forward``) and returns ``v_seq[-1]`` of a
non-firing ``IFNode``; dropout (``torch.nn.Dropout``) before that integrator; a ``nn.Linear`` head outside time; SGD
with a cosine schedule; ``import pytorch_lightning as pl``.
"""

import pytorch_lightning as pl
import torch
import torchmetrics
from barchid_dvs_ssl.sew_resnet import get_encoder_snn
from spikingjelly.activation_based import functional
from torch import nn
from torch.nn import functional as F


class SNNModule(nn.Module):
    def __init__(self, in_channels, timesteps, output_all, n_classes, **encoder_sizes):
        super().__init__()
        self.encoder = get_encoder_snn(in_channels, timesteps, output_all, fc_dropout=True, **encoder_sizes)
        self.fc = nn.Linear(encoder_sizes.get("widths", (512,))[-1], n_classes, bias=False)

    def forward(self, x):
        x = x.permute(1, 0, 2, 3, 4)
        functional.reset_net(self.encoder)  # IMPORTANT: always reset before a new forward
        functional.reset_net(self.fc)
        return self.fc(self.encoder(x))


class FerModule(pl.LightningModule):
    def __init__(self, learning_rate: float, timesteps: int, n_classes: int, epochs: int = 1, **kwargs):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder_sizes"])
        self.epochs = epochs  # the repository reads self.epochs without setting it
        self.n_classes = n_classes
        self.model = SNNModule(
            2, timesteps=timesteps, output_all=False, n_classes=n_classes, **kwargs.get("encoder_sizes", {})
        )

    def forward(self, x):
        return self.model(x)  # (B, T, C, H, W) -> (B, num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        y_hat = self(x)
        loss = F.cross_entropy(y_hat, y)
        acc = torchmetrics.functional.accuracy(
            y_hat.clone().detach(), y, task="multiclass", num_classes=self.n_classes
        )  # torchmetrics >= 0.11 needs the task
        self.log("train_loss", loss, on_epoch=True, prog_bar=False)
        self.log("train_acc", acc, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate, momentum=0.9, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.epochs)
        return [optimizer], [scheduler]

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):  # Lightning 2: no optimizer_idx
        optimizer.zero_grad(set_to_none=True)  # better perf
