"""Spiking VGG11 (batch norm) on N-Caltech101, downsampled to 64x48.

Paper setting (Table 1): batch 128, T = 60 frames of 5 ms, tau = 0.5, u_th = 0.5, Adam (lr 1e-4 to 5e-4),
cross-entropy, dropout 0-0.3. (k, n) = (10, 5): the paper's best interval for VGG11 with 5-layer blocks.
Defaults: lightning_tlbptt.paper.DATASETS, i.e. the lower end of the dropout range and the middle of the threshold
range, with the accuracy study's recipe (docs/results.md): the output layer's bias balanced from one batch and the
learning rate scaled to the batch (--balance-output=false --scale-lr=false: the paper's raw settings); --help lists
the flags.

    python examples/n_caltech101.py                      # TruncatedLocalBPTT(k=10, n=5), 100 epochs
    python examples/n_caltech101.py --bptt               # plain BPTT
    python examples/n_caltech101.py --k 2 --n 1 --logger wandb --devices 2
    python examples/n_caltech101.py --fom                # also cost/fom (Eq. 18) against a cached BPTT run

A W&B agent runs this script for examples/sweeps/n_caltech101.yaml (--name=value flags; it logs cost/fom, the
template's metric): see docs/sweeps.md.
"""

import sys

from tlbptt.train import train_main

if __name__ == "__main__":
    sys.exit(train_main("n_caltech101", k=10, n=5))
