"""What every data module of the project shares: loaders, the split helper, missing-file errors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from lightning_tlbptt.paper.settings import DATASETS

__all__ = ["ClassificationDataModule", "require_files", "resize_to", "stratified_split"]


class ClassificationDataModule(L.LightningDataModule):
    """Base of the project's data modules: a classification task with train/val/test datasets.

    Subclasses set the class attributes and assign ``train_set``, ``val_set`` and ``test_set``
    in ``setup``. Batches are ``(x, y)`` with ``y`` a ``LongTensor [B]``; ``x`` is
    ``[B, C, H, W]`` in [0, 1] for static images (the training strategy repeats it over T: the
    paper's direct encoding) and ``[B, T, 2, H, W]`` binary frames for event data.

    Attributes:
        num_classes: number of classes.
        in_channels: ``C`` of ``x`` (2 polarity channels for event data).
        input_size: ``(H, W)`` of ``x``.
        n_steps: ``T`` of event frames, ``None`` for static images.
    """

    n_steps: int | None = None
    paper_dataset: ClassVar[str]
    """Key of :data:`~lightning_tlbptt.paper.settings.DATASETS`: the dataset's class count and channels, and the
    paper setting whose batch size, ``T`` and ``dt`` fill in the arguments left ``None`` (they live there only)."""

    def __init__(
        self,
        data_dir: str | Path | None,
        *,
        batch_size: int,
        num_workers: int = 0,
        download: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data_dir = None if data_dir is None else Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return DATASETS[self.paper_dataset].num_classes

    @property
    def in_channels(self) -> int:
        return DATASETS[self.paper_dataset].in_channels

    @property
    def input_size(self) -> tuple[int, int]:
        """``(H, W)`` of ``x``; each subclass knows its own."""
        raise NotImplementedError

    @classmethod
    def paper(cls, **values: Any) -> list[Any]:
        """``values`` in order, each ``None`` replaced by the paper setting's value of that name."""
        spec = DATASETS[cls.paper_dataset]
        return [getattr(spec, name) if value is None else value for name, value in values.items()]

    def _root(self) -> Path:
        if self.data_dir is None:
            raise ValueError(f"{type(self).__name__} needs a data_dir")
        return self.data_dir

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def resize_to(size: int | tuple[int, int] | None, native: tuple[int, int]) -> tuple[int, int] | None:
    """``(H, W)`` to resize to, or ``None`` when ``size`` is unset or the native size (no work)."""
    if size is None:
        return None
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return None if size == native else size


def stratified_split(
    labels: Sequence[int] | np.ndarray, val_size: int | float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of sample indices into train and validation with equal class proportions.

    Args:
        labels: class of each sample.
        val_size: number of validation samples, or their fraction if a float in (0, 1).
        seed: seed of the shuffle; the same seed gives the same split.

    Returns:
        ``(train_indices, val_indices)``, each shuffled. Each class contributes its share of
        ``val_size``, rounded, so the total can differ from ``val_size`` by a few samples when the
        classes do not divide it evenly.
    """
    labels = np.asarray(labels)
    fraction = val_size if isinstance(val_size, float) else val_size / len(labels)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_size must leave both splits non-empty, got {val_size} of {len(labels)}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = round(fraction * len(members))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def require_files(dataset: str, root: Path, patterns: Sequence[str], how: str) -> None:
    """Raise ``FileNotFoundError`` naming every expected file or glob under ``root`` that is absent.

    Args:
        dataset: dataset name for the message.
        root: directory the patterns are relative to.
        patterns: relative paths or globs (``*`` allowed); each must match at least one file.
        how: where the files come from and how to get them, appended to the message.
    """
    missing = [p for p in patterns if not any(f.is_file() for f in root.glob(p))]
    if missing:
        listing = "\n".join(f"  {root / p}" for p in missing)
        raise FileNotFoundError(f"{dataset}: missing files (nothing was downloaded):\n{listing}\n{how}")
