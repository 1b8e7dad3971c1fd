"""Catalogue of bad inputs: every user-facing failure mode of the library and its CLI, with its message.

Each case asserts the specific one-line message a user gets. CLI cases also check the contract
of :func:`ascent_jax.cli.run_main` and :class:`ascent_jax.cli.ArgumentParser`: exit status 2,
a single ``error:`` line on stderr, no traceback, nothing on stdout and no output left behind.
"""

from __future__ import annotations

import errno
import functools
import gzip
import io
import json
import math
import os
import pickle
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest

import cifar_fixtures as cf
from ascent_jax import data, datamodels, ensemble, forget_sets, klom, models, train, unlearn
from ascent_jax.cli import run_main
from ascent_jax.unlearn import grids
from experiments import cifar, fashion, merge, plots

REPO = Path(__file__).resolve().parents[1]
PROG = "python -m ascent_jax.forget_sets"
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
NUM_IMAGES = 64  # train split of the fake Fashion-MNIST folder
SMALL_SETS = ["--random-sizes", "2", "--top-sizes", "2", "--split-size", "2"]  # fit a 64-point split


# --- helpers ------------------------------------------------------------------

class CliResult(NamedTuple):
    """What a CLI run left: its exit status and its two output streams."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(module: str, *args: str, cwd: Path) -> CliResult:
    """``python -m module args`` in a subprocess, importing this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    return CliResult(done.returncode, done.stdout, done.stderr)


def call_cli(capsys, *args: str, main=forget_sets.main) -> CliResult:
    """A CLI's ``main`` (default ``forget_sets.main``) in-process through ``run_main``, as ``python -m`` runs it."""
    try:
        code = run_main(main, list(args))
    except SystemExit as exit_:  # argparse rejected an argument
        code = exit_.code
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def assert_user_error(result: CliResult, fragment: str, prog: str = PROG) -> None:
    """Exit 2, nothing on stdout, no traceback, exactly one ``error: ...`` line on stderr matching ``fragment``.

    Flag errors (argparse) end with `` (see PROG --help)``; ``fragment`` may omit that tail.
    """
    assert result.returncode == 2, result
    assert result.stdout == "", result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    line = lines[0].removesuffix(f" (see {prog} --help)")
    assert re.search(fragment, line), f"{fragment!r} not in {line!r}"


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its contents (None for folders), to check that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    """An idx file (big-endian magic and dimensions, then uint8 items), gzipped."""
    header = struct.pack(f">i{array.ndim}I", magic, *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(directory: Path) -> Path:
    """A Fashion-MNIST folder whose train split has ``NUM_IMAGES`` random images (all 10 classes)."""
    directory.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, 28, 28), dtype=np.uint8)
    labels = np.arange(NUM_IMAGES) % 10
    (directory / TRAIN_IMAGES).write_bytes(idx_bytes(data.IDX_IMAGES_MAGIC, images))
    (directory / TRAIN_LABELS).write_bytes(idx_bytes(data.IDX_LABELS_MAGIC, labels))
    return directory


# --- data sets: ascent_jax.data.load --------------------------------------------

def _fashion_overwrite(file_name: str, content: bytes):
    def setup(tmp: Path):
        (write_fashion_mnist(tmp) / file_name).write_bytes(content)
        return "fashion_mnist", tmp
    return setup


def _cifar_python_overwrite(batch: str, content: bytes):
    def setup(tmp: Path):
        (cf.write_python_dir(tmp, cf.make_splits(images_per_batch=2)) / batch).write_bytes(content)
        return "cifar10", tmp
    return setup


def _cifar_binary_batch(content: bytes):
    def setup(tmp: Path):
        cf.write_files(tmp, {f"{cf.BINARY_DIR}/data_batch_1.bin": content})
        return "cifar10", tmp
    return setup


def _cifar_python_without(batch: str):
    def setup(tmp: Path):
        (cf.write_python_dir(tmp, cf.make_splits(images_per_batch=2)) / batch).unlink()
        return "cifar10", tmp
    return setup


def _cifar_python_batch_is_a_folder(tmp: Path):
    folder = cf.write_python_dir(tmp, cf.make_splits(images_per_batch=2))
    (folder / "data_batch_2").unlink()
    (folder / "data_batch_2").mkdir()
    return "cifar10", tmp


def _data_dir_is_file(tmp: Path):
    (tmp / "a_file").write_text("not a folder")
    return "fashion_mnist", tmp / "a_file"


_IMAGE_FILE = idx_bytes(data.IDX_IMAGES_MAGIC, np.zeros((NUM_IMAGES, 28, 28), np.uint8))
_VALID_BATCH = cf.python_batch_bytes(np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]), "batch")

DATA_CASES = [
    pytest.param(lambda tmp: ("fashion_mnist", tmp / "nowhere"), FileNotFoundError,
                 r"nowhere does not exist or is not a directory; pass the folder that holds the fashion_mnist files",
                 id="missing-dir"),
    pytest.param(_data_dir_is_file, FileNotFoundError, r"a_file does not exist or is not a directory",
                 id="data-dir-is-a-file"),
    pytest.param(lambda tmp: ("fashion_mnist", tmp), FileNotFoundError,
                 rf"has neither {TRAIN_IMAGES} nor train-images-idx3-ubyte; put the Fashion-MNIST idx files there",
                 id="fashion-empty-dir"),
    pytest.param(lambda tmp: ("cifar10", tmp), FileNotFoundError,
                 r"CIFAR-10 not found in .*: put cifar-10-python.tar.gz or cifar-10-binary.tar.gz",
                 id="cifar-empty-dir"),
    pytest.param(lambda tmp: ("mnist", tmp), ValueError,
                 r"unknown dataset 'mnist'; known datasets: cifar10, fashion_mnist", id="unknown-dataset"),
    pytest.param(_fashion_overwrite(TRAIN_LABELS, _IMAGE_FILE), ValueError,
                 rf"{TRAIN_LABELS} has magic number 2051, expected 2049 for an idx label file", id="idx-wrong-magic"),
    pytest.param(_fashion_overwrite(TRAIN_IMAGES, _IMAGE_FILE[:-40]), ValueError,
                 rf"{TRAIN_IMAGES} is not a complete gzip file .*; download the file again", id="idx-truncated-gzip"),
    pytest.param(_fashion_overwrite(TRAIN_IMAGES, gzip.compress(gzip.decompress(_IMAGE_FILE)[:-784])), ValueError,
                 rf"{TRAIN_IMAGES} is truncated: its header declares 64 items \(50192 bytes in all\) but it has 49408",
                 id="idx-truncated-payload"),
    pytest.param(_fashion_overwrite(TRAIN_IMAGES, gzip.compress(b"\x00\x00")), ValueError,
                 r"is truncated: 2 bytes, shorter than the 16-byte idx header", id="idx-shorter-than-header"),
    pytest.param(_fashion_overwrite(TRAIN_LABELS, idx_bytes(data.IDX_LABELS_MAGIC, np.zeros(63))), ValueError,
                 rf"holds 64 images but .*{TRAIN_LABELS} holds 63 labels", id="idx-count-mismatch"),
    pytest.param(_fashion_overwrite(TRAIN_LABELS, idx_bytes(data.IDX_LABELS_MAGIC, np.arange(64) % 11)), ValueError,
                 r"label values span 0..10, expected 0..9", id="idx-label-out-of-range"),
    pytest.param(_cifar_binary_batch(bytes(2 * 3073 + 5)), ValueError,
                 r"data_batch_1.bin has 6151 bytes, not a positive multiple of the 3073-byte record",
                 id="cifar-binary-wrong-size"),
    pytest.param(_cifar_python_overwrite("data_batch_1", b"this is not a pickle"), ValueError,
                 r"data_batch_1 is a corrupt pickle \(UnpicklingError: .*\); extract cifar-10-python.tar.gz again",
                 id="cifar-not-a-pickle"),
    pytest.param(_cifar_python_overwrite("data_batch_1", _VALID_BATCH[:1000]), ValueError,
                 r"data_batch_1 is a corrupt pickle", id="cifar-truncated-pickle"),
    pytest.param(_cifar_python_overwrite("data_batch_1", cf.py2_pickle([1, 2])), ValueError,
                 r"data_batch_1 does not hold a dict with keys b'data' and b'labels'", id="cifar-pickle-not-a-batch"),
    pytest.param(_cifar_python_without("data_batch_3"), FileNotFoundError,
                 r"data_batch_3 is missing, so .* is incomplete; delete that folder", id="cifar-batch-missing"),
    pytest.param(_fashion_overwrite(TRAIN_IMAGES, b"plain bytes, not gzip"), ValueError,
                 rf"{TRAIN_IMAGES} is not a complete gzip file \(Not a gzipped file \(b'pl'\)\); download the file "
                 r"again$", id="idx-not-gzip"),
    pytest.param(_fashion_overwrite(TRAIN_IMAGES, _IMAGE_FILE[:-8] + bytes(8)), ValueError,
                 rf"{TRAIN_IMAGES} is not a complete gzip file \(CRC check failed .*\); download the file again$",
                 id="idx-gzip-crc-error"),
    pytest.param(_cifar_python_batch_is_a_folder, ValueError,
                 rf"{cf.PYTHON_DIR}/data_batch_2 is not a file, so .*{cf.PYTHON_DIR} is not an extracted CIFAR-10 "
                 rf"folder; delete that folder and extract {cf.PYTHON_TAR} again$", id="cifar-batch-is-a-folder"),
    pytest.param(_cifar_python_overwrite("data_batch_1", b"\x80\x04\x8e" + struct.pack("<Q", 2**62)), ValueError,
                 rf"data_batch_1 is a corrupt pickle \(MemoryError\); extract {cf.PYTHON_TAR} again$",
                 id="cifar-pickle-huge-length"),
    pytest.param(_cifar_python_overwrite("data_batch_1", cf.py2_pickle({b"data": np.zeros((2, 3072), np.uint8),
                                                                        b"labels": [[1], [2, 3]]})), ValueError,
                 rf"data_batch_1: b'labels' must be a list of 2 ints, one per row of b'data'; extract {cf.PYTHON_TAR} "
                 r"again$", id="cifar-labels-not-ints"),
    pytest.param(_cifar_python_overwrite("data_batch_1", pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                                                       b"labels": [0, 1]}, protocol=2)), ValueError,
                 r"data_batch_1: refusing to unpickle, it references _codecs\.encode, which the official CIFAR-10 "
                 r"batches never do \(they only rebuild numpy arrays\), so it is not one of them; extract "
                 rf"{cf.PYTHON_TAR} from {re.escape(data.CIFAR10_URL)} again$", id="cifar-python3-pickle"),
]


