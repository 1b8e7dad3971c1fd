"""Tests for ascent_jax.klom against the slow per-point reference in benchmarks.klom_bench."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.special

from ascent_jax import klom as klom_module
from ascent_jax.klom import bootstrap_klom, klom, margins, noise_floor, summarize
from benchmarks.klom_bench import reference_klom

EPS = 1e-5
CAP = np.log((1 + 20 * EPS) / EPS)  # KL <= log(1/eps) + log(sum of the floored q)
MODES = [None, "easydub"]


def _random_margins(rng, n_models, n_points):
    """Gaussian margins with per-point centres, scales and shifts between the two ensembles."""
    centre = rng.normal(0, 5, size=n_points)
    scale = rng.choice([0.01, 1.0, 30.0], size=n_points)
    oracle = centre + scale * rng.normal(size=(n_models, n_points))
    shift = rng.choice([0.0, 0.3, 5.0, 200.0], size=n_points)
    unlearned = centre + shift + scale * rng.normal(size=(n_models + 3, n_points))
    return oracle, unlearned


def _adversarial_margins(rng, n_models=12):
    """Columns that break naive binning: ties, constants, exact edges, inf, NaN, huge values."""
    columns = []

    def add(oracle, unlearned):
        columns.append((np.broadcast_to(oracle, n_models).astype(float), np.broadcast_to(unlearned, n_models).astype(float)))

    for lo, hi in zip(rng.uniform(-50, 0, 40), rng.uniform(0.1, 60, 40)):
        edges = np.linspace(lo, lo + hi, 21)  # every sample on an edge; both ends present
        add(np.concatenate([edges[[0, -1]], rng.choice(edges, n_models - 2)]), rng.choice(edges, n_models))
    add(np.concatenate([edges[[0, -1]], rng.choice(edges[:3], n_models - 2)]), rng.choice(edges[-3:], n_models))
    add(rng.choice([-1.0, 0.0, 1.0], n_models), rng.choice([0.0, 1.0], n_models))  # ties
    for value in (0.0, -3.5, 100.0, 250.0):  # constant arrays, both ensembles
        add(value, value)
    add(2.0, 7.0)
    add(rng.normal(size=n_models), 100.0)  # blown-up model: all unlearned at the clip
    add(rng.normal(size=n_models), np.inf)
    add(-np.inf, rng.normal(size=n_models))
    add(np.where(rng.random(n_models) < 0.5, np.inf, -np.inf), rng.normal(size=n_models))
    add(rng.normal(size=n_models), np.nan)  # diverged unlearned models
    nan_some = rng.normal(size=n_models)
    nan_some[::3] = np.nan
    add(rng.normal(size=n_models), nan_some)
    add(nan_some, rng.normal(size=n_models))  # NaN only among the oracle margins
    add(nan_some, nan_some[::-1])
    add(np.nan, np.nan)
    add(1e300 * rng.normal(size=n_models), -1e300)  # huge: everything clips
    add(1 + np.arange(n_models) * np.spacing(1.0), 1.0)  # a span of a few ulps
    add(5.0 + rng.integers(0, 3, n_models) * 2.0**-40, 5.0)
    oracle, unlearned = (np.stack(parts, axis=1) for parts in zip(*columns))
    return oracle, unlearned


@pytest.mark.parametrize("compat", MODES)
def test_klom_matches_reference_on_random_margins(compat):
    oracle, unlearned = _random_margins(np.random.default_rng(0), 30, 700)
    expected = reference_klom(oracle, unlearned, compat=compat)
    np.testing.assert_allclose(klom(oracle, unlearned, compat=compat), expected, rtol=0, atol=1e-9)
    # Several chunks, the last overlapping its predecessor.
    np.testing.assert_allclose(
        klom(oracle, unlearned, compat=compat, chunk_size=128), expected, rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("compat", MODES)
def test_klom_matches_reference_on_adversarial_margins(compat):
    oracle, unlearned = _adversarial_margins(np.random.default_rng(1))
    expected = reference_klom(oracle, unlearned, compat=compat)
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(klom(oracle, unlearned, compat=compat), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("compat", MODES)
def test_klom_matches_reference_with_huge_clip(compat):
    """Magnitudes where lo + 1 == lo and edges collapse onto a few floats."""
    rng = np.random.default_rng(2)
    base = np.array([1e17, -1e17, 1e15, 3e305])
    oracle = base + np.outer(rng.integers(0, 4, 10), np.spacing(base))
    unlearned = base + np.outer(rng.integers(0, 2, 10), np.spacing(base))
    unlearned[:, 1] = -1e17  # a constant column where lo + 1 rounds back to lo
    oracle[:, 1] = -1e17
    oracle[:3, 2] = np.nan  # at clip=1e17: NaN is -clip even where the edges collapse onto it
    oracle[3:, 2] = -1e17
    unlearned[:, 2] = -1e17 + 16 * rng.integers(0, 2, 10)
    for clip in (1e17, 1e306):
        expected = reference_klom(oracle, unlearned, clip=clip, compat=compat)
        np.testing.assert_allclose(klom(oracle, unlearned, clip=clip, compat=compat), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("compat", MODES)
@pytest.mark.parametrize(("bins", "eps", "clip"), [(1, 1e-5, 100.0), (7, 1e-3, 3.0)])
def test_klom_matches_reference_for_other_settings(compat, bins, eps, clip):
    oracle, unlearned = _random_margins(np.random.default_rng(15), 9, 300)
    oracle[0, ::7] = np.nan
    unlearned[1, ::5] = np.inf
    expected = reference_klom(oracle, unlearned, bins=bins, eps=eps, clip=clip, compat=compat)
    got = klom(oracle, unlearned, bins=bins, eps=eps, clip=clip, compat=compat)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def test_compat_float32_keeps_float32_edges_like_numpy():
    rng = np.random.default_rng(3)
    edges32 = np.linspace(np.float32(-1.3), np.float32(2.9), 21)  # float32 edges
    oracle = rng.choice(edges32, size=(16, 200)).astype(np.float32)
    unlearned = rng.choice(edges32, size=(16, 200)).astype(np.float32)
    expected = reference_klom(oracle, unlearned, compat="easydub")
    np.testing.assert_allclose(klom(oracle, unlearned, compat="easydub"), expected, rtol=0, atol=1e-9)
    # The default mode works in float64 whatever the input.
    np.testing.assert_allclose(
        klom(oracle, unlearned), reference_klom(oracle.astype(np.float64), unlearned), rtol=0, atol=1e-9
    )


def test_oracle_is_the_reference_distribution():
    """Definition 3 is KL(oracle || unlearned): hand-computed in both orders."""
    half = np.array([0.0] * 5 + [1.0] * 5)[:, None]  # two bins, half the mass each
    zeros = np.zeros((10, 1))
    spread_vs_point = 0.5 * np.log(0.5) + 0.5 * np.log(0.5 / EPS) + np.log(1 + EPS)
    np.testing.assert_allclose(klom(half, zeros), [spread_vs_point], rtol=1e-12)
    np.testing.assert_allclose(klom(zeros, half), [np.log(2.0)], rtol=1e-12)


def test_blown_up_model_scores_the_cap_not_perfect():
    """All unlearned margins at +clip: the public digitize rule drops them and reports 0."""
    rng = np.random.default_rng(4)
    oracle = 0.1 * rng.normal(size=(100, 3))
    unlearned = np.stack([np.full(100, 100.0), np.full(100, np.inf), np.full(100, 1e9)], axis=1)
    np.testing.assert_allclose(klom(oracle, unlearned), np.log((1 + EPS) / EPS), rtol=1e-12)
    np.testing.assert_array_equal(klom(oracle, unlearned, compat="easydub"), np.zeros(3))


def test_nan_counts_as_minus_clip_and_stays_in_its_column():
    rng = np.random.default_rng(5)
    oracle = 5 + rng.normal(size=(40, 6))
    unlearned = 5 + rng.normal(size=(40, 6))
    clean = klom(oracle, unlearned)
    diverged = unlearned.copy()
    diverged[:7, 2] = np.nan
    diverged[:, 4] = np.nan
    scores = klom(oracle, diverged)
    np.testing.assert_array_equal(np.delete(scores, [2, 4]), np.delete(clean, [2, 4]))
    substituted = np.where(np.isnan(diverged), -100.0, diverged)
    np.testing.assert_allclose(scores, klom(oracle, substituted), rtol=0, atol=1e-12)
    # A diverged model is a sample in a bin the oracle never visits: 7 of 40 cost at least
    # log(40 / 33) (log-sum inequality). Not necessarily more than the clean score, though:
    # the -clip samples widen the joint bin range, which coarsens the bins of the others.
    assert scores[2] >= np.log(40 / 33) - 1e-3
    assert scores[4] > 11.0  # every model diverged: as far from the oracle as it gets
    # The public code ignores the diverged models altogether and reports perfect unlearning.
    assert klom(oracle, diverged, compat="easydub")[4] == 0.0


@pytest.mark.parametrize("compat", MODES)
def test_values_lie_between_zero_and_the_cap(compat):
    oracle, unlearned = _random_margins(np.random.default_rng(6), 30, 700)
    adv_oracle, adv_unlearned = _adversarial_margins(np.random.default_rng(7))
    for o, u in ((oracle, unlearned), (adv_oracle, adv_unlearned)):
        scores = klom(o, u, compat=compat)
        assert np.all(scores >= -1e-12) and np.all(scores <= CAP + 1e-12)
    assert klom(oracle, unlearned, compat=compat).max() > 11.0  # shifts of 200 reach the cap
    np.testing.assert_allclose(klom(oracle, oracle, compat=compat), 0.0, atol=1e-12)


def test_output_is_float64_numpy_and_x64_stays_off():
    oracle, unlearned = _random_margins(np.random.default_rng(8), 30, 700)
    scores = klom(oracle.astype(np.float32), unlearned.astype(np.float32))
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float64
    np.testing.assert_allclose(
        scores, reference_klom(oracle.astype(np.float32), unlearned.astype(np.float32)), rtol=0, atol=1e-9
    )
    assert not jax.config.jax_enable_x64
    assert jnp.ones(1).dtype == jnp.float32
    assert klom(oracle[:, :0], unlearned[:, :0]).shape == (0,)


def test_chunks_share_one_compilation():
    rng = np.random.default_rng(9)
    oracle, unlearned = rng.normal(size=(7, 1000)), rng.normal(size=(9, 1000))
    before = klom_module._chunk_histograms._cache_size()
    chunked = klom(oracle, unlearned, chunk_size=96)  # 11 chunks
    assert klom_module._chunk_histograms._cache_size() == before + 1
    np.testing.assert_allclose(chunked, klom(oracle, unlearned), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"oracle_margins": np.zeros((5, 3)), "unlearned_margins": np.zeros((5, 4))}, "same points"),
        ({"oracle_margins": np.zeros(5)}, r"shape \(N_models, n_points\)"),
        ({"oracle_margins": np.zeros((1, 3))}, "N_models >= 2"),
        ({"oracle_margins": np.zeros((5, 3), complex)}, "real numbers"),
        ({"bins": 0}, "bins"),
        ({"bins": 2.5}, "bins"),
        ({"eps": 0.0}, "eps"),
        ({"clip": np.inf}, "clip"),
        ({"clip": -1.0}, "clip"),
        ({"compat": "torch"}, "compat"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_klom_rejects_bad_input(kwargs, message):
    arguments = {"oracle_margins": np.zeros((5, 3)), "unlearned_margins": np.zeros((5, 3)), **kwargs}
    with pytest.raises(ValueError, match=message):
        klom(**arguments)


def test_margins_match_the_definition():
    rng = np.random.default_rng(10)
    logits = rng.normal(scale=3.0, size=(4, 6, 5))
    labels = rng.integers(0, 5, size=6)
    others = np.where(np.arange(5) == labels[:, None], -np.inf, logits)
    expected = np.take_along_axis(logits, labels[None, :, None], -1)[..., 0] - scipy.special.logsumexp(others, -1)
    with jax.enable_x64(True):
        got = margins(logits, labels)
        chex.assert_shape(got, (4, 6))
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12)
    jitted = jax.jit(margins)(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(np.asarray(jitted), expected, rtol=1e-5, atol=1e-5)


def test_margins_do_not_overflow_at_large_logits():
    logits = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [-1e4, -1e4, 1e4]])
    got = np.asarray(margins(logits, jnp.array([0, 1, 0])))
    np.testing.assert_allclose(got, [1e4, 0.0, -2e4], rtol=1e-6)


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (np.zeros((3, 4)), np.zeros(2, int), r"shape \(n,\)"),
        (np.zeros((3, 1)), np.zeros(3, int), "at least 2 classes"),
        (np.zeros((3, 4)), np.array([0, 4, 1]), r"\[0, C\)"),
        (np.zeros((3, 4)), np.zeros(3), "integers"),
    ],
)
def test_margins_reject_bad_input(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        margins(logits, labels)


def test_noise_floor_shrinks_with_ensemble_size_as_measured():
    rng = np.random.default_rng(11)
    pool = rng.normal(size=(200, 3000))
    p95 = {n: np.percentile(noise_floor(pool, n, seed=1), 95) for n in (20, 100)}
    np.testing.assert_allclose(p95[20], 5.0, atol=0.4)
    np.testing.assert_allclose(p95[100], 0.7, atol=0.15)
    floors = noise_floor(pool[:40], n_repeats=3, seed=2)  # n_models defaults to M // 2 = 20
    chex.assert_shape(floors, (3, 3000))
    assert not np.allclose(floors[0], floors[1])  # independent random splits
    np.testing.assert_array_equal(floors, noise_floor(pool[:40], n_repeats=3, seed=2))
    with pytest.raises(ValueError, match="n_models"):
        noise_floor(pool[:40], 21)


def test_bootstrap_resamples_models():
    rng = np.random.default_rng(12)
    oracle = rng.normal(size=(30, 400))
    replicates = bootstrap_klom(oracle, oracle, n_bootstrap=4, seed=3)
    chex.assert_shape(replicates, (4, 400))
    assert replicates.mean() > 0.1  # resampled ensembles differ although the inputs are equal
    np.testing.assert_array_equal(replicates, bootstrap_klom(oracle, oracle, n_bootstrap=4, seed=3))
    with pytest.raises(ValueError, match="n_bootstrap"):
        bootstrap_klom(oracle, oracle, n_bootstrap=0)


def test_summarize_reports_percentile_mean_ci_and_floor():
    rng = np.random.default_rng(13)
    values = rng.exponential(size=12)
    groups = np.array(["forget"] * 3 + ["retain"] * 5 + ["validation"] * 4)
    replicates = rng.exponential(size=(50, 12))
    floor = rng.exponential(size=(2, 12))
    table = summarize(values, groups, replicates=replicates, floor=floor)
    assert list(table.columns) == ["group", "statistic", "value", "ci_low", "ci_high", "noise_floor", "n_points"]
    assert list(table.group) == ["forget", "forget", "retain", "retain", "validation", "validation"]
    assert list(table.statistic) == ["p95", "mean"] * 3
    retain = table[(table.group == "retain") & (table.statistic == "p95")].iloc[0]
    members = groups == "retain"
    np.testing.assert_allclose(retain.value, np.percentile(values[members], 95))
    expected_ci = np.quantile(np.percentile(replicates[:, members], 95, axis=1), [0.025, 0.975])
    np.testing.assert_allclose([retain.ci_low, retain.ci_high], expected_ci)
    np.testing.assert_allclose(retain.noise_floor, np.percentile(floor[:, members], 95, axis=1).mean())
    assert retain.n_points == 5
    forget_mean = table[(table.group == "forget") & (table.statistic == "mean")].iloc[0]
    np.testing.assert_allclose(forget_mean.value, values[:3].mean())

    plain = summarize(values, groups)
    assert plain[["ci_low", "ci_high", "noise_floor"]].isna().all().all()
    pd.testing.assert_series_equal(plain.value, table.value)
    with pytest.raises(ValueError, match="one label per point"):
        summarize(values, groups[:-1])
    with pytest.raises(ValueError, match="replicates"):
        summarize(values, groups, replicates=replicates[:, :5])


@pytest.mark.slow
@pytest.mark.parametrize("compat", MODES)
def test_klom_matches_reference_at_paper_scale(compat):
    """100 models x 60,000 points, as in the papers (about a minute per mode)."""
    oracle, unlearned = _random_margins(np.random.default_rng(14), 100, 60_000)
    unlearned[:, ::97] = 1e9
    unlearned[0, ::89] = np.nan
    expected = reference_klom(oracle, unlearned, compat=compat)
    np.testing.assert_allclose(klom(oracle, unlearned, compat=compat), expected, rtol=0, atol=1e-9)
