"""Named hyper-parameter grids, expanded as Cartesian products, and a driver that runs them all.

A method declares its grids in its own file (``register(..., grids={preset: {field: values}})``);
this module only reads the registry. Presets used by the built-in methods: ``paper`` (App. M of
"Ascent Fails to Forget" for GA, GDA and SCRUB, App. D.4 of the datamodel-matching paper for
fine-tune, the Adam grid of issue #15 for OM/DMM; every method under its authors' optimiser),
``benchmark`` (the same grids with plain SGD, as the public KLoM benchmark ran them, so its
published numbers can be compared), ``cpu`` (smaller, for a CPU study), ``main`` (the README's
main job) and ``quick`` (smoke runs). Configs that differ only in ``epochs`` come from ONE run
snapshotted at each epoch count (:func:`group_runs`), and every config is reported, diverged or
not (:func:`sweep`).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from ascent_jax import ensemble
from ascent_jax.unlearn import base


def presets() -> dict[str, dict[str, dict[str, tuple]]]:
    """``{preset: {method: grid}}`` over every registered method's grids (registration order)."""
    found: dict[str, dict[str, dict[str, tuple]]] = {}
    for name in base.names():
        for preset, grid in base.get(name).grids.items():
            found.setdefault(preset, {})[name] = grid
    return found


def expand(method: str, preset: str = "paper", **fixed: Any) -> list:
    """Every config of ``preset``'s grid for ``method`` (Cartesian product, first axis slowest).

    ``fixed`` sets hyper-parameters outside the grid, e.g. ``retain_multiple`` for OM.
    """
    known = presets()
    if preset not in known:
        raise ValueError(f"unknown grid preset {preset!r}; choose one of {', '.join(known)}")
    if method not in known[preset]:
        raise ValueError(f"preset {preset!r} has no grid for {method!r}; it has {', '.join(known[preset])}")
    grid = known[preset][method]
    config = base.get(method).config
    return [config(**dict(zip(grid, values)), **fixed) for values in itertools.product(*grid.values())]


class Run(NamedTuple):
    """One training run: ``config`` at the largest epoch count, snapshotted at ``snapshot_epochs``."""

    config: Any
    snapshot_epochs: tuple[int, ...]


def group_runs(configs: list) -> list[Run]:
    """Merge configs that differ only in ``epochs`` into one run (first-seen order)."""
    groups: dict[Any, set[int]] = {}
    for config in configs:
        groups.setdefault(dataclasses.replace(config, epochs=1), set()).add(config.epochs)
    return [Run(dataclasses.replace(key, epochs=max(epochs)), tuple(sorted(epochs))) for key, epochs in groups.items()]


class ConfigResult(NamedTuple):
    """The outcome of one grid config: margins ``(K, n_eval)`` and which replicas diverged by then."""

    config: Any
    margins: np.ndarray
    diverged: np.ndarray
    diverged_epoch: np.ndarray


def sweep(configs: list, model, pretrained, images, labels, norm, forget,
          options: ensemble.RunOptions = ensemble.RunOptions(), *, checkpoint_dir: str | Path | None = None,
          **inputs: Any) -> list[ConfigResult]:
    """Run every config (grouped by :func:`group_runs`); one result per config, in input order.

    ``inputs`` go to :func:`ascent_jax.unlearn.unlearn` (test set, targets, ...); each run
    checkpoints under ``checkpoint_dir/<method>-<hash of its config>``.
    """
    outcomes = {}
    for run in group_runs(configs):
        name = base.get(run.config).name
        directory = None
        if checkpoint_dir is not None:
            directory = Path(checkpoint_dir) / f"{name}-{ensemble.fingerprint(dataclasses.asdict(run.config))}"
        result = base.unlearn(run.config, model, pretrained, images, labels, norm, forget, options,
                              snapshot_epochs=run.snapshot_epochs, checkpoint_dir=directory, **inputs)
        for epochs in run.snapshot_epochs:
            config = dataclasses.replace(run.config, epochs=epochs)
            outcomes[config] = ConfigResult(config, result.margins[epochs], result.diverged_by(epochs),
                                            np.where(result.diverged_by(epochs), result.diverged_epoch, -1))
    return [outcomes[config] for config in configs]


def table(results: list[ConfigResult]) -> pd.DataFrame:
    """One row per config: method, hyper-parameters and the fraction of diverged replicas."""
    rows = [{"method": base.get(r.config).name, **dataclasses.asdict(r.config),
             "diverged_fraction": float(np.mean(r.diverged))} for r in results]
    return pd.DataFrame(rows)
