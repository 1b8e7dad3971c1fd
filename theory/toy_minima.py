"""The toy example with bad minima (workshop App. B / Fig. 4; NeurIPS Sec. 5.2 / Fig. 5).

Model ``h(x) = sigma(a x + b x^2)`` with parameters ``theta = (a, b)``, data
``x = (-1, 1, 3, 4)``, labels ``(-1, 1, -1, 1)``, cluster weights
``alpha = (5, 4, 1, 4)`` and a weighted MSE plus ridge ``lam/2 |theta|^2``
with ``lam = 0.1``. Forgetting two of the four points at ``x = 4`` gives:

* retraining: ``alpha_4 = 2``;
* GDA: descent on R and ascent on F (the paper says this "amounts to
  ``alpha_4 = 0``").

The paper's claim (``claims`` below):

* C1: the pretrain loss has a global minimum of type A (``x3`` misclassified)
  and a local minimum of type B (``x4`` misclassified);
* C2: the retrain loss keeps its global minimum of type A;
* C3: GDA started at the pretrained model ends in a type-B minimum;
* C4: fine-tuning on the retain set from there stays in type B (a local
  minimum of the retrain loss: "inescapable").

The text leaves the loss underspecified, so ``ToyReading`` makes every
choice explicit:

* ``sigma``: "paper" ``1/(1 + e^{-(1+z)/2})`` as printed, or "standard";
* labels "pm1" or "01";
* output ``sigma`` or ``2 sigma - 1``;
* normalisation: 1/(number of points) "points", 1/(sum of weights)
  "count", or none "sum";
* GDA form: "zero" (``alpha_4 = 0``) or "eq1", i.e.
  ``(1/|R|) sum_R - (1/|F|) sum_F`` as in Eq. (1);
* ``lam``.

``PAPER_READING`` is the literal one. Minima are found by brute force (loss
on a fine ``(a, b)`` grid, the grid's discrete local minima, then Newton
refinement, keeping points with zero gradient and a positive-definite
Hessian). Paths are found by gradient descent with a capped step (a
discretised gradient flow). A point is classified '+' when the argument of
``sigma`` is positive, i.e. ``sigma > 1/2`` (output above the label
midpoint).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ToyReading",
    "PAPER_READING",
    "toy_loss",
    "find_minima",
    "descend",
    "decision_pattern",
    "claims",
    "search_readings",
    "plot_landscapes",
]

X_POINTS = np.array([-1.0, 1.0, 3.0, 4.0])
Y_PM1 = np.array([-1.0, 1.0, -1.0, 1.0])
ALPHA_D = np.array([5.0, 4.0, 1.0, 4.0])
ALPHA_R = np.array([5.0, 4.0, 1.0, 2.0])  # two of the four x4 points forgotten
N_FORGET_AT_X4 = 2.0
TYPE_A = "-+++"  # x3 misclassified: the paper's pretrain/retrain optimum
TYPE_B = "-+--"  # x4 misclassified: the paper's GDA optimum
DEFAULT_BOX = ((-12.0, 12.0), (-6.0, 6.0))


@dataclass(frozen=True)
class ToyReading:
    """One interpretation of App. B's loss (see module docstring)."""

    sigma: str = "paper"  # "paper" | "standard"
    labels: str = "pm1"  # "pm1" | "01"
    output: str = "sigma"  # "sigma" | "2sigma-1"
    norm: str = "points"  # "points" | "count" | "sum"
    gda: str = "zero"  # "zero" | "eq1"
    lam: float = 0.1

    def __post_init__(self):
        options = {
            "sigma": ("paper", "standard"),
            "labels": ("pm1", "01"),
            "output": ("sigma", "2sigma-1"),
            "norm": ("points", "count", "sum"),
            "gda": ("zero", "eq1"),
        }
        for field, allowed in options.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if not self.lam > 0:
            raise ValueError("lam must be > 0")

    def label(self) -> str:
        return f"sigma={self.sigma}, y={self.labels}, h={self.output}, norm={self.norm}, gda={self.gda}, lam={self.lam:g}"


PAPER_READING = ToyReading()


