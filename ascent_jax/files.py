"""Atomic result files (tables, reports, plots, run manifests): temp file, fsync, rename.

A reader never sees a half-written file: a run killed while writing leaves the previous
version intact. In a multi-process run only process 0 writes them (the others return at once);
checkpoints and caches go through the engine's store (:class:`ascent_jax.ensemble.Store`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, then rename it over ``path``.

    The file gets the permissions of a plain ``open`` under the process's umask.
    """
    if jax.process_index() != 0:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
