"""Small CIFAR-10 files in the exact official formats, for tests.

CIFAR-10 cannot be downloaded on the test machines, so these helpers write
miniature copies of the two official distributions (few images per batch
file, same names, same layout) plus a few deliberately hostile files:

* python version: ``cifar-10-batches-py/`` with ``data_batch_1`` ..
  ``data_batch_5``, ``test_batch`` and ``batches.meta``, each a pickle written
  the way the official files were (Python 2 ``cPickle``, protocol 2, ``str``
  keys, ``b'data'`` a numpy uint8 array of shape (n, 3072), ``b'labels'`` a
  list of int), and the tarball ``cifar-10-python.tar.gz`` holding that folder;
* binary version: ``cifar-10-batches-bin/`` with ``data_batch_1.bin`` ..
  ``data_batch_5.bin``, ``test_batch.bin`` (records of 1 label byte + 3072
  pixel bytes) and ``batches.meta.txt``, and ``cifar-10-binary.tar.gz``.

In both, the 3072 pixel bytes of an image are the red plane, then green, then
blue, each 32x32 row-major. Python 3's pickler cannot write Python 2 byte
strings (it encodes ``bytes`` as ``_codecs.encode`` calls at protocol 2), so
:func:`py2_pickle` emits the opcodes by hand.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
PYTHON_DIR = "cifar-10-batches-py"
BINARY_DIR = "cifar-10-batches-bin"
PYTHON_TAR = "cifar-10-python.tar.gz"
BINARY_TAR = "cifar-10-binary.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
IMAGE_SHAPE = (32, 32, 3)
ROW_BYTES = 32 * 32 * 3


@dataclass(frozen=True)
class CifarSplits:
    """Ground truth for generated files: NHWC uint8 images, int32 labels.

    ``train_*`` is the concatenation of the five training batches in order;
    each batch holds ``images_per_batch`` images, as does the test batch.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    images_per_batch: int

    def train_batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of training batch ``index`` (0-based)."""
        rows = slice(index * self.images_per_batch, (index + 1) * self.images_per_batch)
        return self.train_images[rows], self.train_labels[rows]


def make_splits(images_per_batch: int = 20, seed: int = 0) -> CifarSplits:
    """Random images and labels covering every class, reproducible by ``seed``."""
    rng = np.random.default_rng(seed)

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        images = rng.integers(0, 256, size=(count, *IMAGE_SHAPE), dtype=np.uint8)
        labels = (np.arange(count) % len(LABEL_NAMES)).astype(np.int32)
        return images, rng.permutation(labels)

    train_images, train_labels = draw(5 * images_per_batch)
    test_images, test_labels = draw(images_per_batch)
    return CifarSplits(train_images, train_labels, test_images, test_labels,
                       images_per_batch)


def images_to_rows(images: np.ndarray) -> np.ndarray:
    """NHWC uint8 images -> (n, 3072) rows laid out R plane, G plane, B plane."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), ROW_BYTES)


@dataclass(frozen=True)
class PickleGlobal:
    """A reference to ``module.name`` in a pickle (the GLOBAL opcode)."""

    module: str
    name: str


@dataclass(frozen=True)
class PickleReduce:
    """``func(*args)`` at load time, then ``__setstate__(state)`` if state is given."""

    func: PickleGlobal
    args: tuple
    state: object = None


def py2_pickle(obj: object) -> bytes:
    """Serialise ``obj`` as Python 2 ``cPickle.dumps(obj, 2)`` would.

    Supports what the CIFAR files contain: dict, list, int, bool, None,
    tuple, ``bytes`` (written as a Python 2 ``str``) and uint8 numpy arrays
    (reduced through ``numpy.core.multiarray._reconstruct`` like numpy 1.x
    under Python 2), plus :class:`PickleGlobal` / :class:`PickleReduce` to
    craft arbitrary (e.g. hostile) references. The memo is not used, which
    any unpickler accepts.
    """
    out = io.BytesIO()
    out.write(pickle.PROTO + b"\x02")
    _write_py2(out, obj)
    out.write(pickle.STOP)
    return out.getvalue()


def _write_py2(out: io.BytesIO, obj: object) -> None:
    if isinstance(obj, bool) or obj is None:
        out.write({True: pickle.NEWTRUE, False: pickle.NEWFALSE, None: pickle.NONE}[obj])
    elif isinstance(obj, int):
        if 0 <= obj < 256:
            out.write(pickle.BININT1 + bytes([obj]))
        elif 0 <= obj < 65536:
            out.write(pickle.BININT2 + struct.pack("<H", obj))
        else:
            out.write(pickle.BININT + struct.pack("<i", obj))
    elif isinstance(obj, bytes):
        if len(obj) < 256:
            out.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            out.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
    elif isinstance(obj, tuple):
        _write_tuple(out, obj)
    elif isinstance(obj, list):
        out.write(pickle.EMPTY_LIST + pickle.MARK)
        for item in obj:
            _write_py2(out, item)
        out.write(pickle.APPENDS)
    elif isinstance(obj, dict):
        out.write(pickle.EMPTY_DICT + pickle.MARK)
        for key, value in obj.items():
            _write_py2(out, key)
            _write_py2(out, value)
        out.write(pickle.SETITEMS)
    elif isinstance(obj, np.ndarray) and obj.dtype == np.uint8:
        _write_py2(out, _ndarray_reduction(obj))
    elif isinstance(obj, PickleGlobal):
        out.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
    elif isinstance(obj, PickleReduce):
        _write_py2(out, obj.func)
        _write_tuple(out, obj.args)
        out.write(pickle.REDUCE)
        if obj.state is not None:
            _write_py2(out, obj.state)
            out.write(pickle.BUILD)
    else:
        raise TypeError(f"py2_pickle cannot encode {type(obj).__name__}")


