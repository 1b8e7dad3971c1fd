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

The paper's datamodels predict all ``k`` class logits (Eq. 2, ``f_x: Theta -> R^k``):
:func:`train_outputs` records the logits in the same ensemble run, :func:`fit_class_datamodels`
fits one datamodel per chosen target point and class (:class:`ClassDatamodels`, scored by
:func:`class_lds`, saved by :func:`save_class_datamodels`) and :func:`dm_direct_logits` is
Algorithm C.2 on them.
"""

from __future__ import annotations

import functools
import json
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from ascent_jax import ensemble, files, train
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


class Outputs(NamedTuple):
    """What :func:`train_outputs` records: ``margins`` ``(M, n)`` float32 and, when asked, eval-mode
    ``logits`` ``(M, n, C)`` stored as float16 (half the disk and memory; about 3 significant digits)."""

    margins: np.ndarray
    logits: np.ndarray | None


LOGITS_FOLDER = "with-logits"


def train_outputs(model: Model, config: train.TrainConfig, images: np.ndarray, labels: np.ndarray,
                  norm: train.Normalization, masks: np.ndarray, options: ensemble.RunOptions, *,
                  out_dir: str | Path, logits: bool = False) -> Outputs:
    """Margins ``(M, n)`` of model ``j`` (trained on ``images[masks[j]]``) on every image, and its logits if asked.

    One ensemble run of the engine (member ``j`` uses key ``fold_in(key(options.seed), j)``),
    ``options.chunk_size`` models at a time, checkpointed under ``out_dir``; each finished
    chunk keeps only its outputs (:func:`ascent_jax.ensemble.run`'s ``finalize``), so a rerun
    skips it and the disk holds one chunk's checkpoints at a time. The margins come from the
    same evaluator either way, so they are bit-identical with and without ``logits``. A run
    with ``logits`` keeps its chunks in ``out_dir/with-logits``: the engine's fingerprint
    does not cover what ``finalize`` returns, so margins-only chunks must never be read as
    holding logits (nor the other way round).
    """
    margin_evaluator = train.margin_evaluator(model, norm, images, labels, options)
    if logits:
        logits_evaluator = ensemble.Evaluator(train.logits_fn(model, norm), (images,), options)

        def finalize(variables):
            return {"margins": margin_evaluator.on_devices(variables)[0],
                    "logits": logits_evaluator.on_devices(variables).astype(np.float16)}
    else:
        def finalize(variables):
            return margin_evaluator.on_devices(variables)[0]

    folder = Path(out_dir) / LOGITS_FOLDER if logits else out_dir
    result = train.train_ensemble(model, config, images, labels, norm, options, num_members=len(masks),
                                  subsets=_subsets(masks), checkpoint_dir=folder, finalize=finalize,
                                  desc="datamodel models")
    if logits:
        states = result.states
        return Outputs(np.asarray(states["margins"], np.float32), np.asarray(states["logits"], np.float16))
    return Outputs(np.asarray(result.states, np.float32), None)


def train_margins(model: Model, config: train.TrainConfig, images: np.ndarray, labels: np.ndarray,
                  norm: train.Normalization, masks: np.ndarray, options: ensemble.RunOptions, *,
                  out_dir: str | Path) -> np.ndarray:
    """Margins ``(M, n)`` of model ``j`` (trained on ``images[masks[j]]``) on every image: :func:`train_outputs`
    without logits."""
    return train_outputs(model, config, images, labels, norm, masks, options, out_dir=out_dir).margins


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
        chunk_started = time.time()
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
            how = "loaded" if saved is not None else f"fitted in {time.time() - chunk_started:.1f} s"
            log(f"datamodel fit: targets chunk {number}/{len(starts)} done ({how}), "
                f"{time.time() - started:.0f} s so far")
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


class ClassDatamodels(NamedTuple):
    """Per-class linear datamodels of chosen target points: ``logit_c(x_rows[r]; S) ~ matrix[r, c] . 1_S + bias[r, c]``.

    ``rows`` ``(R,)`` int64: positions of the target points in the study subset; ``matrix``
    ``(R, C, n)`` float32 (entry ``[r, c, i]``: effect of including train point ``i`` on the
    class-``c`` logit of target ``rows[r]``); ``bias`` and ``ratio`` (the chosen L1 strength
    as a fraction of ``lambda_max``) ``(R, C)``.
    """

    rows: np.ndarray
    matrix: np.ndarray
    bias: np.ndarray
    ratio: np.ndarray

    def predict(self, masks: np.ndarray) -> np.ndarray:
        """Predicted logits ``(models, R, C)`` for training-subset masks ``(models, n)``."""
        r, c, n = self.matrix.shape
        return (np.asarray(masks, np.float32) @ self.matrix.reshape(r * c, n).T).reshape(-1, r, c) + self.bias

    def flat(self) -> Datamodels:
        """The same datamodels as ``R * C`` targets (row ``r * C + c``), in the margin datamodels' form."""
        r, c, n = self.matrix.shape
        return Datamodels(self.matrix.reshape(r * c, n), self.bias.reshape(-1), self.ratio.reshape(-1))


def _check_rows(rows, n: int) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) or len(rows) == 0:
        raise ValueError(f"rows must be a non-empty 1-D integer array of positions in the study subset, got "
                         f"shape {rows.shape} of {rows.dtype}")
    if rows.min() < 0 or rows.max() >= n:
        raise ValueError(f"rows must lie in [0, {n}), got {rows.min()}..{rows.max()}")
    if len(np.unique(rows)) != len(rows):
        raise ValueError("rows contain duplicates")
    return rows.astype(np.int64)