@pytest.mark.parametrize("setup, error, fragment", DATA_CASES)
def test_bad_data(tmp_path, monkeypatch, setup, error, fragment):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # same message with or without the extra
    name, data_dir = setup(tmp_path)
    with pytest.raises(error, match=fragment) as caught:
        data.load(name, "train", data_dir)
    assert "\n" not in str(caught.value)


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match=r"unknown split 'validation' for fashion_mnist; use one of: train, test"):
        data.load("fashion_mnist", "validation", write_fashion_mnist(tmp_path))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    folder = cf.write_python_dir(tmp_path, cf.make_splits(images_per_batch=2))
    (folder / "data_batch_1").write_bytes(cf.malicious_pickle(f"touch {marker}"))
    with pytest.raises(ValueError, match=r"data_batch_1: refusing to unpickle, it references os\.system, which the "
                                         r"official CIFAR-10 batches never do \(they only rebuild numpy arrays\)") \
            as caught:
        data.load("cifar10", "train", tmp_path)
    assert not marker.exists()
    assert "possibly malicious" not in str(caught.value)


@pytest.mark.parametrize("members, symlinks, fragment", [
    ({f"{cf.PYTHON_DIR}/../../evil": b"x"}, {}, r"refusing to extract member 'cifar-10-batches-py/../../evil'"),
    ({}, {f"{cf.PYTHON_DIR}/link": "/etc/passwd"}, r"refusing to extract member 'cifar-10-batches-py/link'"),
], ids=["dotdot-member", "absolute-symlink"])
def test_tar_member_escaping_the_folder_is_refused(tmp_path, members, symlinks, fragment):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    files = {**cf.python_files(cf.make_splits(images_per_batch=2)), **members}
    cf.write_tar_gz(data_dir / cf.PYTHON_TAR, files, (cf.PYTHON_DIR,), symlinks)
    with pytest.raises(ValueError, match=rf"{cf.PYTHON_TAR}: {fragment} .*; this is not an official CIFAR-10 archive"):
        data.load("cifar10", "train", data_dir)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["data", f"data/{cf.PYTHON_TAR}"]


def test_tar_member_with_absolute_name_is_confined(tmp_path):
    """tarfile's ``data`` filter strips the leading ``/``: the member lands in the staging folder, which is deleted."""
    target = tmp_path / "absolute-evil"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    splits = cf.make_splits(images_per_batch=2)
    cf.write_tar_gz(data_dir / cf.PYTHON_TAR, {**cf.python_files(splits), str(target): b"x"}, (cf.PYTHON_DIR,))
    images, _ = data.load("cifar10", "train", data_dir)
    np.testing.assert_array_equal(images, splits.train_images)
    assert not target.exists()
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([cf.PYTHON_TAR, cf.PYTHON_DIR])


@pytest.mark.parametrize("blocker", ["file", "broken-link"])
def test_file_in_place_of_the_extracted_folder(tmp_path, blocker):
    """A file (or dangling link) named cifar-10-batches-py beside the tarball: one line naming it, nothing written."""
    cf.write_python_tar(tmp_path, cf.make_splits(images_per_batch=2))
    in_the_way = tmp_path / cf.PYTHON_DIR
    if blocker == "file":
        in_the_way.write_text("not a folder")
    else:
        in_the_way.symlink_to(tmp_path / "gone")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError) as caught:
        data.load("cifar10", "train", tmp_path)
    assert str(caught.value) == (f"{in_the_way} is a file, not the folder of extracted CIFAR-10 batches, so "
                                 f"{cf.PYTHON_TAR} cannot be extracted beside it; remove or rename {in_the_way}")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_data_dir_name_too_long(tmp_path):
    too_long = tmp_path / ("d" * 300)
    with pytest.raises(FileNotFoundError, match=rf"^data_dir {re.escape(str(too_long))} cannot be accessed \(File name "
                                                r"too long\); pass the folder that holds the cifar10 files$"):
        data.load("cifar10", "train", too_long)


def _truncated_tarball(archive: Path) -> None:
    cf.write_tar_gz(archive, cf.python_files(cf.make_splits(images_per_batch=2)), (cf.PYTHON_DIR,))
    archive.write_bytes(archive.read_bytes()[:2000])


@pytest.mark.parametrize("write", [
    lambda archive: archive.write_bytes(gzip.compress(b"not a tar archive")),
    lambda archive: archive.write_bytes(b""),
    _truncated_tarball,
], ids=["not-a-tar", "empty-file", "truncated"])
def test_unreadable_tarball(tmp_path, write):
    write(tmp_path / cf.PYTHON_TAR)
    with pytest.raises(ValueError, match=rf"{cf.PYTHON_TAR} is not a readable tar.gz archive \(.*\); download it"):
        data.load("cifar10", "train", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [cf.PYTHON_TAR]


# --- forget-set index files: ascent_jax.forget_sets.load_index_file --------------

def write_index_file(path: Path, content) -> Path:
    """An index file: arrays via ``np.save``, text as is, bytes verbatim."""
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, indices=np.arange(3))
    return buffer.getvalue()


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The header of a version 1.0 ``.npy`` file of int64 items of ``shape``, without the items."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<i8", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


_FORMATS = re.escape("a 1-D integer array saved with numpy.save (.npy), whole numbers in a .txt file or a .json "
                     "list of them")
_ZIP_REFUSED = re.escape("not a .npy array file but a zip archive (an .npz?); save one 1-D integer array with "
                         "numpy.save(file, indices), or write the indices as .txt or .json")
_PICKLE_REFUSED = re.escape("holds a Python pickle, and pickles are not accepted; save the indices with "
                            "numpy.save(file, indices) (an integer array, no pickling) or write them as .txt or .json")