def _write_tuple(out: io.BytesIO, items: tuple) -> None:
    """Tuples as cPickle protocol 2 writes them: TUPLE1/2/3 when short."""
    if not items:
        out.write(pickle.EMPTY_TUPLE)
        return
    short = {1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}.get(len(items))
    if short is None:
        out.write(pickle.MARK)
    for item in items:
        _write_py2(out, item)
    out.write(short or pickle.TUPLE)


def _ndarray_reduction(array: np.ndarray) -> PickleReduce:
    """How numpy 1.x under Python 2 reduced a uint8 array (``ndarray.__reduce__``)."""
    dtype = PickleReduce(PickleGlobal("numpy", "dtype"), (b"u1", 0, 1),
                         state=(3, b"|", None, None, None, -1, -1, 0))
    # State: (pickle version, shape, dtype, is_fortran, raw C-order bytes).
    state = (1, tuple(array.shape), dtype, False, np.ascontiguousarray(array).tobytes())
    return PickleReduce(PickleGlobal("numpy.core.multiarray", "_reconstruct"),
                        (PickleGlobal("numpy", "ndarray"), (0,), b"b"), state=state)


def python_batch_bytes(images: np.ndarray, labels: np.ndarray, batch_label: str) -> bytes:
    """One official python-version batch file (a pickled dict) for these images."""
    batch = {
        b"batch_label": batch_label.encode("ascii"),
        b"labels": [int(label) for label in labels],
        b"data": images_to_rows(images),
        b"filenames": [f"image_{i:05d}.png".encode("ascii") for i in range(len(images))],
    }
    return py2_pickle(batch)


def binary_batch_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """One official binary-version batch file: per image 1 label byte + 3072 pixel bytes."""
    records = np.concatenate(
        [labels.astype(np.uint8)[:, None], images_to_rows(images)], axis=1)
    return records.tobytes()


def python_files(splits: CifarSplits) -> dict[str, bytes]:
    """Official python-version files, keyed by path inside the archive."""
    files = {}
    for index, name in enumerate(TRAIN_BATCHES):
        images, labels = splits.train_batch(index)
        files[f"{PYTHON_DIR}/{name}"] = python_batch_bytes(
            images, labels, f"training batch {index + 1} of 5")
    files[f"{PYTHON_DIR}/{TEST_BATCH}"] = python_batch_bytes(
        splits.test_images, splits.test_labels, "testing batch 1 of 1")
    meta = {
        b"num_cases_per_batch": splits.images_per_batch,
        b"label_names": [name.encode("ascii") for name in LABEL_NAMES],
        b"num_vis": ROW_BYTES,
    }
    files[f"{PYTHON_DIR}/batches.meta"] = py2_pickle(meta)
    return files


def binary_files(splits: CifarSplits) -> dict[str, bytes]:
    """Official binary-version files, keyed by path inside the archive."""
    files = {}
    for index, name in enumerate(TRAIN_BATCHES):
        files[f"{BINARY_DIR}/{name}.bin"] = binary_batch_bytes(*splits.train_batch(index))
    files[f"{BINARY_DIR}/{TEST_BATCH}.bin"] = binary_batch_bytes(
        splits.test_images, splits.test_labels)
    files[f"{BINARY_DIR}/batches.meta.txt"] = "".join(
        f"{name}\n" for name in LABEL_NAMES).encode("ascii")
    return files


def write_files(root: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` (relative path -> content) under ``root``."""
    for relative, content in files.items():
        path = Path(root, relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def write_tar_gz(archive: Path, files: Mapping[str, bytes],
                 directories: tuple[str, ...] = (),
                 symlinks: Mapping[str, str] | None = None) -> Path:
    """Write a gzipped tar with exactly these members, names taken verbatim.

    Names are not sanitised, so hostile archives (``../x``, ``/etc/x``, links
    pointing outside) can be built for tests. ``symlinks`` maps a member name
    to its link target.
    """
    with tarfile.open(archive, "w:gz") as tar:
        for name in directories:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return Path(archive)


def write_python_dir(root: Path, splits: CifarSplits) -> Path:
    """Create ``root/cifar-10-batches-py``; returns that folder."""
    write_files(root, python_files(splits))
    return Path(root, PYTHON_DIR)


def write_binary_dir(root: Path, splits: CifarSplits) -> Path:
    """Create ``root/cifar-10-batches-bin``; returns that folder."""
    write_files(root, binary_files(splits))
    return Path(root, BINARY_DIR)


def write_python_tar(root: Path, splits: CifarSplits) -> Path:
    """Create ``root/cifar-10-python.tar.gz`` (folder entry, then its files)."""
    return write_tar_gz(Path(root, PYTHON_TAR), python_files(splits), (PYTHON_DIR,))


def write_binary_tar(root: Path, splits: CifarSplits) -> Path:
    """Create ``root/cifar-10-binary.tar.gz`` (folder entry, then its files)."""
    return write_tar_gz(Path(root, BINARY_TAR), binary_files(splits), (BINARY_DIR,))


def malicious_pickle(command: str) -> bytes:
    """A pickle whose loading would run ``os.system(command)``."""
    return py2_pickle(PickleReduce(PickleGlobal("os", "system"), (command.encode("utf-8"),)))
