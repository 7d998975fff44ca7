"""Spiking SEW-ResNet18 (batch norm) on Tiny-ES-ImageNet (200 classes, 64x64).

Paper setting (Table 1, Es-ImageNet column): batch 512, T = 8, tau = 0.5, u_th = 0.5-0.8, Adam (lr 1e-4
to 1e-3), cross-entropy. (k, n) = (4, 2): the paper's best interval for ResNet18 is 4.
Defaults: lightning_tlbptt.paper.DATASETS, i.e. the lower end of the dropout range and the middle of the threshold
range, with the accuracy study's recipe (docs/results.md): the output layer's bias balanced from one batch and the
learning rate scaled to the batch (--balance-output=false --scale-lr=false: the paper's raw settings); --help lists
the flags.

    python examples/tiny_es_imagenet.py                      # TruncatedLocalBPTT(k=4, n=2), 100 epochs
    python examples/tiny_es_imagenet.py --bptt               # plain BPTT
    python examples/tiny_es_imagenet.py --k 2 --n 1 --logger wandb --devices 2
    python examples/tiny_es_imagenet.py --fom                # also cost/fom (Eq. 18) against a cached BPTT run

A W&B agent runs this script for examples/sweeps/tiny_es_imagenet.yaml (--name=value flags; it logs cost/fom, the
template's metric): see docs/sweeps.md.
"""

import sys

from tlbptt.train import train_main

if __name__ == "__main__":
    sys.exit(train_main("tiny_es_imagenet", k=4, n=2))
