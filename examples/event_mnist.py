"""Spiking LeNet-1 on EventMNIST: simulated sensor saccades over the MNIST-5k digits (offline).

Paper setting (Table 1, EMNIST column; not a paper dataset): T = 20 frames of 15 ms, [B, T, 2, 34, 34],
tau = 0.9, u_th = 0.5, SGD (momentum 0.9, lr 0.2-0.5 at batch 1,024), MSE, batch 128. (k, n) = (10, 1): the
paper's best figure of merit on its event-data LeNet task (DvsGesture).
Defaults: lightning_tlbptt.paper.DATASETS, i.e. the lower end of the dropout range and the middle of the threshold
range, with the accuracy study's recipe (docs/results.md): the output layer's bias balanced from one batch and the
learning rate scaled to the batch (--balance-output=false --scale-lr=false: the paper's raw settings); --help lists
the flags.

    python examples/event_mnist.py                      # TruncatedLocalBPTT(k=10, n=1), 100 epochs
    python examples/event_mnist.py --bptt               # plain BPTT
    python examples/event_mnist.py --k 2 --n 1 --logger wandb --devices 2
    python examples/event_mnist.py --fom                # also cost/fom (Eq. 18) against a cached BPTT run

A W&B agent runs this script for examples/sweeps/event_mnist.yaml (--name=value flags; it logs cost/fom, the
template's metric): see docs/sweeps.md.
"""

import sys

from tlbptt.train import train_main

if __name__ == "__main__":
    sys.exit(train_main("event_mnist", k=10, n=1))