INDEX_CASES = [
    pytest.param("F.npy", np.array([3, 10, 12]), r"indices out of range \[0, 10\): \[10, 12\]", id="out-of-range-npy"),
    pytest.param("F.txt", "3, 10", r"indices out of range \[0, 10\): \[10\]", id="out-of-range-txt"),
    pytest.param("F.json", "[3, 10]", r"indices out of range \[0, 10\): \[10\]", id="out-of-range-json"),
    pytest.param("F.npy", np.array([-1, 2]), r"negative indices: \[-1\]", id="negative-npy"),
    pytest.param("F.txt", "1 -2 3", r"negative indices: \[-2\]", id="negative-txt"),
    pytest.param("F.json", "[1, -2]", r"negative indices: \[-2\]", id="negative-json"),
    pytest.param("F.npy", np.array([4, 7, 4, 7, 1]), r"duplicate indices: \[4, 7\]", id="duplicates-npy"),
    pytest.param("F.txt", "4\n4", r"duplicate indices: \[4\]", id="duplicates-txt"),
    pytest.param("F.json", '{"indices": [5, 5]}', r"duplicate indices: \[5\]", id="duplicates-json-object"),
    pytest.param("F.npy", np.array([], np.int64), r"contains no indices", id="empty-npy"),
    pytest.param("F.txt", " \n", r"contains no indices", id="empty-txt"),
    pytest.param("F.json", "[]", r"contains no indices", id="empty-json"),
    pytest.param("F.npy", np.array([1.0, 1.5]), r"non-integer values: \[1.5\]", id="float-npy"),
    pytest.param("F.npy", np.array(["1", "abc"]), r"non-integer values: \['abc'\]", id="string-npy"),
    pytest.param("F.txt", "1 1.5 abc", r"non-integer values: \['1.5', 'abc'\]", id="non-integer-txt"),
    pytest.param("F.json", '[1, 1.5, "abc", true, null]', r"non-integer values: \[1.5, 'abc', True, None\]",
                 id="non-integer-json"),
    pytest.param("F.json", "[1, 2", r"cannot read it: Expecting ',' delimiter: .*", id="bad-json"),
    pytest.param("F.txt", b"\xff\xfe1 2", r"not a UTF-8 text file \(byte 0xff at offset 0\); expected " + _FORMATS,
                 id="bad-utf8-txt"),
    pytest.param("F.npy", np.zeros((2, 2), int), r"expected a 1-D array, got shape \(2, 2\)", id="2d-npy"),
    pytest.param("F.csv", "1,2", r"unsupported format '.csv'; use .npy, .txt or .json", id="csv"),
    pytest.param("F.txt", "1 99999999999999999999999", r"indices out of range \[0, 10\): \[99999999999999999999999\]",
                 id="beyond-int64-txt"),
    pytest.param("F.npy", b"not an npy file", r"not a valid index array \(no \.npy header\); expected " + _FORMATS,
                 id="not-npy"),
    pytest.param("F.npy", b"", r"the file is empty \(0 bytes\); expected " + _FORMATS, id="empty-npy-file"),
    pytest.param("F.npy", _npz_bytes(), _ZIP_REFUSED, id="npz-renamed-npy"),
    pytest.param("F.npy", _npz_bytes()[:40], _ZIP_REFUSED, id="truncated-npz-renamed-npy"),
    *[pytest.param("F.npy", pickle.dumps([1, 2], protocol=protocol), _PICKLE_REFUSED, id=f"pickle-protocol-{protocol}")
      for protocol in (0, 2, 5)],
    pytest.param("F.npy", np.array([1, None], dtype=object), r"holds an array of Python objects, which would need "
                 r"unpickling, and such arrays are not accepted; save the indices as an integer array with "
                 r"numpy\.save\(file, indices\) or write them as \.txt or \.json", id="object-array-npy"),
    pytest.param("F.npy", _npy_bytes(np.arange(100, dtype="<i8"))[:-50], r"truncated \.npy file: its header declares "
                 r"shape \(100,\) of int64 \(800 bytes\) but 750 bytes follow it; save it again", id="truncated-npy"),
    pytest.param("F.npy", _npy_header((2**40,)) + bytes(8), r"truncated \.npy file: its header declares shape "
                 r"\(1099511627776,\) of int64 \(8796093022208 bytes\) but 8 bytes follow it; save it again",
                 id="npy-header-declares-8-TiB"),
    pytest.param("F.npy", _npy_bytes(np.arange(3))[:30], r"not a valid \.npy file \(EOF: reading array header, "
                 r"expected \d+ bytes got \d+\); save the indices again with numpy\.save\(file, indices\)",
                 id="npy-header-cut"),
    pytest.param("F.npy", b"\x93NUMPY\x09\x00" + bytes(100), r"not a valid \.npy file \(unknown \.npy format "
                 r"version 9\.0\); save the indices again with numpy\.save\(file, indices\)", id="npy-unknown-version"),
    pytest.param("F.npy", np.zeros(3, "V0"), r"holds items of type \|V0, which have no data; expected " + _FORMATS,
                 id="npy-zero-size-items"),
    pytest.param("F.json", b"\x00\xff[1]", r"not a UTF-8 text file \(byte 0xff at offset 1\); expected " + _FORMATS,
                 id="binary-json"),
    pytest.param("F.json", "[" * 100_000 + "]" * 100_000, r"cannot read it: JSON nested too deeply; expected a list "
                 r"of indices", id="deeply-nested-json"),
    pytest.param("F.json", "[" + "9" * 5000 + "]", r"indices out of range \[0, 10\): \[<a 5000-digit number>\]",
                 id="5000-digit-json"),
    pytest.param("F.txt", "9" * 5000, r"indices out of range \[0, 10\): \[<a 5000-digit number>\]",
                 id="5000-digit-txt"),
    pytest.param("F.txt", "1 -" + "9" * 5000, r"negative indices: \[-<a 5000-digit number>\]", id="5000-digit-negative"),
    pytest.param("F.txt", "1 " + "x" * 100, r"non-integer values: \['" + "x" * 36 + r"\.\.\.\]",
                 id="long-token-shown-cut"),
]


@pytest.mark.parametrize("name, content, fragment", INDEX_CASES)
def test_bad_index_file(tmp_path, name, content, fragment):
    path = write_index_file(tmp_path / name, content)
    with pytest.raises(ValueError, match=re.escape(f"forget set file {path}: ") + fragment + "$") as caught:
        forget_sets.load_index_file(path, 10)
    assert "\n" not in str(caught.value)


def test_missing_index_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"forget set file {tmp_path / 'nope.txt'} does not exist")):
        forget_sets.load_index_file(tmp_path / "nope.txt", 10)


def test_index_file_that_is_a_folder(tmp_path):
    folder = tmp_path / "set1.npy"
    folder.mkdir()
    with pytest.raises(ValueError) as caught:
        forget_sets.load_index_file(folder, 10)
    assert str(caught.value) == (f"forget set file {folder} is a directory, but a file is expected; pass the index "
                                 "file (.npy, .txt or .json) itself")


def test_index_file_name_too_long(tmp_path):
    path = tmp_path / ("f" * 300 + ".txt")
    with pytest.raises(ValueError, match=rf"^forget set file {re.escape(str(path))}: cannot access it: File name too "
                                         r"long$"):
        forget_sets.load_index_file(path, 10)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_index_file(tmp_path):
    path = write_index_file(tmp_path / "F.txt", "1 2")
    path.chmod(0)
    with pytest.raises(ValueError, match=rf"^forget set file {re.escape(str(path))}: cannot read it: Permission "
                                         r"denied$"):
        forget_sets.load_index_file(path, 10)


def test_index_file_with_a_byte_order_mark(tmp_path):
    """What Windows editors write: a UTF-8 byte-order mark before the numbers."""
    for name, text in (("F.txt", "3 1"), ("F.json", "[3, 1]")):
        path = write_index_file(tmp_path / name, b"\xef\xbb\xbf" + text.encode())
        assert forget_sets.load_index_file(path, 10).tolist() == [1, 3]


