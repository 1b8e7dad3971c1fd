"""Loading Fashion-MNIST and CIFAR-10 as whole splits of numpy arrays.

``load(name, split, data_dir)`` returns ``(images, labels)``: uint8 images in
NHWC layout and int32 labels, read from the datasets' official file formats.
Batching, shuffling and augmentation live elsewhere.

Archives and pickles supplied by users are treated as untrusted: tarballs are
extracted with tarfile's ``data`` filter, and pickles are read by an
unpickler that resolves only the numpy callables the official CIFAR-10 files
reference. Bad input raises ``ValueError`` or ``FileNotFoundError`` with a
one-line message saying what is wrong and how to fix it.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, ModuleType

import numpy as np

try:  # resolved here, not via pickle's import, to skip numpy 2's deprecated numpy.core alias
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct

__all__ = [
    "CIFAR10",
    "DATASETS",
    "FASHION_MNIST",
    "FASHION_MNIST_DEFAULT_DIR",
    "SPLITS",
    "DatasetInfo",
    "get_info",
    "load",
]

PathLike = str | os.PathLike[str]
Arrays = tuple[np.ndarray, np.ndarray]  # (images, labels)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset that models and pipelines need.

    ``mean`` and ``std`` are per channel, for pixels scaled to [0, 1].
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train: int
    num_test: int


FASHION_MNIST = DatasetInfo(
    name="fashion_mnist",
    num_classes=10,
    image_shape=(28, 28, 1),
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    # Mean and std of all 60000*784 training pixels divided by 255, computed
    # once in float64 from the Debian package's train-images-idx3-ubyte.gz
    # (0.2860405969887955, 0.35302424451492254); a test recomputes them.
    mean=(0.286041,),
    std=(0.353024,),
    num_train=60_000,
    num_test=10_000,
)

CIFAR10 = DatasetInfo(
    name="cifar10",
    num_classes=10,
    image_shape=(32, 32, 3),
    class_names=("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"),
    # The constants used throughout the CIFAR-10 literature, kept for
    # comparability. The mean is the per-channel training pixel mean; the std
    # is the customary value, smaller than the training pixel std
    # (about 0.247, 0.243, 0.261).
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2023, 0.1994, 0.2010),
    num_train=50_000,
    num_test=10_000,
)

DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {info.name: info for info in (FASHION_MNIST, CIFAR10)})
SPLITS = ("train", "test")

# Where the Debian package dataset-fashion-mnist installs the idx files.
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")


def get_info(name: str) -> DatasetInfo:
    """Metadata of dataset ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known datasets: "
                         f"{', '.join(sorted(DATASETS))}") from None


def load(name: str, split: str, data_dir: PathLike | None = None) -> Arrays:
    """Load a whole split as ``(images, labels)``.

    ``images`` is uint8 of shape (N, H, W, C), ``labels`` int32 of shape (N,);
    both are freshly allocated, writable arrays.

    Sources: ``fashion_mnist`` reads the idx files (``.gz`` or uncompressed)
    from ``data_dir``, or by default from ``FASHION_MNIST_DEFAULT_DIR``.
    ``cifar10`` reads, from ``data_dir``, the first of
    ``cifar-10-batches-py/``, ``cifar-10-batches-bin/``,
    ``cifar-10-python.tar.gz``, ``cifar-10-binary.tar.gz`` (a tarball is
    extracted next to itself once), and otherwise tensorflow-datasets'
    prepared ``cifar10`` in ``data_dir`` or tfds' default data dir, if
    tensorflow-datasets is installed.
    """
    info = get_info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {name}; use one of: {', '.join(SPLITS)}")
    loaders: dict[str, Callable[[str, PathLike | None], Arrays]] = {
        FASHION_MNIST.name: _load_fashion_mnist,
        CIFAR10.name: _load_cifar10,
    }
    return loaders[info.name](split, data_dir)


def _existing_dir(data_dir: PathLike, dataset: str) -> Path:
    path = Path(data_dir).expanduser()
    try:
        is_dir = path.is_dir()
    except OSError as error:  # e.g. a name too long for the file system
        raise FileNotFoundError(f"data_dir {path} cannot be accessed ({error.strerror or error}); "
                                f"pass the folder that holds the {dataset} files") from None
    if not is_dir:
        raise FileNotFoundError(f"data_dir {path} does not exist or is not a directory; "
                                f"pass the folder that holds the {dataset} files")
    return path


