"""Lemma 5 / Lemma 2 / Lemmas 6-7 / Corollary 1 / App. F.3 (workshop numbering).

Ground truth is Newton (or bisection) on explicit semi-orthogonal data
sets, never the Lambert-W closed form itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory import single_dim as sd

R, F, RJ, LAM = 200, 40, 100, 1.0  # |F|/|R| = 0.2, Lemma 2 lower end 0.02857, case 3 above 0.3472


@pytest.fixture(scope="module")
def grid():
    return sd.lemma2_grid(R, F, RJ, LAM, f_js=np.arange(0, F + 1))


def test_dataset_satisfies_assumptions():
    X, y, is_forget = sd.semi_orthogonal_dataset(R, F, RJ, 30)
    support = X != 0
    # Assumption 1: every sample lives on one coordinate (so sets on different coordinates are orthogonal)
    assert np.all(support.sum(1) == 1)
    # Assumption 2: y_i x_ij = 1 wherever x_ij != 0
    assert np.all((y[:, None] * X)[support] == 1.0)
    assert is_forget.sum() == F and (~is_forget).sum() == R
    assert support[~is_forget, 0].sum() == RJ and support[is_forget, 0].sum() == 30


@pytest.mark.parametrize("f_j", [0, 10, 20, 30])
def test_lemma5_closed_form_matches_newton(f_j):
    s = sd.single_dim_solutions(f_j / RJ, RJ, R, F, LAM)
    d = sd.direct_single_dim(R, F, RJ, f_j, LAM)
    for name, closed in (("pretrain", s.pretrain), ("retrain", s.retrain), ("da", s.da_min)):
        w, gnorm, diverged = d[name]
        assert not diverged and gnorm < 1e-12
        assert abs(w - float(closed)) < 1e-12


def test_da_minimum_is_w0_and_maximum_is_w_minus_1():
    f_j = 30  # -1/e < z_DA < 0: two stationary points
    s = sd.single_dim_solutions(f_j / RJ, RJ, R, F, LAM)
    assert int(s.n_da) == 2
    w_min = sd.direct_single_dim(R, F, RJ, f_j, LAM)["da"][0]
    w_max = sd.direct_da_maximum(R, F, RJ, f_j, LAM, w_min)
    assert abs(w_max - float(s.da_max)) < 1e-12
    # second derivative lam (1 + W): W0 branch -> minimum, W-1 branch -> maximum (App. H has it reversed)
    X, y, isf = sd.semi_orthogonal_dataset(R, F, RJ, f_j)
    from theory.solvers import exp_loss, sample_weights

    with jax.enable_x64(True):
        e0 = jnp.zeros(X.shape[1]).at[0].set(1.0)
        c = sample_weights(jnp.asarray(isf), "da")
        curv = jax.grad(jax.grad(lambda t: exp_loss(t * e0, jnp.asarray(X), jnp.asarray(y), c, LAM)))
        assert abs(float(curv(w_min)) - LAM * (1 + float(s.da_min))) < 1e-12 and float(curv(w_min)) > 0
        assert abs(float(curv(w_max)) - LAM * (1 + float(s.da_max))) < 1e-12 and float(curv(w_max)) < 0


def test_no_stationary_point_means_da_diverges():
    f_j = 38  # alpha = 0.38 > |F|/|R| + lam |F| / (e |R_j|)
    s = sd.single_dim_solutions(f_j / RJ, RJ, R, F, LAM)
    assert int(s.n_da) == 0 and np.isnan(s.da_min) and float(s.z_da) < -np.exp(-1)
    assert sd.direct_single_dim(R, F, RJ, f_j, LAM)["da"][2]


def test_case_boundaries_and_branch_counts():
    lo_case2 = F / R
    hi_case2 = F / R + LAM * F / (np.e * RJ)
    alphas = np.array([0.0, lo_case2, 0.5 * (lo_case2 + hi_case2), hi_case2 * (1 + 1e-9), 0.39])
    s = sd.single_dim_solutions(alphas, RJ, R, F, LAM)
    assert list(s.n_da) == [1, 1, 2, 0, 0]
    assert float(s.da_min[1]) == 0.0 and s.da_max[1] == -np.inf  # z_DA = 0: W0(0) = 0


def test_lemma2_closed_form_product_matches_direct(grid):
    finite = np.isfinite(grid["product_closed"])
    assert np.array_equal(finite, ~grid["da_diverged"])
    assert np.max(np.abs(grid["product_closed"][finite] - grid["product_direct"][finite])) < 1e-12


def test_lemma2_holds_exactly_on_app_h_range(grid):
    lo, hi = sd.lemma2_alpha_range(R, F)
    assert lo == pytest.approx(F**2 / (R * (F + R + F)))
    holds = grid["product_direct"] >= -1e-12
    np.testing.assert_array_equal(holds, grid["in_range"])
    # the main text's "holds for alpha <= |F|/|R|" overstates it: it fails below lo
    a = grid["alpha"]
    assert np.all(grid["product_direct"][a < lo] < 0) and np.any(a < lo)
    # and it fails above |F|/|R| (DA overshoots past the oracle, then diverges)
    assert np.all(grid["product_direct"][a > hi] < 0)


def test_lemma2_range_is_independent_of_lambda():
    lo, hi = sd.lemma2_alpha_range(R, F)
    for lam in (1e-3, 0.1, 10.0):
        a = np.array([0.5 * lo, 1.01 * lo, 0.5 * (lo + hi), 0.99 * hi, 1.01 * hi])
        s = sd.single_dim_solutions(a, RJ, R, F, lam)
        prod = (np.where(s.n_da > 0, s.da_min, -np.inf) - s.pretrain) * (s.pretrain - s.retrain)
        assert list(prod >= 0) == [False, True, True, True, False]


def test_lemmas_6_and_7_bounds_on_a_grid():
    for lam in (1e-3, 1e-1, 1.0, 10.0):
        a = np.linspace(0, F / RJ, 81)
        s = sd.single_dim_solutions(a, RJ, R, F, lam)
        d_rd = np.abs(s.pretrain - s.retrain)
        assert np.all(d_rd <= np.abs(np.log((1 + a) * R / (R + F))) + 1e-14)
        big = a >= F / R
        d_rda = np.abs(s.retrain - np.where(s.n_da > 0, s.da_min, -np.inf))
        assert np.all(d_rda[big] >= s.retrain - 1e-14)
    # and one direct spot check of Lemma 7 with a real minimiser
    d = sd.direct_single_dim(R, F, RJ, 30, LAM)
    assert abs(d["retrain"][0] - d["da"][0]) >= float(sd.single_dim_solutions(0.3, RJ, R, F, LAM).retrain)


def test_corollary1_limits():
    rows = sd.corollary1_table([1.0, 1e-2, 1e-4], 50, 10)  # alpha = |F|/|R| exactly
    for r in rows:
        assert r["delta_rd_direct"] < 1e-12 and r["delta_rd_closed"] == 0.0
        assert abs(r["delta_rda_direct"] - r["delta_rda_closed"]) < 1e-8
    assert rows[0]["delta_rda_direct"] < rows[1]["delta_rda_direct"] < rows[2]["delta_rda_direct"]
    # alpha just above |F|/|R|: DA has a minimum for lam > e/|R| and diverges below
    rows = sd.corollary1_table([0.1, 1e-2], 50, 10, r_j=49)
    assert np.isfinite(rows[0]["delta_rda_direct"]) and np.isfinite(rows[0]["delta_rda_closed"])
    assert np.isinf(rows[1]["delta_rda_direct"]) and np.isinf(rows[1]["delta_rda_closed"])


def test_f3_one_step_agrees_to_second_order():
    a, b, lam, w = 0.5, 0.25, 1.0, 0.2
    etas = np.logspace(-2, -5, 7)
    err = sd.f3_step_error(w, etas, a, b, lam)
    slope = np.polyfit(np.log(etas), np.log(err), 1)[0]
    assert abs(slope - 2.0) < 0.01
    exact, paper, numerical = sd.f3_eta2_coefficient(w, a, b, lam)
    assert abs(exact - numerical) < 1e-12
    assert abs(err[-1] / etas[-1] ** 2 - abs(exact)) < 1e-4
    assert abs(paper - numerical) > 0.1  # the printed eta^2 term drops -lam*g1


def test_f3_fixed_points_differ_at_first_order():
    a, b, lam = 0.5, 0.25, 1.0
    etas = np.logspace(-2, -6, 9)
    w_joint, w_it, slope = sd.f3_fixed_point_gap(etas, a, b, lam)
    gap = w_it - w_joint
    assert abs(np.polyfit(np.log(etas), np.log(np.abs(gap)), 1)[0] - 1.0) < 0.01
    assert abs(gap[-1] / etas[-1] - slope) < 1e-4
    # the joint fixed point really is a fixed point of the joint update with doubled ridge
    with jax.enable_x64(True):
        assert abs(float(sd.joint_da_step(jnp.asarray(w_joint), 0.1, a, b, lam)) - w_joint) < 1e-15


def _iterate(w0, eta, a, b, lam, n):
    """``n`` rounds of the iterated map from ``w0`` (direct iteration, no Newton)."""
    with jax.enable_x64(True):
        step = lambda _, w: sd.iterated_da_step(w, eta, a, b, lam)
        return float(jax.jit(lambda w: jax.lax.fori_loop(0, n, step, w))(jnp.asarray(w0, jnp.float64)))


def test_f3_eta2_term_stabilises_but_fixed_point_runs_off_like_log_eta():
    a, b, lam = 0.5, 2.0, 0.5  # b/a = 4, (a - b)/(2 lam) = -1.5 < -1/e: joint DA has no fixed point
    etas = np.array([1e-2, 1e-3, 1e-4, 1e-6])
    w, guess = sd.f3_stabilised_fixed_point(etas, a, b, lam)
    with jax.enable_x64(True):
        resid = [float(sd.iterated_da_step(jnp.asarray(wi), e, a, b, lam)) - wi for wi, e in zip(w, etas)]
    assert np.max(np.abs(resid)) < 1e-12
    # -ln(ln(b/a)/(eta a)) is the asymptote (error O(eta ln eta)); -ln((b-a)/(eta a b)) is off by ln(ln 4 / 0.75) = 0.61
    assert np.all(np.diff(np.abs(w - guess)) < 0) and abs(w[-1] - guess[-1]) < 1e-4
    old = -np.log((b - a) / (etas * a * b))
    assert np.all(np.abs(old[1:] - w[1:] - np.log(np.log(b / a) * b / (b - a))) < 0.01)
    assert np.all(np.diff(w) < -2.0)  # runs to -inf like ln(eta)
    # direct iteration from 0.3 away converges to the Newton fixed point
    assert abs(_iterate(guess[1] + 0.3, etas[1], a, b, lam, 3000) - w[1]) < 1e-10


def test_f3_stabilised_fixed_point_repels_beyond_e_to_sqrt2():
    """T'(w*) -> 1 - ln(b/a)^2: attracting for b/a < e^sqrt(2) = 4.11, repelling above (no convergence)."""
    a, lam, eta = 0.5, 0.5, 1e-4
    for ratio in (4.0, 5.0):
        w, _ = sd.f3_stabilised_fixed_point([eta], a, ratio * a, lam)
        with jax.enable_x64(True):
            slope = float(jax.grad(sd.iterated_da_step)(jnp.asarray(w[0]), eta, a, ratio * a, lam))
        assert abs(slope - (1 - np.log(ratio) ** 2)) < 0.01
        end = _iterate(w[0] + 1e-3, eta, a, ratio * a, lam, 3000)
        assert (abs(end - w[0]) < 1e-10) == (ratio < np.exp(np.sqrt(2)))


def test_validation_errors():
    with pytest.raises(ValueError):
        sd.single_dim_solutions(0.1, RJ, R, F, 0.0)
    with pytest.raises(ValueError):
        sd.single_dim_solutions(-0.1, RJ, R, F, 1.0)
    with pytest.raises(ValueError):
        sd.single_dim_solutions(0.5, RJ, R, F, 1.0)  # |F_j| = 50 > |F| = 40
    with pytest.raises(ValueError):
        sd.semi_orthogonal_dataset(R, F, RJ, F + 1)
    with pytest.raises(ValueError):
        sd.f3_stabilised_fixed_point([1e-2], 0.5, 0.25, 1.0)
