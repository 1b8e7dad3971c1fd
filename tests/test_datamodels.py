"""Datamodels: study subset, masks, batched L1 fit on planted models, LDS, PCA, DM-direct.

Training margins in chunks and resuming is exercised end to end by the CLI test in test_forget_sets.py.
"""

from __future__ import annotations

import json
import pickle
import re
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


def planted_classes(num_models, n, rows, classes, *, seed, noise=0.05, nonzero=3):
    """Masks, true per-class matrix ``(R, C, n)``, bias ``(R, C)`` and logits ``(M, n, C)`` whose ``rows`` are linear."""
    rng = np.random.default_rng(seed)
    masks = datamodels.subset_masks(num_models, n, 0.5, seed)
    matrix = np.zeros((len(rows), classes, n))
    for r in range(len(rows)):
        for c in range(classes):
            signs = rng.choice([-1, 1], nonzero)
            matrix[r, c, rng.choice(n, nonzero, replace=False)] = signs * rng.uniform(0.5, 1.5, nonzero)
    bias = rng.normal(size=(len(rows), classes))
    logits = rng.normal(size=(num_models, n, classes))  # the points that are not rows: noise
    noise = noise * rng.normal(size=(num_models, len(rows), classes))
    logits[:, rows] = np.einsum("mi,rci->mrc", masks, matrix) + bias + noise
    return masks, matrix, bias, logits.astype(np.float16)


def test_class_datamodels_recover_planted_per_class_model_and_lds_needs_the_right_rows():
    rows = np.array([17, 2, 30, 9, 25])
    masks, matrix, bias, logits = planted_classes(700, 40, rows, 4, seed=6)
    fit = datamodels.fit_class_datamodels(masks[:600], logits[:600], masks[600:650], logits[600:650], rows,
                                          target_chunk=7)
    assert fit.rows.dtype == np.int64 and fit.rows.tolist() == rows.tolist()
    assert fit.matrix.shape == (5, 4, 40) and fit.bias.shape == fit.ratio.shape == (5, 4)
    assert fit.matrix.dtype == fit.bias.dtype == np.float32
    assert np.corrcoef(fit.matrix.ravel(), matrix.ravel())[0, 1] > 0.98
    assert np.abs(fit.bias - bias).max() < 0.3
    assert fit.predict(masks[650:]).shape == (50, 5, 4)
    scores = datamodels.class_lds(fit, masks[650:], logits[650:])
    assert scores.shape == (5, 4) and scores.min() > 0.9
    shuffled = fit._replace(rows=np.roll(rows, 1))  # each row scored against another point's logits
    assert np.abs(datamodels.class_lds(shuffled, masks[650:], logits[650:])).mean() < 0.2
    with pytest.raises(ValueError, match="duplicates"):
        datamodels.fit_class_datamodels(masks[:600], logits[:600], masks[600:], logits[600:], [2, 2])
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        datamodels.fit_class_datamodels(masks[:600], logits[:600], masks[600:], logits[600:], [40])
    with pytest.raises(ValueError, match=r"\(M, n, classes\)"):
        datamodels.fit_class_datamodels(masks[:600], logits[:600, :, 0], masks[600:], logits[600:], rows)


def test_dm_direct_logits_is_the_closed_form_per_class():
    rng = np.random.default_rng(7)
    cdm = datamodels.ClassDatamodels(np.array([4, 0, 2]), rng.normal(size=(3, 5, 8)).astype(np.float32),
                                     np.zeros((3, 5), np.float32), np.zeros((3, 5), np.float32))
    pretrained = rng.normal(size=(2, 3, 5))
    forget = np.array([1, 6, 3])
    expected = pretrained - cdm.matrix[:, :, forget].sum(axis=2)
    np.testing.assert_allclose(datamodels.dm_direct_logits(pretrained, cdm, forget), expected, rtol=1e-6)
    np.testing.assert_array_equal(datamodels.dm_direct_logits(pretrained[0], cdm, []), pretrained[0])
    with pytest.raises(ValueError, match="duplicates"):
        datamodels.dm_direct_logits(pretrained, cdm, [1, 1])
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        datamodels.dm_direct_logits(pretrained, cdm, [8])
    with pytest.raises(ValueError, match=r"\(rows, classes\) = \(3, 5\)"):
        datamodels.dm_direct_logits(pretrained[..., :4], cdm, forget)


def test_logits_recorded_with_bit_identical_margins(tmp_path):
    from ascent_jax import ensemble, klom, models, train

    rng = np.random.default_rng(8)
    labels = np.tile(np.arange(10, dtype=np.int32), 6)
    images = (rng.integers(0, 60, (60, 28, 28, 1)) + 19 * labels[:, None, None, None]).astype(np.uint8)
    masks = datamodels.subset_masks(4, 60, 0.5, seed=8)
    setting = (models.build("mlp", 10), train.TrainConfig(epochs=1, batch_size=20), images, labels,
               train.Normalization((0.3,), (0.3,)), masks, ensemble.RunOptions(seed=8, chunk_size=2, progress=False))
    alone = datamodels.train_outputs(*setting, out_dir=tmp_path)
    assert alone.logits is None
    np.testing.assert_array_equal(datamodels.train_margins(*setting, out_dir=tmp_path), alone.margins)
    margins_only = sorted(p.name for p in tmp_path.iterdir())
    both = datamodels.train_outputs(*setting, out_dir=tmp_path, logits=True)  # margins-only chunks are not reused
    assert sorted(p.name for p in tmp_path.iterdir()) == [*margins_only, datamodels.LOGITS_FOLDER]
    assert both.logits.dtype == np.float16 and both.logits.shape == (4, 60, 10)
    assert both.margins.dtype == np.float32
    np.testing.assert_array_equal(both.margins, alone.margins)
    from_logits = np.asarray(klom.margins(both.logits.astype(np.float32), labels))
    tolerance = 2 * 2.0**-11 * np.abs(both.logits.astype(np.float32)).max()  # two float16 roundings of the logits
    np.testing.assert_allclose(from_logits, both.margins, rtol=0, atol=tolerance)
    again = datamodels.train_outputs(*setting, out_dir=tmp_path, logits=True)  # finished chunks reloaded as saved
    np.testing.assert_array_equal(again.logits, both.logits)
    np.testing.assert_array_equal(again.margins, both.margins)


