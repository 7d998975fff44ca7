"""Event-camera MNIST simulated from the 5,000 real MNIST digits, for offline event-data runs.

N-MNIST (Orchard et al. 2015) was recorded by moving an event sensor in front of a still MNIST
digit along three straight saccades. This module does the same in simulation: the digit, placed in
a 34x34 sensor like N-MNIST's, is translated (sub-pixel, bilinear) along a closed triangle of three
saccades; each pixel emits an ON (OFF) event when its log intensity has risen (fallen) by the
contrast threshold since its last event, as a DVS pixel does (several thresholds crossed within one
simulation step give one event, which binary frames could not tell apart anyway). Per-pixel threshold mismatch and
timestamps within a simulation step are drawn from a seeded generator, so the dataset is
deterministic. Events are tonic structured arrays (``tonic.io.events_struct``: ``x, y, t, p``,
``t`` in microseconds) and are framed by the shared :class:`EventFrames`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import ClassVar

import numpy as np
from tonic.io import events_struct
from torch.utils.data import Dataset, Subset

from lightning_tlbptt.paper.data.base import ClassificationDataModule, stratified_split
from lightning_tlbptt.paper.data.framing import EventFrames
from lightning_tlbptt.paper.data.static import load_mnist5k

__all__ = ["EventMNIST", "EventMNISTDataModule", "SaccadeSimulator"]

# Sensor displacement (dx, dy) in pixels at the corners of the saccade triangle; the path returns
# to its start. Three directions, so edges of every orientation move across pixels.
_TRIANGLE = np.array([(0.0, 0.0), (6.0, 3.0), (0.0, 6.0), (0.0, 0.0)])
_SWEEP = int(np.ceil(_TRIANGLE.max()))
# Images simulated at once: bounds memory to ~_CHUNK * S * H * W bytes. A constant, because the
# random draws are made per chunk and must not depend on a caller's choice.
_CHUNK = 256


@dataclass(frozen=True)
class SaccadeSimulator:
    """DVS simulation of images moved along N-MNIST-like saccades.

    Args:
        sensor_size: ``(W, H)``; must leave room for the 6-pixel saccades around the image.
        saccade_us: duration of each of the three saccades, in microseconds (N-MNIST: ~100 ms).
        steps_per_saccade: simulation steps per saccade; events get timestamps within their step.
        threshold: mean contrast threshold on log intensity.
        threshold_sigma: standard deviation of the per-pixel threshold (sensor mismatch).
        eps: intensity offset that keeps ``log`` finite on black pixels.
        seed: seed of mismatch and timestamp jitter.
    """

    sensor_size: tuple[int, int] = (34, 34)
    saccade_us: int = 100_000
    steps_per_saccade: int = 20
    threshold: float = 0.5
    threshold_sigma: float = 0.05
    eps: float = 0.1
    seed: int = 0

    def key(self) -> str:
        """Short digest of the settings, naming cache files."""
        return hashlib.sha1(repr(sorted(asdict(self).items())).encode()).hexdigest()[:12]

    def _path(self) -> np.ndarray:
        """Displacement ``[S+1, 2]`` at the start of the recording and after each step."""
        frac = np.linspace(0.0, 1.0, self.steps_per_saccade + 1)[1:, None]
        legs = [a + frac * (b - a) for a, b in pairwise(_TRIANGLE)]
        return np.concatenate([_TRIANGLE[:1], *legs])

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Simulate every image; the same images and settings give the same events.

        Args:
            images: ``[N, h, w]`` intensities in [0, 1].

        Returns:
            ``(events, offsets)``: all recordings concatenated as one ``events_struct`` array,
            each sorted by ``t``, and ``int64 [N + 1]`` offsets: recording ``i`` is
            ``events[offsets[i]:offsets[i + 1]]``.
        """
        n, h, w = images.shape
        width, height = self.sensor_size
        if h + _SWEEP > height or w + _SWEEP > width:
            raise ValueError(f"images of {h}x{w} do not fit the saccades in a {width}x{height} sensor")
        rng = np.random.default_rng(self.seed)
        pieces: list[np.ndarray] = []
        counts = np.zeros(n, dtype=np.int64)
        for start in range(0, n, _CHUNK):
            events, per_image = self._simulate(images[start : start + _CHUNK].astype(np.float32), rng)
            pieces.append(events)
            counts[start : start + _CHUNK] = per_image
        offsets = np.concatenate([[0], np.cumsum(counts)])
        return np.concatenate(pieces), offsets

    def _simulate(self, images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        b, h, w = images.shape
        width, height = self.sensor_size
        # Bilinear interpolation reads one pixel beyond the sweep.
        pad = _SWEEP + 1
        # Image at sensor offset (pad, pad) of a zero canvas: shifting by d reads canvas[p + pad - d].
        canvas = np.zeros((b, height + 2 * pad, width + 2 * pad), dtype=np.float32)
        canvas[:, pad : pad + h, pad : pad + w] = images

        def seen(d: np.ndarray) -> np.ndarray:
            (ix, iy), (fx, fy) = np.floor(d).astype(int), d - np.floor(d)

            def view(ky: int, kx: int) -> np.ndarray:
                return canvas[:, pad - ky : pad - ky + height, pad - kx : pad - kx + width]

            # Bilinear translation: a shift of i + f blends the integer shifts i and i + 1.
            return (1 - fy) * ((1 - fx) * view(iy, ix) + fx * view(iy, ix + 1)) + fy * (
                (1 - fx) * view(iy + 1, ix) + fx * view(iy + 1, ix + 1)
            )

        threshold = np.maximum(
            self.threshold + self.threshold_sigma * rng.standard_normal((b, height, width), dtype=np.float32), 0.05
        )
        path = self._path()
        reference = np.log(self.eps + seen(path[0]))
        polarity = np.zeros((b, len(path) - 1, height, width), dtype=np.int8)
        for step, d in enumerate(path[1:]):
            change = np.log(self.eps + seen(d)) - reference
            crossings = np.trunc(change / threshold)
            polarity[:, step] = np.sign(crossings)
            # Reset the reference by whole thresholds only, as a DVS pixel's comparator does.
            reference += crossings * threshold

        sample, step, y, x = np.nonzero(polarity)
        step_us = self.saccade_us / self.steps_per_saccade
        t = ((step + rng.random(len(step))) * step_us).astype(np.int64)
        events = np.empty(len(t), dtype=events_struct)
        events["x"], events["y"], events["t"] = x, y, t
        events["p"] = polarity[sample, step, y, x] > 0
        order = np.lexsort((t, sample))
        return events[order], np.bincount(sample, minlength=b)


class EventMNIST(Dataset):
    """Simulated-saccade event recordings of the 5,000 MNIST digits, tonic-style.

    ``dataset[i]`` is ``(transform(events), label)`` with ``events`` an ``events_struct`` array
    (``t`` in microseconds), like a tonic dataset; ``sensor_size``, ``dtype`` and ``ordering`` are
    tonic's attributes.

    Args:
        data_dir: directory for the ``.npy`` cache (``<data_dir>/EventMNIST/``); ``None``
            simulates in memory every time.
        simulator: simulation settings.
        transform: applied to each event array (e.g. :class:`EventFrames`).
    """

    dtype = events_struct
    ordering = "".join(events_struct.names)
    classes: ClassVar[list[str]] = [str(d) for d in range(10)]

    def __init__(
        self,
        data_dir: str | Path | None = None,
        simulator: SaccadeSimulator = SaccadeSimulator(),
        transform: EventFrames | None = None,
    ) -> None:
        self.sensor_size = (*simulator.sensor_size, 2)
        self.transform = transform
        images, labels = load_mnist5k()
        self.targets = labels.tolist()
        cache = None if data_dir is None else Path(data_dir).expanduser() / "EventMNIST"
        files = (
            None
            if cache is None
            else (cache / f"events_{simulator.key()}.npy", cache / f"offsets_{simulator.key()}.npy")
        )
        if files is not None and all(f.is_file() for f in files):
            self.events, self.offsets = np.load(files[0]), np.load(files[1])
        else:
            self.events, self.offsets = simulator(images[:, 0].numpy())
            if files is not None:
                files[0].parent.mkdir(parents=True, exist_ok=True)
                np.save(files[0], self.events)
                np.save(files[1], self.offsets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        events = self.events[self.offsets[index] : self.offsets[index + 1]]
        if self.transform is not None:
            events = self.transform(events)
        return events, self.targets[index]


class EventMNISTDataModule(ClassificationDataModule):
    """:class:`EventMNIST` as binary event frames ``[B, T, 2, 34, 34]``: offline event-data default.

    The 300 ms recordings are cut into ``n_steps`` windows of ``dt_ms`` (the paper's framing,
    section 3.3.2); a seeded, class-stratified split gives ``5000 - val_size`` training and
    ``val_size`` validation recordings; the test loader serves the validation split.

    Args:
        data_dir: optional cache directory for the simulated events (simulating all 5,000 digits
            takes a few seconds).
        n_steps: ``T``, frames per sample; default: the setting's (20; :data:`~lightning_tlbptt.paper.DATASETS`).
        dt_ms: frame window; default: the setting's (15 ms).
        batch_size: samples per batch; default: the setting's (128).
        val_size: validation samples (or fraction, if a float).
        seed: seed of the simulation and of the split.
        num_workers: DataLoader workers.
    """

    paper_dataset = "event_mnist"

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        n_steps: int | None = None,
        dt_ms: float | None = None,
        batch_size: int | None = None,
        val_size: int | float = 1000,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        n_steps, dt_ms, batch_size = self.paper(n_steps=n_steps, dt_ms=dt_ms, batch_size=batch_size)
        super().__init__(data_dir, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.n_steps = n_steps
        self.dt_ms = dt_ms
        self.val_size = val_size
        self.simulator = SaccadeSimulator(seed=seed)

    @property
    def input_size(self) -> tuple[int, int]:
        width, height = self.simulator.sensor_size
        return (height, width)

    def prepare_data(self) -> None:
        # Fill the cache once, before any DDP process calls setup().
        if self.data_dir is not None:
            EventMNIST(self.data_dir, self.simulator)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        frames = EventFrames(
            sensor_size=(*self.simulator.sensor_size, 2),
            time_window=self.dt_ms * 1000.0,
            n_steps=self.n_steps,
            start_time=0.0,  # the saccades start at t = 0, not at the first event
        )
        dataset = EventMNIST(self.data_dir, self.simulator, transform=frames)
        train, val = stratified_split(dataset.targets, self.val_size, self.seed)
        self.train_set = Subset(dataset, train.tolist())
        self.val_set = Subset(dataset, val.tolist())
        self.test_set = self.val_set
