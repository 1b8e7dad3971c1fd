"""Does the first descent-ascent step point away from the oracle? (NeurIPS text)

The NeurIPS version adds a statement: in logistic regression "DA moves away
from the oracle from the very first steps: Lemma 3 proves that DA updates
point in the opposite direction to the oracle". In 1D, "farthest away" means
that ``w^DA - w^D`` and ``w^R - w^D`` have opposite signs. The first DA step
starts at the pretrained ``w^D`` and points along ``-grad L_DA(w^D)``.

1D closed form (workshop Lemma 5 / NeurIPS Lemma 2 notation). Because
``w^D = z_D e^{-w^D}``, the step is

    -grad L_DA(w^D) = lam e^{-w^D} (z_DA - z_D),

so it points away from ``w^R`` (where ``w^R - w^D`` has the sign of
``z_R - z_D``) exactly when ``(z_DA - z_D)(z_R - z_D) < 0``. That is the
open interval ``|F|^2/(|R|(|F|+|D|)) < alpha < |F|/|R|``: the same range as
workshop Lemma 2 / NeurIPS Lemma 3. Outside it, the first step points
*toward* the oracle. The ground truth here is ``jax.grad`` of the explicit
objective at the Newton minimiser, with the oracle also found by Newton.

The module also checks the 2D correlated setting (workshop Sec. 4.3) and the
nonlinear toy (App. B).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .single_dim import lemma2_alpha_range, semi_orthogonal_dataset, single_dim_solutions, solve_three
from .solvers import exp_loss, newton_minimise, sample_weights

__all__ = ["first_da_step_closed", "da_direction_grid", "da_direction_2d", "da_direction_toy"]


def first_da_step_closed(alpha, r_j, n_retain, n_forget, lam):
    """``-d/dw_j L_DA`` at the pretrained point, ``lam e^{-w^D} (z_DA - z_D)``."""
    s = single_dim_solutions(alpha, r_j, n_retain, n_forget, lam)
    return lam * np.exp(-s.pretrain) * (s.z_da - s.z_pretrain)


_da_step = jax.jit(lambda w, X, y, c, lam: -jax.grad(exp_loss)(w, X, y, c, lam))


def da_direction_grid(n_retain: int, n_forget: int, r_j: int, lam: float, f_js=None):
    """First DA step vs oracle direction on explicit semi-orthogonal data.

    Returns a dict of arrays:

    * ``alpha``;
    * ``step_direct``: ``-grad_j L_DA(w^D)`` by autodiff;
    * ``step_closed``;
    * ``oracle_dir``: ``w^R_j - w^D_j`` (Newton);
    * ``away``: ``step * oracle_dir < 0``;
    * ``predicted_away``: alpha strictly inside Lemma 2's range.
    """
    if f_js is None:
        f_js = np.arange(0, n_forget + 1)
    f_js = np.asarray(f_js, int)
    alpha = f_js / r_j
    step, oracle = [], []
    with jax.enable_x64(True):
        for f_j in f_js:
            X, y, is_forget = (jnp.asarray(v) for v in semi_orthogonal_dataset(n_retain, n_forget, r_j, int(f_j)))
            lam_ = jnp.asarray(lam, jnp.float64)
            res = solve_three(X, y, is_forget, lam_)
            w_d = res["pretrain"].w
            step.append(float(_da_step(w_d, X, y, sample_weights(is_forget, "da"), lam_)[0]))
            oracle.append(float(res["retrain"].w[0] - w_d[0]))
    step, oracle = np.asarray(step), np.asarray(oracle)
    lo, hi = lemma2_alpha_range(n_retain, n_forget)
    return {
        "alpha": alpha,
        "step_direct": step,
        "step_closed": first_da_step_closed(alpha, r_j, n_retain, n_forget, lam),
        "oracle_dir": oracle,
        "away": step * oracle < 0,
        "predicted_away": (alpha > lo) & (alpha < hi),
    }


@jax.jit
def _block_first_step(eps, alpha, R, F, lam):
    X = jnp.stack([jnp.stack([1.0, eps]), jnp.stack([eps, 1.0])])
    ones = jnp.ones(2, X.dtype)
    D = R + F
    c_d = jnp.stack([1.0 / D, alpha / D])
    c_r = jnp.stack([1.0 / R, 0.0 * alpha])
    c_da = jnp.stack([1.0 / R, -alpha / F])
    w0 = jnp.zeros(2, X.dtype)
    w_d = newton_minimise(exp_loss, w0, X, ones, c_d, lam).w
    w_r = newton_minimise(exp_loss, w0, X, ones, c_r, lam).w
    step = -jax.grad(exp_loss)(w_d, X, ones, c_da, lam)
    return jnp.dot(step, w_r - w_d), step, w_r - w_d


def da_direction_2d(eps, alpha, n_retain, n_forget, lam):
    """Two-dimensional setting (sizes in units of ``|R_ij|``).

    Returns ``(inner, step, oracle_dir)``. Here ``inner`` is
    ``<-grad L_DA(w^D), w^R - w^D>``; it is negative when the first DA step
    points away from the oracle. ``eps`` and ``alpha`` broadcast.
    """
    with jax.enable_x64(True):
        args = jnp.broadcast_arrays(*(jnp.asarray(v, jnp.float64) for v in (eps, alpha, n_retain, n_forget, lam)))
        shape = args[0].shape
        inner, step, oracle = jax.vmap(_block_first_step)(*(a.reshape(-1) for a in args))
        return np.asarray(inner).reshape(shape), np.asarray(step).reshape(shape + (2,)), np.asarray(oracle).reshape(shape + (2,))


def da_direction_toy(reading):
    """Nonlinear toy (App. B): ``<-grad L_GDA(theta_pre), theta_R - theta_pre>``.

    ``theta_R`` is the global minimiser of the retrain loss (the oracle).
    Returns ``(inner, step, oracle_dir)``.
    """
    from .toy_minima import _args, _grad, find_minima

    theta_pre = find_minima(reading, "pretrain")[0][0]
    theta_r = find_minima(reading, "retrain")[0][0]
    with jax.enable_x64(True):
        step = -np.asarray(_grad(jnp.asarray(theta_pre), *_args(reading, "gda")))
    oracle = theta_r - theta_pre
    return float(step @ oracle), step, oracle