def _checked_labels(labels: np.ndarray, num_classes: int, source: Path) -> np.ndarray:
    """Labels as int32 after checking they are integers in 0..num_classes-1."""
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{source}: labels have type {labels.dtype}, expected integers; "
                         "the file is corrupt or not an official dataset file")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{source}: label values span {labels.min()}..{labels.max()}, "
                         f"expected 0..{num_classes - 1}; the file is corrupt or from "
                         "another dataset")
    return labels.astype(np.int32)


# --- Fashion-MNIST: idx files -------------------------------------------------

IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _load_fashion_mnist(split: str, data_dir: PathLike | None) -> Arrays:
    directory = _fashion_mnist_dir(data_dir)
    image_stem, label_stem = _IDX_STEMS[split]
    image_path = _find_idx_file(directory, image_stem)
    label_path = _find_idx_file(directory, label_stem)
    height, width, _ = FASHION_MNIST.image_shape
    images = _read_idx(image_path, IDX_IMAGES_MAGIC, (height, width))
    labels = _read_idx(label_path, IDX_LABELS_MAGIC, ())
    if len(images) != len(labels):
        raise ValueError(f"{image_path} holds {len(images)} images but {label_path} holds "
                         f"{len(labels)} labels; use the image and label files of the same split")
    return images[..., np.newaxis], _checked_labels(labels, FASHION_MNIST.num_classes, label_path)


def _fashion_mnist_dir(data_dir: PathLike | None) -> Path:
    if data_dir is not None:
        return _existing_dir(data_dir, FASHION_MNIST.name)
    if not FASHION_MNIST_DEFAULT_DIR.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST not found: {FASHION_MNIST_DEFAULT_DIR} does not exist; run "
            "`apt-get install dataset-fashion-mnist` or pass data_dir=<folder with the idx files>")
    return FASHION_MNIST_DEFAULT_DIR