def _params(reading: ToyReading, problem: str):
    """Numeric parameters ``(c, y, s0, s1, m, k)`` with ``h = m sigma(s0 + s1 z) + k``."""
    s0, s1 = (0.5, 0.5) if reading.sigma == "paper" else (0.0, 1.0)
    m, k = (1.0, 0.0) if reading.output == "sigma" else (2.0, -1.0)
    y = Y_PM1 if reading.labels == "pm1" else (Y_PM1 + 1.0) / 2.0

    def norm(weights, n_points):
        return {"points": float(n_points), "count": float(np.sum(weights)), "sum": 1.0}[reading.norm]

    if problem == "pretrain":
        c = ALPHA_D / norm(ALPHA_D, 4)
    elif problem == "retrain":
        c = ALPHA_R / norm(ALPHA_R, 4)
    elif problem == "gda":
        if reading.gda == "zero":
            a0 = ALPHA_R - np.array([0.0, 0.0, 0.0, N_FORGET_AT_X4])
            c = a0 / norm(ALPHA_R, 4)
        else:
            forget = np.array([0.0, 0.0, 0.0, N_FORGET_AT_X4])
            c = ALPHA_R / norm(ALPHA_R, 4) - forget / norm(forget, 1)
    else:
        raise ValueError(f"problem must be 'pretrain', 'retrain' or 'gda', got {problem!r}")
    return np.asarray(c), y, s0, s1, m, k


def _loss(theta, c, y, s0, s1, m, k, lam):
    z = theta[0] * X_POINTS + theta[1] * X_POINTS**2
    h = m * jax.nn.sigmoid(s0 + s1 * z) + k
    return jnp.sum(c * (h - y) ** 2) + 0.5 * lam * jnp.sum(theta**2)


def toy_loss(theta, reading: ToyReading = PAPER_READING, problem: str = "pretrain"):
    """Value of the App. B objective for ``problem`` at ``theta = (a, b)`` (float64)."""
    with jax.enable_x64(True):
        args = _params(reading, problem)
        return float(_loss(jnp.asarray(theta, jnp.float64), *args, reading.lam))


@jax.jit
def _grid_loss(A, B, c, y, s0, s1, m, k, lam):
    f = lambda a, b: _loss(jnp.stack([a, b]), c, y, s0, s1, m, k, lam)
    return jax.vmap(jax.vmap(f, in_axes=(None, 0)), in_axes=(0, None))(A, B)


_grad = jax.jit(jax.grad(_loss))
_hess = jax.jit(jax.hessian(_loss))


@jax.jit
def _newton_polish(theta, c, y, s0, s1, m, k, lam):
    def body(_, th):
        H = _hess(th, c, y, s0, s1, m, k, lam)
        g = _grad(th, c, y, s0, s1, m, k, lam)
        ev = jnp.linalg.eigvalsh(H)
        shift = jnp.where(ev[0] > 1e-10, 0.0, -ev[0] + 1e-3)
        step = jnp.linalg.solve(H + shift * jnp.eye(2), g)
        # cap the step so a start cannot jump into another basin
        step = step * jnp.minimum(1.0, 0.05 / (jnp.linalg.norm(step) + 1e-300))
        return th - step

    return jax.lax.fori_loop(0, 400, body, theta)


def _args(reading, problem):
    c, y, s0, s1, m, k = _params(reading, problem)
    return (jnp.asarray(c), jnp.asarray(y), s0, s1, m, k, reading.lam)


def find_minima(reading: ToyReading, problem: str, box=DEFAULT_BOX, n=(481, 241)):
    """All local minima of one objective in ``box`` by grid search plus Newton.

    Returns a list of ``(theta, loss)`` sorted by loss (the first is the
    global minimum in the box). A candidate is kept when the gradient is
    below 1e-9 and the Hessian is positive definite. Duplicates within
    1e-6 are merged.
    """
    with jax.enable_x64(True):
        args = _args(reading, problem)
        A = jnp.linspace(box[0][0], box[0][1], n[0])
        B = jnp.linspace(box[1][0], box[1][1], n[1])
        Z = np.asarray(_grid_loss(A, B, *args))
        Zp = np.pad(Z, 1, constant_values=np.inf)
        is_min = np.ones_like(Z, bool)
        for di, dj in itertools.product((-1, 0, 1), repeat=2):
            if (di, dj) != (0, 0):
                is_min &= Z <= Zp[1 + di : 1 + di + Z.shape[0], 1 + dj : 1 + dj + Z.shape[1]]
        is_min[[0, -1], :] = False
        is_min[:, [0, -1]] = False
        found = []
        for i, j in np.argwhere(is_min):
            th = _newton_polish(jnp.array([A[i], B[j]]), *args)
            g = np.asarray(_grad(th, *args))
            ev = np.linalg.eigvalsh(np.asarray(_hess(th, *args)))
            th = np.asarray(th)
            if np.max(np.abs(g)) < 1e-9 and ev[0] > 0 and not any(np.allclose(th, t, atol=1e-6) for t, _ in found):
                found.append((th, float(_loss(jnp.asarray(th), *args))))
        return sorted(found, key=lambda r: r[1])