def _row_logits(logits: np.ndarray, rows: np.ndarray, masks: np.ndarray, what: str) -> np.ndarray:
    """``logits[:, rows]`` as float32 ``(M, R, C)``, once ``logits`` is checked to be ``(M, n, C)`` for ``masks``."""
    logits = np.asarray(logits)
    masks = np.asarray(masks)
    if logits.ndim != 3 or masks.ndim != 2 or logits.shape[:2] != masks.shape:
        raise ValueError(f"{what} logits must be (M, n, classes) for masks (M, n); got {logits.shape} and {masks.shape}")
    return np.asarray(logits[:, rows], np.float32)


def fit_class_datamodels(masks: np.ndarray, logits: np.ndarray, val_masks: np.ndarray, val_logits: np.ndarray,
                         rows: np.ndarray, *, ratios=DEFAULT_RATIOS, steps: int = 50, target_chunk: int = 1024,
                         checkpoint_dir: str | Path | None = None, log=None) -> ClassDatamodels:
    """Per-class datamodels of the target points ``rows``: :func:`fit_datamodels` on every class logit of each.

    ``logits`` ``(M, n, C)`` (any float dtype; float16 as recorded) of the models trained on
    ``masks`` ``(M, n)``, ``val_*`` those of the models that pick lambda; ``rows`` are positions
    ``0..n-1`` of the targets. The ``R * C`` outputs are fitted as one batch of targets, so the
    fit is chunked, logged and resumable from ``checkpoint_dir`` exactly as :func:`fit_datamodels`.
    """
    rows = _check_rows(rows, np.shape(masks)[-1])
    outputs = _row_logits(logits, rows, masks, "fit")
    val_outputs = _row_logits(val_logits, rows, val_masks, "validation")
    if val_outputs.shape[2] != outputs.shape[2]:
        raise ValueError(f"fit and validation logits have {outputs.shape[2]} and {val_outputs.shape[2]} classes")
    num_rows, classes = outputs.shape[1:]
    fitted = fit_datamodels(masks, outputs.reshape(len(outputs), -1), val_masks,
                            val_outputs.reshape(len(val_outputs), -1), ratios=ratios, steps=steps,
                            target_chunk=target_chunk, checkpoint_dir=checkpoint_dir, log=log)
    return ClassDatamodels(rows, fitted.matrix.reshape(num_rows, classes, -1), fitted.bias.reshape(num_rows, classes),
                           fitted.ratio.reshape(num_rows, classes))


