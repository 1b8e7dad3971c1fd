"""Hyper-parameter grids: the papers' sizes, Cartesian expansion, one run per epoch sweep."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from ascent_jax import unlearn
from ascent_jax.unlearn import grids

PAPER_SIZES = {"ga": 35, "gda": 48, "scrub": 48, "finetune": 20, "om": 16, "dmm": 16}


@pytest.mark.parametrize("method, size", PAPER_SIZES.items())
def test_paper_grids_have_the_papers_sizes(method, size):
    configs = grids.expand(method, "paper")
    assert len(configs) == size and len(set(configs)) == size
    assert all(isinstance(c, unlearn.get(method).config) for c in configs)


def test_expansion_is_the_cartesian_product_of_the_preset():
    grid = grids.presets()["paper"]["gda"]
    configs = grids.expand("gda", "paper")
    expected = {tuple(values) for values in itertools.product(*grid.values())}
    assert {tuple(getattr(c, field) for field in grid) for c in configs} == expected
    assert {c.retain_batch_size for c in configs} == {64}


def test_app_m_values():
    paper = grids.presets()["paper"]
    assert paper["ga"] == {"lr": (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 1e-2, 5e-2), "epochs": (1, 3, 5, 7, 10)}
    assert paper["scrub"] == paper["gda"] == {"lr": (5e-5, 5e-4, 1e-3, 5e-3), "epochs": (5, 7, 10),
                                              "ascent_epochs": (3, 5), "forget_batch_size": (32, 64)}
    assert paper["finetune"] == {"lr": (1e-5, 1e-4, 1e-3, 1e-2), "epochs": (1, 3, 5, 7, 10)}
    assert paper["om"] == paper["dmm"] == {"lr": (2e-4, 5e-4, 1e-3, 2e-3), "epochs": (2, 4, 8, 16)}  # issue #15


@pytest.mark.parametrize("method", PAPER_SIZES)
def test_cpu_preset_is_small_and_varies_what_the_paper_grid_varies(method):
    cpu, paper = grids.presets()["cpu"][method], grids.presets()["paper"][method]
    assert set(cpu) <= set(paper) and {"lr", "epochs"} <= set(cpu)
    assert set(cpu["epochs"]) <= set(paper["epochs"])
    assert 2 <= len(cpu["lr"]) <= 4 and len(grids.expand(method, "cpu")) <= 16


def test_configs_differing_only_in_epochs_share_one_run():
    runs = grids.group_runs(grids.expand("ga", "paper"))
    assert len(runs) == 7 and all(run.snapshot_epochs == (1, 3, 5, 7, 10) for run in runs)
    assert all(run.config.epochs == 10 for run in runs)
    gda = grids.group_runs(grids.expand("gda", "paper"))
    assert len(gda) == 16 and all(run.snapshot_epochs == (5, 7, 10) for run in gda)
    # Ascent epochs are part of a run's identity, not a snapshot.
    identities = {(run.config.ascent_epochs, run.config.forget_batch_size) for run in gda}
    assert identities == {(3, 32), (3, 64), (5, 32), (5, 64)}
    expanded = {dataclasses.replace(run.config, epochs=e) for run in gda for e in run.snapshot_epochs}
    assert expanded == set(grids.expand("gda", "paper"))


def test_fixed_hyperparameters_and_bad_names():
    assert {c.retain_multiple for c in grids.expand("om", "paper", retain_multiple=5.0)} == {5.0}
    with pytest.raises(ValueError, match="unknown grid preset"):
        grids.expand("ga", "huge")
    with pytest.raises(ValueError, match="has no grid"):
        grids.expand("retrain", "paper")