# --- forget-set folders: forget_sets.read_manifest (experiments' --forget-sets-dir) -----

_MANIFEST_FIX = ("write the folder again with python -m ascent_jax.forget_sets (or its --import), or pass another "
                 "folder of forget sets")


@pytest.mark.parametrize("content, problem", [
    pytest.param('{"sets": {}}', ": has no 'provenance' entry", id="no-provenance"),
    pytest.param('{"provenance": {}}', ": has no 'sets' entry", id="no-sets"),
    pytest.param("[1, 2]", ": expected a JSON object with 'provenance' and 'sets', got a list", id="a-list"),
    pytest.param('"text"', ": expected a JSON object with 'provenance' and 'sets', got a string", id="a-string"),
    pytest.param('{"provenance": [], "sets": {}}', ": 'provenance' must be an object, got a list",
                 id="provenance-a-list"),
    pytest.param('{"provenance": {}, "sets": ["a.npy"]}', ": 'sets' must be an object, got a list", id="sets-a-list"),
    pytest.param('{"provenance": {}, "sets": {"a": {"size": 3}}}',
                 """: set 'a' must be an object with a 'file' name, got {"size": 3}""", id="entry-without-file"),
    pytest.param('{"provenance": {}, "sets": {"a": 7}}', ": set 'a' must be an object with a 'file' name, got 7",
                 id="entry-a-number"),
    pytest.param("{truncated", " is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                 "column 2 (char 1))", id="not-json"),
    pytest.param(b"\x00\xff\x00", " is not a JSON text file", id="binary"),
])
def test_bad_manifest(tmp_path, content, problem):
    path = tmp_path / forget_sets.MANIFEST
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as caught:
        forget_sets.read_manifest(tmp_path)
    assert str(caught.value) == f"forget-sets manifest {path}{problem}; {_MANIFEST_FIX}"


def test_manifest_that_is_a_folder(tmp_path):
    (tmp_path / forget_sets.MANIFEST).mkdir()
    with pytest.raises(ValueError) as caught:
        forget_sets.read_manifest(tmp_path)
    assert str(caught.value) == f"forget-sets manifest {tmp_path / forget_sets.MANIFEST} is not a file; {_MANIFEST_FIX}"


@pytest.mark.parametrize("below", [False, True], ids=["a-file", "below-a-file"])
def test_forget_sets_dir_that_is_a_file(tmp_path, below):
    a_file = tmp_path / forget_sets.MANIFEST
    a_file.write_text('{"provenance": {}, "sets": {}}')
    directory = a_file / "sets" if below else a_file
    what = f"is not a folder of forget sets: {a_file} is a file" if below else "is a file, not a folder of forget sets"
    with pytest.raises(ValueError) as caught:
        forget_sets.read_manifest(directory)
    assert str(caught.value) == (f"{directory} {what}; pass the folder that holds forget_sets.json and the sets' .npy "
                                 "files (the --out of python -m ascent_jax.forget_sets)")


def test_read_manifest_of_good_and_absent_folders(tmp_path):
    assert forget_sets.read_manifest(tmp_path / "nowhere") is None
    assert forget_sets.read_manifest(tmp_path) is None  # a folder without a manifest: no datamodel sets there
    manifest = forget_sets.write_sets(tmp_path, {"a": np.array([1, 3])}, np.array([0, 1, 1, 0]), 2, {"seed": 1})
    assert forget_sets.read_manifest(tmp_path) == json.loads(json.dumps(manifest))


# --- library arguments: unlearning methods, training, ensembles, models, grids ------

def _ensemble_run(layout="auto", **overrides):
    arguments = {"num_members": 2, "epochs": 1, **overrides}
    return ensemble.run(lambda key, member: None, lambda *args: None, ensemble.RunOptions(layout=layout), **arguments)


def train_tiny(**overrides):
    """Two 784-8-10 MLPs, one epoch (batch 32) on 64 random 28x28 images, or what ``overrides`` changes."""
    options = {"config": train.TrainConfig(epochs=1, batch_size=32),
               "images": np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, 28, 28, 1), dtype=np.uint8),
               "labels": np.arange(NUM_IMAGES) % 10, "num_members": 2, "seed": 0, **overrides}
    model = models.build("mlp", 10, hidden=(8,))
    return train.train_ensemble(model, options.pop("config"), options.pop("images"), options.pop("labels"),
                                train.Normalization((0.5,), (0.5,)),
                                ensemble.RunOptions(seed=options.pop("seed"), progress=False), **options)


LIBRARY_CASES = [
    pytest.param(lambda: unlearn.get("nope"), ValueError, r"unknown unlearning method 'nope'; choose one of .*\bga\b",
                 id="unknown-method"),
    pytest.param(lambda: unlearn.make("nope", lr=1e-3, epochs=1), ValueError, r"unknown unlearning method 'nope'",
                 id="make-unknown-method"),
    *[pytest.param(lambda lr=lr: unlearn.make("ga", lr=lr, epochs=1), ValueError,
                   rf"GradientAscentConfig: lr must be a positive finite number, got {re.escape(repr(lr))}$",
                   id=f"ga-lr-{lr}") for lr in (-1e-3, 0.0, math.nan, math.inf, -math.inf)],
    pytest.param(lambda: unlearn.make("ga", lr="0.01", epochs=1), ValueError,
                 r"lr must be a positive finite number, got '0.01'", id="ga-lr-string"),
    *[pytest.param(lambda epochs=epochs: unlearn.make("ga", lr=1e-3, epochs=epochs), ValueError,
                   rf"GradientAscentConfig: epochs must be a positive integer, got {epochs}$", id=f"ga-epochs-{epochs}")
      for epochs in (0, -1, 1.5)],
    pytest.param(lambda: unlearn.make("ga", lr=1e-3, epochs=1, batch_size=0), ValueError,
                 r"GradientAscentConfig: batch_size must be a positive integer, got 0", id="ga-batch-size-0"),
    pytest.param(lambda: unlearn.make("gda", lr=1e-3, epochs=2, ascent_epochs=-1), ValueError,
                 r"GradientDescentAscentConfig: ascent_epochs must be a non-negative integer, got -1",
                 id="gda-ascent-epochs"),
    pytest.param(lambda: unlearn.make("ga", lr=1e-3, epochs=1, momentum=0.9), TypeError,
                 r"unexpected keyword argument 'momentum'", id="ga-unknown-hyperparameter"),
    pytest.param(lambda: unlearn.make("ga", lr=1e-3), TypeError, r"missing 1 required positional argument: 'epochs'",
                 id="ga-missing-epochs"),
    pytest.param(lambda: unlearn.split_indices(np.array([], np.int64), 10), ValueError,
                 r"forget indices must be a non-empty 1-D integer array", id="forget-empty"),
    pytest.param(lambda: unlearn.split_indices(np.array([3, 10]), 10), ValueError,
                 r"forget indices must lie in \[0, 10\), got 3..10", id="forget-out-of-range"),
    pytest.param(lambda: unlearn.split_indices(np.array([3, 3]), 10), ValueError, r"forget indices contain duplicates",
                 id="forget-duplicates"),
    pytest.param(lambda: unlearn.split_indices(np.arange(10), 10), ValueError,
                 r"the forget set covers the whole training set; nothing would be retained", id="forget-everything"),
    *[pytest.param(lambda field=field, value=value: train.TrainConfig(**{field: value}), ValueError, fragment,
                   id=f"train-config-{field}-{value}") for field, value, fragment in [
        ("epochs", 0, r"epochs must be a positive integer, got 0"),
        ("batch_size", -1, r"batch_size must be a positive integer, got -1"),
        ("peak_lr", 0.0, r"peak_lr must be a positive finite number, got 0.0"),
        ("peak_lr", math.nan, r"peak_lr must be a positive finite number, got nan"),
        ("peak_lr", math.inf, r"peak_lr must be a positive finite number, got inf"),
        ("peak_fraction", 1.0, r"peak_fraction must lie in \(0, 1\), got 1.0"),
        ("schedule", "linear", r"schedule must be 'triangular' or 'cosine', got 'linear'"),
        ("momentum", 1.0, r"momentum must lie in \[0, 1\), got 1.0"),
        ("weight_decay", -5e-4, r"weight_decay must be non-negative, got -0.0005"),
        ("label_smoothing", 1.0, r"label_smoothing must lie in \[0, 1\), got 1.0"),
        ("crop_padding", -4, r"crop_padding must be non-negative, got -4"),
    ]],
    *[pytest.param(lambda field=field: train.TrainConfig(**{field: 2.5}), ValueError,
                   rf"{field} must be a positive integer, got 2.5", id=f"train-config-{field}-2.5")
      for field in ("epochs", "batch_size")],
    pytest.param(lambda: _ensemble_run(num_members=0), ValueError, r"ensemble size must be positive, got 0",
                 id="ensemble-run-size-0"),
    pytest.param(lambda: _ensemble_run(epochs=0), ValueError, r"number of epochs must be positive, got 0",
                 id="ensemble-run-epochs-0"),
    pytest.param(lambda: _ensemble_run(layout="pmap"), ValueError, r"layout must be .*one of vmap, map, got 'pmap'",
                 id="ensemble-run-layout"),
    pytest.param(lambda: train_tiny(num_members=0), ValueError, r"ensemble size must be positive, got 0",
                 id="train-ensemble-size-0"),
    pytest.param(lambda: train_tiny(num_members=-1), ValueError, r"ensemble size must be positive, got -1",
                 id="train-ensemble-size-negative"),
    pytest.param(lambda: train_tiny(subsets=np.full((2, 8), NUM_IMAGES)), ValueError,
                 r"subset indices must lie in \[0, 64\), got 64..64", id="train-ensemble-subset-out-of-range"),
    pytest.param(lambda: models.build("vit", 10), ValueError, r"unknown model 'vit'; choose one of .*\bmlp\b",
                 id="unknown-model"),
    pytest.param(lambda: models.build("mlp", 1), ValueError, r"num_classes must be at least 2, got 1",
                 id="model-one-class"),
    pytest.param(lambda: models.build("mlp", 10, dtype="float16"), ValueError,
                 r"dtype must be 'float32' or 'bfloat16', got 'float16'", id="model-dtype"),
    pytest.param(lambda: grids.expand("ga", "nope"), ValueError, r"unknown grid preset 'nope'; choose one of paper, benchmark, cpu",
                 id="unknown-grid-preset"),
    pytest.param(lambda: grids.expand("do_nothing", "cpu"), ValueError,
                 r"preset 'cpu' has no grid for 'do_nothing'; it has ga, gda", id="no-grid-for-method"),
    pytest.param(lambda: klom.klom(np.zeros((1, 5)), np.zeros((4, 5))), ValueError,
                 r"oracle_margins has 1 model\(s\); a margin distribution needs N_models >= 2", id="klom-one-model"),
    pytest.param(lambda: klom.klom(np.zeros((4, 5)), np.zeros((4, 6))), ValueError,
                 r"must cover the same points; got 5 and 6 columns", id="klom-point-mismatch"),
    pytest.param(lambda: klom.klom(np.zeros((4, 5)), np.zeros((4, 5)), bins=0), ValueError,
                 r"bins must be an integer >= 1 \(the papers use 20\); got 0", id="klom-bins-0"),
]