@jax.jit
def _descend(theta, c, y, s0, s1, m, k, lam):
    """Gradient descent, step ``min(0.5/curvature, 0.01/|g|)``: a stable discretised gradient flow."""

    def cond(state):
        th, it = state
        return (jnp.max(jnp.abs(_grad(th, c, y, s0, s1, m, k, lam))) > 1e-7) & (it < 200_000)

    def body(state):
        th, it = state
        g = _grad(th, c, y, s0, s1, m, k, lam)
        curv = jnp.max(jnp.abs(jnp.linalg.eigvalsh(_hess(th, c, y, s0, s1, m, k, lam))))
        lr = jnp.minimum(0.5 / curv, 0.01 / (jnp.linalg.norm(g) + 1e-300))
        return th - lr * g, it + 1

    th, it = jax.lax.while_loop(cond, body, (theta, jnp.asarray(0)))
    return th, it


def descend(reading: ToyReading, problem: str, theta0):
    """Where gradient descent on ``problem`` from ``theta0`` ends (then Newton-polished)."""
    with jax.enable_x64(True):
        args = _args(reading, problem)
        th, _ = _descend(jnp.asarray(theta0, jnp.float64), *args)
        return np.asarray(_newton_polish(th, *args))


def decision_pattern(theta, reading: ToyReading = PAPER_READING) -> str:
    """'+'/'-' per data point: is the argument of sigma positive (sigma > 1/2)?"""
    s0, s1 = (0.5, 0.5) if reading.sigma == "paper" else (0.0, 1.0)
    z = theta[0] * X_POINTS + theta[1] * X_POINTS**2
    return "".join("+" if s0 + s1 * v > 0 else "-" for v in z)


def claims(reading: ToyReading = PAPER_READING, box=DEFAULT_BOX, n=(481, 241)) -> dict:
    """Test C1-C4 (module docstring) for one reading.

    Returns the minima of the three objectives, these points:

    * ``theta_pre``: the pretrain global minimum;
    * ``theta_gda``: GDA descent from ``theta_pre``;
    * ``theta_ft``: fine-tuning on R from ``theta_gda``;
    * ``theta_retrain``: the retrain global minimum;
    * ``theta_scratch``: gradient descent on R from ``theta = 0``;

    the booleans ``c1``-``c4`` and ``reproduced`` (all four hold). There is
    also ``c2_path``, a weaker, path-dependent C2: retraining from scratch
    (from 0) lands in type A, even if type A is not the retrain loss's
    global minimum.
    """
    mins = {p: find_minima(reading, p, box, n) for p in ("pretrain", "retrain", "gda")}
    pat = lambda th: decision_pattern(th, reading)
    pre = mins["pretrain"]
    theta_pre = pre[0][0]
    theta_gda = descend(reading, "gda", theta_pre)
    theta_ft = descend(reading, "retrain", theta_gda)
    theta_retrain = mins["retrain"][0][0]
    theta_scratch = descend(reading, "retrain", np.zeros(2))
    c1 = pat(theta_pre) == TYPE_A and any(pat(t) == TYPE_B for t, _ in pre[1:])
    c2 = pat(theta_retrain) == TYPE_A
    c3 = pat(theta_gda) == TYPE_B
    c4 = c3 and pat(theta_ft) == TYPE_B
    return {
        "reading": reading,
        "minima": mins,
        "theta_pre": theta_pre,
        "theta_gda": theta_gda,
        "theta_ft": theta_ft,
        "theta_retrain": theta_retrain,
        "theta_scratch": theta_scratch,
        "patterns": {
            k: pat(v)
            for k, v in (("pre", theta_pre), ("gda", theta_gda), ("ft", theta_ft), ("retrain", theta_retrain), ("scratch", theta_scratch))
        },
        "c1": c1,
        "c2": c2,
        "c2_path": pat(theta_scratch) == TYPE_A,
        "c3": c3,
        "c4": c4,
        "reproduced": c1 and c2 and c3 and c4,
    }


