"""Atomic ``.npz`` checkpoints of pytrees (write to a temp file, fsync, rename).

A reader never sees a half-written file: a run killed while saving leaves the previous
checkpoint intact. Leaves are stored under their pytree key paths and restored into the
structure of a template tree, so a checkpoint from a different model/config is refused
instead of being silently reshaped.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

_META = "__meta__"


def _keyed_leaves(tree: Any) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(path: str | os.PathLike, tree: Any, meta: dict | None = None) -> None:
    """Atomically save ``tree``'s leaves (as numpy) and a JSON-able ``meta`` dict."""
    arrays = {key: np.asarray(jax.device_get(leaf)) for key, leaf in _keyed_leaves(tree)}
    arrays[_META] = np.frombuffer(json.dumps(meta or {}, sort_keys=True).encode(), dtype=np.uint8)
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def read_meta(path: str | os.PathLike) -> dict:
    """The ``meta`` dict of a checkpoint, without loading its arrays."""
    with np.load(path) as archive:
        return json.loads(archive[_META].tobytes().decode())


def load(path: str | os.PathLike, like: Any) -> tuple[Any, dict]:
    """Load a checkpoint into the structure of ``like``; returns ``(tree, meta)``."""
    with np.load(path) as archive:
        meta = json.loads(archive[_META].tobytes().decode())
        leaves = []
        for key, template in _keyed_leaves(like):
            if key not in archive.files:
                raise ValueError(f"checkpoint {path} has no entry {key}: it was written by a different model "
                                 "or configuration; delete it to start fresh")
            value = archive[key]
            if value.shape != np.shape(template):
                raise ValueError(f"checkpoint {path} entry {key} has shape {value.shape}, expected "
                                 f"{np.shape(template)}; delete it to start fresh")
            leaves.append(value)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves), meta
