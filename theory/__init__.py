"""Numerical checks of the logistic-regression theory of "Ascent Fails to Forget".

Numbering follows the workshop text (``ascent-fails-to-forget.md``); the
NeurIPS numbers and a mapping table are in ``theory/README.md``.

Every check compares a closed form with an independent ground truth: mpmath,
Newton/gradient descent on explicit data, bisection, brute-force grids or
Monte Carlo. Modules:

* ``lambertw``: real Lambert W (branches 0, -1) in JAX, with a custom JVP;
* ``single_dim``: Lemma 5 closed form, Lemma 2, Lemmas 6/7, Corollary 1,
  App. F.3;
* ``two_dim``: Lemmas 8-11, 3/4 (and how tight they are), 13, Fig. 3 and
  App. L's Eq. (13);
* ``random_forget``: Lemma 1 on Fashion-MNIST;
* ``toy_minima``: the App. B toy with bad minima (Fig. 4 / NeurIPS Fig. 5);
* ``da_direction``: the NeurIPS claim that the first DA step points away
  from the oracle;
* ``report``: ``python -m theory`` (figures and the results table).

Nothing here turns on ``jax_enable_x64`` globally: public functions compute
in float64 inside ``jax.enable_x64(True)``.
"""

from .da_direction import da_direction_2d, da_direction_grid, da_direction_toy, first_da_step_closed
from .lambertw import lambertw
from .random_forget import forget_set_tails, hoeffding_bound, train_linear_classifier
from .single_dim import (
    corollary1_table,
    direct_single_dim,
    f3_eta2_coefficient,
    f3_fixed_point_gap,
    f3_step_error,
    iterated_da_step,
    joint_da_step,
    lemma2_alpha_range,
    lemma2_grid,
    semi_orthogonal_dataset,
    single_dim_solutions,
)
from .solvers import newton_minimise
from .toy_minima import PAPER_READING, ToyReading, claims, find_minima, search_readings
from .two_dim import (
    alpha_bounds_2d,
    app_l_eq13,
    block_direct,
    direct_two_dim,
    lemma8_retrain_xy,
    lemma9_pretrain_bounds,
    lemma10_da_bounds,
    ordering_region,
    threshold_tightness,
    true_crossings,
    two_dim_dataset,
)

__all__ = [
    "lambertw",
    "single_dim_solutions",
    "lemma2_alpha_range",
    "semi_orthogonal_dataset",
    "direct_single_dim",
    "lemma2_grid",
    "corollary1_table",
    "iterated_da_step",
    "joint_da_step",
    "f3_step_error",
    "f3_eta2_coefficient",
    "f3_fixed_point_gap",
    "alpha_bounds_2d",
    "lemma8_retrain_xy",
    "lemma9_pretrain_bounds",
    "lemma10_da_bounds",
    "two_dim_dataset",
    "direct_two_dim",
    "block_direct",
    "ordering_region",
    "true_crossings",
    "threshold_tightness",
    "app_l_eq13",
    "ToyReading",
    "PAPER_READING",
    "claims",
    "find_minima",
    "search_readings",
    "first_da_step_closed",
    "da_direction_grid",
    "da_direction_2d",
    "da_direction_toy",
    "train_linear_classifier",
    "forget_set_tails",
    "hoeffding_bound",
    "newton_minimise",
]
