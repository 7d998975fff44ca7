"""Spiking LeNet-1 on EMNIST balanced (47 classes).

Paper setting (Table 1): batch 1,024, T = 20 (direct encoding), tau = 0.9, u_th = 0.5, SGD (momentum 0.9,
lr 0.2-0.5), MSE, no dropout. (k, n) = (5, 2): k in the recommended 2..10, blocks of more than one layer.
Defaults: lightning_tlbptt.paper.DATASETS, i.e. the lower end of the dropout range and the middle of the threshold
range, with the accuracy study's recipe (docs/results.md): the output layer's bias balanced from one batch and the
learning rate scaled to the batch (--balance-output=false --scale-lr=false: the paper's raw settings); --help lists
the flags.

    python examples/emnist.py                      # TruncatedLocalBPTT(k=5, n=2), 100 epochs
    python examples/emnist.py --bptt               # plain BPTT
    python examples/emnist.py --k 2 --n 1 --logger wandb --devices 2
    python examples/emnist.py --fom                # also cost/fom (Eq. 18) against a cached BPTT run

A W&B agent runs this script for examples/sweeps/emnist.yaml (--name=value flags; it logs cost/fom, the
template's metric): see docs/sweeps.md.
"""

import sys

from tlbptt.train import train_main

if __name__ == "__main__":
    sys.exit(train_main("emnist", k=5, n=2))
