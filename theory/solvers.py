"""Independent numerical ground truth: direct minimisation in JAX.

The closed forms (Lambert W) are never used here. Each check finds the
stationary point of the *explicit* objective built from samples and compares
it with the closed form.

``newton_minimise`` is a damped Newton method:

* the Hessian is shifted to be positive definite when it is not;
* an Armijo backtracking line search guards each step;
* the loop stops early when an iterate leaves ``|w| <= bound``.

It runs inside ``lax.while_loop``, so it ``jit``s and ``vmap``s over data.
Leaving the box happens exactly when the objective is unbounded below along
the path (descent-ascent past the branch point, Lemma 2 case 3). The flag
``diverged`` then records what descent-ascent actually does.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["NewtonResult", "newton_minimise", "exp_loss", "sample_weights"]


class NewtonResult(NamedTuple):
    w: jax.Array
    grad_norm: jax.Array  # max-norm of the gradient at ``w``
    n_iter: jax.Array
    diverged: jax.Array  # True if an iterate left the box |w_k| <= bound


def exp_loss(w, X, y, c, lam):
    """Eq. (1) in weighted form: ``sum_i c_i exp(-y_i <w, x_i>) + lam/2 |w|^2``.

    The three objectives of Eq. (1) differ only in ``c``: pretrain
    ``c_i = 1/|D|``; retrain ``c_i = 1/|R|`` on R and 0 on F; descent-ascent
    ``c_i = 1/|R|`` on R and ``-1/|F|`` on F (``sample_weights``).
    """
    return jnp.sum(c * jnp.exp(-y * (X @ w))) + 0.5 * lam * jnp.sum(w * w)


def sample_weights(is_forget, problem: str):
    """Per-sample weights ``c`` of Eq. (1) for 'pretrain', 'retrain' or 'da'."""
    is_forget = jnp.asarray(is_forget, dtype=bool)
    n_f = jnp.sum(is_forget)
    n_r = is_forget.shape[0] - n_f
    if problem == "pretrain":
        return jnp.full(is_forget.shape, 1.0 / is_forget.shape[0])
    if problem == "retrain":
        return jnp.where(is_forget, 0.0, 1.0 / n_r)
    if problem == "da":
        return jnp.where(is_forget, -1.0 / n_f, 1.0 / n_r)
    raise ValueError(f"problem must be 'pretrain', 'retrain' or 'da', got {problem!r}")


def newton_minimise(
    loss: Callable,
    w0,
    *args,
    max_iter: int = 200,
    tol: float = 1e-15,
    bound: float = 40.0,
) -> NewtonResult:
    """Minimise ``loss(w, *args)`` from ``w0`` by damped Newton (traceable).

    Stops when the Newton step falls below ``tol * (1 + |w|)`` (quadratic
    convergence makes this the float64 floor), after ``max_iter`` steps, or
    when ``|w_k| > bound`` for some k (``diverged=True``).
    """
    f = lambda w: loss(w, *args)
    grad = jax.grad(f)
    hess = jax.hessian(f)
    n = w0.shape[0]
    eye = jnp.eye(n, dtype=w0.dtype)

    def direction(w):
        g = grad(w)
        H = hess(w)
        eig_min = jnp.linalg.eigvalsh(H)[0]
        scale = jnp.maximum(1.0, jnp.max(jnp.abs(jnp.diag(H))))
        convex = eig_min > 1e-12 * scale
        shift = jnp.where(convex, 0.0, -eig_min + 1e-3 * scale)
        d = -jnp.linalg.solve(H + shift * eye, g)
        return g, d, convex

    def line_search(w, g, d, f0):
        slope = jnp.dot(g, d)

        def cond(s):
            fs = f(w + s * d)
            ok = fs <= f0 + 1e-4 * s * slope  # False for NaN/inf too
            return (~ok) & (s > 1e-20)

        return jax.lax.while_loop(cond, lambda s: 0.5 * s, jnp.asarray(1.0, w.dtype))

    def body(state):
        w, _, it, _ = state
        g, d, convex = direction(w)
        small = convex & (jnp.max(jnp.abs(d)) < 1e-6 * (1.0 + jnp.max(jnp.abs(w))))
        # Close to a strict minimum the full Newton step is taken: the Armijo
        # test would be decided by rounding of f there.
        s = jnp.where(small, 1.0, line_search(w, g, d, f(w)))
        step = s * d
        w_new = w + step
        done = small & (jnp.max(jnp.abs(step)) <= tol * (1.0 + jnp.max(jnp.abs(w_new))))
        return w_new, done, it + 1, jnp.any(jnp.abs(w_new) > bound)

    def cond(state):
        _, done, it, out = state
        return (~done) & (it < max_iter) & (~out)

    w0 = jnp.asarray(w0)
    init = (w0, jnp.asarray(False), jnp.asarray(0), jnp.asarray(False))
    w, _, it, out = jax.lax.while_loop(cond, body, init)
    return NewtonResult(w, jnp.max(jnp.abs(grad(w))), it, out)
