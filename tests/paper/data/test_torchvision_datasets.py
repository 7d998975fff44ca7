"""EMNIST and CIFAR10 data modules on tiny copies written in torchvision's on-disk formats."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_tlbptt.paper.data import CIFAR10DataModule, EMNISTDataModule


def test_emnist_reads_local_idx_files(emnist_root):
    dm = EMNISTDataModule(emnist_root.root, batch_size=3)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (6, 4)
    assert dm.test_set is dm.val_set  # the paper reports accuracy on the official test split
    assert (dm.num_classes, dm.in_channels, dm.input_size) == (47, 1, (28, 28))
    for i, (image, label) in enumerate(emnist_root.samples["train"]):
        x, y = dm.train_set[i]
        assert y == label
        np.testing.assert_allclose(x[0].numpy(), image / 255.0, atol=1e-6)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.long and y.tolist() == [label for _, label in emnist_root.samples["test"][:3]]


def test_emnist_resizes(emnist_root):
    dm = EMNISTDataModule(emnist_root.root, batch_size=6, input_size=14)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 1, 14, 14) and dm.input_size == (14, 14)
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_cifar10_reads_local_batches_without_md5(cifar10_root):
    # The fixture's batch files cannot match torchvision's md5 sums: loading them shows that the
    # offline path checks presence only.
    dm = CIFAR10DataModule(cifar10_root.root, batch_size=4)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (10, 2)
    assert (dm.num_classes, dm.in_channels, dm.input_size) == (10, 3, (32, 32))
    for i, (image, label) in enumerate(cifar10_root.samples["train"]):
        x, y = dm.train_set[i]
        assert y == label
        np.testing.assert_allclose(x.numpy(), image / 255.0, atol=1e-6)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long


@pytest.mark.parametrize(
    ("module", "first_missing"),
    [
        (EMNISTDataModule, "EMNIST/raw/emnist-balanced-train-images-idx3-ubyte"),
        (CIFAR10DataModule, "cifar-10-batches-py/data_batch_1"),
    ],
)
def test_missing_files_are_named(tmp_path: Path, module, first_missing: str):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / first_missing))):
        module(tmp_path).setup("fit")


def test_missing_single_file_is_the_only_one_named(cifar10_root):
    (cifar10_root.root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError) as error:
        CIFAR10DataModule(cifar10_root.root).setup("fit")
    assert "test_batch" in str(error.value) and "data_batch_1" not in str(error.value)
