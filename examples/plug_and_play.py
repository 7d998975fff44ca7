"""An existing SpikingJelly + Lightning project, trained with TruncatedLocalBPTT by changing one line.

The module below is written the way SpikingJelly's own Lightning example is (its network resets itself and
transposes [B, T] -> [T, B] inside forward); nothing in it knows about truncation or local learning. The
data are real MNIST digits turned into event streams by simulated sensor saccades, framed with tonic.

    python examples/plug_and_play.py --k 5 --n 1 --epochs 1
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_tlbptt import TruncatedLocalBPTT
from lightning_tlbptt.paper.data import EventMNISTDataModule


class EventNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        lif = dict(
            tau=2.0,
            decay_input=False,
            v_reset=None,
            v_threshold=0.5,
            surrogate_function=surrogate.ATan(),
            step_mode="m",
        )
        # 2 x 34 x 34 event frames (N-MNIST-sized sensor) -> 16 x 15 x 15 -> 32 x 6 x 6
        self.features = nn.Sequential(
            layer.Conv2d(2, 16, 5),
            neuron.LIFNode(**lif),
            layer.AvgPool2d(2),
            layer.Conv2d(16, 32, 4),
            neuron.LIFNode(**lif),
            layer.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(layer.Flatten(), layer.Linear(32 * 6 * 6, num_classes), neuron.LIFNode(**lif))
        functional.set_step_mode(self, "m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self)
        x = x.transpose(0, 1).contiguous()  # [B, T, C, H, W] -> [T, B, C, H, W]
        return self.classifier(self.features(x))


class Classifier(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = EventNet()
        self.lr = lr
        self.val_acc = MulticlassAccuracy(10)

    def training_step(self, batch, batch_idx):  # used by plain BPTT, replaced by TruncatedLocalBPTT
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).mean(0), nn.functional.one_hot(y, 10).float())
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self.net(x).mean(0), y)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--bptt", action="store_true", help="train with plain BPTT instead")
    args = parser.parse_args()
    strategy = "auto" if args.bptt else TruncatedLocalBPTT(k=args.k, n=args.n)  # the one line
    trainer = L.Trainer(strategy=strategy, max_epochs=args.epochs, accelerator="cpu", devices=1)
    trainer.fit(Classifier(), EventMNISTDataModule(n_steps=20, batch_size=64))


if __name__ == "__main__":
    main()
