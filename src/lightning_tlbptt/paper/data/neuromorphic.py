"""The paper's event datasets: DVS128 Gesture, CIFAR10-DVS, N-Caltech101 and Tiny-ES-ImageNet.

Batches are ``(x [B, T, 2, H, W] binary float, y LongTensor [B])``: each recording is cut into
windows of ``dt`` and the first ``T`` become frames (section 3.3.2, :class:`EventFrames`). The first
three datasets are read by tonic's dataset classes; Tiny-ES-ImageNet, which the paper derived from
ES-ImageNet and which is not published, from a file layout defined here.

Without ``download=True`` nothing is fetched: the modules check for the files themselves and raise
``FileNotFoundError`` naming what is missing. tonic's own check would otherwise demand a minimum
file count (e.g. all 8,709 N-Caltech101 recordings) and start a download when it is not met, so
the offline path uses the subclasses below, which only require the archive and at least one
extracted recording and never download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import tonic.datasets
from torch.utils.data import Dataset, Subset
from torchvision.datasets import DatasetFolder

from lightning_tlbptt.paper.data.base import ClassificationDataModule, require_files, resize_to, stratified_split
from lightning_tlbptt.paper.data.framing import EventFrames

__all__ = [
    "CIFAR10DVSDataModule",
    "DVSGestureDataModule",
    "EventDataModule",
    "NCaltech101DataModule",
    "TinyESImageNetDataModule",
]


class _NeverDownload:
    """tonic dataset mixin: accept any extracted copy, refuse to download."""

    _recording_suffix: str

    def _check_exists(self) -> bool:
        return self._is_file_present() and self._folder_contains_at_least_n_files_of_type(1, self._recording_suffix)

    def download(self) -> None:
        raise FileNotFoundError(f"{type(self).__name__}: no recordings under {self.location_on_system}")


# tonic derives the dataset folder from the class name, so these keep tonic's names.
class DVSGesture(_NeverDownload, tonic.datasets.DVSGesture):
    _recording_suffix = ".npy"


class CIFAR10DVS(_NeverDownload, tonic.datasets.CIFAR10DVS):
    _recording_suffix = ".aedat4"


class NCALTECH101(_NeverDownload, tonic.datasets.NCALTECH101):
    _recording_suffix = ".bin"


@dataclass(frozen=True)
class _ClassIndex:
    """Picklable ``target_transform`` from a class name to its index."""

    classes: tuple[str, ...]

    def __call__(self, name: str) -> int:
        return self.classes.index(name)


class EventDataModule(ClassificationDataModule):
    """Base of the event data modules: frames of ``dt_ms`` windows, ``T = n_steps``.

    Args:
        data_dir: root directory of the dataset files.
        n_steps: ``T``, frames per sample; default: the paper's (:data:`~lightning_tlbptt.paper.settings.DATASETS`).
        dt_ms: frame window in milliseconds; default: the paper's.
        input_size: optional ``(H, W)`` (or side) to rescale the pixel grid to (tonic's
            ``Downsample``); the sensor's resolution if ``None``.
        batch_size: samples per batch; default: the paper's.
        download: let tonic download the dataset if it is missing.
        val_size: validation fraction of the datasets without an official test split (ignored where there is one).
        seed: seed of that split.
        num_workers: DataLoader workers.
    """

    sensor_size: ClassVar[tuple[int, int, int]]

    def __init__(
        self,
        data_dir: str | Path,
        *,
        n_steps: int | None = None,
        dt_ms: float | None = None,
        input_size: int | tuple[int, int] | None = None,
        batch_size: int | None = None,
        download: bool = False,
        val_size: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        n_steps, dt_ms, batch_size = self.paper(n_steps=n_steps, dt_ms=dt_ms, batch_size=batch_size)
        super().__init__(data_dir, batch_size=batch_size, num_workers=num_workers, download=download, seed=seed)
        self.save_hyperparameters()
        self.n_steps = n_steps
        self.dt_ms = dt_ms
        self.resize = resize_to(input_size, native=(self.sensor_size[1], self.sensor_size[0]))
        self.val_size = val_size

    @property
    def input_size(self) -> tuple[int, int]:
        return self.resize or (self.sensor_size[1], self.sensor_size[0])

    def frames(self) -> EventFrames:
        """The transform from one recording to ``[T, 2, H, W]`` frames."""
        return EventFrames(
            sensor_size=self.sensor_size,
            time_window=self.dt_ms * 1000.0,  # tonic's timestamps are microseconds
            n_steps=self.n_steps,
            target_size=self.resize,
        )

    def _split(self, dataset: Dataset, targets: list[int]) -> None:
        train, val = stratified_split(targets, self.val_size, self.seed)
        self.train_set = Subset(dataset, train.tolist())
        self.val_set = Subset(dataset, val.tolist())
        self.test_set = self.val_set


class DVSGestureDataModule(EventDataModule):
    """DVS128 Gesture (11 classes, 128x128) via ``tonic.datasets.DVSGesture``: LeNet-2's task.

    Paper setting: ``dt = 20 ms``, ``T = 60``, batch 32. Validation and test use the official test
    users. Files, tonic's preprocessed release (one ``<label>.npy`` per gesture)::

        <data_dir>/DVSGesture/ibmGestureTrain.tar.gz
        <data_dir>/DVSGesture/ibmGestureTrain/user<NN>_<lighting>/<label>.npy
        <data_dir>/DVSGesture/ibmGestureTest.tar.gz
        <data_dir>/DVSGesture/ibmGestureTest/user<NN>_<lighting>/<label>.npy
    """

    sensor_size = tonic.datasets.DVSGesture.sensor_size
    paper_dataset = "dvs_gesture"

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                tonic.datasets.DVSGesture(str(self._root()), train=train)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        root = self._root()
        source = tonic.datasets.DVSGesture
        require_files(
            "DVSGesture",
            root,
            [
                pattern
                for archive in (source.train_filename, source.test_filename)
                for pattern in (f"DVSGesture/{archive}", f"DVSGesture/{archive.removesuffix('.tar.gz')}/user*_*/*.npy")
            ],
            f"Download {source.train_url} ({source.train_filename}) and {source.test_url} "
            f"({source.test_filename}) into {root / 'DVSGesture'} and extract them there, or pass download=True.",
        )
        dataset = source if self.download else DVSGesture
        frames = self.frames()
        self.train_set = dataset(str(root), train=True, transform=frames)
        self.val_set = dataset(str(root), train=False, transform=frames)
        self.test_set = self.val_set


class CIFAR10DVSDataModule(EventDataModule):
    """CIFAR10-DVS (10 classes, 10,000 recordings, 128x128) via ``tonic.datasets.CIFAR10DVS``.

    AlexNet's event task. Paper setting: ``dt = 5 ms``, ``T = 100``, batch 128. The dataset has no
    test split: a seeded, class-stratified ``val_size`` fraction is held out for validation and
    test. Reading the ``.aedat4`` files needs the ``aedat`` package. Files, tonic's release::

        <data_dir>/CIFAR10DVS/CIFAR10DVS.zip
        <data_dir>/CIFAR10DVS/<class>/*.aedat4     (class: airplane, automobile, ..., truck)
    """

    sensor_size = tonic.datasets.CIFAR10DVS.sensor_size
    paper_dataset = "cifar10_dvs"

    def prepare_data(self) -> None:
        if self.download:
            tonic.datasets.CIFAR10DVS(str(self._root()))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        root = self._root()
        source = tonic.datasets.CIFAR10DVS
        require_files(
            "CIFAR10-DVS",
            root,
            [f"CIFAR10DVS/{source.filename}"] + [f"CIFAR10DVS/{name}/*.aedat4" for name in source.classes],
            f"Download {source.url} as {root / 'CIFAR10DVS' / source.filename} and extract the per-class "
            "archives it contains into that folder, or pass download=True.",
        )
        dataset = (source if self.download else CIFAR10DVS)(str(root), transform=self.frames())
        self._split(dataset, dataset.targets)


class NCaltech101DataModule(EventDataModule):
    """N-Caltech101 (101 classes, 8,709 recordings) via ``tonic.datasets.NCALTECH101``: VGG11's task.

    Paper setting: ``dt = 5 ms``, ``T = 60``, batch 128. Recordings have no fixed extent (tonic
    shifts each to start at pixel 0); they are framed on a 240x180 grid, as SpikingJelly does, and
    events beyond it are dropped. Classes are the sorted folder names. There is no test split: a
    seeded, class-stratified ``val_size`` fraction is held out for validation and test. Files::

        <data_dir>/NCALTECH101/N-Caltech101-archive.zip
        <data_dir>/NCALTECH101/Caltech101/<class>/image_<NNNN>.bin
    """

    sensor_size = (240, 180, 2)
    paper_dataset = "n_caltech101"

    def prepare_data(self) -> None:
        if self.download:
            tonic.datasets.NCALTECH101(str(self._root()))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        root = self._root()
        source = tonic.datasets.NCALTECH101
        require_files(
            "N-Caltech101",
            root,
            [f"NCALTECH101/{source.filename}", f"NCALTECH101/{source.folder_name}/*/*.bin"],
            f"Download {source.url} as {root / 'NCALTECH101' / source.filename} and extract its "
            f"{source.data_filename} into that folder, or pass download=True.",
        )
        dataset = (source if self.download else NCALTECH101)(str(root), transform=self.frames())
        classes = tuple(sorted(set(dataset.targets)))
        dataset.target_transform = _ClassIndex(classes)
        self._split(dataset, [classes.index(name) for name in dataset.targets])


