"""Semi-orthogonal logistic regression (paper Sec. 4.2, App. F-J).

Numbering: workshop text ``ascent-fails-to-forget.md`` (NeurIPS numbers in
brackets; see ``theory/README.md``).

* Lemma 5 [2]: closed-form stationary points of one coordinate
  (``single_dim_solutions``);
* Lemma 2 [3]: the sign condition ``(w^DA - w^D)(w^D - w^R) >= 0``
  (``lemma2_alpha_range``, ``lemma2_grid``);
* Lemmas 6/7 [4/5] and Corollary 1: distances and the limit ``lam -> 0``
  (``corollary1_table``);
* App. F.3 [D.3]: iterated descent-then-ascent against the joint update
  (``iterated_da_step``, ``joint_da_step``, ``f3_step_error``,
  ``f3_fixed_point_gap``).

Setting (Assumptions 1-2): every sample with ``x_ij != 0`` has
``y_i x_ij = 1``. Coordinate j holds ``|R_j|`` retain and
``|F_j| = alpha |R_j|`` forget samples. The objectives are normalised by the
*global* sizes ``|D|, |R|, |F|``. In coordinate j the three objectives of
Eq. (1) reduce to ``k e^{-w} + lam/2 w^2`` with

    k_D = (1 + alpha) |R_j| / |D|,   k_R = |R_j| / |R|,
    k_DA = |R_j| / |R| - alpha |R_j| / |F|,

so a stationary point satisfies ``w e^w = k / lam``, i.e. ``w = W(k / lam)``.
The second derivative at a stationary point is ``lam (1 + W)``:

* the W0 branch (``W >= -1``) is the **minimum**;
* the W-1 branch (``W <= -1``) is the **maximum**.

App. H says the reverse ("primary ... secondary branch ... local maximum and
minimum respectively").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .lambertw import lambertw
from .solvers import exp_loss, newton_minimise, sample_weights

__all__ = [
    "SingleDimSolutions",
    "single_dim_solutions",
    "lemma2_alpha_range",
    "semi_orthogonal_dataset",
    "direct_single_dim",
    "direct_da_maximum",
    "lemma2_grid",
    "corollary1_table",
    "iterated_da_step",
    "joint_da_step",
    "f3_step_error",
    "f3_eta2_coefficient",
    "f3_fixed_point_gap",
    "f3_stabilised_fixed_point",
]

_INV_E = float(np.exp(-1.0))


class SingleDimSolutions(NamedTuple):
    """Closed-form stationary points of coordinate j (Lemma 5).

    ``da_min`` = W0(z_da) is the DA local minimum (NaN if ``z_da < -1/e``).
    ``da_max`` = W-1(z_da) is the DA local maximum. It exists only for
    ``-1/e <= z_da < 0``; otherwise it is NaN (``-inf`` at ``z_da = 0``, where
    the maximum has gone to infinity). ``n_da`` counts the real stationary
    points: 1 (z_da >= 0, or z_da = -1/e where min and max merge into an
    inflection), 2 (-1/e < z_da < 0), or 0 (z_da < -1/e). With none, gradient
    descent-ascent diverges to ``-inf``.
    """

    pretrain: np.ndarray
    retrain: np.ndarray
    da_min: np.ndarray
    da_max: np.ndarray
    n_da: np.ndarray
    z_pretrain: np.ndarray
    z_retrain: np.ndarray
    z_da: np.ndarray


def _check_sizes(r_j, n_retain, n_forget, lam, alpha=None):
    r_j, n_retain, n_forget, lam = map(np.asarray, (r_j, n_retain, n_forget, lam))
    if np.any(lam <= 0):
        raise ValueError("lam must be > 0")
    if np.any(n_retain <= 0) or np.any(n_forget <= 0):
        raise ValueError("n_retain and n_forget must be > 0")
    if np.any(r_j <= 0) or np.any(r_j > n_retain):
        raise ValueError("need 0 < r_j <= n_retain (r_j = |R_j| retain samples on coordinate j)")
    if alpha is not None:
        alpha = np.asarray(alpha)
        if np.any(alpha < 0):
            raise ValueError("alpha must be >= 0")
        if np.any(alpha * r_j > n_forget * (1 + 1e-12)):
            raise ValueError("alpha * r_j = |F_j| cannot exceed n_forget = |F|")


def single_dim_solutions(alpha, r_j, n_retain, n_forget, lam) -> SingleDimSolutions:
    """Lemma 5: pretrain, retrain and DA stationary points of coordinate j.

    Args broadcast against each other: ``alpha = |F_j|/|R_j|``, ``r_j = |R_j|``,
    ``n_retain = |R|``, ``n_forget = |F|`` (global sizes, ``|D| = |R| + |F|``),
    ``lam`` the ridge. Computed in float64.
    """
    _check_sizes(r_j, n_retain, n_forget, lam, alpha)
    with jax.enable_x64(True):
        alpha, r_j, n_r, n_f, lam = (jnp.asarray(v, jnp.float64) for v in (alpha, r_j, n_retain, n_forget, lam))
        z_d = (1.0 + alpha) * r_j / (lam * (n_r + n_f))
        z_r = r_j / (lam * n_r)
        z_da = (1.0 - alpha * n_r / n_f) * r_j / (lam * n_r)
        w_da_max = jnp.where(z_da < 0.0, lambertw(z_da, -1), jnp.where(z_da == 0.0, -jnp.inf, jnp.nan))
        n_da = jnp.where(z_da >= 0.0, 1, jnp.where(z_da > -_INV_E, 2, jnp.where(z_da == -_INV_E, 1, 0)))
        out = (lambertw(z_d), lambertw(z_r), lambertw(z_da), w_da_max, n_da, z_d, z_r, z_da)
        return SingleDimSolutions(*(np.asarray(v) for v in out))


def lemma2_alpha_range(n_retain, n_forget):
    """The alpha interval on which App. H proves Lemma 2 (its Case 1).

    ``[|F|^2 / (|R| (|F| + |D|)), |F|/|R|]``. Below the lower end ``w^DA`` lies
    between ``w^D`` and ``w^R`` (DA helps); above ``|F|/|R|``, ``w^DA < w^R < w^D``
    (DA overshoots the oracle). The product is negative in both cases, so the
    main text's "holds for alpha <= |F|/|R|" overstates the range.
    """
    n_r, n_f = float(n_retain), float(n_forget)
    return n_f**2 / (n_r * (2.0 * n_f + n_r)), n_f / n_r


def semi_orthogonal_dataset(n_retain: int, n_forget: int, r_j: int, f_j: int):
    """An explicit data set satisfying Assumptions 1-2, coordinate j = 0.

    Layout (``d = 2 + n_forget``, so the shape depends only on |R|, |F|):

    * coordinate 0 holds ``r_j`` retain and ``f_j`` forget samples;
    * coordinate 1 holds the other ``n_retain - r_j`` retain samples;
    * each other forget sample sits alone on its own coordinate.

    Labels alternate ``+-1`` with ``x_ij = y_i``, so ``y_i x_ij = 1``
    (Assumption 2), and samples on different coordinates are orthogonal
    (Assumption 1). Returns float64 NumPy ``(X, y, is_forget)``.
    """
    if not (0 < r_j <= n_retain and 0 <= f_j <= n_forget and n_forget > 0):
        raise ValueError("need 0 < r_j <= n_retain and 0 <= f_j <= n_forget, n_forget > 0")
    n, d = n_retain + n_forget, 2 + n_forget
    coord = np.concatenate(
        [
            np.zeros(r_j, int),
            np.ones(n_retain - r_j, int),
            np.zeros(f_j, int),
            2 + np.arange(n_forget - f_j),
        ]
    )
    is_forget = np.arange(n) >= n_retain
    y = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    X = np.zeros((n, d))
    X[np.arange(n), coord] = y
    return X, y, is_forget


_newton_exp = jax.jit(lambda w0, X, y, c, lam: newton_minimise(exp_loss, w0, X, y, c, lam))


def solve_three(X, y, is_forget, lam):
    """Direct minimisers of the three objectives of Eq. (1); DA starts at w^D.

    Call inside ``jax.enable_x64(True)`` with float64 arrays.
    """
    w0 = jnp.zeros(X.shape[1], X.dtype)
    res = {}
    for name in ("pretrain", "retrain"):
        res[name] = _newton_exp(w0, X, y, sample_weights(is_forget, name), lam)
    res["da"] = _newton_exp(res["pretrain"].w, X, y, sample_weights(is_forget, "da"), lam)
    return res


def direct_single_dim(n_retain: int, n_forget: int, r_j: int, f_j: int, lam: float):
    """Ground truth for Lemma 5: Newton on the explicit data set.

    DA starts from the pretrained solution (as unlearning does). Returns
    ``{problem: (w_j, grad_norm, diverged)}`` for coordinate j = 0. For DA,
    ``diverged`` means some coordinate left the box ``|w| <= 40``, i.e. the
    iterates ran off to ``-inf``.
    """
    X, y, is_forget = semi_orthogonal_dataset(n_retain, n_forget, r_j, f_j)
    with jax.enable_x64(True):
        res = solve_three(jnp.asarray(X), jnp.asarray(y), jnp.asarray(is_forget), jnp.asarray(lam, jnp.float64))
        return {k: (float(v.w[0]), float(v.grad_norm), bool(v.diverged)) for k, v in res.items()}


def direct_da_maximum(n_retain: int, n_forget: int, r_j: int, f_j: int, lam: float, w_min: float):
    """The DA local maximum of coordinate j by bisection on the explicit gradient.

    Searches ``[-40, w_min)``, where ``w_min`` is the DA local minimum from
    ``direct_single_dim``. Between the two, ``dL/dw_j`` goes from positive
    to negative, and no Lambert W is involved. The objective is separable,
    so the other coordinates are held at 0.
    """
    X, y, is_forget = semi_orthogonal_dataset(n_retain, n_forget, r_j, f_j)
    with jax.enable_x64(True):
        X, y = jnp.asarray(X), jnp.asarray(y)
        c = sample_weights(jnp.asarray(is_forget), "da")
        e0 = jnp.zeros(X.shape[1]).at[0].set(1.0)
        slope = jax.jit(jax.grad(lambda t: exp_loss(t * e0, X, y, c, lam)))
        lo, hi = -40.0, float(w_min) - 1e-3
        if not (slope(lo) > 0 > slope(hi)):
            raise ValueError("no local maximum below w_min: DA has a single stationary point here")
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
        return 0.5 * (lo + hi)


def lemma2_grid(n_retain: int, n_forget: int, r_j: int, lam: float, f_js=None):
    """Lemma 2's product on a grid of ``alpha = f_j / r_j``, closed form vs direct.

    Returns a dict of NumPy arrays:

    * ``alpha``;
    * ``product_closed``: ``(w^DA - w^D)(w^D - w^R)`` from Lemma 5, taking
      ``w^DA = -inf`` when there is no stationary point;
    * ``product_direct``: the same product from Newton on explicit data;
    * ``da_diverged``;
    * ``in_range``: alpha inside ``lemma2_alpha_range``.
    """
    if f_js is None:
        f_js = np.arange(0, min(n_forget, 10 * r_j) + 1)
    f_js = np.asarray(f_js, int)
    alpha = f_js / r_j
    sol = single_dim_solutions(alpha, r_j, n_retain, n_forget, lam)
    w_da = np.where(sol.n_da > 0, sol.da_min, -np.inf)
    prod_closed = (w_da - sol.pretrain) * (sol.pretrain - sol.retrain)
    prod_direct, diverged = [], []
    for f_j in f_js:
        d = direct_single_dim(n_retain, n_forget, r_j, int(f_j), lam)
        w_da_d = -np.inf if d["da"][2] else d["da"][0]
        prod_direct.append((w_da_d - d["pretrain"][0]) * (d["pretrain"][0] - d["retrain"][0]))
        diverged.append(d["da"][2])
    lo, hi = lemma2_alpha_range(n_retain, n_forget)
    return {
        "alpha": alpha,
        "product_closed": prod_closed,
        "product_direct": np.asarray(prod_direct),
        "da_diverged": np.asarray(diverged),
        "in_range": (alpha >= lo * (1 - 1e-12)) & (alpha <= hi * (1 + 1e-12)),
    }


def corollary1_table(lams, n_retain: int, n_forget: int, r_j=None):
    """Corollary 1 (= workshop App. Corollary 2, NeurIPS Cor. 1) as ``lam -> 0``.

    By default ``r_j = n_retain`` (a purely one-dimensional retain set, so
    ``alpha = |F|/|R|`` exactly). There ``Delta_RD = |w^D - w^R| = 0`` and
    ``Delta_R,DA = w^R = W0(1/lam) -> inf``. With ``r_j = n_retain - 1``,
    alpha exceeds ``|F|/|R|`` by ``|F|/(|R|(|R|-1))``. DA then has no
    stationary point once ``lam < e/|R|``: it diverges. Returns a list of dict
    rows with the closed form and the direct minimiser, plus the Lemma 6 upper
    bound and the Lemma 7 lower bound.
    """
    r_j = n_retain if r_j is None else r_j
    rows = []
    for lam in lams:
        alpha = n_forget / r_j
        sol = single_dim_solutions(alpha, r_j, n_retain, n_forget, lam)
        d = direct_single_dim(n_retain, n_forget, r_j, n_forget, lam)
        da_closed = float(sol.da_min) if sol.n_da > 0 else -np.inf
        da_direct = -np.inf if d["da"][2] else d["da"][0]
        rows.append(
            {
                "lam": lam,
                "alpha": alpha,
                "delta_rd_closed": abs(float(sol.pretrain - sol.retrain)),
                "delta_rd_direct": abs(d["pretrain"][0] - d["retrain"][0]),
                "lemma6_bound": abs(np.log((1 + alpha) * n_retain / (n_retain + n_forget))),
                "delta_rda_closed": abs(float(sol.retrain) - da_closed),
                "delta_rda_direct": abs(d["retrain"][0] - da_direct),
                "lemma7_bound": float(sol.retrain),
            }
        )
    return rows


# ---------------------------------------------------------------- App. F.3


def iterated_da_step(w, eta, a, b, lam):
    """One round of App. F.3 Eq. (3): descent on R, then ascent on F.

    ``a = |R_j|/|R|``, ``b = |F_j|/|F| = alpha |R_j|/|F|``. F.3 writes ``b``
    with ``epsilon`` in place of ``alpha`` (a typo). Each half-step also
    carries the ridge ``lam w``.
    """
    u = w + eta * (a * jnp.exp(-w) - lam * w)
    return u - eta * (b * jnp.exp(-u) + lam * u)


def joint_da_step(w, eta, a, b, lam):
    """The joint DA gradient step of Eq. (1) with the ridge doubled (F.3 Eq. (4))."""
    return w - eta * (-a * jnp.exp(-w) + b * jnp.exp(-w) + 2.0 * lam * w)


def f3_step_error(w, etas, a, b, lam):
    """``|iterated - joint|`` after one step for each eta (should be O(eta^2))."""
    with jax.enable_x64(True):
        etas = jnp.asarray(etas, jnp.float64)
        w = jnp.asarray(w, jnp.float64)
        return np.asarray(jnp.abs(iterated_da_step(w, etas, a, b, lam) - joint_da_step(w, etas, a, b, lam)))


def f3_eta2_coefficient(w, a, b, lam):
    """The eta^2 term of the iterated step, exactly and as printed in F.3.

    Expanding ``iterated_da_step`` gives
    ``joint + eta^2 g1 (b e^{-w} - lam) + O(eta^3)``, where
    ``g1 = a e^{-w} - lam w``. F.3 keeps only ``eta^2 b e^{-w} g1``: it
    dropped the ``-lam * eta * g1`` piece of the ridge on the ascent
    half-step. Returns ``(exact, paper, numerical)``. ``numerical`` is the
    second derivative in eta at 0, taken by ``jax.hessian`` of the explicit
    map (independent of the hand expansion).
    """
    with jax.enable_x64(True):
        w = jnp.asarray(w, jnp.float64)
        g1 = a * jnp.exp(-w) - lam * w
        exact = g1 * (b * jnp.exp(-w) - lam)
        paper = b * jnp.exp(-w) * g1
        diff = lambda eta: iterated_da_step(w, eta, a, b, lam) - joint_da_step(w, eta, a, b, lam)
        numerical = 0.5 * jax.hessian(diff)(jnp.asarray(0.0, jnp.float64))
        return float(exact), float(paper), float(numerical)


def _iterated_fixed_points(etas, a, b, lam, w_start):
    """Fixed points of ``iterated_da_step`` by Newton on ``T(w) - w`` (one per eta)."""

    @jax.jit
    def fixed_point(eta, w0):
        h = lambda w: iterated_da_step(w, eta, a, b, lam) - w
        dh = jax.grad(h)
        return jax.lax.fori_loop(0, 100, lambda _, w: w - h(w) / dh(w), w0)

    etas = jnp.asarray(etas, jnp.float64)
    return np.asarray(jax.vmap(fixed_point)(etas, jnp.broadcast_to(jnp.asarray(w_start, jnp.float64), etas.shape)))


def f3_fixed_point_gap(etas, a, b, lam):
    """Fixed points: iterated map (Newton on ``T(w) - w``) vs joint map.

    The joint map's fixed point does not depend on eta:
    ``W0((a - b) / (2 lam))`` (Lemma 5 with ``lam -> 2 lam``). The iterated
    map's fixed point moves by ``O(eta)``:
    ``w*(eta) - w0 ~ eta g1(w0) (b e^{-w0} - lam) / (2 lam (1 + w0))``.
    Returns ``(w_joint, w_iterated[etas], predicted_slope)``.
    """
    with jax.enable_x64(True):
        w_joint = float(lambertw(jnp.asarray((a - b) / (2.0 * lam), jnp.float64)))
        w_it = _iterated_fixed_points(etas, a, b, lam, w_joint)
        g1 = a * np.exp(-w_joint) - lam * w_joint
        slope = g1 * (b * np.exp(-w_joint) - lam) / (2.0 * lam * (1.0 + w_joint))
        return w_joint, w_it, slope


def f3_stabilised_fixed_point(etas, a, b, lam):
    """Iterated DA where the joint update has no fixed point (``(a-b)/(2 lam) < -1/e``).

    App. F.3 says the ``eta^2`` term "stops the algorithm's solution from
    diverging". The iterated map does keep a fixed point, at
    ``w ~ -ln(ln(b/a) / (eta a))``: there the descent half-step lifts ``w`` by
    ``eta a e^{-w} = ln(b/a)``, just enough for the ascent gradient
    ``b e^{-u}`` to cancel the descent gradient ``a e^{-w}`` (the ridge terms
    are O(eta ln eta)). It runs to ``-inf`` like ``ln eta`` as ``eta -> 0``.
    Its slope ``T'(w*) -> 1 - ln(b/a)^2``, so it attracts only for
    ``b/a < e^sqrt(2)``. Returns ``(w_fixed[etas], asymptotic[etas])``, the
    fixed point found by Newton on ``T(w) - w`` from the asymptotic guess.
    """
    if not (a - b) / (2.0 * lam) < -float(np.exp(-1.0)):
        raise ValueError("this regime needs (a - b) / (2 lam) < -1/e (no joint fixed point)")
    etas = np.asarray(etas, float)
    guess = -np.log(np.log(b / a) / (etas * a))
    with jax.enable_x64(True):
        return _iterated_fixed_points(etas, a, b, lam, guess), guess