def _find_idx_file(directory: Path, stem: str) -> Path:
    """``stem.gz`` if present, else the uncompressed ``stem``."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{directory} has neither {stem}.gz nor {stem}; put the "
                            "Fashion-MNIST idx files there (the Debian package "
                            f"dataset-fashion-mnist installs them in {FASHION_MNIST_DEFAULT_DIR})")


def _read_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Array stored in an idx file of unsigned bytes, after checking its header.

    Header: big-endian int32 magic, then one big-endian uint32 per dimension.
    """
    raw = _read_possibly_gzipped(path)
    ndim = 1 + len(item_shape)
    header_size = 4 * (1 + ndim)
    if len(raw) < header_size:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than the "
                         f"{header_size}-byte idx header; download the file again")
    (found_magic,) = struct.unpack(">i", raw[:4])
    if found_magic != magic:
        kind = "label" if magic == IDX_LABELS_MAGIC else "image"
        raise ValueError(f"{path} has magic number {found_magic}, expected {magic} for an idx "
                         f"{kind} file; it is not a Fashion-MNIST {kind} file (check the file name)")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    if shape[1:] != item_shape:
        raise ValueError(f"{path} declares items of shape {shape[1:]}, expected {item_shape}; "
                         "it is not a Fashion-MNIST file")
    expected = header_size + int(np.prod(shape))
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "too long"
        raise ValueError(f"{path} is {problem}: its header declares {shape[0]} items "
                         f"({expected} bytes in all) but it has {len(raw)} bytes; "
                         "download the file again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def _read_possibly_gzipped(path: Path) -> bytes:
    with open(path, "rb") as file:
        if path.suffix != ".gz":
            return file.read()
        try:
            return gzip.GzipFile(fileobj=file).read()
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise ValueError(f"{path} is not a complete gzip file ({error}); "
                             "download the file again") from error


# --- CIFAR-10: official python and binary versions, or tfds -------------------

CIFAR10_PYTHON_DIR = "cifar-10-batches-py"
CIFAR10_BINARY_DIR = "cifar-10-batches-bin"
CIFAR10_PYTHON_TAR = "cifar-10-python.tar.gz"
CIFAR10_BINARY_TAR = "cifar-10-binary.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CIFAR10_BATCHES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR10_PIXELS = 32 * 32 * 3  # per image: red plane, green plane, blue plane
_CIFAR10_RECORD = 1 + _CIFAR10_PIXELS  # binary version: label byte, then pixels


def _load_cifar10(split: str, data_dir: PathLike | None) -> Arrays:
    directory = None if data_dir is None else _existing_dir(data_dir, CIFAR10.name)
    if directory is not None:
        if (directory / CIFAR10_PYTHON_DIR).is_dir():
            return _read_cifar10_python(directory / CIFAR10_PYTHON_DIR, split)
        if (directory / CIFAR10_BINARY_DIR).is_dir():
            return _read_cifar10_binary(directory / CIFAR10_BINARY_DIR, split)
        if (directory / CIFAR10_PYTHON_TAR).is_file():
            extracted = _extract_tarball(directory / CIFAR10_PYTHON_TAR, CIFAR10_PYTHON_DIR)
            return _read_cifar10_python(extracted, split)
        if (directory / CIFAR10_BINARY_TAR).is_file():
            extracted = _extract_tarball(directory / CIFAR10_BINARY_TAR, CIFAR10_BINARY_DIR)
            return _read_cifar10_binary(extracted, split)
    tfds = _import_tfds()
    if tfds is not None:
        loaded = _read_cifar10_tfds(tfds, split, directory)
        if loaded is not None:
            return loaded
    where = f"in {directory}" if directory is not None else "(no data_dir given)"
    files = (f"{CIFAR10_PYTHON_TAR} or {CIFAR10_BINARY_TAR} (or the extracted "
             f"{CIFAR10_PYTHON_DIR}/ or {CIFAR10_BINARY_DIR}/) from {CIFAR10_URL}")
    if tfds is None:
        alternative = ("or install the tfds extra (pip install 'ascent_jax[tfds]') and "
                       "prepare cifar10 in a tensorflow-datasets data dir")
    else:
        alternative = ("or prepare cifar10 with tensorflow-datasets in data_dir or in "
                       "tfds' default data dir")
    raise FileNotFoundError(f"CIFAR-10 not found {where}: put {files} in a folder and pass "
                            f"it as data_dir, {alternative}")


def _read_cifar10_binary(directory: Path, split: str) -> Arrays:
    images, labels = [], []
    for batch in _CIFAR10_BATCHES[split]:
        path = _cifar10_batch_path(directory, f"{batch}.bin", CIFAR10_BINARY_TAR)
        raw = path.read_bytes()
        if not raw or len(raw) % _CIFAR10_RECORD:
            raise ValueError(f"{path} has {len(raw)} bytes, not a positive multiple of the "
                             f"{_CIFAR10_RECORD}-byte record (1 label byte + {_CIFAR10_PIXELS} "
                             f"pixel bytes); it is truncated or corrupt, extract "
                             f"{CIFAR10_BINARY_TAR} again")
        records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR10_RECORD)
        labels.append(_checked_labels(records[:, 0], CIFAR10.num_classes, path))
        images.append(_planes_to_nhwc(records[:, 1:]))
    return np.concatenate(images), np.concatenate(labels)


def _read_cifar10_python(directory: Path, split: str) -> Arrays:
    images, labels = [], []
    for batch_name in _CIFAR10_BATCHES[split]:
        path = _cifar10_batch_path(directory, batch_name, CIFAR10_PYTHON_TAR)
        batch = _unpickle_cifar_batch(path)
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise ValueError(f"{path} does not hold a dict with keys b'data' and b'labels'; it "
                             f"is not a CIFAR-10 batch, extract {CIFAR10_PYTHON_TAR} again")
        data, batch_labels = batch[b"data"], batch[b"labels"]
        if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
                or data.shape[1] != _CIFAR10_PIXELS):
            found = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                     else type(data).__name__)
            raise ValueError(f"{path}: b'data' is a {found}, expected a uint8 array of shape "
                             f"(n, {_CIFAR10_PIXELS}); extract {CIFAR10_PYTHON_TAR} again")
        if (not isinstance(batch_labels, list) or len(batch_labels) != len(data)
                or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in batch_labels)):
            raise ValueError(f"{path}: b'labels' must be a list of {len(data)} ints, one per "
                             f"row of b'data'; extract {CIFAR10_PYTHON_TAR} again")
        labels.append(_checked_labels(np.asarray(batch_labels), CIFAR10.num_classes, path))
        images.append(_planes_to_nhwc(data))
    return np.concatenate(images), np.concatenate(labels)


def _cifar10_batch_path(directory: Path, file_name: str, tarball: str) -> Path:
    path = directory / file_name
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a file, so {directory} is not an extracted CIFAR-10 folder; delete that "
                         f"folder and extract {tarball} again")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing, so {directory} is incomplete; delete that "
                                f"folder and extract {tarball} again")
    return path