def search_readings(lams=(0.1,), n=(241, 121)):
    """``claims`` for every combination of the interpretation choices, for each ``lam``."""
    rows = []
    for sigma, (labels, output), norm, gda, lam in itertools.product(
        ("paper", "standard"), (("pm1", "sigma"), ("01", "sigma"), ("pm1", "2sigma-1")), ("points", "count", "sum"), ("zero", "eq1"), lams
    ):
        r = ToyReading(sigma, labels, output, norm, gda, lam)
        rows.append(claims(r, n=n))
    return rows


def plot_landscapes(result: dict, path):
    """Filled contours of the pretrain, retrain and GDA losses with minima and paths (Fig. 4/5).

    Marks: x = global minimum, o = local minimum, each labelled with its
    decision pattern. Red arrows (with a dot at the start and a square at
    the end) show pretrain -> GDA (GDA panel) and GDA -> fine-tune on R
    (retrain panel), with the distance moved, because a short path would
    otherwise be invisible. The verdict and C1-C4 head the figure.
    """
    from matplotlib.figure import Figure

    reading = result["reading"]
    pts = np.array([result["theta_pre"], result["theta_gda"], result["theta_ft"]])
    lo = pts.min(0) - 1.5
    hi = pts.max(0) + 1.5
    A = np.linspace(lo[0], hi[0], 201)
    B = np.linspace(lo[1], hi[1], 201)
    fig = Figure(figsize=(14, 4.8), dpi=80)
    axes = fig.subplots(1, 3)
    paths = {"gda": (pts[0], pts[1], "pretrain min -> GDA end"), "retrain": (pts[1], pts[2], "GDA end -> fine-tune end")}
    with jax.enable_x64(True):
        for ax, problem in zip(axes, ("pretrain", "retrain", "gda")):
            Z = np.asarray(_grid_loss(jnp.asarray(A), jnp.asarray(B), *_args(reading, problem))).T
            filled = ax.contourf(A, B, Z, levels=20, cmap="viridis")
            ax.contour(A, B, Z, levels=filled.levels, colors="k", linewidths=0.3)
            fig.colorbar(filled, ax=ax).set_label(f"{problem} loss", fontsize=11)
            for idx, (th, _) in enumerate(result["minima"][problem]):
                if lo[0] <= th[0] <= hi[0] and lo[1] <= th[1] <= hi[1]:
                    ax.plot(*th, "wx" if idx == 0 else "wo", mfc="none", ms=12, mew=2)
                    ax.annotate(decision_pattern(th, reading), th, textcoords="offset points", xytext=(8, 8), fontsize=11,
                                bbox=dict(boxstyle="round", fc="w", alpha=0.8))
            if problem in paths:
                start, end, what = paths[problem]
                ax.plot(*start, "o", color="r", ms=7)
                ax.plot(*end, "s", color="r", ms=7)
                ax.annotate("", end, start, arrowprops=dict(arrowstyle="-|>", color="r", lw=2.5, mutation_scale=20))
                # a callout to the end point, so that a very short path is still found
                ax.annotate(f"{what}:\nmoves {np.linalg.norm(end - start):.3g}", end, xytext=(0.04, 0.06), textcoords="axes fraction",
                            fontsize=10, color="r", bbox=dict(boxstyle="round", fc="w", alpha=0.9),
                            arrowprops=dict(arrowstyle="->", color="r", lw=1.2, ls="--"))
            ax.set_title(f"{problem} loss", fontsize=12)
            ax.set_xlabel("a", fontsize=11)
            ax.tick_params(labelsize=10)
    axes[0].set_ylabel("b", fontsize=11)
    verdict = "REPRODUCED" if result["reproduced"] else "NOT REPRODUCED"
    marks = "  ".join(f"C{i} {'yes' if result[f'c{i}'] else 'NO'}" for i in range(1, 5))
    fig.suptitle(f"App. B toy, {reading.label()}: {verdict} ({marks})", fontsize=13, fontweight="bold")
    fig.text(0.5, 0.005, "x global minimum, o local minimum (label: decision pattern); red: path from dot to square",
             ha="center", va="bottom", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)
    return fig


def with_lam(reading: ToyReading, lam: float) -> ToyReading:
    """Same reading with another ridge (for the lam-sensitivity scan)."""
    return replace(reading, lam=lam)
