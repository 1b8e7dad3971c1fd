"""Two-dimensional correlated data: Lemmas 8-10, 13, 3/4 (=11), Eqs. (5)-(6), Fig. 3.

The ground truth is Newton on explicit data with features (1, eps) / (eps, 1),
or the same objective with multiplicities as weights (``block_direct``).
"""

import numpy as np
import pytest

from theory import two_dim as td

# Fig. 3 parameters in units of |R_ij|: |D| = 100, |F| = 30, lam = 1
RU, FU, LAM = 70.0, 30.0, 1.0
EPS = np.linspace(0.02, 0.98, 25)[:, None]
ALPHA = np.linspace(0.0, 1.0, 51)[None, :]


@pytest.fixture(scope="module")
def block():
    r = td.block_direct(EPS, ALPHA, RU, FU, LAM)
    (xd, yd, dd), (xr, yr, dr), (xa, ya, da) = r["pretrain"], r["retrain"], r["da"]
    assert not dd.any() and not dr.any()
    return dict(xd=xd, yd=yd, xr=xr, yr=yr, xa=np.where(da, -np.inf, xa), ya=np.where(da, -np.inf, ya), div=da)


def test_explicit_dataset_matches_weighted_block():
    # 10 retain samples (1, eps), 4 forget samples (eps, 1), fillers elsewhere
    d = td.direct_two_dim(10, 4, 700, 300, 0.8, LAM)
    b = td.block_direct(0.8, 0.4, RU, FU, LAM)
    for k in ("pretrain", "retrain", "da"):
        assert not d[k][2]
        assert abs(d[k][0] - float(b[k][0])) < 1e-12 and abs(d[k][1] - float(b[k][1])) < 1e-12


def test_lemma8_retrain_closed_form_matches_newton():
    for eps, r_ij, lam in [(0.8, 10, 1.0), (0.3, 5, 0.1), (0.05, 20, 0.01)]:
        n_r = 700  # same shapes as above: one compilation
        d = td.direct_two_dim(r_ij, 0, n_r, 300, eps, lam)["retrain"]
        x, y = td.lemma8_retrain_xy(eps, r_ij, n_r, lam)
        assert abs(d[0] - float(x)) < 1e-12 and abs(d[1] - float(y)) < 1e-12


def test_lemma13_and_lemma9_bounds(block):
    assert np.all(block["yd"] <= block["xd"] + 1e-15)  # Lemma 13 (alpha <= 1)
    xl, xh, yl, yh = td.lemma9_pretrain_bounds(EPS, ALPHA, 1.0, RU + FU, LAM)
    assert np.all(xl <= block["xd"] + 1e-15) and np.all(block["xd"] <= xh + 1e-15)
    assert np.all(yl <= block["yd"] + 1e-15) and np.all(block["yd"] <= yh + 1e-15)
    # the bounds are not vacuous: the lower x bound is tight somewhere
    assert np.min(block["xd"] - xl) < 1e-6


def test_lemma10_da_bounds(block):
    xh, yh = td.lemma10_da_bounds(EPS, ALPHA, 1.0, RU, FU, LAM)
    ok = ~block["div"]
    assert np.all(block["xa"][ok] <= xh[ok] + 1e-15) and np.all(block["ya"][ok] <= yh[ok] + 1e-15)
    # DA points also satisfy y <= x (App. K)
    assert np.all(block["ya"][ok] <= block["xa"][ok] + 1e-15)


def test_lemma3_and_lemma4_thresholds(block):
    b = td.alpha_bounds_2d(EPS[:, 0], RU, RU + FU, FU, LAM)
    above = ALPHA >= b.d_gt_da[:, None]
    below = ALPHA <= b.r_gt_d[:, None]
    assert above.sum() > 100 and below.sum() > 100
    d_ge_da = (block["xd"] >= block["xa"]) & (block["yd"] >= block["ya"])
    r_ge_d = (block["xr"] >= block["xd"]) & (block["yr"] >= block["yd"])
    assert np.all(d_ge_da[above]) and np.all(r_ge_d[below])
    window = above & below
    assert window.sum() > 10 and np.all((d_ge_da & r_ge_d)[window])
    # the thresholds are sufficient, not necessary: the true region is larger
    assert (d_ge_da & r_ge_d).sum() > 2 * window.sum()


