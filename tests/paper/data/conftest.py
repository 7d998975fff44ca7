"""Tiny copies of the datasets, written in each dataset's real on-disk format.

Each fixture writes a handful of samples under ``tmp_path`` exactly where torchvision or tonic
looks for them (archives included, since tonic checks for them), so the data modules load them
without any download. Every fixture returns the data root and the samples it wrote, so tests can
compare what comes out of a loader with what went in.
"""

from __future__ import annotations

import pickle
import struct
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from tonic.io import make_structured_array

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Written:
    """A fixture dataset: its root and what was written there.

    Attributes:
        root: the ``data_dir`` to give the data module.
        samples: for torchvision datasets, per split, ``(image, label)`` in file order.
        recordings: for event datasets, ``path -> (events, label)`` with ``events`` as written
            (tonic field names, ``t`` in microseconds), keyed by ``str(Path)`` of each file.
    """

    root: Path
    samples: dict[str, list[tuple[np.ndarray, int]]] = field(default_factory=dict)
    recordings: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)


def _expected_frames(events: np.ndarray, dt_us: float, n_steps: int, height: int, width: int) -> np.ndarray:
    """Binary frames computed directly from the definition: window ``(t - t0) // dt``, channel ``p``."""
    frames = np.zeros((n_steps, 2, height, width), dtype=np.float32)
    step = ((events["t"] - events["t"][0]) // dt_us).astype(int)
    keep = step < n_steps
    frames[step[keep], events["p"][keep].astype(int), events["y"][keep], events["x"][keep]] = 1.0
    return frames


@pytest.fixture
def expected_frames():
    """The reference framing, independent of tonic, for comparing loaders against."""
    return _expected_frames


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX file (the MNIST/EMNIST format): magic with the uint8 type code and rank, then big-endian sizes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def emnist_root(tmp_path: Path) -> Written:
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    samples = {}
    for split, n in (("train", 6), ("test", 4)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 47, size=n).astype(np.uint8)
        _write_idx(raw / f"emnist-balanced-{split}-images-idx3-ubyte", images)
        _write_idx(raw / f"emnist-balanced-{split}-labels-idx1-ubyte", labels)
        samples[split] = list(zip(images, labels.tolist(), strict=True))
    return Written(tmp_path, samples=samples)


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Written:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    samples: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(2, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=2).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        split = "test" if name == "test_batch" else "train"
        samples[split] += [(row.reshape(3, 32, 32), label) for row, label in zip(data, labels, strict=True)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 2, "num_vis": 3072}, f)
    return Written(tmp_path, samples=samples)


def _events(rng: np.random.Generator, n: int, width: int, height: int, duration_us: int) -> np.ndarray:
    """``n`` random events sorted by time, fields ``x, y, t, p`` (``t`` in microseconds)."""
    return make_structured_array(
        rng.integers(0, width, n),
        rng.integers(0, height, n),
        np.sort(rng.integers(0, duration_us, n)),
        rng.integers(0, 2, n),
        dtype=np.dtype([("x", np.int64), ("y", np.int64), ("t", np.int64), ("p", np.int64)]),
    )


