"""Tests for ascent_jax.data: real Fashion-MNIST, generated CIFAR-10 files, bad input."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import cifar_fixtures as cf
from ascent_jax import data

needs_fashion_mnist = pytest.mark.skipif(
    not data.FASHION_MNIST_DEFAULT_DIR.is_dir(),
    reason="needs the Debian package dataset-fashion-mnist")

# sha256 of the uint8 image bytes / uint8 label bytes, computed once from the
# Debian package's files with this loader.
FASHION_MNIST_SHA256 = {
    "train": ("2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
              "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7"),
    "test": ("c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
             "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9"),
}


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an idx file (gzipped when ``path`` ends in .gz)."""
    header = struct.pack(f">i{array.ndim}I", 0x800 | array.ndim, *array.shape)
    content = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)
    return path


def write_small_fashion_mnist(directory: Path, suffix: str = ".gz") -> tuple[np.ndarray, np.ndarray]:
    """Five random test-split images and labels as idx files in ``directory``."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 7], dtype=np.uint8)
    write_idx(directory / f"t10k-images-idx3-ubyte{suffix}", images)
    write_idx(directory / f"t10k-labels-idx1-ubyte{suffix}", labels)
    return images, labels


# --- real Fashion-MNIST ---------------------------------------------------------

@pytest.fixture(scope="module")
def fashion_train() -> tuple[np.ndarray, np.ndarray]:
    return data.load("fashion_mnist", "train")


@needs_fashion_mnist
@pytest.mark.parametrize("split, count, per_class", [("train", 60_000, 6_000),
                                                     ("test", 10_000, 1_000)])
def test_real_fashion_mnist_shapes_classes_and_checksums(split, count, per_class, request):
    images, labels = (request.getfixturevalue("fashion_train") if split == "train"
                      else data.load("fashion_mnist", "test"))
    info = data.DATASETS["fashion_mnist"]
    assert images.shape == (count, *info.image_shape) == (count, 28, 28, 1)
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    assert labels.shape == (count,)
    assert count == (info.num_train if split == "train" else info.num_test)
    np.testing.assert_array_equal(np.bincount(labels, minlength=11), [per_class] * 10 + [0])
    image_hash, label_hash = FASHION_MNIST_SHA256[split]
    assert hashlib.sha256(images.tobytes()).hexdigest() == image_hash
    assert hashlib.sha256(labels.astype(np.uint8).tobytes()).hexdigest() == label_hash
    assert labels[0] == 9  # both splits start with an ankle boot
    assert images.flags.writeable


@needs_fashion_mnist
def test_fashion_mnist_normalisation_constants_match_train_set(fashion_train):
    pixels = fashion_train[0].astype(np.float64) / 255.0
    assert data.FASHION_MNIST.mean == pytest.approx((pixels.mean(),), abs=1e-6)
    assert data.FASHION_MNIST.std == pytest.approx((pixels.std(),), abs=1e-6)


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_fashion_mnist_from_data_dir_gzipped_or_uncompressed(tmp_path, suffix):
    images, labels = write_small_fashion_mnist(tmp_path, suffix)
    loaded_images, loaded_labels = data.load("fashion_mnist", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(loaded_images, images[..., None])
    np.testing.assert_array_equal(loaded_labels, labels)
    assert loaded_labels.dtype == np.int32


def test_dataset_registry_metadata():
    assert set(data.DATASETS) == {"fashion_mnist", "cifar10"}
    for name, info in data.DATASETS.items():
        assert info.name == name and data.get_info(name) is info
        assert len(info.class_names) == info.num_classes == 10
        assert len(info.mean) == len(info.std) == info.image_shape[-1]
    assert data.CIFAR10.class_names == cf.LABEL_NAMES
    assert data.CIFAR10.mean == (0.4914, 0.4822, 0.4465)
    assert data.CIFAR10.std == (0.2023, 0.1994, 0.2010)
    with pytest.raises(AttributeError):
        data.CIFAR10.num_classes = 11


# --- generated CIFAR-10 ---------------------------------------------------------

CIFAR_LAYOUTS = {
    "python_dir": cf.write_python_dir,
    "python_tar": cf.write_python_tar,
    "binary_dir": cf.write_binary_dir,
    "binary_tar": cf.write_binary_tar,
}


@pytest.fixture(scope="module")
def cifar_splits() -> cf.CifarSplits:
    return cf.make_splits(images_per_batch=20, seed=0)


@pytest.mark.parametrize("layout", CIFAR_LAYOUTS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_official_layouts_match_ground_truth(tmp_path, cifar_splits, layout, split):
    CIFAR_LAYOUTS[layout](tmp_path, cifar_splits)
    images, labels = data.load("cifar10", split, data_dir=tmp_path)
    expected_images, expected_labels = (
        (cifar_splits.train_images, cifar_splits.train_labels) if split == "train"
        else (cifar_splits.test_images, cifar_splits.test_labels))
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    assert images.shape == (len(expected_images), 32, 32, 3)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)


def test_cifar10_tarball_is_extracted_once_next_to_itself(tmp_path, cifar_splits):
    archive = cf.write_python_tar(tmp_path, cifar_splits)
    first = data.load("cifar10", "test", data_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cf.PYTHON_TAR, cf.PYTHON_DIR])
    archive.unlink()  # the extracted folder is now the source
    second = data.load("cifar10", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(first[0], second[0])


def _planes_image_rows() -> tuple[np.ndarray, np.ndarray]:
    """Two images written plane by plane, independently of the fixtures' encoder.

    Image 0: R plane all 10, G all 20, B all 30. Image 1: R[y, x] = (32y + x)
    mod 256, G = 255 - R, B = 7, which also pins the row-major order.
    """
    ramp = (np.arange(32 * 32) % 256).astype(np.uint8)
    constant = np.concatenate([np.full(1024, value, np.uint8) for value in (10, 20, 30)])
    graded = np.concatenate([ramp, 255 - ramp, np.full(1024, 7, np.uint8)])
    return np.stack([constant, graded]), np.array([3, 8], dtype=np.uint8)


def _check_plane_order(images: np.ndarray, labels: np.ndarray) -> None:
    assert (images[0, ..., 0] == 10).all() and (images[0, ..., 1] == 20).all()
    assert (images[0, ..., 2] == 30).all()
    ys, xs = np.mgrid[0:32, 0:32]
    np.testing.assert_array_equal(images[1, ..., 0], (32 * ys + xs) % 256)
    np.testing.assert_array_equal(images[1, ..., 1], 255 - (32 * ys + xs) % 256)
    assert (images[1, ..., 2] == 7).all()
    np.testing.assert_array_equal(labels, [3, 8])


def test_cifar10_binary_decodes_rgb_planes(tmp_path):
    rows, labels = _planes_image_rows()
    records = b"".join(bytes([label]) + row.tobytes() for label, row in zip(labels, rows))
    cf.write_files(tmp_path, {f"{cf.BINARY_DIR}/test_batch.bin": records})
    _check_plane_order(*data.load("cifar10", "test", data_dir=tmp_path))


def test_cifar10_python_decodes_rgb_planes(tmp_path):
    rows, labels = _planes_image_rows()
    batch = cf.py2_pickle({b"data": rows, b"labels": [int(label) for label in labels]})
    cf.write_files(tmp_path, {f"{cf.PYTHON_DIR}/test_batch": batch})
    _check_plane_order(*data.load("cifar10", "test", data_dir=tmp_path))


def test_cifar10_python3_pickle_with_numpy2_reconstruct_path_loads(tmp_path, cifar_splits):
    rows = cf.images_to_rows(cifar_splits.test_images)
    batch = pickle.dumps({b"data": rows, b"labels": cifar_splits.test_labels.tolist()},
                         protocol=4)
    cf.write_files(tmp_path, {f"{cf.PYTHON_DIR}/test_batch": batch})
    images, labels = data.load("cifar10", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(images, cifar_splits.test_images)
    np.testing.assert_array_equal(labels, cifar_splits.test_labels)


def _fake_tfds(prepared_dir: Path, images: np.ndarray, labels: np.ndarray) -> types.ModuleType:
    """Stand-in for tensorflow_datasets exposing the calls the loader makes."""
    module = types.ModuleType("tensorflow_datasets")

    class Builder:
        def __init__(self, name: str, data_dir: str | None) -> None:
            assert name == "cifar10"
            self.data_dir = str(Path(data_dir or prepared_dir, "cifar10", "3.0.2"))
            self.data_path = Path(self.data_dir)

        def as_dataset(self, *, split: str, batch_size: int, as_supervised: bool):
            assert (split, batch_size, as_supervised) == ("test", -1, True)
            return images, labels.astype(np.int64)

    module.builder = lambda name, data_dir=None: Builder(name, data_dir)
    module.as_numpy = lambda tree: tree
    return module


def test_cifar10_through_tfds_when_no_official_files(tmp_path, monkeypatch, cifar_splits):
    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)
    fake = _fake_tfds(tmp_path, cifar_splits.test_images, cifar_splits.test_labels)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    images, labels = data.load("cifar10", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(images, cifar_splits.test_images)
    np.testing.assert_array_equal(labels, cifar_splits.test_labels)
    assert labels.dtype == np.int32


# --- bad input ----------------------------------------------------------------

def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError,
                       match=r"unknown dataset 'mnist'; known datasets: cifar10, fashion_mnist"):
        data.load("mnist", "train")


def test_unknown_split():
    with pytest.raises(ValueError,
                       match=r"unknown split 'val' for cifar10; use one of: train, test"):
        data.load("cifar10", "val")


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_missing_data_dir(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist or is not a directory"):
        data.load(name, "test", data_dir=tmp_path / "nowhere")


def test_missing_default_fashion_mnist_dir_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DEFAULT_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError,
                       match=r"apt-get install dataset-fashion-mnist` or pass data_dir"):
        data.load("fashion_mnist", "train")


def test_missing_idx_file(tmp_path):
    write_small_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"neither t10k-labels-idx1-ubyte.gz nor t10k-labels-idx1-ubyte"):
        data.load("fashion_mnist", "test", data_dir=tmp_path)


def test_idx_wrong_magic(tmp_path):
    images, _ = write_small_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", images)  # an image file under a label name
    with pytest.raises(ValueError,
                       match=r"has magic number 2051, expected 2049 for an idx label file"):
        data.load("fashion_mnist", "test", data_dir=tmp_path)


def test_idx_truncated_payload(tmp_path):
    write_small_fashion_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    with pytest.raises(ValueError, match=r"is truncated: its header declares 5 items"):
        data.load("fashion_mnist", "test", data_dir=tmp_path)


def test_idx_truncated_gzip_stream(tmp_path):
    write_small_fashion_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ValueError, match=r"is not a complete gzip file"):
        data.load("fashion_mnist", "test", data_dir=tmp_path)


def test_idx_image_and_label_counts_differ(tmp_path):
    write_small_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match=r"holds 5 images but .* holds 4 labels"):
        data.load("fashion_mnist", "test", data_dir=tmp_path)


@pytest.mark.parametrize("size", [0, 3073 * 2 + 1, 3073 * 2 - 1])
def test_cifar10_binary_file_of_wrong_size(tmp_path, size):
    cf.write_files(tmp_path, {f"{cf.BINARY_DIR}/test_batch.bin": bytes(size)})
    with pytest.raises(ValueError,
                       match=rf"test_batch.bin has {size} bytes, not a positive multiple of the 3073-byte record"):
        data.load("cifar10", "test", data_dir=tmp_path)


def test_cifar10_python_rows_must_have_3072_columns(tmp_path):
    batch = cf.py2_pickle({b"data": np.zeros((2, 3073), np.uint8), b"labels": [0, 1]})
    cf.write_files(tmp_path, {f"{cf.PYTHON_DIR}/test_batch": batch})
    with pytest.raises(ValueError,
                       match=r"b'data' is a uint8 array of shape \(2, 3073\), expected a uint8 array of shape \(n, 3072\)"):
        data.load("cifar10", "test", data_dir=tmp_path)


def test_cifar10_label_out_of_range(tmp_path):
    record = bytes([10]) + bytes(3072)
    cf.write_files(tmp_path, {f"{cf.BINARY_DIR}/test_batch.bin": record})
    with pytest.raises(ValueError, match=r"label values span 10..10, expected 0..9"):
        data.load("cifar10", "test", data_dir=tmp_path)


def test_cifar10_incomplete_extracted_dir(tmp_path, cifar_splits):
    folder = cf.write_python_dir(tmp_path, cifar_splits)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3 is missing, so .* is incomplete"):
        data.load("cifar10", "train", data_dir=tmp_path)


def test_malicious_pickle_is_refused_without_running(tmp_path, cifar_splits):
    marker = tmp_path / "pwned"
    folder = cf.write_python_dir(tmp_path, cifar_splits)
    (folder / "test_batch").write_bytes(cf.malicious_pickle(f"touch {marker}"))
    with pytest.raises(ValueError,
                       match=r"test_batch: refusing to unpickle, it references os\.system"):
        data.load("cifar10", "test", data_dir=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("subprocess", "Popen"),
                                          ("numpy", "load"), ("_codecs", "encode")])
def test_pickle_globals_outside_allowlist_are_refused(tmp_path, module, name):
    hostile = cf.PickleReduce(cf.PickleGlobal(module, name), (b"x",))
    batch = cf.py2_pickle({b"data": hostile, b"labels": []})
    cf.write_files(tmp_path, {f"{cf.PYTHON_DIR}/test_batch": batch})
    with pytest.raises(ValueError, match=rf"refusing to unpickle, it references {module}\.{name}"):
        data.load("cifar10", "test", data_dir=tmp_path)


def test_corrupt_pickle(tmp_path, cifar_splits):
    folder = cf.write_python_dir(tmp_path, cifar_splits)
    batch = folder / "test_batch"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"test_batch is a corrupt pickle"):
        data.load("cifar10", "test", data_dir=tmp_path)


@pytest.mark.parametrize("files, symlinks", [
    ({f"{cf.PYTHON_DIR}/../../escaped": b"x"}, {}),
    ({}, {f"{cf.PYTHON_DIR}/link": "../../outside"}),
], ids=["dotdot_member", "symlink_out"])
def test_tar_member_escaping_target_is_refused(tmp_path, cifar_splits, files, symlinks):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    members = {**cf.python_files(cifar_splits), **files}
    cf.write_tar_gz(data_dir / cf.PYTHON_TAR, members, (cf.PYTHON_DIR,), symlinks)
    with pytest.raises(ValueError, match=r"cifar-10-python.tar.gz: refusing to extract member"):
        data.load("cifar10", "train", data_dir=data_dir)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cifar-10-python.tar.gz", "data"]


def test_cifar10_not_found_without_tfds_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(FileNotFoundError,
                       match=r"CIFAR-10 not found in .*cifar-10-python.tar.gz.*pip install 'ascent_jax\[tfds\]'"):
        data.load("cifar10", "train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 not found \(no data_dir given\)"):
        data.load("cifar10", "train")


def test_cifar10_not_found_with_unprepared_tfds(tmp_path, monkeypatch, cifar_splits):
    fake = _fake_tfds(tmp_path, cifar_splits.test_images, cifar_splits.test_labels)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    with pytest.raises(FileNotFoundError, match=r"or prepare cifar10 with tensorflow-datasets"):
        data.load("cifar10", "test", data_dir=tmp_path)


def test_error_messages_are_one_line(tmp_path, cifar_splits):
    folder = cf.write_python_dir(tmp_path, cifar_splits)
    (folder / "test_batch").write_bytes(cf.malicious_pickle("true"))
    calls = [lambda: data.load("nope", "train"),
             lambda: data.load("cifar10", "test", data_dir=tmp_path),
             lambda: data.load("cifar10", "test", data_dir=tmp_path / "missing")]
    for call in calls:
        with pytest.raises((ValueError, FileNotFoundError)) as caught:
            call()
        assert "\n" not in str(caught.value)
