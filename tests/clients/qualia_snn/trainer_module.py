"""Single-step spiking MLPs whose time loop lives in the LightningModule's ``forward``: a fixture of the patterns of
LEAT-EDGE/qualia-plugin-snn's SpikingJelly learning frameworks on qualia-core's ``TrainerModule`` (both AGPL-3.0, so
nothing of them is copied; see README.md).

Patterns: the network runs in single-step mode and ``forward`` calls it once per time step, either on a static input
``[N, C, S]`` repeated ``timesteps`` times or on the steps of a ``[N, T, C, S]`` batch, after checking that ``T`` is the
model's ``timesteps``; the output is the mean over steps; targets are one-hot ``[B, C]``; metrics are a
``MetricCollection`` logged with ``log_dict``; ``from pytorch_lightning import LightningModule``.
"""

import itertools
import math

import torch
import torchmetrics
from pytorch_lightning import LightningModule
from spikingjelly.activation_based import functional, layer, neuron
from torch import nn


class SMLP(nn.Module):
    """Flatten, [Linear, IF] per hidden width, and a Linear to the classes; ``timesteps`` steps per sample."""

    def __init__(self, input_shape, output_shape, units, timesteps, step_mode="s"):
        super().__init__()
        self.timesteps = timesteps
        layers = {"flatten1": layer.Flatten(step_mode=step_mode)}
        widths = [math.prod(input_shape), *units]
        for i, (n_in, n_out) in enumerate(itertools.pairwise(widths), start=1):
            layers[f"fc{i}"] = layer.Linear(n_in, n_out, step_mode=step_mode)
            layers[f"neuron{i}"] = neuron.IFNode(v_reset=None, detach_reset=True, step_mode=step_mode)
        layers[f"fc{len(widths)}"] = layer.Linear(widths[-1], output_shape[0], step_mode=step_mode)
        self.layers = nn.ModuleDict(layers)

    def forward(self, input):
        x = input
        for name in self.layers:
            x = self.layers[name](x)
        return x


class CrossEntropyLossOneHot(nn.CrossEntropyLoss):
    def forward(self, input, target):
        return super().forward(input, target.argmax(dim=-1))


class MulticlassAccuracyOneHot(torchmetrics.classification.MulticlassAccuracy):
    def update(self, preds, target):
        super().update(preds, target.argmax(dim=-1))


class TrainerModule(LightningModule):
    """qualia-core's generic module: the model's logits, a one-hot loss, metrics logged as a collection."""

    def __init__(self, model, optimizer=None, num_outputs=0):
        super().__init__()
        self.model = model
        self.optimizer = optimizer
        self.loss = CrossEntropyLossOneHot()
        metrics = torchmetrics.MetricCollection({"acc": MulticlassAccuracyOneHot(num_classes=num_outputs)})
        self.train_metrics = metrics.clone(prefix="train")

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_nb):
        x, y = batch
        logits = self(x)
        self.train_metrics(logits, y)
        self.log_dict(self.train_metrics)
        loss = self.loss(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = getattr(torch.optim, self.optimizer["kind"])(self.parameters(), **self.optimizer.get("params", {}))
        return [optimizer], []


class SpikingJellyTrainerModule(TrainerModule):
    """Single step, duplicated time steps: the static input goes through the model ``timesteps`` times."""

    def forward(self, x):
        functional.reset_net(self.model)
        x_list = [self.model(x) for _ in range(self.model.timesteps)]
        return torch.stack(x_list).sum(0) / self.model.timesteps


class SpikingJellyTimeStepsInDataTrainerModule(SpikingJellyTrainerModule):
    """Single step, time steps in the data: one model call per step of ``[N, T, C, S]``."""

    def forward(self, x):
        functional.reset_net(self.model)
        input_timesteps = list(x.swapaxes(0, 1))
        if len(input_timesteps) != self.model.timesteps:
            raise ValueError(f"Model.timesteps differs from timesteps dimension in data: {self.model.timesteps} != "
                             f"{len(input_timesteps)}")  # fmt: skip
        x_list = [self.model(t) for t in input_timesteps]
        return torch.stack(x_list).sum(0) / len(input_timesteps)