def class_lds(datamodels: ClassDatamodels, masks: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per-row, per-class LDS ``(R, C)`` on held-out models: :func:`lds` of each class logit of each target row.

    ``logits`` ``(M, n, C)`` of the held-out models trained on ``masks``; row ``r`` is scored
    against ``logits[:, datamodels.rows[r]]``.
    """
    actual = _row_logits(logits, datamodels.rows, masks, "held-out")
    if actual.shape[2] != datamodels.matrix.shape[1]:
        raise ValueError(f"held-out logits have {actual.shape[2]} classes, the datamodels {datamodels.matrix.shape[1]}")
    return lds(datamodels.flat(), masks, actual.reshape(len(actual), -1)).reshape(datamodels.bias.shape)


def dm_direct_logits(pretrained_logits: np.ndarray, datamodels: ClassDatamodels,
                     forget_positions: np.ndarray) -> np.ndarray:
    """DM-direct ("Attribute-to-Delete" Algorithm C.2) on class logits: ``h(x) = f_x(theta_0) - sum_{i in F} beta_i(x)``.

    ``pretrained_logits`` ``(..., R, C)`` are the pretrained model(s)' logits on the target rows
    ``datamodels.rows``; ``forget_positions`` as in :func:`dm_direct_margins` (same checks).
    Returns the predicted oracle logits, same shape as ``pretrained_logits``.
    """
    pretrained = np.asarray(pretrained_logits)
    shape = datamodels.bias.shape
    if pretrained.shape[-2:] != shape:
        raise ValueError(f"pretrained logits must end in (rows, classes) = {shape} of the datamodels, got "
                         f"{pretrained.shape}")
    flat = pretrained.reshape(*pretrained.shape[:-2], -1)
    return dm_direct_margins(flat, datamodels.flat().matrix, forget_positions).reshape(pretrained.shape)


CLASS_DATAMODEL_KEYS = ("rows", "matrix", "bias", "ratio", "subset", "lds", "provenance")


def save_class_datamodels(path: str | Path, datamodels: ClassDatamodels, subset: np.ndarray, provenance: dict, *,
                          lds: np.ndarray) -> None:
    """Write ``datamodels`` (fitted on the study ``subset``) with their per-row, per-class ``lds`` ``(R, C)`` and a
    JSON ``provenance`` as an ``.npz`` (atomically), which :func:`load_class_datamodels` reads and checks."""
    arrays = {"rows": np.asarray(datamodels.rows, np.int64), "matrix": np.asarray(datamodels.matrix, np.float32),
              "bias": np.asarray(datamodels.bias, np.float32), "ratio": np.asarray(datamodels.ratio, np.float32),
              "subset": np.asarray(subset, np.int64), "lds": np.asarray(lds, np.float32),
              "provenance": np.asarray(json.dumps(provenance, sort_keys=True, default=str))}
    files.atomic_write(path, lambda handle: np.savez(handle, **arrays))


def load_class_datamodels(path: str | Path, subset: np.ndarray) -> ClassDatamodels:
    """The per-class datamodels of ``path``, checked to be a sound file fitted on the study ``subset``.

    Raises ``FileNotFoundError`` for a missing file and a one-line ``ValueError`` saying what is
    wrong and how to fix it for anything else; never unpickles.
    """
    path = Path(path)
    what = "pass the class_datamodels.npz that python -m ascent_jax.forget_sets --logits --fit-classes wrote"
    again = "fit them again with python -m ascent_jax.forget_sets --logits --fit-classes"
    if not path.exists():
        raise FileNotFoundError(f"class datamodels file {path} does not exist; {what}")
    if path.is_dir():
        raise ValueError(f"class datamodels file {path} is a directory; {what}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"class datamodels file {path} is not an .npz archive; {what}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in CLASS_DATAMODEL_KEYS if key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        if "allow_pickle" in str(error):  # numpy's refusal of an object array
            raise ValueError(f"class datamodels file {path} holds an array of Python objects, which would need "
                             f"unpickling and is never loaded; {what}") from None
        raise ValueError(f"class datamodels file {path} is not a readable .npz ({type(error).__name__}); "
                         f"{what}") from None
    missing = [key for key in CLASS_DATAMODEL_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"class datamodels file {path} lacks {', '.join(map(repr, missing))}; {what}")
    subset = np.asarray(subset)
    if arrays["subset"].shape != subset.shape or not np.array_equal(arrays["subset"], subset):
        raise ValueError(f"the class datamodels in {path} were fitted on another study subset; use the same "
                         "--subset-size and seed as the forget-sets run that wrote them")
    rows, matrix = arrays["rows"], arrays["matrix"]
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) or len(rows) == 0:
        raise ValueError(f"class datamodels file {path}: rows must be a non-empty 1-D integer array, got shape "
                         f"{rows.shape} of {rows.dtype}; {again}")
    if matrix.ndim != 3 or matrix.shape[0] != len(rows) or matrix.shape[2] != len(subset):
        raise ValueError(f"class datamodels file {path}: matrix has shape {matrix.shape}, expected "
                         f"({len(rows)}, classes, {len(subset)}) for {len(rows)} rows of a {len(subset)}-point "
                         f"study subset; {again}")
    for key in ("matrix", "bias", "ratio", "lds"):
        expected = matrix.shape if key == "matrix" else matrix.shape[:2]
        if arrays[key].shape != expected or not np.issubdtype(arrays[key].dtype, np.floating):
            raise ValueError(f"class datamodels file {path}: {key} has shape {arrays[key].shape} and dtype "
                             f"{arrays[key].dtype}, expected float {expected}; {again}")
    for key in ("matrix", "bias", "ratio"):
        if not np.isfinite(arrays[key]).all():
            raise ValueError(f"class datamodels file {path}: {key} has non-finite entries; {again}")
    provenance = arrays["provenance"]
    try:
        parsed = json.loads(str(provenance)) if provenance.shape == () and provenance.dtype.kind == "U" else None
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ValueError(f"class datamodels file {path}: provenance must be one string holding a JSON object; {again}")
    try:
        _check_rows(rows, len(subset))
    except ValueError as error:
        raise ValueError(f"class datamodels file {path}: {error}; {again}") from None
    return ClassDatamodels(rows.astype(np.int64), matrix.astype(np.float32), arrays["bias"].astype(np.float32),
                           arrays["ratio"].astype(np.float32))