@pytest.mark.parametrize("call, error, fragment", LIBRARY_CASES)
def test_bad_library_argument(call, error, fragment):
    with pytest.raises(error, match=fragment) as caught:
        call()
    assert "\n" not in str(caught.value)


# --- a checkpoint folder written by another configuration ------------------------

@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory) -> Path:
    """The checkpoint folder of a finished tiny run (:func:`train_tiny`)."""
    directory = tmp_path_factory.mktemp("pretrain")
    train_tiny(checkpoint_dir=directory)
    return directory


@pytest.mark.parametrize("change", [
    {"config": train.TrainConfig(epochs=1, batch_size=32, peak_lr=0.2)},
    {"seed": 1},
    {"images": np.zeros((NUM_IMAGES, 28, 28, 1), np.uint8)},
], ids=["other-recipe", "other-seed", "other-data"])
def test_checkpoint_of_another_configuration_is_refused(pretrain_dir, change):
    before = snapshot(pretrain_dir)
    checkpoint = re.escape(str(pretrain_dir / "members-0000-0001"))
    with pytest.raises(ValueError, match=rf"^checkpoint {checkpoint} was written by a different configuration; use "
                                         rf"another output directory or delete {checkpoint} to start fresh$"):
        train_tiny(checkpoint_dir=pretrain_dir, **change)
    assert snapshot(pretrain_dir) == before


# --- the forget_sets CLI -----------------------------------------------------------

@pytest.fixture
def cli_paths(tmp_path) -> dict[str, Path]:
    """Inputs of the CLI cases: a 64-image Fashion-MNIST folder, an empty folder, index files, --out."""
    (tmp_path / "empty").mkdir()
    return {"data": write_fashion_mnist(tmp_path / "fashion"), "empty": tmp_path / "empty",
            "nowhere": tmp_path / "nowhere", "out": tmp_path / "out",
            "good_index": write_index_file(tmp_path / "good.txt", "1 2 3"),
            "bad_index": write_index_file(tmp_path / "bad.txt", "3 64 70"),
            "empty_npy": write_index_file(tmp_path / "empty.npy", b""),
            "npz_npy": write_index_file(tmp_path / "archive.npy", _npz_bytes()),
            "pickle_npy": write_index_file(tmp_path / "pickled.npy", pickle.dumps([1, 2], protocol=2))}


def fill(args: list[str], paths: dict[str, Path]) -> list[str]:
    return [arg.format(**paths) for arg in args]


def fill_pattern(fragment: str, paths: dict[str, Path]) -> str:
    return fragment.format(**{name: re.escape(str(path)) for name, path in paths.items()})


DATA = ["--data-dir", "{data}"]
CLI_CASES = [
    pytest.param(["--models", "0"], r"argument --models: must be at least 1, got 0$", id="models-0"),
    pytest.param(["--alpha", "1.5"], r"argument --alpha: must lie strictly between 0 and 1, got 1.5$", id="alpha-1.5"),
    pytest.param(["--lr", "nan"], r"argument --lr: must be a positive finite number, got nan$", id="lr-nan"),
    pytest.param(["--epochs", "two"], r"argument --epochs: expected a whole number, got 'two'$", id="epochs-text"),
    pytest.param(["--dataset", "mnist"], r"argument --dataset: invalid choice: 'mnist'", id="unknown-dataset"),
    pytest.param(["--random-sizes", "10,0"], r"argument --random-sizes: expected positive whole numbers, got '10,0'$",
                 id="random-sizes-0"),
    pytest.param(["--data-dir", "{empty}"], r"{empty} has neither train-images-idx3-ubyte.gz nor", id="data-dir-empty"),
    pytest.param(["--data-dir", "{nowhere}"], r"{nowhere} does not exist or is not a directory", id="data-dir-missing"),
    pytest.param(["--dataset", "cifar10", "--data-dir", "{empty}"], r"CIFAR-10 not found in {empty}",
                 id="cifar-data-dir-empty"),
    pytest.param([*DATA, "--subset-size", "100"], r"study subset size must lie in \[1, 64\], got 100$",
                 id="subset-larger-than-train-split"),
    pytest.param([*DATA, "--subset-size", "20"], r"the largest forget set has 500 points but --subset-size is 20$",
                 id="subset-smaller-than-forget-set"),
    pytest.param([*DATA, "--subset-size", "20", "--alpha", "0.01", *SMALL_SETS],
                 r"alpha=0.01 of 20 points gives 0-point subsets; need between 1 and 19$", id="alpha-empty-subsets"),
    pytest.param([*DATA, "--subset-size", "64", "--models", "7", *SMALL_SETS],
                 r"--models 7 leaves 1 models to fit after holding out 2 x 3; use at least 8 models$",
                 id="too-few-models"),
    pytest.param([*DATA, "--import", "{bad_index}"],
                 r"^error: forget set file {bad_index}: indices out of range \[0, 64\): \[64, 70\]$",
                 id="import-bad-index"),
    pytest.param([*DATA, "--import", "{good_index}", "{bad_index}"], r"forget set file {bad_index}: indices out",
                 id="import-good-then-bad"),
    pytest.param([*DATA, "--import", "{nowhere}"], r"forget set file {nowhere} does not exist$", id="import-missing"),
    pytest.param([*DATA, "--subset-size", "30", *SMALL_SETS, "--seed", "-1"], r"argument --seed: must be at least 0, got -1$",
                 id="seed-negative"),
    pytest.param([*DATA, "--subset-size", "30", *SMALL_SETS, "--seed", str(2**40)], r"argument --seed: must be below 2",
                 id="seed-wraps"),
    pytest.param([*DATA, "--seed", str(2**64)], r"^error: argument --seed: must be below 2\*\*32 = 4294967296 \(JAX's "
                 r"PRNG keys hold 32 bits\), got 18446744073709551616$", id="seed-2**64"),
    pytest.param([*DATA, "--seed", "2**64"], r"^error: argument --seed: expected a whole number, got '2\*\*64'$",
                 id="seed-expression"),
    pytest.param([*DATA, "--import", "{empty_npy}"],
                 r"^error: forget set file {empty_npy}: the file is empty \(0 bytes\); expected " + _FORMATS + "$",
                 id="import-empty-npy"),
    pytest.param([*DATA, "--import", "{npz_npy}"], r"^error: forget set file {npz_npy}: " + _ZIP_REFUSED + "$",
                 id="import-npz-renamed-npy"),
    pytest.param([*DATA, "--import", "{pickle_npy}"], r"^error: forget set file {pickle_npy}: " + _PICKLE_REFUSED + "$",
                 id="import-pickle"),
    pytest.param([*DATA, "--import", "{empty}"], r"^error: forget set file {empty} is a directory, but a file is "
                 r"expected; pass the index file \(\.npy, \.txt or \.json\) itself$", id="import-a-folder"),
]