def test_thresholds_solve_their_defining_equations():
    eps, rij, R, F, lam = 0.6, 2.0, 80.0, 20.0, 0.5
    D = R + F
    b = td.alpha_bounds_2d(eps, R, D, F, lam, rij)
    x_r, y_r = td.lemma8_retrain_xy(eps, rij, R, lam)
    # Eq. (5): the upper bound on x^D reaches x^R exactly at alpha_x^{R>D}; Eq. (6) likewise for y
    assert abs(float(td.lemma9_pretrain_bounds(eps, b.r_gt_d_x, rij, D, lam)[1]) - float(x_r)) < 1e-13
    assert abs(float(td.lemma9_pretrain_bounds(eps, b.r_gt_d_y, rij, D, lam)[3]) - float(y_r)) < 1e-13
    # Lemma 3: lower bound on x^D (y^D) meets the upper bound on x^DA (y^DA) at alpha_x (alpha_y)
    assert abs(float(td.lemma9_pretrain_bounds(eps, b.d_gt_da_x, rij, D, lam)[0]) - float(td.lemma10_da_bounds(eps, b.d_gt_da_x, rij, R, F, lam)[0])) < 1e-13
    assert abs(float(td.lemma9_pretrain_bounds(eps, b.d_gt_da_y, rij, D, lam)[2]) - float(td.lemma10_da_bounds(eps, b.d_gt_da_y, rij, R, F, lam)[1])) < 1e-13
    # the printed closed form for alpha^{D>DA}
    expect = max((1 + eps**2) / (2 * eps) * F**2 / (R * (D + F)), 2 * eps / (1 + eps**2) * F * D / (R * (D + F)))
    assert float(b.d_gt_da) == pytest.approx(expect, rel=1e-14)


def test_only_lam_d_over_rij_matters():
    b1 = td.alpha_bounds_2d(0.5, 70.0, 100.0, 30.0, 1.0, 1.0)
    b2 = td.alpha_bounds_2d(0.5, 700.0, 1000.0, 300.0, 1.0, 10.0)
    np.testing.assert_allclose(b1, b2, rtol=1e-13)


def test_fig3_window_widens_with_forget_fraction():
    eps = np.linspace(0.3, 0.95, 14)
    widths = []
    for frac in (0.1, 0.2, 0.3):
        b = td.alpha_bounds_2d(eps, 100 * (1 - frac), 100.0, 100 * frac, LAM)
        widths.append(np.clip(b.r_gt_d - b.d_gt_da, 0, None).sum())
    assert widths[0] < widths[1] < widths[2]


@pytest.mark.slow
def test_fig3_png(tmp_path):
    td.plot_fig3(tmp_path / "fig3.png", n_eps=50, n_region=(15, 21))
    assert (tmp_path / "fig3.png").stat().st_size > 5_000


def test_validation():
    with pytest.raises(ValueError, match="n_total"):
        td.alpha_bounds_2d(0.5, 70, 99, 30, 1.0)
    with pytest.raises(ValueError, match="eps"):
        td.alpha_bounds_2d(1.5, 70, 100, 30, 1.0)
    with pytest.raises(ValueError):
        td.two_dim_dataset(0, 1, 10, 5, 0.5)


