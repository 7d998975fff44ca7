"""Spiking LeNet-2 on DVS128 Gesture (11 classes).

Paper setting (Table 1): batch 32, T = 60 frames of 20 ms, tau = 0.3, u_th = 0.2-0.5, SGD (momentum 0.9,
lr 0.005-0.2), MSE, dropout 0-0.2. (k, n) = (10, 1): the paper's best figure of merit on DvsGesture.
Defaults: lightning_tlbptt.paper.DATASETS, i.e. the lower end of the dropout range and the middle of the threshold
range, with the accuracy study's recipe (docs/results.md): the output layer's bias balanced from one batch and the
learning rate scaled to the batch (--balance-output=false --scale-lr=false: the paper's raw settings); --help lists
the flags.

    python examples/dvs_gesture.py                      # TruncatedLocalBPTT(k=10, n=1), 100 epochs
    python examples/dvs_gesture.py --bptt               # plain BPTT
    python examples/dvs_gesture.py --k 2 --n 1 --logger wandb --devices 2
    python examples/dvs_gesture.py --fom                # also cost/fom (Eq. 18) against a cached BPTT run

A W&B agent runs this script for examples/sweeps/dvs_gesture.yaml (--name=value flags; it logs cost/fom, the
template's metric): see docs/sweeps.md.
"""

import sys

from tlbptt.train import train_main

if __name__ == "__main__":
    sys.exit(train_main("dvs_gesture", k=10, n=1))