@pytest.mark.parametrize("args, fragment", CLI_CASES)
def test_bad_cli_input(capsys, cli_paths, args, fragment):
    out = cli_paths["out"]
    assert_user_error(call_cli(capsys, *fill(args, cli_paths), "--out", str(out)), fill_pattern(fragment, cli_paths))
    assert not out.exists()


@pytest.mark.parametrize("args, fragment", [case for case in CLI_CASES
                                            if case.id in ("models-0", "data-dir-empty", "import-bad-index",
                                                           "import-empty-npy", "seed-2**64")])
def test_bad_cli_input_as_a_process(tmp_path, cli_paths, args, fragment):
    """The real ``python -m`` entry point: exit status, stderr, no traceback, nothing written."""
    out = cli_paths["out"]
    result = run_cli("ascent_jax.forget_sets", *fill(args, cli_paths), "--out", str(out), cwd=tmp_path)
    assert_user_error(result, fill_pattern(fragment, cli_paths))
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_cli_read_only_out(capsys, cli_paths, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o500)
    out = parent / "out"
    result = call_cli(capsys, *fill(DATA, cli_paths), "--out", str(out))
    assert_user_error(result, rf"output directory {re.escape(str(out))} is not writable; pass --out to a writable")
    assert list(parent.iterdir()) == []


def _regular_file(tmp: Path) -> Path:
    (tmp / "a_file").write_text("keep me")
    return tmp / "a_file"


@pytest.mark.parametrize("where", [_regular_file, lambda tmp: _regular_file(tmp) / "out"],
                         ids=["out-is-a-file", "out-below-a-file"])
def test_cli_out_that_cannot_be_a_folder(capsys, cli_paths, tmp_path, where):
    out = where(tmp_path)
    args = [*DATA, "--subset-size", "64", "--models", "8", *SMALL_SETS, "--out", str(out)]
    result = call_cli(capsys, *fill(args, cli_paths))
    assert_user_error(result, rf"output directory {re.escape(str(out))} is not (writable|a directory)")
    assert (tmp_path / "a_file").read_text() == "keep me"


@pytest.mark.parametrize("content, fragment", [
    pytest.param('{"fingerprint": "0000000000000000"}',
                 r"^error: {out} holds a run with other settings \({out}/run\.json\); use another --out or delete it$",
                 id="other-fingerprint"),
    pytest.param("{truncated", r"{out}/run\.json is not a run file of this program; use another --out",
                 id="corrupt-run-json"),
])
def test_cli_run_dir_of_other_settings_is_refused(capsys, cli_paths, content, fragment):
    out = cli_paths["out"]
    out.mkdir()
    (out / "run.json").write_text(content)
    before = snapshot(out)
    args = [*DATA, "--subset-size", "64", "--models", "8", *SMALL_SETS, "--out", "{out}"]
    assert_user_error(call_cli(capsys, *fill(args, cli_paths)), fill_pattern(fragment, cli_paths))
    assert snapshot(out) == before


def test_cli_import_into_a_computed_run_is_refused(capsys, cli_paths):
    out = cli_paths["out"]
    out.mkdir()
    (out / "run.json").write_text('{"fingerprint": "0000000000000000"}')
    (out / forget_sets.MANIFEST).write_text('{"provenance": {"source": "datamodels"}, "sets": {}}')
    before = snapshot(out)
    result = call_cli(capsys, *fill([*DATA, "--import", "{good_index}", "--out", "{out}"], cli_paths))
    assert_user_error(result, fill_pattern(r"{out}/run\.json", cli_paths))
    assert snapshot(out) == before


def test_cli_import_of_two_files_with_one_name_is_refused(capsys, cli_paths, tmp_path):
    first = write_index_file(tmp_path / "set1.txt", "1 2")
    (tmp_path / "b").mkdir()
    second = write_index_file(tmp_path / "b" / "set1.npy", np.array([3]))
    out = cli_paths["out"]
    result = call_cli(capsys, *fill(DATA, cli_paths), "--import", str(first), str(second), "--out", str(out))
    assert_user_error(result, rf"{re.escape(str(first))}.*{re.escape(str(second))}")
    assert not out.exists()


# --- the study CLIs (experiments.fashion, experiments.cifar) --------------------------------