def test_app_l_eq13_weights_are_real_and_solve_eq12():
    mpmath = pytest.importorskip("mpmath")
    eps, r_lam = 0.9, 10.0  # 8 (1-eps)^2 / (|R| lam)^2 = 8e-4 < 1/e
    with mpmath.workdps(30):
        c = mpmath.mpf(eps - 1) / r_lam

        def eq12(u, v):  # App. L Eq. (12), the eps -> 1 DA stationarity equations
            return [u - mpmath.exp(-u - v) * (u - v - 1) * c, v - mpmath.exp(-u - v) * (u - v + 1) * c]

        def printed_eq13(ratio):  # Eq. (13) as printed, in complex arithmetic, argument -ratio
            W = mpmath.lambertw(-ratio)
            return (W - 1j * mpmath.sqrt(2) * mpmath.sqrt(W)) / 4, (W + 1j * mpmath.sqrt(2) * mpmath.sqrt(W)) / 4

        w1, w2 = printed_eq13(8 * c**2)
        assert mpmath.im(w1) == 0 and mpmath.im(w2) == 0  # i sqrt(2) sqrt(W) is real for W < 0
        assert max(abs(r) for r in eq12(w1, w2)) < 1e-28
        root = mpmath.findroot(eq12, (0.01, -0.01))  # Newton on Eq. (12), no Lambert W
        assert abs(root[0] - w1) < 1e-25 and abs(root[1] - w2) < 1e-25
        x1, x2 = td.app_l_eq13(eps, r_lam)
        assert abs(float(x1) - 0.009804) < 1e-6 and abs(float(x2) + 0.010204) < 1e-6
        assert abs(float(x1) - float(mpmath.re(w1))) < 1e-16 and abs(float(x2) - float(mpmath.re(w2))) < 1e-16
        assert max(abs(float(r)) for r in eq12(mpmath.mpf(float(x1)), mpmath.mpf(float(x2)))) < 1e-17
        # complex exactly past 8 (1-eps)^2 / (|R| lam)^2 = 1/e
        for e in (0.2, 0.5, 0.95):
            rl_edge = float(mpmath.sqrt(8 * mpmath.e)) * (1 - e)
            for f, real in ((1 + 1e-6, True), (1 - 1e-6, False)):  # larger |R| lam -> smaller argument
                w1, _ = printed_eq13(8 * (1 - mpmath.mpf(e)) ** 2 / (rl_edge * f) ** 2)
                assert (mpmath.im(w1) == 0) == real
                assert np.isfinite(td.app_l_eq13(e, rl_edge * f)[0]) == real


@pytest.mark.parametrize("lam_d", [0.1, 1.0])
def test_lemma4_threshold_negative_at_small_lam_d(lam_d):
    """For lam |D|/|R_ij| <= 1 the window is empty at every eps; alpha^{R>D} < 0 for most eps only if |F|/|D| <= 0.1."""
    eps = np.linspace(0.01, 0.99, 99)
    shares = []
    for frac in (0.05, 0.1, 0.3, 0.5):
        n_f = 100 * frac
        b = td.alpha_bounds_2d(eps, 100 - n_f, 100.0, n_f, lam_d / 100)
        assert np.all(b.r_gt_d < b.d_gt_da)  # the window is empty
        # Eq. (6) solves y_hi^D(alpha) = y^R with y_hi^D increasing in alpha: it is negative exactly where
        # Lemma 9's bound already exceeds Lemma 8's y^R at alpha = 0
        y_hi0 = td.lemma9_pretrain_bounds(eps, 0.0, 1.0, 100.0, lam_d / 100)[3]
        y_r = td.lemma8_retrain_xy(eps, 1.0, 100 - n_f, lam_d / 100)[1]
        np.testing.assert_array_equal(b.r_gt_d < 0, y_hi0 > y_r)
        assert np.all(b.r_gt_d_x > 0)  # only the y part goes negative
        shares.append(np.mean(b.r_gt_d < 0))
    assert np.all(np.diff(shares) < 0)
    if lam_d == 1.0:  # the README's numbers
        np.testing.assert_allclose(shares, [0.687, 0.556, 0.273, 0.091], atol=0.006)
        assert shares[1] > 0.5 > shares[2]


def test_threshold_tightness_no_violation_and_gap_shrinks():
    eps = np.array([0.2, 0.5, 0.8])[:, None]
    lam_d = np.array([1.0, 100.0, 1e4])
    res = td.threshold_tightness(eps, lam_d, 0.3, n_bisect=30)
    for part, (thr, crossing, gap) in res.items():
        assert np.all(gap > -1e-6), part  # the thresholds are sufficient: no counterexample
    # the crossing found by bisection is where x^D reaches Lemma 8's x^R (closed form, not used in the bisection)
    cross = res["eq5"][1]
    x_d = td.block_direct(eps, cross, 70.0, 30.0, lam_d / 100)["pretrain"][0]
    np.testing.assert_allclose(x_d, td.lemma8_retrain_xy(eps, 1.0, 70.0, lam_d / 100)[0], rtol=1e-7)
    for part in ("eq5", "eq6", "lemma4", "lemma3_x"):
        med = np.median(res[part][2], axis=0)
        assert np.all(np.diff(med) < 0) and med[-1] < 0.01, part
    assert np.all(res["lemma3_y"][2] > 1.0)  # y part of Lemma 3 loose by > 100 % at every lam
