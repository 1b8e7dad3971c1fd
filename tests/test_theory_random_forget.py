"""Lemma 1 (random forget sets): Monte Carlo and exact hypergeometric tails vs Hoeffding."""

import numpy as np
import pytest

from theory import random_forget as rf


def test_tails_on_synthetic_pool_match_exact_law_and_respect_bound():
    rng = np.random.default_rng(1)
    correct = rng.random(2000) < 0.7
    tails = rf.forget_set_tails(correct, sizes=(10, 100), n_sets=3000, seed=2)
    for n, t in tails.items():
        se = np.sqrt(t["exact"] * (1 - t["exact"]) / 3000)
        assert np.all(np.abs(t["mc"] - t["exact"]) <= 5 * se + 1e-12)
        assert np.all(t["exact"] <= np.minimum(t["bound"], 1.0) + 1e-12)
        assert t["mc"][0] == 1.0 and t["exact"][0] == pytest.approx(1.0)


def test_bound_formula_and_validation():
    assert rf.hoeffding_bound(100, 0.1) == pytest.approx(2 * np.exp(-2.0))
    with pytest.raises(ValueError):
        rf.forget_set_tails(np.ones(10, bool), sizes=(11,))


def test_lemma1_on_fashion_mnist():
    data = pytest.importorskip("ascent_jax.data")
    try:
        _, predict = rf.train_linear_classifier()
        images, labels = data.load("fashion_mnist", "test")  # the pool: never seen in training
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    correct = predict(images) == labels
    acc_t = correct.mean()
    assert 0.75 < acc_t < 0.95
    tails = rf.forget_set_tails(correct, sizes=rf.FORGET_SIZES, n_sets=2000)
    for n, t in tails.items():
        bound = np.minimum(t["bound"], 1.0)
        se = np.sqrt(t["exact"] * (1 - t["exact"]) / 2000)
        assert np.all(t["exact"] <= bound + 1e-12)
        assert np.all(t["mc"] <= bound + 4 * se + 1e-12)
        assert np.all(np.abs(t["mc"] - t["exact"]) <= 5 * se + 1e-12)
    # the bound is informative for large |F|: deviations above 0.1 are rare
    i = np.searchsorted(tails[500]["eps"], 0.1)
    assert tails[500]["mc"][i] <= tails[500]["bound"][i] < 1e-3