STUDY_CASES = [
    pytest.param(["--ensemble", "0"], r"argument --ensemble: must be at least 1, got 0$", id="ensemble-0"),
    pytest.param(["--epochs", "0"], r"argument --epochs: must be at least 1, got 0$", id="epochs-0"),
    pytest.param(["--lr", "nan"], r"argument --lr: must be a positive finite number, got nan$", id="lr-nan"),
    pytest.param(["--lr=-1e-3"], r"argument --lr: must be a positive finite number, got -1e-3$", id="lr-negative"),
    pytest.param(["--seed", "-2"], r"argument --seed: must be at least 0, got -2$", id="seed-negative"),
    pytest.param(["--seed", str(2**32)], r"argument --seed: must be below 2\*\*32 = 4294967296 \(JAX's PRNG keys hold "
                 r"32 bits\), got 4294967296$", id="seed-wraps"),
    pytest.param(["--chunk-size", "0"], r"argument --chunk-size: must be at least 1, got 0$", id="chunk-size-0"),
    pytest.param(["--chunk-size", "half"], r"argument --chunk-size: expected a whole number, got 'half'$",
                 id="chunk-size-word"),
    pytest.param(["--memory-limit", "0"], r"argument --memory-limit: must be a positive finite number, got 0$",
                 id="memory-limit-0"),
    pytest.param(["--checkpoint-every", "0"], r"argument --checkpoint-every: must be at least 1, got 0$",
                 id="checkpoint-every-0"),
    pytest.param(["--model", "vit"], r"argument --model: invalid choice: 'vit'", id="unknown-model"),
    pytest.param(["--method", "nope"], r"unknown unlearning method 'nope'; choose one of ga, ", id="unknown-method"),
    pytest.param(["--grid", "huge"], r"unknown grid preset 'huge'; choose one of paper, benchmark, cpu, main, quick$", id="unknown-grid"),
    pytest.param(["--method", "dmm", "--grid", "quick"], r"method dmm needs datamodels: pass --class-datamodels "
                 r"\(class_datamodels.npz of python -m ascent_jax.forget_sets --logits --fit-classes\)$",
                 id="dmm-without-class-datamodels"),
    pytest.param(["--method", "dmm_margin", "--grid", "quick"], r"method dmm_margin needs datamodels: pass --datamodels",
                 id="dmm-margin-without-datamodels"),
    pytest.param(["--method", "scrub"], r"grid 'main' has no configs for method 'scrub'; it covers ga, gda, om, dmm, "
                 r"dmm_margin$", id="method-outside-the-grid"),
    pytest.param(["--forget-set", "set99"], r"unknown forget set 'set99': give a set name \(", id="unknown-forget-set"),
    pytest.param(["--forget-set", "{bad_index}"], r"forget set file {bad_index}: indices out of range \[0, 60000\)",
                 id="forget-indices-out-of-range"),
    pytest.param(["--forget-set", "{empty_index}"], r"forget set file {empty_index}: contains no indices$",
                 id="forget-indices-empty"),
    pytest.param(["--forget-set", "{outside_index}"], r"indices are not in the study's training subset",
                 id="forget-indices-outside-the-study-subset"),
    pytest.param(["--data-dir", "{empty}"], r"{empty} has neither train-images-idx3-ubyte.gz nor", id="data-dir-empty"),
    pytest.param(["--datamodels", "{nowhere}"], r"datamodels file {nowhere} does not exist", id="datamodels-missing"),
    pytest.param(["--class-datamodels", "{nowhere}"], r"class datamodels file {nowhere} does not exist",
                 id="class-datamodels-missing"),
    pytest.param(["--out", "{a_file}"], r"output directory {a_file} is not writable \(or is a file\)", id="out-is-a-file"),
    # whole-plan checks: what used to fail only after training had written the run directory
    pytest.param(["--ensemble", "1"], r"--ensemble 1: KLoM compares the margin distributions of N replicas with N "
                 r"oracles and needs N >= 2; pass --ensemble 2 or more \(or --pretrain-only\)$", id="ensemble-1"),
    pytest.param(["--epochs", "1000000000"], r"--epochs 1000000000: 20000000000 optimiser steps at batch 512 exceed "
                 r"the step counter's 2147483647; pass fewer --epochs$", id="epochs-overflow"),
    pytest.param(["--ensemble", "1000000", "--subset-size", "300"], r"--ensemble 1000000: the study would hold about "
                 r"[\d.]+ GiB on the host \(replicas' and oracles' weights and margins\), more than 80% of this "
                 r"machine's [\d.]+ GiB; pass a smaller --ensemble$", id="ensemble-beyond-host-memory"),
    pytest.param(["--datamodels", "{npy}"], r"datamodels file {npy} is not an .npz archive; pass the datamodels.npz "
                 r"that python -m ascent_jax.forget_sets wrote$", id="datamodels-npy"),
    pytest.param(["--datamodels", "{empty}"], r"datamodels file {empty} is a directory; pass the datamodels.npz",
                 id="datamodels-directory"),
    pytest.param(["--datamodels", "{garbage_npz}"], r"datamodels file {garbage_npz} is not an .npz archive",
                 id="datamodels-garbage"),
    pytest.param(["--datamodels", "{square_npz}", "--subset-size", "300"], r"the datamodel matrix in {square_npz} has "
                 r"shape \(3, 3\) and dtype float64; the study subset needs a float \(300, 300\) matrix",
                 id="datamodels-wrong-shape"),
    pytest.param(["--forget-set", "{mine_a}", "--forget-set", "{mine_b}", "--subset-size", "300"],
                 r"forget set files {mine_a} and {mine_b} are both named 'mine'; rename one \(forget-set names must "
                 r"be unique in a run\)$", id="forget-set-name-collision"),
    pytest.param(["--forget-set", "{committed_name}"], r"forget set file {committed_name} is named 'set2-random100' "
                 r"like a set of the forget-sets folder; rename the file", id="forget-set-named-like-a-committed-one"),
    pytest.param(["--subset-size", "10"], r"--subset-size 10 is too small for any forget set \(the smallest random "
                 r"fallback has 10 points\); pass a larger --subset-size$", id="subset-too-small-for-any-set"),
    pytest.param(["--forget-sets-dir", "{a_file}"], r"{a_file} is a file, not a folder of forget sets",
                 id="forget-sets-dir-is-a-file"),
    pytest.param(["--forget-sets-dir", "{list_manifest}"], r"forget-sets manifest {list_manifest}/forget_sets.json: "
                 r"expected a JSON object with 'provenance' and 'sets', got a list", id="forget-sets-manifest-a-list"),
    pytest.param(["--forget-sets-dir", "{bare_manifest}"], r"forget-sets manifest {bare_manifest}/forget_sets.json: "
                 r"has no 'provenance' entry", id="forget-sets-manifest-without-provenance"),
]


@functools.cache
def study_subset(size: int) -> np.ndarray:
    """The study subset ``experiments.fashion`` draws at ``--subset-size size`` (seed 0)."""
    return datamodels.study_subset(data.load("fashion_mnist", "train")[1], size, 0)


