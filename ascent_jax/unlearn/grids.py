"""Named hyper-parameter grids, expanded as Cartesian products, and a driver that runs them all.

``paper``: App. M of "Ascent Fails to Forget" (GA, GDA, SCRUB), App. D.4 of the
datamodel-matching paper (fine-tune) and this library's OM grid (Sec. 4.2 of that paper).
``cpu``: subsets of those values small enough for a CPU study; ``main``: the README's main job
(GA, GDA, OM); ``quick``: a few configs of every method, for smoke runs. DMM uses OM's grid. Configs that differ only in
``epochs`` come from ONE run snapshotted at each epoch count (:func:`group_runs`), and every
config is reported, diverged or not (:func:`sweep`).
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

_GDA_PAPER = {"lr": (5e-5, 5e-4, 1e-3, 5e-3), "epochs": (5, 7, 10), "ascent_epochs": (3, 5),
              "forget_batch_size": (32, 64)}
_GDA_CPU = {"lr": (5e-4, 1e-3, 5e-3), "epochs": (5, 10), "ascent_epochs": (3, 5), "forget_batch_size": (64,)}

PRESETS: dict[str, dict[str, dict[str, tuple]]] = {
    "paper": {
        "ga": {"lr": (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 1e-2, 5e-2), "epochs": (1, 3, 5, 7, 10)},
        "gda": _GDA_PAPER,
        "scrub": _GDA_PAPER,
        "finetune": {"lr": (1e-5, 1e-4, 1e-3, 1e-2), "epochs": (1, 3, 5, 7, 10)},
        "om": {"lr": (1e-4, 1e-3, 1e-2), "epochs": (1, 2, 4, 8)},
        "dmm": {"lr": (1e-4, 1e-3, 1e-2), "epochs": (1, 2, 4, 8)},
    },
    "cpu": {
        "ga": {"lr": (1e-4, 1e-3, 1e-2, 5e-2), "epochs": (1, 3, 5, 10)},
        "gda": _GDA_CPU,
        "scrub": _GDA_CPU,
        "finetune": {"lr": (1e-4, 1e-3, 1e-2), "epochs": (1, 3, 5, 10)},
        "om": {"lr": (1e-4, 1e-3, 1e-2), "epochs": (1, 2, 4, 8)},
        "dmm": {"lr": (1e-4, 1e-3, 1e-2), "epochs": (1, 2, 4, 8)},
    },
    "main": {  # the README's main job: enough configs for the selection illusion, OM's rates up to 0.03
        "ga": {"lr": (1e-3, 1e-2, 5e-2), "epochs": (1, 3, 5)},
        "gda": {"lr": (1e-3,), "epochs": (3, 5), "ascent_epochs": (3,), "forget_batch_size": (64,)},
        "om": {"lr": (1e-2, 3e-2), "epochs": (2, 4, 8)},
    },
    "quick": {
        "ga": {"lr": (1e-3, 1e-2), "epochs": (1, 3, 5)},
        "gda": {"lr": (1e-3,), "epochs": (3, 5), "ascent_epochs": (3,), "forget_batch_size": (64,)},
        "scrub": {"lr": (1e-3,), "epochs": (3, 5), "ascent_epochs": (3,), "forget_batch_size": (64,)},
        "finetune": {"lr": (1e-2,), "epochs": (1, 3, 5)},
        "om": {"lr": (1e-3, 1e-2), "epochs": (1, 2, 4)},
        "dmm": {"lr": (1e-3, 1e-2), "epochs": (1, 2, 4)},
    },
}


def expand(method: str, preset: str = "paper", **fixed: Any) -> list:
    """Every config of ``preset``'s grid for ``method`` (Cartesian product, first axis slowest).

    ``fixed`` sets hyper-parameters outside the grid, e.g. ``retain_fraction`` for OM.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown grid preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if method not in PRESETS[preset]:
        raise ValueError(f"preset {preset!r} has no grid for {method!r}; it has {', '.join(PRESETS[preset])}")
    grid = PRESETS[preset][method]
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