def _planes_to_nhwc(rows: np.ndarray) -> np.ndarray:
    """(n, 3072) rows of R, G, B planes (each 32x32 row-major) -> (n, 32, 32, 3)."""
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _extract_tarball(archive: Path, folder: str) -> Path:
    """Extract ``archive`` safely and move its ``folder`` next to it; returns the new path.

    Extraction goes to a private staging directory, so a rejected or broken
    archive leaves no half-extracted ``folder`` behind.
    """
    target = archive.parent / folder
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ValueError(f"{target} is a file, not the folder of extracted CIFAR-10 batches, so {archive.name} "
                         f"cannot be extracted beside it; remove or rename {target}")
    try:
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=archive.parent))
    except OSError as error:
        raise ValueError(f"cannot extract {archive} into its folder ({error}); extract it "
                         "into a writable folder yourself and pass that as data_dir") from error
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(staging, filter="data")
        except tarfile.FilterError as error:
            raise ValueError(f"{archive}: refusing to extract member {error.tarinfo.name!r} "
                             f"({error}); this is not an official CIFAR-10 archive, download "
                             f"it again from {CIFAR10_URL}") from error
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
            raise ValueError(f"{archive} is not a readable tar.gz archive ({error}); download "
                             f"it again from {CIFAR10_URL}") from error
        except OSError as error:  # e.g. the disk is full
            raise ValueError(f"cannot extract {archive} into {archive.parent} ({error.strerror or error}); free "
                             "space there, or extract it yourself and pass that folder as data_dir") from error
        extracted = staging / folder
        if not extracted.is_dir():
            raise ValueError(f"{archive} has no {folder}/ folder; it is not the official "
                             f"archive, download it again from {CIFAR10_URL}")
        try:
            extracted.rename(target)
        except OSError as error:
            if not target.is_dir():  # another process may have extracted it meanwhile
                raise ValueError(f"cannot move the extracted {folder}/ to {target} ({error.strerror or error}); "
                                 f"remove {target} if it is there, or extract {archive.name} yourself") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# The official pickles (Python 2 cPickle, protocol 2) build dicts, lists, str
# and ints with opcodes alone; the only globals they name rebuild b'data':
# numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b') followed by a
# numpy.dtype for the state. numpy >= 2 pickles name numpy._core.multiarray.
_ALLOWED_PICKLE_GLOBALS: Mapping[tuple[str, str], object] = MappingProxyType({
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
})


class _ForbiddenGlobalError(pickle.UnpicklingError):
    """A pickle referenced a global outside ``_ALLOWED_PICKLE_GLOBALS``."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can only call the numpy array reconstruction callables."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise _ForbiddenGlobalError(module, name) from None


def _unpickle_cifar_batch(path: Path) -> object:
    try:
        with open(path, "rb") as file:
            return _CifarUnpickler(file, encoding="bytes").load()
    except _ForbiddenGlobalError as error:
        raise ValueError(f"{path}: refusing to unpickle, it references {error.qualified_name}, which the "
                         f"official CIFAR-10 batches never do (they only rebuild numpy arrays), so it is not one "
                         f"of them; extract {CIFAR10_PYTHON_TAR} from {CIFAR10_URL} again") from error
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError, MemoryError, RecursionError) as error:  # MemoryError: a huge length field
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise ValueError(f"{path} is a corrupt pickle ({detail}); extract {CIFAR10_PYTHON_TAR} again") from error


def _import_tfds() -> ModuleType | None:
    """tensorflow_datasets if installed (the optional ``tfds`` extra), else None."""
    try:
        import tensorflow_datasets
    except ImportError:
        return None
    return tensorflow_datasets


def _read_cifar10_tfds(tfds: ModuleType, split: str, directory: Path | None) -> Arrays | None:
    """The split from a prepared tfds ``cifar10``, or None if tfds has not prepared it."""
    builder = tfds.builder(CIFAR10.name, data_dir=None if directory is None else os.fspath(directory))
    if not builder.data_path.exists():
        return None
    images, labels = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                                      as_supervised=True))
    source = Path(builder.data_dir)
    if images.dtype != np.uint8 or images.shape[1:] != CIFAR10.image_shape:
        raise ValueError(f"{source}: tfds cifar10 gave {images.dtype} images of shape "
                         f"{images.shape[1:]}, expected uint8 {CIFAR10.image_shape}; "
                         "prepare the dataset again with tensorflow-datasets")
    return np.array(images), _checked_labels(np.asarray(labels), CIFAR10.num_classes, source)
