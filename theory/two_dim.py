"""Two-dimensional correlated data (paper Sec. 4.3, App. C.1.2, K, L).

Numbering: workshop text (NeurIPS numbers in brackets).

Setting: retain block ``S_i`` of ``|R_ij|`` samples with features ``(1, eps)``
and forget block ``S_j`` of ``|F_ij| = alpha |R_ij|`` samples with features
``(eps, 1)``, all with ``y <w, x> = <w, feature>``. The global sizes
``|R|, |F|, |D|`` normalise Eq. (1). In the rotated coordinates
``x = w_1 + eps w_2`` and ``y = eps w_1 + w_2`` the stationarity conditions
are App. K's equations. The module provides:

* Lemma 8 [6]: exact retrain point (``lemma8_retrain_xy``);
* Lemmas 9/10 [7/8]: bounds on the pretrain and DA points
  (``lemma9_pretrain_bounds``, ``lemma10_da_bounds``);
* Lemma 3 = App. Lemma 11 [9] and Lemma 4 [10]: the thresholds
  ``alpha^{D>DA}`` and ``alpha^{R>D}`` (``alpha_bounds_2d``, Eqs. (5)-(6)
  generalised to any ``|R_ij|``);
* Lemma 13 [12]: ``y^D <= x^D`` for ``alpha <= 1``;
* Fig. 3 [Fig. 4]: ``plot_fig3``;
* how tight Lemmas 3-4 are: ``true_crossings``, ``threshold_tightness``;
* App. L [J] Eq. (13): ``app_l_eq13``.

The ground truth is Newton on an explicit data set (``two_dim_dataset``,
``direct_two_dim``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .lambertw import lambertw
from .single_dim import solve_three
from .solvers import exp_loss, newton_minimise

__all__ = [
    "AlphaBounds2D",
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
    "plot_fig3",
]


class AlphaBounds2D(NamedTuple):
    """Thresholds of Lemma 3 (``d_gt_da``) and Lemma 4 (``r_gt_d``), with parts."""

    d_gt_da: np.ndarray  # max(d_gt_da_x, d_gt_da_y)
    r_gt_d: np.ndarray  # min(r_gt_d_x, r_gt_d_y)
    d_gt_da_x: np.ndarray
    d_gt_da_y: np.ndarray
    r_gt_d_x: np.ndarray  # Eq. (5)
    r_gt_d_y: np.ndarray  # Eq. (6)


def _validate(eps, n_retain, n_total, n_forget, lam, r_ij):
    eps, n_retain, n_total, n_forget, lam, r_ij = map(np.asarray, (eps, n_retain, n_total, n_forget, lam, r_ij))
    if np.any(eps <= 0) or np.any(eps >= 1):
        raise ValueError("eps must lie in (0, 1)")
    if np.any(lam <= 0):
        raise ValueError("lam must be > 0")
    if np.any(n_retain <= 0) or np.any(n_forget <= 0):
        raise ValueError("n_retain and n_forget must be > 0")
    if np.any(np.abs(n_total - (n_retain + n_forget)) > 1e-9 * n_total):
        raise ValueError("n_total must equal n_retain + n_forget (|D| = |R| + |F|)")
    if np.any(r_ij <= 0) or np.any(r_ij > n_retain):
        raise ValueError("need 0 < r_ij <= n_retain")


def alpha_bounds_2d(eps, n_retain, n_total, n_forget, lam, r_ij=1.0) -> AlphaBounds2D:
    """``alpha^{D>DA}`` (Lemma 3/11) and ``alpha^{R>D}`` (Lemma 4, Eqs. (5)-(6)).

    The paper's Eqs. (5)-(6) are written for ``|R_ij| = 1``, i.e. sizes in
    units of ``|R_ij|``. ``r_ij`` restores the general form, in which only
    ``|R_ij| / |R|`` etc. matter:

    * ``alpha_x^{R>D} = lam |D| Delta e^V / (2 eps |R_ij|)``, where
      ``Delta = W(z_R) - W(z_D)`` and ``V = (1 + eps^2) Delta / (2 eps)``;
    * ``alpha_y^{R>D} = (lam |D| U e^U / |R_ij| - 2 eps) / (1 + eps^2)``,
      where ``U = 2 eps W(z_R) / (1 + eps^2)``;

    with ``z_R = (1 + eps^2) |R_ij| / (lam |R|)`` and
    ``z_D = (1 + eps^2) |R_ij| / (lam |D|)``. DA is provably detrimental
    (both orderings hold) for ``d_gt_da <= alpha <= r_gt_d``.
    """
    _validate(eps, n_retain, n_total, n_forget, lam, r_ij)
    with jax.enable_x64(True):
        eps, R, D, F, lam, rij = (jnp.asarray(v, jnp.float64) for v in (eps, n_retain, n_total, n_forget, lam, r_ij))
        s = 1.0 + eps**2
        d_x = s / (2.0 * eps) * F**2 / (R * (D + F))
        d_y = 2.0 * eps / s * F * D / (R * (D + F))
        w_r = lambertw(s * rij / (lam * R))
        delta = w_r - lambertw(s * rij / (lam * D))
        v = s * delta / (2.0 * eps)
        r_x = lam * D * delta * jnp.exp(v) / (2.0 * eps * rij)
        u = 2.0 * eps * w_r / s
        r_y = (lam * D * u * jnp.exp(u) / rij - 2.0 * eps) / s
        out = (jnp.maximum(d_x, d_y), jnp.minimum(r_x, r_y), d_x, d_y, r_x, r_y)
        return AlphaBounds2D(*(np.asarray(o) for o in out))


def lemma8_retrain_xy(eps, r_ij, n_retain, lam):
    """Lemma 8: ``x^R = W((1+eps^2)|R_ij|/(lam |R|))``, ``y^R = 2 eps/(1+eps^2) x^R``."""
    with jax.enable_x64(True):
        s = 1.0 + jnp.asarray(eps, jnp.float64) ** 2
        x = lambertw(s * r_ij / (lam * jnp.asarray(n_retain, jnp.float64)))
        return np.asarray(x), np.asarray(2.0 * eps / s * x)


def lemma9_pretrain_bounds(eps, alpha, r_ij, n_total, lam):
    """Lemma 9: ``(x_lo, x_hi, y_lo, y_hi)`` bracketing the pretrain point."""
    with jax.enable_x64(True):
        b = r_ij / (lam * jnp.asarray(n_total, jnp.float64))
        s = 1.0 + eps**2
        x_lo = lambertw(b * (s + 2.0 * alpha * eps))
        x_hi = 2.0 * eps / s * lambertw(b * alpha * s) + lambertw(b * s)
        y_lo = lambertw(b * alpha * s)
        y_hi = lambertw(b * (2.0 * eps + alpha * s))
        return tuple(np.asarray(v) for v in (x_lo, x_hi, y_lo, y_hi))


def lemma10_da_bounds(eps, alpha, r_ij, n_retain, n_forget, lam):
    """Lemma 10: upper bounds ``(x_hi, y_hi)`` on the DA point (W0 branch).

    NaN when the argument is below ``-1/e``. Then ``x e^x <= arg < -1/e``
    has no solution and DA has no stationary point at all.
    """
    with jax.enable_x64(True):
        br = r_ij / (lam * jnp.asarray(n_retain, jnp.float64))
        bf = r_ij / (lam * jnp.asarray(n_forget, jnp.float64))
        s = 1.0 + eps**2
        x_hi = lambertw(br * s - bf * alpha * 2.0 * eps)
        y_hi = lambertw(br * 2.0 * eps - bf * alpha * s)
        return np.asarray(x_hi), np.asarray(y_hi)


def two_dim_dataset(r_ij: int, f_ij: int, n_retain: int, n_forget: int, eps: float):
    """Explicit data set of App. K: ``S_i`` (retain) and ``S_j`` (forget) on coordinates 0, 1.

    ``r_ij`` samples ``y (1, eps)`` (retain) and ``f_ij`` samples ``y (eps, 1)``
    (forget), with labels ``y = +-1`` alternating. The other
    ``n_retain - r_ij`` retain and ``n_forget - f_ij`` forget samples share
    coordinate 2 (orthogonal to the block, so they only change the
    normalisers). That coordinate stays bounded under DA when
    ``r_ij (1/|R| - alpha/|F|) <= lam/e``. Returns NumPy ``(X, y, is_forget)``
    with ``d = 3``.
    """
    if not (0 < r_ij <= n_retain and 0 <= f_ij <= n_forget and n_forget > 0):
        raise ValueError("need 0 < r_ij <= n_retain and 0 <= f_ij <= n_forget, n_forget > 0")
    n = n_retain + n_forget
    X = np.zeros((n, 3))
    X[:r_ij, :2] = (1.0, eps)
    X[r_ij:n_retain, 2] = 1.0
    X[n_retain : n_retain + f_ij, :2] = (eps, 1.0)
    X[n_retain + f_ij :, 2] = 1.0
    y = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    is_forget = np.arange(n) >= n_retain
    return X * y[:, None], y, is_forget


def direct_two_dim(r_ij: int, f_ij: int, n_retain: int, n_forget: int, eps: float, lam: float):
    """Newton on the explicit data set.

    Returns ``{problem: (x, y, diverged)}`` in the rotated coordinates. DA
    starts from the pretrain solution. ``diverged``: an iterate left
    ``|w| <= 40``.
    """
    X, y, is_forget = two_dim_dataset(r_ij, f_ij, n_retain, n_forget, eps)
    with jax.enable_x64(True):
        res = solve_three(jnp.asarray(X), jnp.asarray(y), jnp.asarray(is_forget), jnp.asarray(lam, jnp.float64))
        out = {}
        for k, r in res.items():
            w = np.asarray(r.w)
            out[k] = (w[0] + eps * w[1], eps * w[0] + w[1], bool(r.diverged))
        return out


@jax.jit
def _block_newton(eps, alpha, R, F, lam, r_ij):
    X = jnp.stack([jnp.stack([1.0, eps]), jnp.stack([eps, 1.0])])
    ones = jnp.ones(2, X.dtype)
    D = R + F
    c = {
        "pretrain": jnp.stack([r_ij / D, alpha * r_ij / D]),
        "retrain": jnp.stack([r_ij / R, 0.0 * alpha]),
        "da": jnp.stack([r_ij / R, -alpha * r_ij / F]),
    }
    w0 = jnp.zeros(2, X.dtype)
    out = {k: newton_minimise(exp_loss, w0, X, ones, c[k], lam) for k in ("pretrain", "retrain")}
    out["da"] = newton_minimise(exp_loss, out["pretrain"].w, X, ones, c["da"], lam)
    return {k: (v.w[0] + eps * v.w[1], eps * v.w[0] + v.w[1], v.diverged) for k, v in out.items()}


def block_direct(eps, alpha, n_retain, n_forget, lam, r_ij=1.0):
    """Newton on Eq. (1) restricted to the ``(i, j)`` block, with multiplicities as weights.

    Because of orthogonality, the full objective is a sum over blocks, and
    the ``(i, j)`` block is ``|R_ij|/N e^{-(w1 + eps w2)} +
    alpha |R_ij|/N' e^{-(eps w1 + w2)} + lam/2 |w|^2``. Here ``N, N'`` are
    ``|D|``, ``|R|`` or ``|F|`` as Eq. (1) prescribes. Writing the
    multiplicities as weights allows non-integer ``alpha`` (same
    objective as ``two_dim_dataset`` whenever ``alpha |R_ij|`` is an
    integer). Broadcasts ``eps`` and ``alpha``. Returns
    ``{problem: (x, y, diverged)}`` NumPy arrays (DA started from w^D).
    """
    with jax.enable_x64(True):
        args = [jnp.asarray(v, jnp.float64) for v in (eps, alpha, n_retain, n_forget, lam, r_ij)]
        args = jnp.broadcast_arrays(*args)
        shape = args[0].shape
        flat = [a.reshape(-1) for a in args]
        res = jax.vmap(_block_newton)(*flat)
        return {k: tuple(np.asarray(a).reshape(shape) for a in v) for k, v in res.items()}


def ordering_region(eps, alpha, n_retain, n_forget, lam):
    """Where both orderings actually hold (direct minimisation, ``block_direct``).

    Returns a boolean array: ``x^R >= x^D >= x^DA`` and ``y^R >= y^D >= y^DA``
    (a divergent DA run counts as ``-inf``).
    """
    r = block_direct(eps, alpha, n_retain, n_forget, lam)
    (xd, yd, _), (xr, yr, _), (xa, ya, div) = r["pretrain"], r["retrain"], r["da"]
    xa, ya = np.where(div, -np.inf, xa), np.where(div, -np.inf, ya)
    return (xr >= xd) & (xd >= xa) & (yr >= yd) & (yd >= ya)


def true_crossings(eps, lam_d, forget_fraction, n_bisect=40):
    """The alphas at which each ordering really flips, by bisection on ``block_direct``.

    Sizes are in units of ``|R_ij|`` with ``|D| = 100`` (only ``lam |D|/|R_ij|``
    = ``lam_d`` and ``|F|/|D|`` matter). ``x^D, y^D`` grow with alpha and
    ``x^DA, y^DA`` fall, so each ordering flips once: ``R >= D`` holds below
    ``x_r_gt_d`` (``y_r_gt_d``), ``D >= DA`` above ``x_d_gt_da``
    (``y_d_gt_da``); a diverging DA run counts as ``-inf``. The bracket grows by
    doubling from alpha = 1. Returns a dict of arrays shaped like
    ``broadcast(eps, lam_d)``.
    """
    eps, lam_d = np.broadcast_arrays(np.asarray(eps, float), np.asarray(lam_d, float))
    n_f = 100.0 * forget_fraction
    below = np.array([True, True, False, False]).reshape((4,) + (1,) * eps.ndim)  # R>D parts hold below the crossing

    def holds(alpha):
        r = block_direct(eps[None], alpha, 100.0 - n_f, n_f, lam_d[None] / 100.0)
        (xd, yd, _), (xr, yr, _), (xa, ya, dv) = r["pretrain"], r["retrain"], r["da"]
        xa, ya = np.where(dv, -np.inf, xa), np.where(dv, -np.inf, ya)
        return np.stack([xr[0] >= xd[0], yr[1] >= yd[1], xd[2] >= xa[2], yd[3] >= ya[3]])

    lo, hi = np.zeros((4,) + eps.shape), np.ones((4,) + eps.shape)
    for _ in range(60):
        past = holds(hi) != below
        if past.all():
            break
        lo, hi = np.where(past, lo, hi), np.where(past, hi, 2.0 * hi)
    else:
        raise ValueError("an ordering did not flip below alpha = 2**60")
    for _ in range(n_bisect):
        mid = 0.5 * (lo + hi)
        right = holds(mid) == below
        lo, hi = np.where(right, mid, lo), np.where(right, hi, mid)
    keys = ("x_r_gt_d", "y_r_gt_d", "x_d_gt_da", "y_d_gt_da")
    return dict(zip(keys, 0.5 * (lo + hi)))


def threshold_tightness(eps, lam_d, forget_fraction, n_bisect=40):
    """Each threshold of Lemmas 3-4 against the true crossing (``true_crossings``).

    Returns ``{part: (threshold, crossing, gap)}`` for ``eq5`` (x part of
    Lemma 4), ``eq6`` (y part), ``lemma4`` (their min), ``lemma3_x``,
    ``lemma3_y`` and ``lemma3`` (their max). ``gap`` is the relative distance
    to the crossing, signed so that a sufficient threshold has ``gap >= 0``:
    ``(crossing - threshold)/crossing`` for Lemma 4 and
    ``(threshold - crossing)/crossing`` for Lemma 3. A negative gap would be
    a counterexample.
    """
    c = true_crossings(eps, lam_d, forget_fraction, n_bisect)
    n_f = 100.0 * forget_fraction
    b = alpha_bounds_2d(eps, 100.0 - n_f, 100.0, n_f, np.asarray(lam_d, float) / 100.0)
    shape = c["x_r_gt_d"].shape
    b = AlphaBounds2D(*(np.broadcast_to(v, shape) for v in b))
    parts = {
        "eq5": (b.r_gt_d_x, c["x_r_gt_d"], 1),
        "eq6": (b.r_gt_d_y, c["y_r_gt_d"], 1),
        "lemma4": (b.r_gt_d, np.minimum(c["x_r_gt_d"], c["y_r_gt_d"]), 1),
        "lemma3_x": (b.d_gt_da_x, c["x_d_gt_da"], -1),
        "lemma3_y": (b.d_gt_da_y, c["y_d_gt_da"], -1),
        "lemma3": (b.d_gt_da, np.maximum(c["x_d_gt_da"], c["y_d_gt_da"]), -1),
    }
    return {k: (t, x, sign * (x - t) / x) for k, (t, x, sign) in parts.items()}


def app_l_eq13(eps, r_lam):
    """App. L [J] Eq. (13), the eps -> 1 DA weights ``(w1, w2)``, with ``r_lam = |R| lam``.

    ``W = W0(-8 (1-eps)^2 / r_lam^2)`` lies in ``[-1, 0]`` whenever it is
    real, so the printed ``i sqrt(2) sqrt(W)`` equals the real
    ``-sqrt(-2 W)``: ``w1 = (W + sqrt(-2W))/4``, ``w2 = (W - sqrt(-2W))/4``.
    The weights are complex (NaN here) only for
    ``8 (1-eps)^2 / r_lam^2 > 1/e``, where W0 leaves the real line.
    """
    with jax.enable_x64(True):
        eps, r_lam = (jnp.asarray(v, jnp.float64) for v in (eps, r_lam))
        w = lambertw(-8.0 * (1.0 - eps) ** 2 / r_lam**2)
        root = jnp.sqrt(-2.0 * w)
        return np.asarray((w + root) / 4.0), np.asarray((w - root) / 4.0)


def plot_fig3(path, n_total=100.0, lam=1.0, forget_fractions=(0.05, 0.1, 0.2, 0.3), n_eps=300, n_region=(99, 101)):
    """Fig. 3 [NeurIPS Fig. 4]: ``alpha^{D>DA}`` (dashed) and ``alpha^{R>D}`` (solid) vs eps.

    Sizes are in units of ``|R_ij|`` (as in Eqs. (5)-(6)); only
    ``lam |D| / |R_ij|`` and ``|F|/|D|`` matter.

    * Left: the paper's thresholds for several forget fractions; the shading
      is the window in which DA is provably detrimental.
    * Right: for the largest fraction, the region where both orderings
      really hold (direct minimisation, grey) with the thresholds drawn on
      top. The thresholds are sufficient conditions, and the true region
      is much larger. ``n_region`` is the (eps, alpha) grid used for it.
    """
    from matplotlib.figure import Figure

    eps = np.linspace(0.01, 0.99, n_eps)
    fig = Figure(figsize=(9.5, 3.6), dpi=90)
    axes = fig.subplots(1, 2)
    ax = axes[0]
    for k, frac in enumerate(forget_fractions):
        n_f = frac * n_total
        b = alpha_bounds_2d(eps, n_total - n_f, n_total, n_f, lam)
        color = f"C{k}"
        ax.plot(eps, b.d_gt_da, "--", color=color)
        ax.plot(eps, b.r_gt_d, "-", color=color, label=f"|F|/|D| = {frac:g}")
        ax.fill_between(eps, b.d_gt_da, b.r_gt_d, where=b.r_gt_d >= b.d_gt_da, color=color, alpha=0.15)
    ax.set_title(rf"thresholds ($|D|={n_total:g}|R_{{ij}}|$, $\lambda={lam:g}$)", fontsize=9)
    ax.legend(fontsize=7, title=r"-- $\alpha^{D>DA}$,  — $\alpha^{R>D}$", title_fontsize=7)
    ax = axes[1]
    frac = forget_fractions[-1]
    n_f = frac * n_total
    e_grid = np.linspace(0.01, 0.99, n_region[0])
    a_grid = np.linspace(0.0, 1.0, n_region[1])
    region = ordering_region(e_grid[:, None], a_grid[None, :], n_total - n_f, n_f, lam)
    ax.contourf(e_grid, a_grid, region.T.astype(float), levels=[0.5, 1.5], colors=["0.8"])
    b = alpha_bounds_2d(eps, n_total - n_f, n_total, n_f, lam)
    ax.plot(eps, b.d_gt_da, "k--", label=r"$\alpha^{D>DA}$ (Lemma 3)")
    ax.plot(eps, b.r_gt_d, "k-", label=r"$\alpha^{R>D}$ (Lemma 4)")
    ax.fill_between(
        eps, b.d_gt_da, b.r_gt_d, where=b.r_gt_d >= b.d_gt_da, facecolor="none", edgecolor="C3", hatch="///", lw=0
    )
    ax.set_title(f"|F|/|D| = {frac:g}: grey = orderings hold (direct), hatched = Lemmas 3-4", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    for ax in axes:
        ax.set_xlabel(r"correlation $\epsilon$")
        ax.set_ylabel(r"$\alpha = |F_{ij}|/|R_{ij}|$")
        ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path)
    return fig