def load_es_sample(path: str) -> np.ndarray:
    """Read one Tiny-ES-ImageNet ``.npz``: its ``frames`` array, or else its ``events`` array."""
    with np.load(path) as sample:
        for key in ("frames", "events"):
            if key in sample:
                return sample[key]
    raise ValueError(f"{path}: expected an array named 'frames' or 'events'")


@dataclass(frozen=True)
class _StepFrames:
    """Binary ``[T, 2, H, W]`` frames from a dense ``frames`` array or a time-step ``events`` array."""

    frames: EventFrames

    def __call__(self, sample: np.ndarray) -> np.ndarray:
        if sample.dtype.names is not None:
            return self.frames(sample)
        height, width = self.frames.frame_size
        if sample.ndim != 4 or sample.shape[1:] != (2, height, width):
            raise ValueError(f"expected frames of shape [T, 2, {height}, {width}], got {list(sample.shape)}")
        out = np.zeros((self.frames.n_steps, 2, height, width), dtype=np.float32)
        steps = min(self.frames.n_steps, len(sample))
        out[:steps] = sample[:steps] != 0
        return out


class TinyESImageNetDataModule(ClassificationDataModule):
    """Tiny-ES-ImageNet (200 classes, 64x64, T = 8): ResNet18's task, read from local files.

    The paper's tiny version of ES-ImageNet (Lin et al. 2021) is not published; build it and store
    it in this layout (classes are the sorted folder names, identical in both splits)::

        <data_dir>/TinyESImageNet/train/<class>/<sample>.npz
        <data_dir>/TinyESImageNet/val/<class>/<sample>.npz

    Each ``.npz`` holds one of

    * ``frames``: ``[T, 2, 64, 64]`` array, nonzero where a pixel has an event of that polarity in
      that time step (ES-ImageNet is already 8 steps long, so no framing: section 3.3.2), or
    * ``events``: tonic structured array with fields ``x, y, t, p`` whose ``t`` is the time-step
      index ``0..T-1``, framed by :class:`EventFrames` with one-step windows.

    Validation and test use ``val/``. Paper setting: ``T = 8``, batch 512.

    Args:
        data_dir: root directory holding ``TinyESImageNet/``.
        n_steps: ``T``; shorter samples are zero-padded, longer ones cut. Default: the paper's.
        batch_size: samples per batch; default: the paper's.
        num_workers: DataLoader workers.
    """

    input_size = (64, 64)
    paper_dataset = "tiny_es_imagenet"

    def __init__(
        self, data_dir: str | Path, *, n_steps: int | None = None, batch_size: int | None = None, num_workers: int = 0
    ) -> None:
        n_steps, batch_size = self.paper(n_steps=n_steps, batch_size=batch_size)
        super().__init__(data_dir, batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.n_steps = n_steps

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        root = self._root()
        require_files(
            "Tiny-ES-ImageNet",
            root,
            ["TinyESImageNet/train/*/*.npz", "TinyESImageNet/val/*/*.npz"],
            "It is not downloadable: write it in the layout of TinyESImageNetDataModule's docstring.",
        )
        height, width = self.input_size
        transform = _StepFrames(
            EventFrames(sensor_size=(width, height, 2), time_window=1.0, n_steps=self.n_steps, start_time=0.0)
        )
        splits = [
            DatasetFolder(
                str(root / "TinyESImageNet" / split), loader=load_es_sample, extensions=(".npz",), transform=transform
            )
            for split in ("train", "val")
        ]
        if splits[0].class_to_idx != splits[1].class_to_idx:
            raise ValueError(
                f"Tiny-ES-ImageNet: train/ and val/ under {root / 'TinyESImageNet'} must have the same class folders"
            )
        self.train_set, self.val_set = splits
        self.test_set = self.val_set
