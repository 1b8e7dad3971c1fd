"""NeurIPS claim: the first DA step points away from the oracle (semi-orthogonal setting).

The first step is ``-grad L_DA(w^D)`` by autodiff of the explicit objective at
the Newton minimiser. The oracle direction is ``w^R - w^D``, also from Newton.
"""

import numpy as np
import pytest

from theory import da_direction as dd
from theory import single_dim as sd
from theory.toy_minima import ToyReading

R, F, RJ, LAM = 200, 40, 100, 1.0  # same shapes as test_theory_single_dim: shared compilation


@pytest.fixture(scope="module")
def grid():
    return dd.da_direction_grid(R, F, RJ, LAM, f_js=np.arange(0, 35))  # up to alpha = 0.34 (< case 3)


def test_first_step_closed_form_matches_autodiff(grid):
    assert np.max(np.abs(grid["step_closed"] - grid["step_direct"])) < 1e-13


def test_first_step_points_away_exactly_in_lemma2_range(grid):
    lo, hi = sd.lemma2_alpha_range(R, F)
    tied = np.abs(grid["oracle_dir"]) < 1e-12  # alpha = |F|/|R|: w^D = w^R
    assert tied.sum() == 1 and grid["alpha"][tied][0] == pytest.approx(hi)
    np.testing.assert_array_equal(grid["away"][~tied], grid["predicted_away"][~tied])
    assert grid["away"].sum() >= 15
    # outside the range the first step goes *toward* the oracle
    outside = ~grid["predicted_away"] & ~tied
    assert np.all(grid["step_direct"][outside] * grid["oracle_dir"][outside] > 0)


def test_two_dim_first_step_not_always_away_inside_lemma_window():
    from theory.two_dim import alpha_bounds_2d

    eps = np.linspace(0.3, 0.95, 14)[:, None]
    alpha = np.linspace(0.15, 0.45, 31)[None, :]
    inner, step, oracle = dd.da_direction_2d(eps, alpha, 70.0, 30.0, 1.0)
    np.testing.assert_allclose(inner, np.sum(step * oracle, axis=-1), rtol=1e-12, atol=1e-18)
    b = alpha_bounds_2d(eps[:, 0], 70.0, 100.0, 30.0, 1.0)
    window = (alpha >= b.d_gt_da[:, None]) & (alpha <= b.r_gt_d[:, None])
    assert window.sum() > 20
    away = inner[window] < 0
    assert away.any() and not away.all()  # the 1D statement does not carry over to 2D


def test_toy_first_gda_step_points_toward_the_retrain_optimum():
    inner, step, oracle = dd.da_direction_toy(ToyReading("standard", "pm1", "2sigma-1", "sum", "zero", 0.1))
    assert inner > 0 and np.linalg.norm(oracle) > 0
