"""Event streams to the paper's binary event frames (section 3.3.2), shared by every event dataset.

The paper accumulates the events of each time window ``dt`` into one two-channel image (one
channel per polarity), keeps only whether a pixel had an event (binary intensity), and feeds the
first ``T`` such images to the network. Slicing and accumulation are tonic's own
``ToFrame``/``Downsample``; this module only fixes the window grid to the first ``T`` windows,
drops events outside the sensor and binarises.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tonic.transforms import Downsample, ToFrame

__all__ = ["EventFrames", "events_to_frames"]


def events_to_frames(
    events: np.ndarray,
    *,
    sensor_size: tuple[int, int, int],
    time_window: float,
    n_steps: int,
    target_size: tuple[int, int] | None = None,
    start_time: float | None = None,
) -> np.ndarray:
    """Turn one recording into ``n_steps`` binary frames, ``float32 [n_steps, 2, H, W]``.

    Args:
        events: tonic structured array with fields ``x``, ``y``, ``t``, ``p`` (polarity 0/1 or
            bool), sorted by ``t``.
        sensor_size: ``(W, H, P)`` of the recording, tonic's convention.
        time_window: ``dt``, in the unit of ``events['t']`` (microseconds for tonic's datasets).
        n_steps: ``T``, the number of frames kept: the windows ``[t0 + i*dt, t0 + (i+1)*dt)`` for
            ``i < T``. A recording shorter than ``T*dt`` leaves its last frames empty (zero).
        target_size: optional ``(H, W)`` to rescale the pixel grid to, with tonic's
            ``Downsample``; ``H, W`` of the output.
        start_time: ``t0``; the first event's timestamp if ``None``.

    Events outside the (rescaled) sensor are dropped: N-Caltech101 recordings, for instance,
    have no fixed extent.
    """
    if n_steps < 1 or time_window <= 0:
        raise ValueError(f"need n_steps >= 1 and time_window > 0, got {n_steps}, {time_window}")
    width, height, polarities = sensor_size
    if target_size is not None:
        events = Downsample(sensor_size=sensor_size, target_size=(target_size[1], target_size[0]))(events)
        height, width = target_size
    inside = (events["x"] >= 0) & (events["x"] < width) & (events["y"] >= 0) & (events["y"] < height)
    events = events[inside]
    frames = np.zeros((n_steps, polarities, height, width), dtype=np.float32)
    if len(events) == 0:
        # tonic's ToFrame returns a differently laid out frame for empty input; an empty
        # recording is simply T empty frames.
        return frames
    t0 = events["t"][0] if start_time is None else start_time
    counts = ToFrame(
        sensor_size=(width, height, polarities),
        time_window=time_window,
        start_time=t0,
        end_time=t0 + n_steps * time_window,
    )(events)
    steps = min(n_steps, len(counts))
    frames[:steps] = counts[:steps] > 0
    return frames


@dataclass(frozen=True)
class EventFrames:
    """:func:`events_to_frames` as a picklable tonic-style ``transform``.

    Maps one structured event array to ``float32 [n_steps, 2, H, W]`` binary frames; see
    :func:`events_to_frames` for the arguments. A default-collated batch is ``[B, T, 2, H, W]``.
    """

    sensor_size: tuple[int, int, int]
    time_window: float
    n_steps: int
    target_size: tuple[int, int] | None = None
    start_time: float | None = None

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(H, W)`` of the frames."""
        return self.target_size or (self.sensor_size[1], self.sensor_size[0])

    def __call__(self, events: np.ndarray) -> np.ndarray:
        return events_to_frames(
            events,
            sensor_size=self.sensor_size,
            time_window=self.time_window,
            n_steps=self.n_steps,
            target_size=self.target_size,
            start_time=self.start_time,
        )
