"""The event data modules on tiny copies written in tonic's on-disk formats (no download)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from lightning_tlbptt.paper.data import (
    CIFAR10DVSDataModule,
    DVSGestureDataModule,
    NCaltech101DataModule,
    TinyESImageNetDataModule,
)


def _source_path(dataset, index: int) -> str:
    """The recording file behind ``dataset[index]`` (tonic datasets list them in ``.data``)."""
    if isinstance(dataset, Subset):
        return str(Path(dataset.dataset.data[dataset.indices[index]]))
    return str(Path(dataset.data[index]))


def _assert_binary_batch(x: torch.Tensor, y: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert x.shape == shape and x.dtype == torch.float32
    assert y.dtype == torch.long and y.shape == shape[:1]
    assert set(x.unique().tolist()) <= {0.0, 1.0}


def test_dvs_gesture_frames_match_recordings(dvs_gesture_root, expected_frames):
    dm = DVSGestureDataModule(dvs_gesture_root.root, n_steps=8, dt_ms=20.0, batch_size=4)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (6, 3)
    for dataset in (dm.train_set, dm.val_set):
        for i in range(len(dataset)):
            frames, label = dataset[i]
            events, written_label = dvs_gesture_root.recordings[_source_path(dataset, i)]
            assert label == written_label
            # The release stores milliseconds; tonic converts to microseconds, dt is 20 ms.
            np.testing.assert_array_equal(frames, expected_frames(events, 20_000, 8, 128, 128))
    x, y = next(iter(dm.train_dataloader()))
    _assert_binary_batch(x, y, (4, 8, 2, 128, 128))
    assert x.sum() > 0


def test_dvs_gesture_zero_pads_short_recordings(dvs_gesture_root):
    # 300 ms recordings in 20 windows of 20 ms: the last 5 frames are empty.
    dm = DVSGestureDataModule(dvs_gesture_root.root, n_steps=20, dt_ms=20.0)
    dm.setup("fit")
    frames, _ = dm.train_set[0]
    assert frames.shape == (20, 2, 128, 128)
    assert frames[:15].sum(axis=(1, 2, 3)).min() > 0 and frames[15:].sum() == 0


def test_cifar10_dvs_reads_aedat4_and_splits_by_class(cifar10_dvs_root, expected_frames):
    dm = CIFAR10DVSDataModule(cifar10_dvs_root.root, n_steps=10, dt_ms=5.0, batch_size=4, val_size=0.5)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (10, 10)
    assert sorted(dm.train_set[i][1] for i in range(10)) == list(range(10))
    assert set(dm.train_set.indices).isdisjoint(dm.val_set.indices)
    for i in range(len(dm.val_set)):
        frames, label = dm.val_set[i]
        events, written_label = cifar10_dvs_root.recordings[_source_path(dm.val_set, i)]
        assert label == written_label
        np.testing.assert_array_equal(frames, expected_frames(events, 5_000, 10, 128, 128))
    x, y = next(iter(dm.train_dataloader()))
    _assert_binary_batch(x, y, (4, 10, 2, 128, 128))


def test_cifar10_dvs_downsamples_to_input_size(cifar10_dvs_root, expected_frames):
    dm = CIFAR10DVSDataModule(cifar10_dvs_root.root, n_steps=10, dt_ms=5.0, input_size=32, val_size=0.5)
    dm.setup("fit")
    assert dm.input_size == (32, 32)
    frames, _ = dm.val_set[0]
    events = cifar10_dvs_root.recordings[_source_path(dm.val_set, 0)][0].copy()
    events["x"] //= 4
    events["y"] //= 4
    np.testing.assert_array_equal(frames, expected_frames(events, 5_000, 10, 32, 32))


def test_ncaltech101_maps_sorted_class_folders(ncaltech101_root, expected_frames):
    dm = NCaltech101DataModule(ncaltech101_root.root, n_steps=10, dt_ms=5.0, batch_size=3, val_size=0.5)
    dm.setup("fit")
    assert dm.input_size == (180, 240)
    assert (len(dm.train_set), len(dm.val_set)) == (3, 3)
    for dataset in (dm.train_set, dm.val_set):
        for i in range(len(dataset)):
            frames, label = dataset[i]
            events, written_label = ncaltech101_root.recordings[_source_path(dataset, i)]
            assert label == written_label
            # tonic shifts every recording to start at pixel (0, 0).
            events = events.copy()
            events["x"] -= events["x"].min()
            events["y"] -= events["y"].min()
            np.testing.assert_array_equal(frames, expected_frames(events, 5_000, 10, 180, 240))
    x, y = next(iter(dm.train_dataloader()))
    _assert_binary_batch(x, y, (3, 10, 2, 180, 240))


def test_tiny_es_imagenet_reads_frames_and_events(tiny_es_root):
    dm = TinyESImageNetDataModule(tiny_es_root.root, batch_size=6)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (6, 6)
    for dataset in (dm.train_set, dm.val_set):
        for (path, label), (frames, loaded_label) in zip(dataset.samples, dataset, strict=True):
            sample, written_label = tiny_es_root.recordings[str(Path(path))]
            assert loaded_label == label == written_label
            if sample.dtype.names is None:
                expected = (sample != 0).astype(np.float32)
            else:  # events whose t is the time-step index
                expected = np.zeros((8, 2, 64, 64), dtype=np.float32)
                expected[sample["t"], sample["p"], sample["y"], sample["x"]] = 1.0
            np.testing.assert_array_equal(frames, expected)
    x, y = next(iter(dm.val_dataloader()))
    _assert_binary_batch(x, y, (6, 8, 2, 64, 64))


@pytest.mark.parametrize(
    ("module", "first_missing"),
    [
        (DVSGestureDataModule, "DVSGesture/ibmGestureTrain.tar.gz"),
        (CIFAR10DVSDataModule, "CIFAR10DVS/CIFAR10DVS.zip"),
        (NCaltech101DataModule, "NCALTECH101/N-Caltech101-archive.zip"),
        (TinyESImageNetDataModule, "TinyESImageNet/train/*/*.npz"),
    ],
)
def test_missing_files_are_named(tmp_path: Path, module, first_missing: str):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / first_missing))):
        module(tmp_path).setup("fit")


def test_missing_recordings_are_named_without_downloading(dvs_gesture_root):
    # The archive alone would make tonic's class try to download the rest.
    shutil.rmtree(dvs_gesture_root.root / "DVSGesture" / "ibmGestureTest")
    with pytest.raises(FileNotFoundError) as error:
        DVSGestureDataModule(dvs_gesture_root.root).setup("fit")
    message = str(error.value)
    assert str(dvs_gesture_root.root / "DVSGesture" / "ibmGestureTest" / "user*_*" / "*.npy") in message
    assert "ibmGestureTrain" not in message.split("\n")[1]
