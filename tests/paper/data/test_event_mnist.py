"""EventMNIST: simulated saccades over the real MNIST-5k digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tonic.io import events_struct

from lightning_tlbptt.paper.data import EventFrames, EventMNIST, EventMNISTDataModule, SaccadeSimulator, load_mnist5k


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    images, labels = load_mnist5k()
    # Two digits of each class.
    picks = torch.cat([torch.nonzero(labels == c)[:2, 0] for c in range(10)])
    return images[picks, 0].numpy()


@pytest.fixture(scope="module")
def simulated(digits) -> tuple[np.ndarray, np.ndarray]:
    return SaccadeSimulator()(digits)


def test_events_are_tonic_arrays_from_three_saccades(digits, simulated):
    events, offsets = simulated
    assert events.dtype == events_struct
    assert offsets[0] == 0 and offsets[-1] == len(events) and len(offsets) == len(digits) + 1
    for i in range(len(digits)):
        recording = events[offsets[i] : offsets[i + 1]]
        assert 1000 < len(recording) < 20_000
        assert np.all(np.diff(recording["t"]) >= 0)
        assert recording["t"].min() >= 0 and recording["t"].max() < 300_000
        assert recording["x"].max() < 34 and recording["y"].max() < 34
        # ON (brightening) and OFF (darkening) edges, in each of the three saccades.
        for saccade in range(3):
            in_saccade = recording[(recording["t"] // 100_000) == saccade]
            assert 0.2 < in_saccade["p"].mean() < 0.8


def test_events_come_from_the_digit(digits, simulated):
    events, offsets = simulated
    for i, digit in enumerate(digits):
        recording = events[offsets[i] : offsets[i + 1]]
        # Where the digit can be during the saccades: its pixels dilated by the 6-pixel sweep.
        swept = np.zeros((34, 34), dtype=bool)
        ys, xs = np.nonzero(digit > 0)
        for dy in range(8):
            for dx in range(8):
                swept[ys + dy, xs + dx] = True
        assert swept[recording["y"], recording["x"]].mean() == 1.0


def test_simulation_is_deterministic_and_seeded(digits, simulated):
    events, offsets = simulated
    again, again_offsets = SaccadeSimulator()(digits)
    assert np.array_equal(again, events) and np.array_equal(again_offsets, offsets)
    other, _ = SaccadeSimulator(seed=1)(digits)
    assert not np.array_equal(other, events)


def test_frames_are_binary_and_nonzero(simulated):
    events, offsets = simulated
    frames = EventFrames(sensor_size=(34, 34, 2), time_window=15_000, n_steps=20, start_time=0)(
        events[offsets[0] : offsets[1]]
    )
    assert frames.shape == (20, 2, 34, 34) and frames.dtype == np.float32
    assert set(np.unique(frames)) == {0.0, 1.0}
    assert (frames.sum(axis=(2, 3)) > 0).all()  # ON and OFF events in every window


def test_image_that_does_not_fit_is_rejected():
    with pytest.raises(ValueError, match="do not fit"):
        SaccadeSimulator(sensor_size=(30, 30))(np.zeros((1, 28, 28)))


def test_datamodule_batches():
    dm = EventMNISTDataModule(n_steps=10, dt_ms=30.0, batch_size=16)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (4000, 1000)
    val_labels = [dm.val_set.dataset.targets[i] for i in dm.val_set.indices]
    assert np.bincount(val_labels).tolist() == [100] * 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 10, 2, 34, 34) and x.dtype == torch.float32 and y.dtype == torch.long
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert (dm.num_classes, dm.in_channels, dm.input_size, dm.n_steps) == (10, 2, (34, 34), 10)


@pytest.mark.slow
def test_cache_round_trip(tmp_path):
    first = EventMNIST(tmp_path)
    cached = sorted((tmp_path / "EventMNIST").glob("*.npy"))
    assert len(cached) == 2
    second = EventMNIST(tmp_path)  # loads the cache
    assert np.array_equal(first.events, second.events) and np.array_equal(first.offsets, second.offsets)
    assert first[4999][1] == 9 and first[4999][0].dtype == events_struct
