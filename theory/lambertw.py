"""Real Lambert W function in JAX (branches 0 and -1).

W(z) solves ``W e^W = z``. The logistic-regression closed forms of the paper
(workshop Lemma 5 / NeurIPS Lemma 2, workshop Lemma 8 / NeurIPS Lemma 6) are all
of the form ``w = W(c)`` because the stationarity condition of the ridge-
regularised exponential loss in one coordinate is ``w - c e^{-w} = 0``, i.e.
``w e^w = c``. Its solution is ``w = W(c)``. The paper's App. G.1 (NeurIPS
App. E.1) writes it as ``W(-a)``. That is a sign slip: ``W(-a)`` is undefined
for ``a > 1/e`` and for ``0 < a < 1/e`` it gives ``W(-a) - a e^{-W(-a)} =
2 W(-a) != 0``. ``tests/test_theory_lambertw.py`` checks both forms.

The algorithm uses a branch-dependent initial guess and a fixed number of
Halley iterations, so the function is vectorised and ``jit``-able:

* near the branch point ``z = -1/e`` (``z <= -0.2``, both branches), the guess
  is the series in ``q = ±sqrt(2 (e z + 1))``. The iteration runs on
  ``t = W + 1`` with residual ``t e^t - expm1(t) - e (z + 1/e)``. Here
  ``z + 1/e`` is formed with a double-float ``1/e``, so nothing cancels and
  the result keeps full relative accuracy right up to the branch point;
* branch 0 for ``-0.2 < z <= 3``: Winitzki's guess, then Halley on
  ``w e^w - z``;
* branch 0 for ``z > 3`` and branch -1 for ``-0.2 < z < 0``: the asymptotic
  guess ``L1 - L2 + L2/L1``, then Halley on the log form
  ``w + log|w| - log|z|``. This form cannot overflow for huge ``z``.

The float nearest to ``-1/e`` (``-0.36787944117144233``) lies 1.2e-17 *below*
``-1/e``, so strictly it is outside the real domain. It is handled on purpose:
it is accepted as the branch point and returns exactly ``-1`` on both branches.
That is the real part of the true (complex) value up to 2e-17. Every other
input below it returns NaN. On branch -1, ``z = 0`` returns ``-inf`` (the
limit, as in mpmath) and ``z > 0`` returns NaN.

The derivative comes from a custom JVP with ``W'(z) = e^{-W} / (1 + W)``. It
equals ``W / (z (1 + W))`` but stays finite at ``z = 0``, where that form is
0/0. ``z = 0`` is exactly the DA input at ``alpha = |F|/|R|`` in Lemma 5.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["lambertw", "INV_E_HI", "INV_E_LO"]

# 1/e as an unevaluated sum hi + lo (double-float), from mpmath at 50 digits.
INV_E_HI = 0.36787944117144233
INV_E_LO = -1.2428753672788363e-17
_E = 2.718281828459045

# Series of W around the branch point in q = sqrt(2 (e z + 1)) (Corless et al. 1996).
_BRANCH_SERIES = (
    -1.0,
    1.0,
    -1.0 / 3.0,
    11.0 / 72.0,
    -43.0 / 540.0,
    769.0 / 17280.0,
    -221.0 / 8505.0,
    680863.0 / 43545600.0,
    -1963.0 / 204120.0,
)
_N_HALLEY = 5
_SPLIT_BRANCH = -0.2  # below: branch-point series + t-iteration
_SPLIT_LARGE = 3.0  # branch 0 above: log-form iteration


def _inv_e_pair(dtype):
    """(hi, lo) of 1/e rounded to ``dtype`` so that z + hi + lo is accurate."""
    hi = np.asarray(INV_E_HI, dtype=dtype)
    lo = np.asarray((INV_E_HI - float(hi)) + INV_E_LO, dtype=dtype)
    return hi, lo


def _halley_step(f, df, d2f):
    denom = 2.0 * df * df - f * d2f
    return jnp.where(denom != 0.0, 2.0 * f * df / jnp.where(denom != 0.0, denom, 1.0), 0.0)


def _near_branch(p, sign):
    """W = -1 + t for small p = z + 1/e >= 0; ``sign`` = +1 (W0) or -1 (W-1)."""
    ep = _E * p
    q = sign * jnp.sqrt(2.0 * ep)
    t = jnp.zeros_like(q)
    for c in reversed(_BRANCH_SERIES[1:]):
        t = (t + c) * q
    for _ in range(_N_HALLEY):
        et = jnp.exp(t)
        f = t * et - jnp.expm1(t) - ep  # = e (W e^W - z), cancellation-free
        t = t - _halley_step(f, t * et, (1.0 + t) * et)
    return t - 1.0


def _principal_moderate(z):
    """Branch 0 for -0.2 < z <= 3: Winitzki guess + Halley on w e^w - z."""
    l1 = jnp.log1p(z)
    w = l1 * (1.0 - jnp.log1p(l1) / (2.0 + l1))
    for _ in range(_N_HALLEY):
        ew = jnp.exp(w)
        f = w * ew - z
        w = w - _halley_step(f, ew * (1.0 + w), ew * (2.0 + w))
    return w


def _log_form(z):
    """Both branches where |W| is away from -1: Halley on w + log|w| - log|z|."""
    lz = jnp.log(jnp.abs(z))
    l2 = jnp.log(jnp.abs(lz))
    w = lz - l2 + l2 / lz
    for _ in range(_N_HALLEY):
        f = w + jnp.log(jnp.abs(w)) - lz
        w = w - _halley_step(f, 1.0 + 1.0 / w, -1.0 / (w * w))
    return w


def _lambertw_impl(z, branch):
    hi, lo = _inv_e_pair(z.dtype)
    # z + 1/e without cancellation; the barrier stops XLA from folding
    # (z + hi) + lo into z + (hi + lo), which would drop lo.
    p = jax.lax.optimization_barrier(z + hi) + lo
    in_domain = z >= -hi  # accepts the float nearest -1/e as the branch point
    p_safe = jnp.where(in_domain, jnp.maximum(p, 0.0), 0.0)
    near = z <= _SPLIT_BRANCH
    if branch == 0:
        moderate = jnp.where(near | (z > _SPLIT_LARGE), 0.0, z)
        large = jnp.where(z > _SPLIT_LARGE, z, 10.0)
        w = jnp.where(
            near,
            _near_branch(p_safe, 1.0),
            jnp.where(z > _SPLIT_LARGE, _log_form(large), _principal_moderate(moderate)),
        )
        w = jnp.where(z == jnp.inf, jnp.inf, w)
        return jnp.where(in_domain, w, jnp.nan)
    in_domain = in_domain & (z <= 0.0)
    tail = jnp.where(near | (z >= 0.0), -0.1, z)
    w = jnp.where(near, _near_branch(p_safe, -1.0), _log_form(tail))
    w = jnp.where(z == 0.0, -jnp.inf, w)
    return jnp.where(in_domain, w, jnp.nan)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _lambertw(z, branch):
    return _lambertw_impl(z, branch)


@_lambertw.defjvp
def _lambertw_jvp(branch, primals, tangents):
    (z,), (dz,) = primals, tangents
    w = _lambertw(z, branch)
    return w, jnp.exp(-w) / (1.0 + w) * dz


@partial(jax.jit, static_argnames="branch")
def _lambertw_jit(z, branch):
    return _lambertw(z, branch)


def lambertw(z, branch: int = 0):
    """Real Lambert W: ``w`` with ``w e^w = z`` on branch 0 or -1.

    Args:
      z: real array-like (ints are promoted to the default float dtype). Use
        float64 (``with jax.enable_x64(True):``) for ~1e-15 accuracy.
      branch: 0 (principal, z >= -1/e, W >= -1) or -1 (-1/e <= z < 0, W <= -1).

    Returns:
      Array of the same shape. NaN outside the branch's real domain, and
      ``-inf`` at ``z = 0`` on branch -1. It is differentiable (``jax.grad``,
      ``jax.jvp``) with ``W' = e^{-W} / (1 + W)``.
    """
    if branch not in (0, -1):
        raise ValueError(f"branch must be 0 or -1, got {branch!r}")
    z = jnp.asarray(z)
    if not jnp.issubdtype(z.dtype, jnp.floating):
        z = z.astype(jnp.result_type(float))
    return _lambertw_jit(z, branch)