@pytest.fixture
def dvs_gesture_root(tmp_path: Path) -> Written:
    """tonic's DVSGesture release: ``user<NN>_<lighting>/<label>.npy``, columns x, y, p, t (ms)."""
    location = tmp_path / "DVSGesture"
    rng = np.random.default_rng(2)
    written = Written(tmp_path)
    for split, users in (("Train", ["user01_fluorescent", "user02_lab"]), ("Test", ["user24_led"])):
        folder = location / f"ibmGesture{split}"
        for user in users:
            (folder / user).mkdir(parents=True)
            for label in (0, 3, 10):
                events = _events(rng, 400, 128, 128, duration_us=300_000)
                events["t"] -= events["t"] % 1000  # the release stores milliseconds
                columns = np.stack([events["x"], events["y"], events["p"], events["t"] // 1000], axis=1)
                np.save(folder / user / f"{label}.npy", columns)
                written.recordings[str(folder / user / f"{label}.npy")] = (events, label)
        with tarfile.open(location / f"ibmGesture{split}.tar.gz", "w:gz") as archive:
            archive.add(folder, arcname=folder.name)
    return written


_AEDAT4_DESCRIPTION = (
    '<dv version="2.0"><node name="outInfo"><node name="0">'
    '<attr key="typeIdentifier" type="string">EVTS</attr><node name="info">'
    '<attr key="sizeX" type="int">128</attr><attr key="sizeY" type="int">128</attr>'
    "</node></node></node></dv>"
)


def _aedat4(events: np.ndarray) -> bytes:
    """An uncompressed AEDAT 4 file with one polarity-event stream, as DV writes it.

    Layout: magic line; a size-prefixed ``IOHeader`` flatbuffer (``IOHE``) whose description XML
    declares stream 0 as ``EVTS``; then packets of ``stream id, size, size-prefixed EventPacket
    flatbuffer (EVTS)`` whose ``elements`` vector holds 16-byte ``Event {t: i64, x: i16, y: i16,
    on: bool}`` structs. Flatbuffers are laid out by hand: root offset, file identifier, vtable,
    table, then the string or vector, with the vector's structs 8-byte aligned.
    """
    description = _AEDAT4_DESCRIPTION.encode()
    # vtable: 10 bytes, table of 8 bytes, fields 0 and 1 (compression, data position) left at their
    # defaults (none, -1: read to end of file), field 2 (description) at table offset 4.
    header = struct.pack("<I4sHHHHH2x", 20, b"IOHE", 10, 8, 0, 0, 4)
    header += struct.pack("<iII", 12, 4, len(description)) + description + b"\0"
    header += b"\0" * (-len(header) % 4)
    records = np.zeros(
        len(events),
        dtype=np.dtype(
            {
                "names": ["t", "x", "y", "on"],
                "formats": ["<i8", "<i2", "<i2", "?"],
                "offsets": [0, 8, 10, 12],
                "itemsize": 16,
            }
        ),
    )
    records["t"], records["x"], records["y"], records["on"] = events["t"], events["x"], events["y"], events["p"]
    # vtable of 6 bytes (one field at table offset 4), table at 20, vector length at 28, structs at 32.
    packet = struct.pack("<I4sHHH2xiII", 16, b"EVTS", 6, 8, 4, 8, 4, len(records)) + records.tobytes()
    packet = struct.pack("<I", len(packet)) + packet
    return b"#!AER-DAT4.0\r\n" + struct.pack("<I", len(header)) + header + struct.pack("<II", 0, len(packet)) + packet


@pytest.fixture
def cifar10_dvs_root(tmp_path: Path) -> Written:
    """tonic's CIFAR10-DVS release: ``CIFAR10DVS.zip`` and ``<class>/*.aedat4``, 2 recordings per class."""
    location = tmp_path / "CIFAR10DVS"
    rng = np.random.default_rng(3)
    written = Written(tmp_path)
    for label, name in enumerate(CIFAR10_CLASSES):
        (location / name).mkdir(parents=True)
        for i in range(2):
            events = _events(rng, 300, 128, 128, duration_us=50_000)
            path = location / name / f"cifar10_{name}_{i}.aedat4"
            path.write_bytes(_aedat4(events))
            written.recordings[str(path)] = (events, label)
    with zipfile.ZipFile(location / "CIFAR10DVS.zip", "w") as archive:
        for path in sorted(location.rglob("*.aedat4")):
            archive.write(path, path.relative_to(location).as_posix())
    return written


def _atis_bin(events: np.ndarray) -> bytes:
    """N-MNIST/N-Caltech101 ``.bin``: 5 bytes per event, x, y, then polarity (bit 7) and a 23-bit timestamp."""
    t = events["t"].astype(np.uint32)
    raw = np.stack(
        [events["x"], events["y"], (events["p"] << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF], axis=1
    ).astype(np.uint8)
    return raw.tobytes()


@pytest.fixture
def ncaltech101_root(tmp_path: Path) -> Written:
    """N-Caltech101: the archive and ``Caltech101/<class>/image_<NNNN>.bin``, 2 recordings per class."""
    location = tmp_path / "NCALTECH101"
    rng = np.random.default_rng(4)
    written = Written(tmp_path)
    for label, name in enumerate(["BACKGROUND_Google", "Faces_easy", "accordion"]):
        (location / "Caltech101" / name).mkdir(parents=True)
        for i in range(1, 3):
            events = _events(rng, 300, 230, 170, duration_us=50_000)
            path = location / "Caltech101" / name / f"image_{i:04d}.bin"
            path.write_bytes(_atis_bin(events))
            written.recordings[str(path)] = (events, label)
    with zipfile.ZipFile(location / "N-Caltech101-archive.zip", "w") as archive:
        for path in sorted((location / "Caltech101").rglob("*.bin")):
            archive.write(path, path.relative_to(location).as_posix())
    return written


@pytest.fixture
def tiny_es_root(tmp_path: Path) -> Written:
    """The documented Tiny-ES-ImageNet layout: ``frames`` arrays in train/, ``events`` arrays in val/."""
    rng = np.random.default_rng(5)
    written = Written(tmp_path)
    for label, name in enumerate(["n01443537", "n01629819", "n01641577"]):
        for split in ("train", "val"):
            folder = tmp_path / "TinyESImageNet" / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                path = folder / f"{i}.npz"
                if split == "train":
                    sample = (rng.random((8, 2, 64, 64)) < 0.05).astype(np.uint8)
                    np.savez(path, frames=sample)
                else:
                    sample = _events(rng, 200, 64, 64, duration_us=8)
                    np.savez(path, events=sample)
                written.recordings[str(path)] = (sample, label)
    return written
