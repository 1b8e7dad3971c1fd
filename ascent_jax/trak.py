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

**Over random subsets, as a datamodel** (:func:`train_features`, :func:`datamodels_from_features`,
:func:`trak_datamodels`). TRAK's Algorithm 1 (Park et al. 2023) trains member ``m`` on a random
``alpha``-subset ``S_m`` of the ``n`` points and featurises *all* ``n`` points with it, the kernel
``Phi_m^T Phi_m`` summing over all ``n``. Here each member's kernel is built from the rows of its own
training subset only (``kernel="subset"``, the default: ``K_m = Phi_m[S_m]^T Phi_m[S_m] + ridge I``,
the Gauss-Newton matrix of the loss that member was trained on), while every one of the ``n`` points
still gets its features and hence a score: ``A_m = Phi_m[targets] K_m^{-1} Phi_m^T`` over all ``n``
columns, for members that did and did not train on a point alike. ``kernel="all"`` is Algorithm 1's
kernel over all ``n`` rows. Step 5's averages then run over members as above; one projection ``G``
serves every member (drawn once, :func:`projection_matrix`). The result is a
:class:`ascent_jax.datamodels.Datamodels` whose ``predict(masks)`` is ``masks @ matrix.T + bias``
with ``bias[t] = mean_m(margin_m(t) - masks[m] . matrix[t])``, the least-squares intercept (slope
fixed to 1) on the TRAK members' own margins: the predictions are centred on the margins those
models really have, while their spread keeps TRAK's uncalibrated scale (``datamodels.lds``, a rank
correlation per target, ignores both). ``ratio`` (an L1 strength) is NaN.

**Per-class logits** (:func:`trak_logits`). Output functions ``f_c = z_c``, the ``C`` logits.
With cross-entropy training the "out-to-loss" weight becomes a vector,
``q_i = -dL_i/dz = onehot(y_i) - softmax(z_i)``, which mixes the class gradients of train point
``i`` into ``u_i = sum_c q_ic phi_i^c = G^T (-grad_theta L_i)``; the kernel sums every class row,
``K = sum_{i in S} sum_c phi_i^c phi_i^c^T`` (the Gauss-Newton matrix of the linearised
multi-output model with the loss curvature replaced by the identity, as TRAK replaces ``R`` by
``I``). Then ``scores[r, c, i] = phi_{rows[r]}^c K^{-1} u_i``: the one-step Newton estimate of the
effect of including ``i`` on logit ``c``, whose binary-margin case is exactly step 5's
``phi_t K^{-1} phi_i (1 - p_i)`` (``-dL/df = 1 - p`` for ``L = -log sigmoid(f)``). Because ``q``
sits inside the sum over classes it cannot be averaged separately from the kernel term, so members
are averaged as ``average="scores"`` does; ``bias[r, c]`` is fitted like the margins' bias.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ascent_jax import batches, datamodels, ensemble, klom, train
from ascent_jax.models import Model

PROJECTIONS = ("gaussian", "rademacher")
AVERAGES = ("paper", "scores")
KERNELS = ("subset", "all")
OUTPUTS = ("margin", "logits")
DEFAULT_BLOCK = 4096
# G is drawn once and kept when it has at most this many entries (1 GiB of float32); a larger G is
# redrawn block by block for every chunk of examples (memory-bounded, the same matrix).
SHARED_PROJECTION_ENTRIES = 2**28


def _draw(key: jax.Array, shape: tuple[int, int], projection: str) -> jax.Array:
    if projection == "gaussian":
        return jax.random.normal(key, shape, jnp.float32) / math.sqrt(shape[1])
    return jax.random.rademacher(key, shape, jnp.float32) / math.sqrt(shape[1])


def _check_projection(proj_dim: int, projection: str, block: int) -> None:
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if proj_dim < 1 or block < 1:
        raise ValueError(f"proj_dim and block must be positive, got {proj_dim} and {block}")