@pytest.fixture
def study_paths(tmp_path) -> dict[str, Path]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("keep me")
    np.save(tmp_path / "dm.npy", np.zeros((3, 3)))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip archive")
    np.savez(tmp_path / "square.npz", matrix=np.zeros((3, 3)), subset=study_subset(300))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name, manifest in (("list_manifest", "[]"), ("bare_manifest", '{"sets": {}}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / forget_sets.MANIFEST).write_text(manifest)
    return {"empty": tmp_path / "empty", "nowhere": tmp_path / "nowhere.npz", "a_file": tmp_path / "a_file",
            "out": tmp_path / "out", "bad_index": write_index_file(tmp_path / "bad.txt", "3 60000 70000"),
            "empty_index": write_index_file(tmp_path / "empty.txt", ""),
            "outside_index": write_index_file(tmp_path / "outside.txt", " ".join(map(str, range(0, 60000, 5)))),
            "npy": tmp_path / "dm.npy", "garbage_npz": tmp_path / "garbage.npz", "square_npz": tmp_path / "square.npz",
            "mine_a": write_index_file(tmp_path / "a" / "mine.txt", "1 2 3"),
            "mine_b": write_index_file(tmp_path / "b" / "mine.txt", "4 5 6"),
            "committed_name": write_index_file(tmp_path / "set2-random100.txt", "1 2 3 4 5"),
            "list_manifest": tmp_path / "list_manifest", "bare_manifest": tmp_path / "bare_manifest"}


@pytest.mark.parametrize("args, fragment", STUDY_CASES)
def test_bad_fashion_study_input(capsys, study_paths, args, fragment):
    """Rejected before any output: exit 2, one line, the run directory never created."""
    args = fill(args, study_paths)
    out = ["--out", str(study_paths["out"])] if "--out" not in args else []
    result = call_cli(capsys, *args, *out, "--no-progress", main=fashion.main)
    assert_user_error(result, fill_pattern(fragment, study_paths), prog="python -m experiments.fashion")
    assert not study_paths["out"].exists() and study_paths["a_file"].read_text() == "keep me"


@pytest.mark.parametrize("epochs, what", [
    ("1", "have non-finite outputs after pretraining"),  # its one loss was finite, the step was not
    ("3", "reached a non-finite loss in epoch 2"),
])
def test_diverging_pretraining_leaves_no_run_directory(capsys, study_paths, epochs, what):
    """Found only once training runs: one line, and the fresh run directory is removed so the fix is not refused."""
    out = study_paths["out"]
    result = call_cli(capsys, "--pretrain-lr", "1e308", "--ensemble", "8", "--epochs", epochs, "--subset-size", "300",
                      "--method", "ga",
                      "--out", str(out), "--no-progress", main=fashion.main)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: pretraining diverged: member(s) [0, 1, 2, 3, 4, 5, 6, 7] {what}; lower the learning rate "
        f"(peak_lr=1e+308); nothing was kept in {out}"]
    assert not out.exists()


@pytest.mark.parametrize("args, fragment", [
    pytest.param([], r"needs --data-dir DIR holding CIFAR-10", id="no-data-dir"),
    pytest.param(["--data-dir", "{empty}"], r"CIFAR-10 not found in {empty}", id="data-dir-empty"),
    pytest.param(["--data-dir", "{empty}", "--crop-padding", "-1"], r"--crop-padding must be non-negative, got -1$",
                 id="crop-padding-negative"),
])
def test_bad_cifar_study_input(capsys, study_paths, args, fragment):
    result = call_cli(capsys, *fill(args, study_paths), "--out", str(study_paths["out"]), main=cifar.main)
    assert_user_error(result, fill_pattern(fragment, study_paths), prog="python -m experiments.cifar")
    assert not study_paths["out"].exists()


def test_plots_of_a_folder_without_a_study(capsys, tmp_path):
    result = call_cli(capsys, str(tmp_path), main=plots.main)
    assert_user_error(result, rf"{re.escape(str(tmp_path))} has no results.parquet or results.csv; run a study into it",
                      prog="python -m experiments.plots")
    assert list(tmp_path.iterdir()) == []


# --- experiments.merge --------------------------------------------------------------

_ROW = {"forget_set": "s", "forget_size": 10, "params": "{}", "epochs": 0, "klom_p95_forget": 1.0,
        "wall_time_s": 0.0, "device": "cpu:cpu", "ensemble": 4, "model": "mlp", "dataset": "fashion_mnist",
        "seed": 0, "pretrain": '{"epochs": 10}', "subset_digest": "aaaa", "test_digest": "bbbb",
        "forget_digest": "cccc", "datamodels_digest": "none"}  # a tiny study row with the run's identity


def _results_dir(folder: Path, rows: list[dict]) -> Path:
    """A run directory holding only a results.csv of ``rows`` (each a tiny study row)."""
    folder.mkdir(parents=True)
    pd.DataFrame([{**_ROW, **row} for row in rows]).to_csv(folder / "results.csv", index=False)
    return folder


_WITNESSES = [{"method": "pretrained"}, {"method": "oracle", "klom_p95_forget": 0.5}]


@pytest.mark.parametrize("second, fragment", [
    pytest.param([*_WITNESSES[:1], {"method": "oracle", "klom_p95_forget": 0.7}],
                 r"{a} and {b} disagree on the oracle row of forget set s \(klom_p95_forget\): they are not the same "
                 r"study \(seed, N, recipe, subset or code differ\); merge only pieces of one study$", id="other-study"),
    pytest.param([{**w, "ensemble": 6} for w in _WITNESSES],
                 r"the tables are not one study: they differ in ensemble \({a}: 4; {b}: 6\)$", id="other-ensemble"),
    pytest.param([{"method": "ga", "params": '{"lr": 0.1}', "epochs": 1}],
                 r"{b} has no pretrained or oracle row for forget set s, so it cannot be checked to be the same study",
                 id="no-witnesses"),
    pytest.param([{**w, "seed": 1} for w in _WITNESSES],  # the reviewer's case: other seed, rows look alike
                 r"the tables are not one study: they differ in seed \({a}: 0; {b}: 1\)$", id="other-seed"),
    pytest.param([{**w, "pretrain": '{"epochs": 9}'} for w in _WITNESSES],
                 r"the tables are not one study: they differ in pretrain", id="other-recipe"),
    pytest.param([{**w, "subset_digest": "dddd"} for w in _WITNESSES],
                 r"the tables are not one study: they differ in subset_digest", id="other-subset"),
    pytest.param([{**w, "forget_digest": "eeee"} for w in _WITNESSES],
                 r"forget set s is not the same set in every table: forget_digest differs \({a}: cccc; {b}: eeee\); "
                 r"merge only pieces of one study$", id="other-points-under-one-name"),
    pytest.param([*_WITNESSES, {"method": "ga", "epochs": 1}, {"method": "ga", "epochs": 1}],
                 r"{b} has two rows for forget set s, method ga, params {{}}, 1 epochs; it is not a study's results",
                 id="duplicated-row"),
])
def test_merge_of_tables_that_are_not_one_study(capsys, tmp_path, second, fragment):
    a = _results_dir(tmp_path / "a", [*_WITNESSES, {"method": "ga", "params": '{"lr": 0.1}', "epochs": 1}])
    b = _results_dir(tmp_path / "b", second)
    result = call_cli(capsys, str(tmp_path / "out"), str(a), str(b), main=merge.main)
    assert_user_error(result, fragment.format(a=re.escape(str(a)), b=re.escape(str(b))),
                      prog="python -m experiments.merge")
    assert not (tmp_path / "out").exists()


def test_merge_of_one_folder_twice(capsys, tmp_path):
    a = _results_dir(tmp_path / "a", _WITNESSES)
    result = call_cli(capsys, str(tmp_path / "out"), str(a), str(tmp_path / "a" / "."), main=merge.main)
    assert_user_error(result, r"a RUN_DIR is named twice; name each run directory once$",
                      prog="python -m experiments.merge")
    assert not (tmp_path / "out").exists()


def test_merge_of_a_folder_without_a_study(capsys, tmp_path):
    a = _results_dir(tmp_path / "a", _WITNESSES)
    result = call_cli(capsys, str(tmp_path / "out"), str(a), str(tmp_path / "empty"), main=merge.main)
    assert_user_error(result, rf"{re.escape(str(tmp_path / 'empty'))} has no results.parquet or results.csv",
                      prog="python -m experiments.merge")
    assert not (tmp_path / "out").exists()


def test_merge_of_a_table_without_the_run_identity(capsys, tmp_path):
    a = _results_dir(tmp_path / "a", _WITNESSES)
    old = _results_dir(tmp_path / "old", _WITNESSES)  # written before rows carried seed, recipe and digests
    pd.read_csv(old / "results.csv").drop(columns=["seed", "forget_digest"]).to_csv(old / "results.csv", index=False)
    result = call_cli(capsys, str(tmp_path / "out"), str(a), str(old), main=merge.main)
    assert_user_error(result, rf"the table of {re.escape(str(old))} has no column seed, forget_digest: it is not a "
                      r"study's results table, or one written before rows carried the run's identity",
                      prog="python -m experiments.merge")
    assert not (tmp_path / "out").exists()


def test_merge_into_an_unwritable_out_names_the_positional_argument(capsys, tmp_path):
    a = _results_dir(tmp_path / "a", _WITNESSES)
    (tmp_path / "a_file").write_text("keep me")
    result = call_cli(capsys, str(tmp_path / "a_file"), str(a), main=merge.main)
    assert_user_error(result, r"is not writable \(or is a file\); pass OUT as a writable folder$",
                      prog="python -m experiments.merge")


def test_merge_with_an_unknown_time_method_writes_nothing(capsys, tmp_path):
    complete = {column: 0.0 for column in plots.REQUIRED if column not in _ROW}  # every column the plots read
    a = _results_dir(tmp_path / "a", [{**complete, **row} for row in
                                      [*_WITNESSES, {"method": "ga", "params": '{"lr": 0.1}', "epochs": 1}]])
    result = call_cli(capsys, str(tmp_path / "out"), str(a), "--time-method", "nope", main=merge.main)
    assert_user_error(result, r"--time-method nope is not a method of .*; choose one of: ga$",
                      prog="python -m experiments.merge")
    assert not (tmp_path / "out").exists()


# --- faults: a full disk, Ctrl-C, damaged cache files ------------------------------------

def _full_disk(path: str) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", path)


def _raise_direct(argv):
    raise _full_disk("/data/run/sets/s/rows/x")


def _raise_wrapped(argv):  # orbax's writer threads re-raise the OSError as the cause of their own error
    try:
        raise _full_disk("/data/run/pretrain/members-0000-0003/3")
    except OSError as cause:
        raise RuntimeError("checkpoint save failed") from cause


@pytest.mark.parametrize("main, folder", [(_raise_direct, "/data/run/sets/s/rows"),
                                          (_raise_wrapped, "/data/run/pretrain/members-0000-0003")])
def test_disk_full_is_one_line_naming_the_folder(capsys, main, folder):
    result = call_cli(capsys, main=main)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"error: no space left on the device of {folder}; free some space and "
                                          "rerun the same command to resume"]


def test_other_exceptions_still_raise():
    def main(argv):
        raise RuntimeError("a bug, not a user error")

    with pytest.raises(RuntimeError, match="a bug"):
        run_main(main, [])
