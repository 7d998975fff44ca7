"""The shared framing: events -> first T windows of dt -> binary [T, 2, H, W] frames."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from tonic.io import events_struct, make_structured_array

from lightning_tlbptt.paper.data import EventFrames, events_to_frames


def _events(*rows: tuple[int, int, int, int]) -> np.ndarray:
    x, y, t, p = (np.array(column) for column in zip(*rows, strict=True))
    return make_structured_array(x, y, t, p, dtype=events_struct)


def test_windows_polarity_and_binarisation():
    events = _events(
        (1, 2, 100, 1),  # window 0 (t0 = 100), ON
        (1, 2, 150, 1),  # same pixel again: still 1, not 2
        (3, 0, 1099, 0),  # last microsecond of window 0, OFF
        (3, 0, 1100, 0),  # window 1
        (0, 3, 3100, 1),  # window 3
        (0, 0, 4100, 1),  # window 4: beyond T = 4, dropped
    )
    frames = events_to_frames(events, sensor_size=(4, 4, 2), time_window=1000, n_steps=4)
    expected = np.zeros((4, 2, 4, 4), dtype=np.float32)
    expected[0, 1, 2, 1] = expected[0, 0, 0, 3] = expected[1, 0, 0, 3] = expected[3, 1, 3, 0] = 1.0
    assert frames.dtype == np.float32
    np.testing.assert_array_equal(frames, expected)


def test_short_recording_is_zero_padded_and_start_time_shifts_the_grid():
    events = _events((0, 0, 500, 1), (1, 1, 1500, 0))
    frames = events_to_frames(events, sensor_size=(2, 2, 2), time_window=1000, n_steps=5, start_time=0)
    assert frames.shape == (5, 2, 2, 2)
    assert frames[0, 1, 0, 0] == 1 and frames[1, 0, 1, 1] == 1 and frames.sum() == 2


def test_events_outside_the_sensor_are_dropped_and_empty_input_gives_empty_frames():
    events = _events((5, 0, 0, 1), (0, 9, 10, 1), (1, 1, 20, 0))
    frames = events_to_frames(events, sensor_size=(4, 4, 2), time_window=100, n_steps=2)
    assert frames.sum() == 1 and frames[0, 0, 1, 1] == 1
    empty = events_to_frames(events[:0], sensor_size=(4, 3, 2), time_window=100, n_steps=2)
    assert empty.shape == (2, 2, 3, 4) and empty.sum() == 0


def test_target_size_rescales_coordinates():
    events = _events((7, 3, 0, 1), (2, 1, 0, 0))
    frames = events_to_frames(events, sensor_size=(8, 4, 2), time_window=10, n_steps=1, target_size=(2, 4))
    assert frames.shape == (1, 2, 2, 4)
    assert frames[0, 1, 1, 3] == 1 and frames[0, 0, 0, 1] == 1 and frames.sum() == 2


def test_event_frames_transform_is_picklable_and_reports_its_size():
    transform = EventFrames(sensor_size=(6, 4, 2), time_window=10.0, n_steps=3, target_size=(2, 3))
    assert pickle.loads(pickle.dumps(transform)) == transform
    assert transform.frame_size == (2, 3)
    assert transform(_events((5, 3, 0, 1))).shape == (3, 2, 2, 3)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="n_steps"):
        events_to_frames(_events((0, 0, 0, 1)), sensor_size=(1, 1, 2), time_window=1, n_steps=0)
