"""Datamodels: study subset, masks, batched L1 fit on planted models, LDS, PCA, DM-direct.

Training margins in chunks and resuming is exercised end to end by the CLI test in test_forget_sets.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ascent_jax import datamodels, forget_sets


def planted_linear(num_models, n, targets, *, seed, noise=0.05, nonzero=4):
    """Masks, sparse true matrix, bias and outputs of a known linear datamodel."""
    rng = np.random.default_rng(seed)
    masks = datamodels.subset_masks(num_models, n, 0.5, seed)
    matrix = np.zeros((targets, n))
    for t in range(targets):
        matrix[t, rng.choice(n, nonzero, replace=False)] = rng.choice([-1, 1], nonzero) * rng.uniform(0.5, 1.5, nonzero)
    bias = rng.normal(size=targets)
    outputs = masks @ matrix.T + bias + noise * rng.normal(size=(num_models, targets))
    return masks, matrix, bias, outputs


def test_study_subset_is_balanced_sorted_and_seeded():
    labels = np.repeat(np.arange(10), 50)[np.random.default_rng(0).permutation(500)]
    subset = datamodels.study_subset(labels, 103, seed=1)
    assert subset.dtype == np.int64 and len(subset) == 103 and np.all(np.diff(subset) > 0)
    counts = np.bincount(labels[subset], minlength=10)
    assert counts.min() == 10 and counts.max() == 11 and counts.sum() == 103
    np.testing.assert_array_equal(subset, datamodels.study_subset(labels, 103, seed=1))
    assert not np.array_equal(subset, datamodels.study_subset(labels, 103, seed=2))
    np.testing.assert_array_equal(datamodels.study_subset(labels, 500, seed=3), np.arange(500))
    with pytest.raises(ValueError, match="study subset size"):
        datamodels.study_subset(labels, 501, seed=0)
    with pytest.raises(ValueError, match="class 1 has 1 points"):
        datamodels.study_subset(np.array([0] * 20 + [1]), 10, seed=0)


def test_subset_masks_fixed_size_and_prefix_stable():
    masks = datamodels.subset_masks(12, 31, 0.5, seed=4)
    assert masks.shape == (12, 31) and set(masks.sum(axis=1)) == {16}
    np.testing.assert_array_equal(masks[:5], datamodels.subset_masks(5, 31, 0.5, seed=4))
    assert not np.array_equal(masks, datamodels.subset_masks(12, 31, 0.5, seed=5))
    with pytest.raises(ValueError, match="alpha"):
        datamodels.subset_masks(3, 10, 1.0, seed=0)


def test_fit_recovers_planted_sparse_linear_model():
    masks, matrix, bias, outputs = planted_linear(700, 40, 24, seed=0)
    fit = datamodels.fit_datamodels(masks[:600], outputs[:600], masks[600:650], outputs[600:650], target_chunk=10)
    assert fit.matrix.shape == (24, 40) and fit.bias.shape == (24,)
    assert np.abs(fit.matrix - matrix).max() < 0.15
    np.testing.assert_array_equal(np.abs(fit.matrix) > 0.25, matrix != 0)  # support recovered
    assert np.abs(fit.bias - bias).max() < 0.3
    assert np.nanmean(datamodels.lds(fit, masks[650:], outputs[650:])) > 0.9
    again = datamodels.fit_datamodels(masks[:600], outputs[:600], masks[600:650], outputs[600:650], target_chunk=10)
    np.testing.assert_array_equal(fit.matrix, again.matrix)


def test_killed_fit_resumes_to_the_uninterrupted_fit(tmp_path, monkeypatch):
    masks, _, _, outputs = planted_linear(300, 20, 25, seed=1)
    args = (masks[:250], outputs[:250], masks[250:], outputs[250:])
    uninterrupted = datamodels.fit_datamodels(*args, target_chunk=10)
    first = datamodels.fit_datamodels(*args, target_chunk=10, checkpoint_dir=tmp_path)
    saved = sorted(tmp_path.glob("fit-*/targets-*"))
    assert [p.name for p in saved] == ["targets-000000", "targets-000010", "targets-000020"]
    shutil.rmtree(saved[-1])  # killed before the last chunk was saved
    fitted = []
    real = datamodels._lasso_path
    monkeypatch.setattr(datamodels, "_lasso_path", lambda x, y, *rest: fitted.append(y.shape[1]) or real(x, y, *rest))
    resumed = datamodels.fit_datamodels(*args, target_chunk=10, checkpoint_dir=tmp_path)
    assert fitted == [5]  # only the lost chunk (targets 20..24) was fitted again
    for fit in (first, resumed):
        for field in ("matrix", "bias", "ratio"):
            np.testing.assert_array_equal(getattr(fit, field), getattr(uninterrupted, field))
    other = datamodels.fit_datamodels(*args, target_chunk=10, steps=20, checkpoint_dir=tmp_path)
    assert len(list(tmp_path.glob("fit-*"))) == 2  # other settings: other folder, nothing reused
    assert not np.array_equal(other.matrix, uninterrupted.matrix)


def test_lds_is_near_zero_without_signal_and_nan_for_constant_targets():
    rng = np.random.default_rng(1)
    masks = datamodels.subset_masks(200, 20, 0.5, seed=1)
    dm = datamodels.Datamodels(rng.normal(size=(50, 20)).astype(np.float32), np.zeros(50, np.float32), np.zeros(50))
    assert abs(np.mean(datamodels.lds(dm, masks, rng.normal(size=(200, 50))))) < 0.05
    outputs = rng.normal(size=(200, 50))
    outputs[:, 0] = 1.0
    assert np.isnan(datamodels.lds(dm, masks, outputs)[0])
    with pytest.raises(ValueError, match="at least 3"):
        datamodels.lds(dm, masks[:2], outputs[:2])


def test_principal_components_sign_convention_and_randomised_agrees():
    rng = np.random.default_rng(2)
    low_rank = rng.normal(size=(300, 3)) * [10, 5, 2] @ rng.normal(size=(3, 300)) + 0.01 * rng.normal(size=(300, 300))
    exact = datamodels.principal_components(low_rank, 2)
    fast = datamodels.principal_components(low_rank, 2, exact_below=10, seed=3)
    np.testing.assert_allclose(fast.scores, exact.scores, rtol=1e-3, atol=1e-2 * np.abs(exact.scores).max())
    np.testing.assert_allclose(fast.explained, exact.explained, rtol=1e-4)
    for k in range(2):
        assert exact.scores[np.abs(exact.scores[:, k]).argmax(), k] > 0
    assert exact.explained[0] > exact.explained[1] > 0 and exact.explained.sum() < 1


def test_pc_forget_set_picks_planted_cluster():
    """Ten near-duplicates help each other's margins: PC1's top-10 set is exactly that cluster."""
    n, num_models, rng = 120, 900, np.random.default_rng(3)
    cluster = np.sort(rng.choice(n, 10, replace=False))
    masks = datamodels.subset_masks(num_models, n, 0.5, seed=3)
    truth = np.diag(rng.uniform(0.2, 0.4, n))
    truth[np.ix_(cluster, cluster)] += 1.0
    margins = masks @ truth.T + 0.3 * rng.normal(size=(num_models, n))
    fit = datamodels.fit_datamodels(masks[:800], margins[:800], masks[800:850], margins[800:850])
    assert np.nanmean(datamodels.lds(fit, masks[850:], margins[850:])) > 0.3
    components = datamodels.principal_components(fit.matrix, 2)
    subset = np.arange(1000, 1000 + 2 * n, 2)  # study points as indices into a larger split
    sets = forget_sets.build_sets(forget_sets.default_recipes((5,), (10,), 10, (1,)), subset, components.scores, seed=0)
    np.testing.assert_array_equal(sets["set2-pc1-top10"], subset[cluster])


def test_dm_direct_margins_on_planted_linear_model():
    masks, matrix, bias, outputs = planted_linear(700, 40, 40, seed=5, noise=0.02)
    fit = datamodels.fit_datamodels(masks[:650], outputs[:650], masks[650:], outputs[650:])
    full = np.ones(40)
    forget = np.array([3, 7, 21])
    retain = full.copy()
    retain[forget] = 0
    pretrained = np.stack([full @ matrix.T + bias, full @ matrix.T + bias + 0.5])  # two pretrained models
    oracle = retain @ matrix.T + bias
    np.testing.assert_allclose(datamodels.dm_direct_margins(pretrained, matrix, forget)[0], oracle, atol=1e-9)
    predicted = datamodels.dm_direct_margins(pretrained, fit.matrix, forget)
    assert predicted.shape == (2, 40)
    assert np.abs(predicted[0] - oracle).max() < 0.3
    np.testing.assert_allclose(predicted[1] - predicted[0], 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="duplicates"):
        datamodels.dm_direct_margins(pretrained, matrix, [1, 1])
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        datamodels.dm_direct_margins(pretrained, matrix, [40])
    with pytest.raises(ValueError, match="targets"):
        datamodels.dm_direct_margins(pretrained[:, :5], matrix, forget)


def test_positions_in_subset():
    subset = np.array([2, 5, 9, 11])
    np.testing.assert_array_equal(datamodels.positions_in_subset(subset, [9, 2]), [2, 0])
    with pytest.raises(ValueError, match=r"\[3, 12\]"):
        datamodels.positions_in_subset(subset, [3, 5, 12])