@functools.partial(jax.jit, static_argnames=("proj_dim", "projection", "block"))
def project(vectors: jax.Array, key: jax.Array, proj_dim: int, *, projection: str = "gaussian",
            block: int = DEFAULT_BLOCK) -> jax.Array:
    """``vectors (c, P) @ G`` with the JL matrix ``G (P, proj_dim)`` of ``key`` (module docstring, step 3).

    Rows ``[j * block, (j + 1) * block)`` of ``G`` are drawn from ``fold_in(key, j)`` inside a scan, so
    only one ``(block, proj_dim)`` slab exists at a time. Jit-able (``proj_dim``, ``projection``,
    ``block`` static; jitted).
    """
    _check_projection(proj_dim, projection, block)
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
                      block: int = DEFAULT_BLOCK) -> jax.Array:
    """The whole ``(size, proj_dim)`` matrix ``G`` that :func:`project` applies, drawn block by block as it is
    there. Held whole, it is drawn once for many members (:func:`trak_features`' ``matrix``): on a CPU,
    drawing ``G`` costs several times more than applying it to a chunk of gradients."""
    _check_projection(proj_dim, projection, block)
    draw = jax.jit(_draw, static_argnums=(1, 2))
    blocks = [draw(jax.random.fold_in(key, j), (block, proj_dim), projection) for j in range(-(-size // block))]
    return jnp.concatenate(blocks)[:size]


def _num_params(model: Model, input_shape: tuple[int, ...]) -> int:
    single = jax.eval_shape(lambda k: model.init(k, tuple(input_shape)), jax.random.key(0))
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(single["params"]))


def _shared_projection(model: Model, input_shape: tuple[int, ...], proj_dim: int | None, key: jax.Array,
                       projection: str, block: int) -> jax.Array | None:
    """``G`` drawn once for all members when it is small enough (:data:`SHARED_PROJECTION_ENTRIES`), else None."""
    if proj_dim is None:
        return None
    size = _num_params(model, input_shape)
    if size * proj_dim > SHARED_PROJECTION_ENTRIES:
        return None
    return projection_matrix(key, size, proj_dim, projection=projection, block=block)


@functools.partial(jax.jit, static_argnames=("model", "output", "proj_dim", "projection", "block"))
def _chunk_features(model: Model, variables, images, labels, mean, std, key, matrix, *, output, proj_dim, projection,
                    block):
    flat, unravel = ravel_pytree(variables["params"])
    x = batches.normalize(images, mean, std)

    def logits(flat_params, xi):
        return model.apply({**variables, "params": unravel(flat_params)}, xi[None], False)[0][0]

    if output == "margin":
        def margin(flat_params, xi, yi):
            return klom.margins(logits(flat_params, xi)[None], yi[None])[0]

        outputs, grads = jax.vmap(jax.value_and_grad(margin), in_axes=(None, 0, 0))(flat, x, labels)
    else:
        jacobian = jax.jacrev(lambda f, xi: (logits(f, xi),) * 2, has_aux=True)  # (C, P) and the logits
        grads, outputs = jax.vmap(jacobian, in_axes=(None, 0))(flat, x)
    rows = grads.reshape(-1, grads.shape[-1])  # (chunk [x classes], P)
    if matrix is not None:
        rows = rows @ matrix
    elif proj_dim is not None:
        rows = project(rows, key, proj_dim, projection=projection, block=block)
    return rows.reshape(*grads.shape[:-1], rows.shape[-1]), outputs


def trak_features(model: Model, variables: dict, images: np.ndarray, labels: np.ndarray, norm: train.Normalization,
                  *, proj_dim: int | None, key: jax.Array, chunk: int = 256, projection: str = "gaussian",
                  block: int = DEFAULT_BLOCK, matrix: jax.Array | None = None,
                  output: str = "margin") -> tuple[np.ndarray, np.ndarray]:
    """Projected output gradients and outputs of ONE model (unstacked ``variables``) on uint8 NHWC ``images``,
    ``chunk`` examples at a time (the last chunk is padded, so one compiled program serves every chunk).

    ``output="margin"``: features ``(n, proj_dim)`` and margins ``(n,)``; ``"logits"``: features of every class
    logit ``(n, C, proj_dim)`` and logits ``(n, C)``. ``proj_dim=None`` gives exact gradients (``P`` columns).
    ``matrix``: the ``(P, proj_dim)`` projection itself (:func:`projection_matrix` of the same arguments),
    applied instead of redrawing it from ``key`` for every chunk.
    """
    images = np.asarray(images)
    labels = np.asarray(labels, np.int32)
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need as many labels as images (and at least one), got {len(images)} and {len(labels)}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if matrix is not None:
        size = sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"]))
        if proj_dim is None or tuple(matrix.shape) != (size, proj_dim):
            raise ValueError(f"the projection matrix must have shape (parameters, proj_dim) = ({size}, {proj_dim}), "
                             f"got {tuple(matrix.shape)}")
        matrix = jnp.asarray(matrix, jnp.float32)
    chunk = min(chunk, len(images))
    mean, std = jnp.asarray(norm.mean, jnp.float32), jnp.asarray(norm.std, jnp.float32)
    features, outputs = [], []
    for lo in range(0, len(images), chunk):
        idx = np.arange(lo, lo + chunk) % len(images)  # wrap-around padding of the last chunk
        f, o = _chunk_features(model, variables, jnp.asarray(images[idx]), jnp.asarray(labels[idx]), mean, std, key,
                               matrix, output=output, proj_dim=proj_dim, projection=projection, block=block)
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


def _solve(kernel_features: np.ndarray, targets: np.ndarray, columns: np.ndarray, *, ridge: float,
           weights: np.ndarray | None = None) -> np.ndarray:
    """``targets (K^-1) columns^T`` with ``K = F^T diag(weights) F + ridge I`` of the kernel rows ``F``, in float64."""
    rows, dim = kernel_features.shape
    if ridge == 0 and dim > rows:
        raise ValueError(f"TRAK kernel ({dim} x {dim} from {rows} training points) is singular; use proj_dim <= "
                         f"{rows} or a positive ridge")
    phi = np.asarray(kernel_features, np.float64)
    weighted = phi if weights is None else phi * weights[:, None]
    kernel = phi.T @ weighted + ridge * np.eye(dim)
    try:
        solved = np.linalg.solve(kernel, np.asarray(columns, np.float64).T)  # (k, columns)
    except np.linalg.LinAlgError as error:
        raise ValueError(f"TRAK kernel ({dim} x {dim} from {rows} training points) is singular; use proj_dim <= "
                         f"{rows} or a positive ridge") from error
    return np.asarray(targets, np.float64) @ solved


def kernel_scores(train_features: np.ndarray, train_outputs: np.ndarray, target_features: np.ndarray, *,
                  ridge: float = 0.0, hessian_weights: bool = False,
                  kernel_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One member's ``(A, Q)``: ``A = Phi_target (Phi_K^T W Phi_K + ridge I)^{-1} Phi_train^T`` ``(m, n)``
    (float64; ``W = I``, or ``diag(p (1 - p))`` with ``hessian_weights``) and ``Q = 1 - p = sigmoid(-margin)`` ``(n,)``.
    ``Phi_K`` = the train rows ``kernel_rows`` (a boolean mask or indices; default all of them)."""
    phi = np.asarray(train_features, np.float64)
    outputs = np.asarray(train_outputs, np.float64)
    picked = slice(None) if kernel_rows is None else np.asarray(kernel_rows)
    p = 1.0 / (1.0 + np.exp(-outputs))
    q = 1.0 / (1.0 + np.exp(outputs))
    weights = (p * q)[picked] if hessian_weights else None
    return _solve(phi[picked], target_features, phi, ridge=ridge, weights=weights), q


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
    shape = np.shape(images)[1:]
    matrix = _shared_projection(model, shape, proj_dim, key, projection, block)
    kwargs = dict(proj_dim=proj_dim, key=key, chunk=chunk, projection=projection, block=block, matrix=matrix)
    a_sum, q_sum, aq_sum = 0.0, 0.0, 0.0
    member_list = members(model, variables, shape)
    for member in member_list:
        phi, outputs = trak_features(model, member, images, labels, norm, **kwargs)
        phi_target, _ = trak_features(model, member, target_images, target_labels, norm, **kwargs)
        a, q = kernel_scores(phi, outputs, phi_target, ridge=ridge, hessian_weights=hessian_weights)
        a_sum, q_sum, aq_sum = a_sum + a, q_sum + q, aq_sum + a * q[None, :]
    count = len(member_list)
    scores = (a_sum / count) * (q_sum / count)[None, :] if average == "paper" else aq_sum / count
    return np.asarray(scores, np.float32)


# --------------------------------------------------------------------------------------------
# TRAK over members trained on random subsets, as datamodels


def train_features(model: Model, config: train.TrainConfig, images: np.ndarray, labels: np.ndarray,
                   norm: train.Normalization, masks: np.ndarray, options: ensemble.RunOptions, *, proj_dim: int,
                   key: jax.Array, out_dir: str | Path, first_member: int = 0, chunk: int = 256,
                   projection: str = "gaussian", block: int = DEFAULT_BLOCK, log=None) -> tuple[np.ndarray, np.ndarray]:
    """Train member ``first_member + j`` on ``images[masks[j]]`` and keep its TRAK features at every image:
    projected margin gradients ``(M, n, proj_dim)`` and margins ``(M, n)``, float32.

    One run of the ensemble engine (:func:`ascent_jax.train.train_ensemble` with ``subsets``; member ``i``
    uses key ``fold_in(key(options.seed), i)``), checkpointed under ``out_dir``; each finished chunk of
    members keeps only its features and margins (the engine's ``finalize``), so a rerun skips it and the
    disk holds one chunk's checkpoints at a time. ``G`` is drawn once (:func:`projection_matrix`, held
    whole whatever its size) and shared by every member; the chunks live in a folder named after the
    projection, which the engine's fingerprint does not cover. ``log`` (e.g. ``print``) reports each chunk.
    """
    images = np.asarray(images)

    @functools.cache
    def matrix():  # drawn when the first chunk needs it: a rerun whose chunks are all done draws nothing
        size = _num_params(model, images.shape[1:])
        return projection_matrix(key, size, proj_dim, projection=projection, block=block)

    def finalize(variables):
        started = time.time()
        member_list = members(model, variables, images.shape[1:])
        if log is not None:
            log(f"TRAK features: {len(member_list)} members x {len(images)} points x {proj_dim} dims ...")
        feats, margins = zip(*(trak_features(model, v, images, labels, norm, proj_dim=proj_dim, key=key, chunk=chunk,
                                             matrix=matrix()) for v in member_list))
        if log is not None:
            seconds = time.time() - started
            log(f"TRAK features: {len(member_list)} members in {seconds:.0f} s "
                f"({seconds / len(member_list):.2f} s each)")
        return {"features": np.stack(feats), "margins": np.stack(margins)}

    tag = ensemble.fingerprint({"proj_dim": proj_dim, "key": np.asarray(jax.random.key_data(key)).tolist(),
                                "projection": projection, "block": block})
    result = train.train_ensemble(model, config, images, labels, norm, options, num_members=len(masks),
                                  first_member=first_member, subsets=batches.subsets_from_masks(masks),
                                  checkpoint_dir=Path(out_dir) / f"features-{tag}", finalize=finalize,
                                  desc="TRAK models")
    return np.asarray(result.states["features"], np.float32), np.asarray(result.states["margins"], np.float32)


def _check_rows(rows, n: int) -> np.ndarray:
    rows = np.arange(n) if rows is None else np.asarray(rows)
    if rows.ndim != 1 or len(rows) == 0 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows must be a non-empty 1-D array of positions among the {n} points, got shape "
                         f"{rows.shape} of {rows.dtype}")
    if rows.min() < 0 or rows.max() >= n:
        raise ValueError(f"rows must lie in [0, {n}), got {rows.min()}..{rows.max()}")
    return rows.astype(np.int64)


def _check_masks(masks: np.ndarray, count: int, n: int) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.dtype != bool or masks.shape != (count, n):
        raise ValueError(f"masks must be boolean (members, points) = ({count}, {n}), got {masks.shape} of "
                         f"{masks.dtype}")
    return masks


def datamodels_from_features(features: np.ndarray, margins: np.ndarray, masks: np.ndarray, *, rows=None,
                             counts=None, ridge: float = 0.0, kernel: str = "subset",
                             average: str = "paper") -> list[datamodels.Datamodels]:
    """TRAK datamodels of the target points ``rows`` (default all ``n``) from members' features, one per
    entry of ``counts`` (default ``(M,)``): the estimator over the first ``count`` members.

    ``features`` ``(M, n, d)`` and ``margins`` ``(M, n)`` of members trained on ``masks`` ``(M, n)``
    (:func:`train_features`); ``kernel`` and ``average`` as in the module docstring, which also defines the
    bias. One pass over the members serves every count, so a sweep of ensemble sizes costs one estimate.
    """
    features = np.asarray(features)
    margins = np.asarray(margins)
    if features.ndim != 3 or margins.shape != features.shape[:2]:
        raise ValueError(f"features must be (members, points, dims) and margins (members, points), got "
                         f"{features.shape} and {margins.shape}")
    total, n = margins.shape
    masks = _check_masks(masks, total, n)
    rows = _check_rows(rows, n)
    counts = sorted({total} if counts is None else set(counts))
    if counts[0] < 1 or counts[-1] > total:
        raise ValueError(f"counts must lie in [1, {total}] (the members given), got {counts}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    a_sum, q_sum, estimates = 0.0, 0.0, []
    for m in range(counts[-1]):
        a, q = kernel_scores(features[m], margins[m], features[m, rows], ridge=ridge,
                             kernel_rows=masks[m] if kernel == "subset" else None)
        a_sum, q_sum = a_sum + (a if average == "paper" else a * q[None, :]), q_sum + q
        count = m + 1
        if count in counts:
            matrix = (a_sum / count) * (q_sum / count)[None, :] if average == "paper" else a_sum / count
            bias = np.mean(margins[:count, rows] - masks[:count] @ matrix.T, axis=0)
            estimates.append(datamodels.Datamodels(matrix.astype(np.float32), bias.astype(np.float32),
                                                   np.full(len(rows), np.nan, np.float32)))
    return estimates


def _featurizer(model: Model, variables: dict, images, labels, norm, masks, *, proj_dim, key, chunk, projection,
                block, output):
    """The members of stacked ``variables``, their checked ``masks`` and ``features(member)`` (one shared ``G``)."""
    images = np.asarray(images)
    member_list = members(model, variables, images.shape[1:])
    masks = _check_masks(masks, len(member_list), len(images))
    key = jax.random.key(0) if key is None else key
    matrix = _shared_projection(model, images.shape[1:], proj_dim, key, projection, block)

    def features(member):
        return trak_features(model, member, images, labels, norm, proj_dim=proj_dim, key=key, chunk=chunk,
                             projection=projection, block=block, matrix=matrix, output=output)

    return member_list, masks, features


def trak_datamodels(model: Model, variables: dict, images: np.ndarray, labels: np.ndarray, norm: train.Normalization,
                    masks: np.ndarray, *, rows=None, proj_dim: int | None = 512, key: jax.Array | None = None,
                    ridge: float = 0.0, kernel: str = "subset", average: str = "paper", chunk: int = 256,
                    projection: str = "gaussian", block: int = DEFAULT_BLOCK) -> datamodels.Datamodels:
    """TRAK margin datamodels ``(len(rows), n)`` of members (stacked ``variables``) trained on ``images[masks[m]]``,
    behind :class:`ascent_jax.datamodels.Datamodels` (module docstring: estimator, bias), so
    :func:`ascent_jax.datamodels.lds` scores them unchanged. ``rows``: target positions among the ``n``
    points (default all); ``key`` (default ``jax.random.key(0)``) fixes the projection."""
    member_list, masks, features = _featurizer(model, variables, images, labels, norm, masks, proj_dim=proj_dim,
                                               key=key, chunk=chunk, projection=projection, block=block,
                                               output="margin")
    feats, margins = zip(*(features(member) for member in member_list))
    return datamodels_from_features(np.stack(feats), np.stack(margins), masks, rows=rows, ridge=ridge, kernel=kernel,
                                    average=average)[0]


def trak_logits(model: Model, variables: dict, images: np.ndarray, labels: np.ndarray, norm: train.Normalization,
                masks: np.ndarray, *, rows=None, proj_dim: int | None = 512, key: jax.Array | None = None,
                ridge: float = 0.0, kernel: str = "subset", chunk: int = 32, projection: str = "gaussian",
                block: int = DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Per-class TRAK of the target points ``rows`` (default all ``n``): ``matrix`` ``(R, C, n)`` and ``bias``
    ``(R, C)``, float32, so ``logit_c(rows[r]; S) ~ matrix[r, c] . 1_S + bias[r, c]`` (module docstring:
    weight ``onehot(y) - softmax(z)``, class-summed kernel, members averaged as ``average="scores"``).

    ``variables``: members (stacked) trained on ``images[masks[m]]``; ``kernel`` as for the margins.
    Each example costs ``C`` projected gradients, so ``chunk`` (examples at a time) is smaller.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    labels = np.asarray(labels)
    rows = _check_rows(rows, len(labels))
    member_list, masks, features = _featurizer(model, variables, images, labels, norm, masks, proj_dim=proj_dim,
                                               key=key, chunk=chunk, projection=projection, block=block,
                                               output="logits")
    total, row_logits = 0.0, []
    for member, mask in zip(member_list, masks):
        phi, logits = features(member)  # (n, C, d), (n, C)
        z = np.asarray(logits, np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        q = np.eye(z.shape[1])[labels] - p / p.sum(axis=1, keepdims=True)  # -dL/dz
        u = np.einsum("ncd,nc->nd", phi.astype(np.float64), q)  # G^T (-grad_theta L_i)
        kernel_rows = phi[mask] if kernel == "subset" else phi
        dim = phi.shape[-1]
        scores = _solve(kernel_rows.reshape(-1, dim), phi[rows].reshape(-1, dim), u, ridge=ridge)
        total = total + scores.reshape(len(rows), z.shape[1], -1)
        row_logits.append(z[rows])
    matrix = total / len(member_list)
    bias = np.mean(np.stack(row_logits) - np.einsum("mn,rcn->mrc", masks.astype(np.float64), matrix), axis=0)
    return matrix.astype(np.float32), bias.astype(np.float32)
