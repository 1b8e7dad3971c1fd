"""Linear datamodels: train x train influence matrices, their quality (LDS), PCA, DM-direct.

Recipe (Ilyas et al. 2022, as used by "Attribute-to-Delete" App. D.3 and the forget sets of
"Ascent Fails to Forget" App. M):

1. :func:`study_subset` fixes the ``n`` training points of the CPU study (class balanced).
2. :func:`subset_masks` draws ``M`` masks over those points, each with exactly
   ``round(alpha * n)`` ones (fixed size: the vmapped trainer needs equal subsets).
3. :func:`train_margins` trains model ``j`` on mask ``j`` with the ensemble engine and
   records its margin on all ``n`` points -> ``margins`` ``(M, n)``; chunked and resumable.
4. :func:`fit_datamodels` fits, for every target point ``t`` at once (batched FISTA in JAX),
   the L1-regularised linear model ``margin_t(S) ~ theta_t . 1_S + b_t``, so
   ``matrix[t, i]`` is the effect of including train point ``i`` on the margin of ``t``.
5. :func:`lds` scores it (linear datamodeling score: mean over targets of the Spearman
   correlation, across held-out models, between predicted and actual margins).
6. :func:`principal_components` gives per-point PC scores of the matrix for the forget sets.

:func:`dm_direct_margins` is "Attribute-to-Delete" Algorithm C.2 (DM-direct) on margins; DMM
(Algorithm C.3) is oracle matching with those margins as its target.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from ascent_jax import ensemble, train
from ascent_jax.models import Model


def study_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The fixed, class-balanced training subset of the CPU study: sorted indices into ``labels``.

    Each of the ``C`` classes gets ``n // C`` points; the ``n % C`` left over go to classes
    drawn by ``seed``. Points within a class are drawn uniformly without replacement by
    ``np.random.default_rng(seed)``. ``n == len(labels)`` returns every index.
    """
    labels = np.asarray(labels)
    if not 0 < n <= len(labels):
        raise ValueError(f"study subset size must lie in [1, {len(labels)}], got {n}")
    if n == len(labels):
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    counts = np.full(len(classes), n // len(classes))
    counts[rng.choice(len(classes), n % len(classes), replace=False)] += 1
    chosen = []
    for label, count in zip(classes, counts):
        members = np.flatnonzero(labels == label)
        if count > len(members):
            raise ValueError(f"class {label} has {len(members)} points, fewer than the {count} a balanced "
                             f"subset of {n} needs")
        chosen.append(rng.choice(members, count, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def subset_masks(num_models: int, n: int, alpha: float, seed: int) -> np.ndarray:
    """Boolean masks ``(num_models, n)``, row ``j`` with exactly ``round(alpha * n)`` ones.

    Row ``j`` depends only on ``(seed, j)``, so growing ``num_models`` keeps earlier rows.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"subset fraction alpha must lie in (0, 1), got {alpha}")
    size = round(alpha * n)
    if not 0 < size < n:
        raise ValueError(f"alpha={alpha} of {n} points gives {size}-point subsets; need between 1 and {n - 1}")
    masks = np.zeros((num_models, n), bool)
    for row in range(num_models):
        masks[row, np.random.default_rng([seed, row]).permutation(n)[:size]] = True
    return masks


def train_margins(model: Model, config: train.TrainConfig, images: np.ndarray, labels: np.ndarray,
                  norm: train.Normalization, masks: np.ndarray, options: ensemble.RunOptions, *,
                  out_dir: str | Path) -> np.ndarray:
    """Margins ``(M, n)`` of model ``j`` (trained on ``images[masks[j]]``) on every image.

    One ensemble run of the engine (member ``j`` uses key ``fold_in(key(options.seed), j)``),
    ``options.chunk_size`` models at a time, checkpointed under ``out_dir``; each finished
    chunk keeps only its margins (:func:`ascent_jax.ensemble.run`'s ``finalize``), so a rerun
    skips it and the disk holds one chunk's checkpoints at a time.
    """
    evaluator = train.margin_evaluator(model, norm, images, labels, options)
    result = train.train_ensemble(model, config, images, labels, norm, options, num_members=len(masks),
                                  subsets=_subsets(masks), checkpoint_dir=out_dir,
                                  finalize=lambda variables: evaluator.on_devices(variables)[0], desc="datamodel models")
    return np.asarray(result.states, np.float32)


def _subsets(masks: np.ndarray) -> np.ndarray:
    counts = masks.sum(axis=1)
    if counts.min() != counts.max():
        raise ValueError(f"every mask must select the same number of points, got {counts.min()}..{counts.max()}")
    return np.nonzero(masks)[1].reshape(len(masks), counts[0])


class Datamodels(NamedTuple):
    """Fitted linear datamodels: ``margin_t(S) ~ matrix[t] . 1_S + bias[t]``.

    ``matrix`` is ``(targets, n)`` (row ``t`` is the datamodel vector beta(x_t));
    ``ratio[t]`` the chosen L1 strength as a fraction of target ``t``'s ``lambda_max``.
    """

    matrix: np.ndarray
    bias: np.ndarray
    ratio: np.ndarray

    def predict(self, masks: np.ndarray) -> np.ndarray:
        """Predicted outputs ``(models, targets)`` for training-subset masks ``(models, n)``."""
        return np.asarray(masks, np.float32) @ self.matrix.T + self.bias


DEFAULT_RATIOS = (0.3, 0.1, 0.03, 0.01)


@functools.partial(jax.jit, static_argnames="steps")
def _lasso_path(x, y, x_val, y_val, ratios, step, steps):
    """FISTA on ``(1/2M)||y - x w||^2 + lam ||w||_1`` for all columns of ``y`` at once.

    ``lam = ratio * lam_max`` per target, over ``ratios`` from large to small with warm
    starts; returns the weights whose validation MSE is lowest per target, and that ratio.
    """
    m = x.shape[0]
    lam_max = jnp.max(jnp.abs(x.T @ y), axis=0) / m

    def fista(w, lam):
        def body(carry, _):
            w, z, t = carry
            grad = x.T @ (x @ z - y) / m
            u = z - step * grad
            w_new = jnp.sign(u) * jnp.maximum(jnp.abs(u) - step * lam, 0.0)
            t_new = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
            return (w_new, w_new + (t - 1) / t_new * (w_new - w), t_new), None

        return jax.lax.scan(body, (w, w, jnp.float32(1.0)), None, length=steps)[0][0]

    def over_ratios(carry, ratio):
        w, best_w, best_err, best_ratio = carry
        w = fista(w, ratio * lam_max)
        err = jnp.mean((x_val @ w - y_val) ** 2, axis=0)
        better = err < best_err
        return (w, jnp.where(better, w, best_w), jnp.where(better, err, best_err),
                jnp.where(better, ratio, best_ratio)), None

    zeros = jnp.zeros((x.shape[1], y.shape[1]), x.dtype)
    init = (zeros, zeros, jnp.full(y.shape[1], jnp.inf, x.dtype), jnp.zeros(y.shape[1], x.dtype))
    _, best_w, _, best_ratio = jax.lax.scan(over_ratios, init, ratios)[0]
    return best_w, best_ratio


def _lipschitz(x: jax.Array, iterations: int = 100) -> float:
    """Largest eigenvalue of ``x^T x / M`` by power iteration (deterministic start)."""
    v = jnp.ones(x.shape[1], x.dtype) / np.sqrt(x.shape[1])
    for _ in range(iterations):
        v = x.T @ (x @ v)
        v = v / jnp.linalg.norm(v)
    return float(jnp.linalg.norm(x @ v) ** 2 / x.shape[0])


def fit_datamodels(masks: np.ndarray, outputs: np.ndarray, val_masks: np.ndarray, val_outputs: np.ndarray, *,
                   ratios=DEFAULT_RATIOS, steps: int = 50, target_chunk: int = 1024,
                   checkpoint_dir: str | Path | None = None, log=None) -> Datamodels:
    """L1-regularised linear datamodels for every target (columns of ``outputs``) at once.

    ``masks`` ``(M, n)`` and ``outputs`` ``(M, targets)`` fit; ``val_*`` (other models) pick,
    per target, ``lambda = ratio * lambda_max`` from ``ratios`` by validation MSE (the fit is
    not refitted on the union). Masks are standardised per column and outputs centred, as
    in Ilyas et al. (2022); weights are mapped back to 0/1 masks. Targets are processed
    ``target_chunk`` at a time to bound memory; FISTA runs ``steps`` iterations per ratio.
    With ``checkpoint_dir`` each finished chunk is saved in the store (:class:`ascent_jax.ensemble.Store`)
    under a folder keyed by every input, so a rerun (after a kill) fits only the chunks not yet saved; ``log``
    (e.g. ``print``) reports each chunk.
    """
    masks = np.asarray(masks, np.float32)
    outputs = np.asarray(outputs, np.float32)
    if masks.ndim != 2 or outputs.ndim != 2 or len(masks) != len(outputs):
        raise ValueError(f"masks (M, n) and outputs (M, targets) must share M; got {masks.shape} and {outputs.shape}")
    if len(val_masks) == 0:
        raise ValueError("fitting datamodels needs at least one validation model to choose lambda")
    mean = masks.mean(axis=0)
    std = masks.std(axis=0)
    std = np.where(std > 0, std, 1.0).astype(np.float32)
    x = jnp.asarray((masks - mean) / std)
    x_val = jnp.asarray((np.asarray(val_masks, np.float32) - mean) / std)
    step = 1.0 / (1.01 * _lipschitz(x))
    ratios = jnp.asarray(sorted(ratios, reverse=True), jnp.float32)
    y_mean = outputs.mean(axis=0)
    val_outputs = np.asarray(val_outputs, np.float32)
    key = ensemble.fingerprint({"inputs": [ensemble.digest(a) for a in (masks, outputs, x_val, val_outputs)],
                                "ratios": np.asarray(ratios).tolist(), "steps": steps, "chunk": target_chunk})
    store = None if checkpoint_dir is None else ensemble.Store(Path(checkpoint_dir) / f"fit-{key}")
    weights, chosen, started = [], [], time.time()
    starts = range(0, outputs.shape[1], target_chunk)
    for number, lo in enumerate(starts, 1):
        cols = slice(lo, lo + target_chunk)
        name = f"targets-{lo:06d}"
        saved = None if store is None else store.load(name, key)
        if saved is not None:
            w, ratio = saved[0]["weights"], saved[0]["ratio"]
        else:
            w, ratio = _lasso_path(x, jnp.asarray(outputs[:, cols] - y_mean[cols]), x_val,
                                   jnp.asarray(val_outputs[:, cols] - y_mean[cols]), ratios, jnp.float32(step), steps)
            w, ratio = np.ascontiguousarray(np.asarray(w).T), np.asarray(ratio)  # as a reload gives it
            if store is not None:
                store.save(name, key, {"weights": w, "ratio": ratio})
        weights.append(w)
        chosen.append(ratio)
        if log is not None:
            log(f"datamodel fit: targets chunk {number}/{len(starts)} done, {time.time() - started:.0f} s so far")
    matrix = np.concatenate(weights) / std
    bias = y_mean - matrix @ mean
    return Datamodels(matrix.astype(np.float32), bias.astype(np.float32), np.concatenate(chosen))


def lds(datamodels: Datamodels, masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Per-target linear datamodeling score on held-out models ("Attribute-to-Delete" G.2).

    For target ``t``: Spearman correlation, across the held-out models, between predicted
    and actual outputs. Targets whose actual or predicted outputs are constant give NaN.
    """
    if len(masks) < 3:
        raise ValueError(f"LDS needs at least 3 held-out models, got {len(masks)}")
    predicted = scipy.stats.rankdata(datamodels.predict(masks), axis=0)
    actual = scipy.stats.rankdata(np.asarray(outputs), axis=0)
    predicted = predicted - predicted.mean(axis=0)
    actual = actual - actual.mean(axis=0)
    scale = np.sqrt((predicted ** 2).sum(axis=0) * (actual ** 2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, (predicted * actual).sum(axis=0) / scale, np.nan)


class Components(NamedTuple):
    """Top principal components of a datamodel matrix.

    ``scores`` ``(n, k)``: projection of each centred row (target point) on PC ``k``, signed
    so that the entry of largest magnitude is positive; ``explained`` the fraction of the
    total (centred) variance each PC carries.
    """

    scores: np.ndarray
    explained: np.ndarray


def principal_components(matrix: np.ndarray, k: int, *, seed: int = 0, exact_below: int = 2000,
                         oversample: int = 10, power_iterations: int = 4) -> Components:
    """PCA of the rows of ``matrix`` (columns centred): exact SVD for ``n < exact_below``,
    otherwise randomised SVD (Halko et al. 2011) with ``power_iterations`` and a Gaussian
    sketch drawn from ``seed``."""
    a = np.asarray(matrix, np.float32)
    if not 0 < k <= min(a.shape):
        raise ValueError(f"number of components must lie in [1, {min(a.shape)}], got {k}")
    a = a - a.mean(axis=0)
    total = float(np.sum(a.astype(np.float64) ** 2))
    if min(a.shape) < exact_below:
        u, s, _ = np.linalg.svd(a, full_matrices=False)
    else:
        sketch = np.random.default_rng(seed).standard_normal((a.shape[1], k + oversample)).astype(np.float32)
        q = np.linalg.qr(a @ sketch)[0]
        for _ in range(power_iterations):
            q = np.linalg.qr(a @ np.linalg.qr(a.T @ q)[0])[0]
        ub, s, _ = np.linalg.svd(q.T @ a, full_matrices=False)
        u = q @ ub
    scores = u[:, :k] * s[:k]
    signs = np.sign(scores[np.abs(scores).argmax(axis=0), np.arange(k)])
    scores = scores * np.where(signs == 0, 1, signs)
    explained = s[:k].astype(np.float64) ** 2 / total if total > 0 else np.zeros(k)
    return Components(scores.astype(np.float64), explained)


def positions_in_subset(subset: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Positions in the sorted study ``subset`` of full-split ``indices`` (all must be in it)."""
    subset = np.asarray(subset)
    indices = np.asarray(indices, np.int64)
    positions = np.searchsorted(subset, indices)
    inside = (positions < len(subset)) & (subset[np.minimum(positions, len(subset) - 1)] == indices)
    if not inside.all():
        raise ValueError(f"indices not in the study subset: {indices[~inside][:5].tolist()}")
    return positions


def dm_direct_margins(pretrained_margins: np.ndarray, datamodel_matrix: np.ndarray,
                      forget_positions: np.ndarray) -> np.ndarray:
    """DM-direct ("Attribute-to-Delete" Algorithm C.2) on margins: ``h(x) = f_x(theta_0) - sum_{i in F} beta_i(x)``.

    ``pretrained_margins`` ``(..., targets)`` are margins of the pretrained model(s);
    ``datamodel_matrix`` ``(targets, n)`` holds margin datamodels (row = beta(x));
    ``forget_positions`` are positions ``0..n-1`` of the forget set in the datamodels' training
    points (see :func:`positions_in_subset`). Returns the predicted oracle margins, same shape
    as ``pretrained_margins``; DMM (Algorithm C.3) fine-tunes towards them.
    """
    matrix = np.asarray(datamodel_matrix)
    forget = np.asarray(forget_positions, np.int64)
    if forget.ndim != 1 or (forget.size and (forget.min() < 0 or forget.max() >= matrix.shape[1])):
        raise ValueError(f"forget positions must be a 1-D array in [0, {matrix.shape[1]})")
    if len(np.unique(forget)) != len(forget):
        raise ValueError("forget positions contain duplicates")
    pretrained = np.asarray(pretrained_margins)
    if pretrained.shape[-1] != matrix.shape[0]:
        raise ValueError(f"pretrained margins have {pretrained.shape[-1]} targets, the datamodel matrix "
                         f"{matrix.shape[0]}")
    return pretrained - matrix[:, forget].sum(axis=1)
