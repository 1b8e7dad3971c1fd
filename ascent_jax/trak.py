"""TRAK data attribution (Park et al. 2023) in pure JAX: the datamodel matrix without retraining.

"Attribute-to-Delete" App. G.2 swaps the regression datamodels of :mod:`ascent_jax.datamodels`
for TRAK. For one trained model ``theta`` (one member of an ensemble):

1. Model output ``f(z; theta)`` = the margin ``z_y - logsumexp_{j != y} z_j`` of
   :func:`ascent_jax.klom.margins`, which equals TRAK's ``log(p / (1 - p))`` with ``p`` the
   softmax probability of the correct class; its "out-to-loss" weight is ``Q = 1 - p = sigmoid(-f)``.
2. Per-example gradients ``g(z) = d f(z; theta) / d theta`` (``jax.vmap(jax.grad(...))`` over
   examples, eval mode, ``chunk`` examples at a time), flattened over every parameter leaf.
3. Random JL projection ``phi(z) = G^T g(z)`` with ``G`` of shape ``(P, k)``, entries i.i.d.
   ``N(0, 1) / sqrt(k)`` (``projection="gaussian"``) or ``+-1 / sqrt(k)`` (``"rademacher"``), so
   ``E <phi(a), phi(b)> = <g(a), g(b)>``. ``G`` is never held whole: its rows come in blocks of
   ``block`` parameters, block ``j`` drawn from ``jax.random.fold_in(key, j)`` and consumed at once by a
   ``lax.scan`` (peak memory ``block * k`` floats, plus the ``chunk x P`` gradients). A projection is thus
   a pure function of ``(key, P, k, block, projection)``, independent of how examples are chunked;
   :func:`projection_matrix` materialises it for small ``P``. ``proj_dim=None`` skips it (exact gradients).
4. Kernel ``K = Phi_train^T Phi_train + ridge * I`` (``k x k``, float64) and member scores
   ``A = Phi_target K^{-1} Phi_train^T`` (``m x n``).
5. Over ``M`` members (stacked variables with a leading member axis, as the ensemble engine makes
   them; every member uses the same projection, as the reference implementation does):
   ``average="paper"`` gives TRAK's estimator ``tau = mean_m(A_m) * mean_m(Q_m)[None, :]`` (Q and the
   kernel term averaged separately); ``average="scores"`` gives ``mean_m(A_m * Q_m[None, :])``.
   TRAK's soft-thresholding sparsification step is not applied.

``scores[t, i]`` has the orientation and sign of :attr:`ascent_jax.datamodels.Datamodels.matrix`: the
estimated effect of *including* train point ``i`` on the margin of target ``t`` -- for logistic regression
with ``hessian_weights=True`` (``K = Phi^T R Phi``, ``R = diag(p (1 - p))``, the Hessian of the loss) it is
exactly the one-step Newton estimate of ``f_t(theta) - f_t(theta_{-i})``. TRAK's scores estimate that
effect only up to an overall scale (they drop ``R``, the leave-one-out leverage correction and the
training dynamics), so compare them to regression datamodels by correlation / ranking, not by value.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ascent_jax import batches, klom, train
from ascent_jax.models import Model

PROJECTIONS = ("gaussian", "rademacher")
AVERAGES = ("paper", "scores")
DEFAULT_BLOCK = 4096


def _draw(key: jax.Array, shape: tuple[int, int], projection: str) -> jax.Array:
    if projection == "gaussian":
        return jax.random.normal(key, shape, jnp.float32) / math.sqrt(shape[1])
    return jax.random.rademacher(key, shape, jnp.float32) / math.sqrt(shape[1])


@functools.partial(jax.jit, static_argnames=("proj_dim", "projection", "block"))
def project(vectors: jax.Array, key: jax.Array, proj_dim: int, *, projection: str = "gaussian",
            block: int = DEFAULT_BLOCK) -> jax.Array:
    """``vectors (c, P) @ G`` with the JL matrix ``G (P, proj_dim)`` of ``key`` (module docstring, step 3).

    Rows ``[j * block, (j + 1) * block)`` of ``G`` are drawn from ``fold_in(key, j)`` inside a scan, so
    only one ``(block, proj_dim)`` slab exists at a time. Jit-able (``proj_dim``, ``projection``,
    ``block`` static; jitted).
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if proj_dim < 1 or block < 1:
        raise ValueError(f"proj_dim and block must be positive, got {proj_dim} and {block}")
    vectors = jnp.asarray(vectors, jnp.float32)
    count, size = vectors.shape
    num_blocks = -(-size // block)
    padded = jnp.pad(vectors, ((0, 0), (0, num_blocks * block - size)))
    slabs = padded.reshape(count, num_blocks, block).transpose(1, 0, 2)

    def body(acc, inputs):
        index, slab = inputs
        return acc + slab @ _draw(jax.random.fold_in(key, index), (block, proj_dim), projection), None

    init = jnp.zeros((count, proj_dim), jnp.float32)
    return jax.lax.scan(body, init, (jnp.arange(num_blocks), slabs))[0]


def projection_matrix(key: jax.Array, size: int, proj_dim: int, *, projection: str = "gaussian",
                      block: int = DEFAULT_BLOCK) -> np.ndarray:
    """The whole ``(size, proj_dim)`` matrix ``G`` that :func:`project` applies (for small ``size``)."""
    return np.asarray(project(jnp.eye(size, dtype=jnp.float32), key, proj_dim, projection=projection, block=block))


@functools.partial(jax.jit, static_argnames=("model", "proj_dim", "projection", "block"))
def _chunk_features(model: Model, variables, images, labels, mean, std, key, *, proj_dim, projection, block):
    flat, unravel = ravel_pytree(variables["params"])
    x = batches.normalize(images, mean, std)

    def output(flat_params, xi, yi):
        logits, _ = model.apply({**variables, "params": unravel(flat_params)}, xi[None], False)
        return klom.margins(logits, yi[None])[0]

    grads = jax.vmap(jax.grad(output), in_axes=(None, 0, 0))(flat, x, labels)
    outputs = jax.vmap(output, in_axes=(None, 0, 0))(flat, x, labels)
    if proj_dim is not None:
        grads = project(grads, key, proj_dim, projection=projection, block=block)
    return grads, outputs


def trak_features(model: Model, variables: dict, images: np.ndarray, labels: np.ndarray, norm: train.Normalization,
                  *, proj_dim: int | None, key: jax.Array, chunk: int = 256, projection: str = "gaussian",
                  block: int = DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Projected output gradients ``(n, proj_dim)`` (``(n, P)`` for ``proj_dim=None``) and margins ``(n,)``
    of ONE model (unstacked ``variables``) on uint8 NHWC ``images``, ``chunk`` examples at a time
    (the last chunk is padded, so one compiled program serves every chunk)."""
    images = np.asarray(images)
    labels = np.asarray(labels, np.int32)
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need as many labels as images (and at least one), got {len(images)} and {len(labels)}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    chunk = min(chunk, len(images))
    mean, std = jnp.asarray(norm.mean, jnp.float32), jnp.asarray(norm.std, jnp.float32)
    features, outputs = [], []
    for lo in range(0, len(images), chunk):
        idx = np.arange(lo, lo + chunk) % len(images)  # wrap-around padding of the last chunk
        f, o = _chunk_features(model, variables, jnp.asarray(images[idx]), jnp.asarray(labels[idx]), mean, std, key,
                               proj_dim=proj_dim, projection=projection, block=block)
        keep = min(chunk, len(images) - lo)
        features.append(np.asarray(f)[:keep])
        outputs.append(np.asarray(o)[:keep])
    return np.concatenate(features), np.concatenate(outputs)


def members(model: Model, variables: dict, input_shape: tuple[int, ...]) -> list[dict]:
    """``variables`` as a list of per-member variables: one entry for a single model, ``K`` for
    variables stacked with a leading member axis of size ``K`` (told apart by ``model.init``'s shapes)."""
    single = jax.eval_shape(lambda k: model.init(k, tuple(input_shape)), jax.random.key(0))
    want = jax.tree_util.tree_leaves(single["params"])
    have = jax.tree_util.tree_leaves(variables["params"])
    if len(want) != len(have):
        raise ValueError(f"variables have {len(have)} parameter leaves, model {model.name} has {len(want)}")
    if all(tuple(h.shape) == tuple(w.shape) for h, w in zip(have, want)):
        return [variables]
    if all(tuple(h.shape[1:]) == tuple(w.shape) for h, w in zip(have, want)) and len({h.shape[0] for h in have}) == 1:
        return [jax.tree_util.tree_map(lambda leaf, m=m: leaf[m], variables) for m in range(have[0].shape[0])]
    raise ValueError(f"variables match neither one {model.name} nor a stack of them with a leading member axis")


def kernel_scores(train_features: np.ndarray, train_outputs: np.ndarray, target_features: np.ndarray, *,
                  ridge: float = 0.0, hessian_weights: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One member's ``(A, Q)``: ``A = Phi_target (Phi^T W Phi + ridge I)^{-1} Phi_train^T`` ``(m, n)``
    (float64; ``W = I``, or ``diag(p (1 - p))`` with ``hessian_weights``) and ``Q = 1 - p = sigmoid(-margin)`` ``(n,)``."""
    phi = np.asarray(train_features, np.float64)
    target = np.asarray(target_features, np.float64)
    outputs = np.asarray(train_outputs, np.float64)
    p = 1.0 / (1.0 + np.exp(-outputs))
    q = 1.0 / (1.0 + np.exp(outputs))
    weighted = phi * (p * q)[:, None] if hessian_weights else phi
    kernel = phi.T @ weighted + ridge * np.eye(phi.shape[1])
    try:
        solved = np.linalg.solve(kernel, target.T)  # (k, m)
    except np.linalg.LinAlgError as error:
        raise ValueError(f"TRAK kernel ({phi.shape[1]} x {phi.shape[1]} from {phi.shape[0]} training points) is "
                         "singular; use proj_dim <= n or a positive ridge") from error
    return solved.T @ phi.T, q


def trak_scores(model: Model, variables: dict, images: np.ndarray, labels: np.ndarray, norm: train.Normalization,
                target_images: np.ndarray, target_labels: np.ndarray, *, proj_dim: int | None = 2048,
                key: jax.Array | None = None, ridge: float = 0.0, chunk: int = 256, projection: str = "gaussian",
                average: str = "paper", hessian_weights: bool = False, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """TRAK scores ``(m, n)`` (float32) of train points ``images`` on ``target_images``; ``scores[t, i]``
    oriented like ``Datamodels.matrix`` (module docstring). ``variables``: one model, or a stack of
    members (leading axis) averaged as ``average`` says. ``key`` (default ``jax.random.key(0)``) fixes
    the projection; ``ridge`` is added to the kernel's diagonal; ``proj_dim=None`` uses exact gradients."""
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    key = jax.random.key(0) if key is None else key
    kwargs = dict(proj_dim=proj_dim, key=key, chunk=chunk, projection=projection, block=block)
    a_sum, q_sum, aq_sum = 0.0, 0.0, 0.0
    member_list = members(model, variables, np.shape(images)[1:])
    for member in member_list:
        phi, outputs = trak_features(model, member, images, labels, norm, **kwargs)
        phi_target, _ = trak_features(model, member, target_images, target_labels, norm, **kwargs)
        a, q = kernel_scores(phi, outputs, phi_target, ridge=ridge, hessian_weights=hessian_weights)
        a_sum, q_sum, aq_sum = a_sum + a, q_sum + q, aq_sum + a * q[None, :]
    count = len(member_list)
    scores = (a_sum / count) * (q_sum / count)[None, :] if average == "paper" else aq_sum / count
    return np.asarray(scores, np.float32)