def _class_file(tmp_path, **changes):
    """A class-datamodels file of 3 rows x 2 classes on a 6-point subset, with ``changes`` to its arrays."""
    subset = np.arange(10, 16)
    cdm = datamodels.ClassDatamodels(np.array([5, 0, 3]), np.arange(36, dtype=np.float32).reshape(3, 2, 6),
                                     np.ones((3, 2), np.float32), np.full((3, 2), 0.1, np.float32))
    path = tmp_path / "class_datamodels.npz"
    datamodels.save_class_datamodels(path, cdm, subset, {"seed": 0}, lds=np.full((3, 2), 0.5))
    if changes:
        with np.load(path) as archive:
            arrays = {**dict(archive), **changes}
        np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path, subset, cdm


def test_class_datamodels_file_round_trip(tmp_path):
    path, subset, cdm = _class_file(tmp_path)
    loaded = datamodels.load_class_datamodels(path, subset)
    for field in cdm._fields:
        np.testing.assert_array_equal(getattr(loaded, field), getattr(cdm, field))
    assert loaded.rows.dtype == np.int64 and loaded.matrix.dtype == np.float32
    with np.load(path) as archive:
        assert json.loads(str(archive["provenance"])) == {"seed": 0}
        np.testing.assert_array_equal(archive["lds"], np.full((3, 2), 0.5))


_FIX = r"; fit them again with python -m ascent_jax\.forget_sets --logits --fit-classes$"
_PASS = r"; pass the class_datamodels\.npz that python -m ascent_jax\.forget_sets --logits --fit-classes wrote$"


_FILE = r"^class datamodels file PATH"


@pytest.mark.parametrize("changes, message", [
    pytest.param({"bias": None, "lds": None}, _FILE + r" lacks 'bias', 'lds'" + _PASS, id="missing-keys"),
    pytest.param({"rows": np.array([5, 0, 3], dtype=object)},
                 _FILE + r" holds an array of Python objects, which would need unpickling and is never loaded" + _PASS,
                 id="object-array"),
    pytest.param({"subset": np.arange(11, 17)}, r"^the class datamodels in PATH were fitted on another study subset; "
                 r"use the same --subset-size and seed as the forget-sets run that wrote them$", id="other-subset"),
    pytest.param({"rows": np.array([5.0, 0, 3])},
                 _FILE + r": rows must be a non-empty 1-D integer array, got shape \(3,\) of float64" + _FIX,
                 id="float-rows"),
    pytest.param({"matrix": np.zeros((3, 2, 7))}, _FILE + r": matrix has shape \(3, 2, 7\), expected "
                 r"\(3, classes, 6\) for 3 rows of a 6-point study subset" + _FIX, id="matrix-shape"),
    pytest.param({"bias": np.zeros((3, 3))},
                 _FILE + r": bias has shape \(3, 3\) and dtype float64, expected float \(3, 2\)" + _FIX, id="bias-shape"),
    pytest.param({"ratio": np.zeros((3, 2), np.int64)},
                 _FILE + r": ratio has shape \(3, 2\) and dtype int64, expected float \(3, 2\)" + _FIX, id="int-ratio"),
    pytest.param({"matrix": np.full((3, 2, 6), np.nan)}, _FILE + r": matrix has non-finite entries" + _FIX,
                 id="nan-matrix"),
    pytest.param({"rows": np.array([5, 0, 6])}, _FILE + r": rows must lie in \[0, 6\), got 0\.\.6" + _FIX,
                 id="row-out-of-range"),
    pytest.param({"rows": np.array([5, 0, 5])}, _FILE + r": rows contain duplicates" + _FIX, id="duplicate-rows"),
    pytest.param({"provenance": np.array("{not json")},
                 _FILE + r": provenance must be one string holding a JSON object" + _FIX, id="provenance-not-json"),
])
def test_load_class_datamodels_rejects_bad_contents(tmp_path, changes, message):
    path, subset, _ = _class_file(tmp_path, **changes)
    with pytest.raises(ValueError, match=message.replace("PATH", re.escape(str(path)))):
        datamodels.load_class_datamodels(path, subset)


def test_load_class_datamodels_rejects_what_is_not_one(tmp_path):
    subset = np.arange(6)
    with pytest.raises(FileNotFoundError, match=f"^class datamodels file {re.escape(str(tmp_path / 'no.npz'))} does "
                       "not exist" + _PASS):
        datamodels.load_class_datamodels(tmp_path / "no.npz", subset)
    with pytest.raises(ValueError, match=f"^class datamodels file {re.escape(str(tmp_path))} is a directory" + _PASS):
        datamodels.load_class_datamodels(tmp_path, subset)
    array_file = tmp_path / "matrix.npy"
    np.save(array_file, np.zeros((2, 2)))
    pickled = tmp_path / "class_datamodels.pkl"
    pickled.write_bytes(pickle.dumps({"matrix": np.zeros(3)}))
    for path in (array_file, pickled):
        with pytest.raises(ValueError, match=f"^class datamodels file {re.escape(str(path))} is not an .npz archive"
                           + _PASS):
            datamodels.load_class_datamodels(path, subset)
