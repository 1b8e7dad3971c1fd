"""KLoM, the KL divergence of margins: the unlearning yardstick of both papers.

For one evaluation point x, with the margins of N oracle models (retrained without the
forget set: the reference distribution safe(S_F)) and of N unlearned models (Georgiev et
al. 2024, Definition 3 and Appendix F.1)::

    KLoM(x) = KL( H(oracle margins at x) || H(unlearned margins at x) )
            = sum_b p_b * log(p_b / q_b)                               (nats)

where H clips the margins to [-clip, clip], bins them into ``bins`` equal-width bins that
span the joint min..max of both samples, and normalises the counts; unlearned bins below
``eps`` where the oracle has mass are raised to ``eps`` and q is renormalised (as
``scipy.stats.entropy`` does). 0 is perfect unlearning; the value is capped near
``log(1 / eps)`` (about 11.5 for eps = 1e-5), reached when the oracle's mass lies in bins
where the unlearned models have none. At small N even two oracle ensembles score far
above 0: report :func:`noise_floor` beside every KLoM.

``compat="easydub"`` reproduces the public PyTorch benchmark (EasyDUB ``klom_from_margins``)
exactly instead; see :func:`klom` for the differences. Computation is float64 (numpy for
the per-point ranges, bin edges and the final KL; one jitted JAX kernel for the counting),
with ``jax.enable_x64`` switched on only inside each call, never globally.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

__all__ = ["margins", "klom", "noise_floor", "bootstrap_klom", "summarize"]

COMPAT_MODES = (None, "easydub")
# Points per kernel call: cache-sized on CPU, large on accelerators.
_CPU_CHUNK, _ACCELERATOR_CHUNK = 1024, 16384


@jax.jit
def _margins(logits: jax.Array, labels: jax.Array) -> jax.Array:
    num_classes = logits.shape[-1]
    is_label = labels[:, None] == jnp.arange(num_classes)
    correct = jnp.sum(jnp.where(is_label, logits, 0), axis=-1)
    others = jax.nn.logsumexp(jnp.where(is_label, -jnp.inf, logits), axis=-1)
    return correct - others


def margins(logits: Any, labels: Any) -> jax.Array:
    """Classification margins ``z_y - logsumexp_{j != y} z_j``, the model output KLoM compares.

    ``logits`` has shape ``(..., n, C)`` (e.g. ``(N_models, n, C)``), ``labels`` shape
    ``(n,)`` with values in ``[0, C)``; returns shape ``(..., n)`` in the logits' dtype. The
    log-sum-exp shifts by the largest other logit, so logits of +-1e4 do not overflow.
    Jit-able: under a trace only shapes are checked (label values cannot be).
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim < 2:
        raise ValueError(
            f"logits must have shape (..., n, C); got shape {logits.shape}. "
            "Add a class axis, e.g. logits[None, :] for a single point."
        )
    if labels.ndim != 1 or labels.shape[0] != logits.shape[-2]:
        raise ValueError(
            f"labels must have shape (n,) = ({logits.shape[-2]},) to match logits of shape "
            f"{logits.shape}; got {labels.shape}."
        )
    if logits.shape[-1] < 2:
        raise ValueError(f"a margin needs at least 2 classes; logits have C = {logits.shape[-1]}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers; got dtype {labels.dtype}.")
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= logits.shape[-1]:
            raise ValueError(
                f"labels must lie in [0, C) = [0, {logits.shape[-1]}); got values in [{low}, {high}]."
            )
    return _margins(logits, labels)


def _aligned_empty(shape: tuple[int, int], dtype: type) -> np.ndarray:
    """An uninitialised C-contiguous array on a 64-byte boundary, which XLA:CPU reads in place."""
    size = shape[0] * shape[1] * np.dtype(dtype).itemsize
    raw = np.empty(size + 64, dtype=np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset : offset + size].view(dtype).reshape(shape)


def _copy_into(out: np.ndarray, margins: np.ndarray) -> None:
    """Copy a chunk of margins into the kernel's buffer, zero-padding the columns past it."""
    columns = margins.shape[1]
    np.copyto(out[:, :columns], margins, casting="same_kind")
    out[:, columns:] = 0


def _bin_range(oracle: np.ndarray, unlearned: np.ndarray, clip: float, *, compat: bool):
    """Per-point ``lo, hi`` of the clipped samples; ``hi = lo + 1`` when they are all one value.

    Clipping is monotone, so the range is read off the raw chunk's min and max.
    """

    def extremes(x):
        if compat:
            # numpy.clip keeps NaN, so a NaN propagates into the public code's min and max.
            return np.clip(x.min(axis=0), -clip, clip), np.clip(x.max(axis=0), -clip, clip)
        # NaN counts as -clip: it sets the minimum and never the maximum (unless all are NaN).
        low, high = x.min(axis=0), np.fmax.reduce(x, axis=0)
        low = np.where(np.isnan(low), -clip, np.clip(low, -clip, clip))
        return low, np.where(np.isnan(high), -clip, np.clip(high, -clip, clip))

    (o_min, o_max), (u_min, u_max) = extremes(oracle), extremes(unlearned)
    if compat:
        # EasyDUB takes Python's min()/max() of the two (unlearned first), which returns
        # its first argument when the comparison involves NaN.
        lo, hi = np.where(o_min < u_min, o_min, u_min), np.where(o_max > u_max, o_max, u_max)
    else:
        lo, hi = np.minimum(o_min, u_min), np.maximum(o_max, u_max)
    return lo, np.where(lo >= hi, lo + 1, hi)


def _edges(lo: np.ndarray, hi: np.ndarray, bins: int) -> np.ndarray:
    """Per-point edges ``(bins + 1, points)``, bit-identical to ``numpy.linspace(lo, hi, bins + 1)``.

    Built in numpy on purpose: XLA may fuse ``lo + i * step`` into an FMA or turn the
    division into a multiply by ``1 / bins``, either of which moves edges by an ulp.
    """
    delta = hi - lo
    step = delta / bins
    ramp = np.arange(bins + 1, dtype=lo.dtype)[:, None]
    edges = ramp * step + lo
    underflow = step == 0
    if underflow.any():
        # numpy.linspace's own rule: a step that underflows to 0 scales the ramp by delta.
        edges[:, underflow] = ramp / bins * delta[underflow] + lo[underflow]
    edges[-1] = hi
    return edges


def _clip(x, clip, *, compat: bool):
    """Clip to [-clip, clip]; NaN becomes -clip, or stays NaN in compat mode (``numpy.clip``)."""
    clipped = jnp.clip(x, -clip, clip)
    return clipped if compat else jnp.where(jnp.isnan(x), -clip, clipped)


def _at_least(x, edges):
    """``(len(edges), points)`` counts of samples ``>= edges[i]``; a scan over models keeps it cheap."""

    def add_model(count, row):
        return count + (row[None, :] >= edges).astype(jnp.int32), None

    return jax.lax.scan(add_model, jnp.zeros(edges.shape, jnp.int32), x)[0]


def _histogram(x, edges, *, compat: bool):
    """Bin counts ``(bins, points)`` of ``x (N, points)`` under ``searchsorted(edges, x, 'right') - 1``.

    Bin b holds ``at_least[b] - at_least[b + 1]``. Default: samples equal to the last edge
    go to the last bin, and since ``edges[0]`` is the minimum every sample is counted, so
    only the inner edges need comparing. Compat: samples outside ``[edges[0], edges[-1])``
    and NaN are dropped, like ``numpy.digitize``.
    """
    if compat:
        at_least = _at_least(x, edges)
    else:
        inner = _at_least(x, edges[1:-1])
        total = jnp.full((1, x.shape[1]), x.shape[0], jnp.int32)
        at_least = jnp.concatenate([total, inner, jnp.zeros_like(total)], axis=0)
    return at_least[:-1] - at_least[1:]


@functools.partial(jax.jit, static_argnames=("compat",))
def _chunk_histograms(oracle, unlearned, edges, clip, *, compat: bool):
    """Bin counts ``(2, bins, points)`` of one chunk of raw margins: oracle, then unlearned."""
    return jnp.stack(
        [_histogram(_clip(x, clip, compat=compat), edges, compat=compat) for x in (oracle, unlearned)]
    )


def _kl_from_counts(counts_o: np.ndarray, counts_u: np.ndarray, eps: float, *, compat: bool) -> np.ndarray:
    """Per-point KL from bin counts ``(bins, points)`` (see :func:`klom`); numpy, as log is cheap there."""
    counts_o, counts_u = counts_o.astype(np.float64), counts_u.astype(np.float64)
    if compat:
        # EasyDUB calls its binned KL with p = unlearned, q = oracle; empty histograms are zeros.
        p = counts_u / np.maximum(counts_u.sum(axis=0), 1)
        q = counts_o / np.maximum(counts_o.sum(axis=0), 1)
    else:
        p = counts_o / counts_o.sum(axis=0)
        q = counts_u / counts_u.sum(axis=0)
    has_mass = p > 0
    q_safe = np.where(has_mass, np.maximum(q, eps), q)
    ratio = np.divide(p, q_safe, out=np.ones_like(p), where=has_mass)
    kl = np.sum(p * np.log(ratio), axis=0)
    if compat:
        return kl
    # Renormalising q_safe to sum 1 adds log(sum q_safe) because sum p = 1.
    return kl + np.log(np.sum(q_safe, axis=0))


def _as_margin_matrix(name: str, x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(
            f"{name} must have shape (N_models, n_points); got shape {x.shape}. "
            "For a single point pass x[:, None]."
        )
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be real numbers; got dtype {x.dtype}.")
    if x.shape[0] < 2:
        raise ValueError(
            f"{name} has {x.shape[0]} model(s); a margin distribution needs N_models >= 2 "
            "(the papers use 100)."
        )
    return x


def _is_count(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an integer (not a bool) of at least ``minimum``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_options(bins: Any, eps: Any, clip: Any, compat: Any, chunk_size: Any) -> None:
    if not _is_count(bins, 1):
        raise ValueError(f"bins must be an integer >= 1 (the papers use 20); got {bins!r}.")
    if not (_is_real(eps) and 0 < eps < 1):
        raise ValueError(f"eps must be a number in (0, 1) (the papers use 1e-5); got {eps!r}.")
    if not (_is_real(clip) and 0 < clip < np.inf):
        raise ValueError(f"clip must be a finite number > 0 (the papers use 100); got {clip!r}.")
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}; got {compat!r}.")
    if chunk_size is not None and not _is_count(chunk_size, 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1; got {chunk_size!r}.")


def klom(
    oracle_margins: Any,
    unlearned_margins: Any,
    *,
    bins: int = 20,
    eps: float = 1e-5,
    clip: float = 100.0,
    compat: str | None = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Per-point KLoM, KL(oracle || unlearned) of binned margins (Definition 3, Appendix F.1).

    ``oracle_margins`` ``(N_oracle, n_points)`` is the reference distribution, first as in
    Definition 3; ``unlearned_margins`` is ``(N_unlearned, n_points)``. Returns a float64
    numpy array ``(n_points,)`` with values in [0, ~log(1/eps)] (about 11.5).

    Per point: clip both samples to [-clip, clip] (+-inf become +-clip); NaN counts as
    -clip, a maximally wrong margin, never dropped: a point whose unlearned models all
    diverged scores the cap, and with k of N diverged it scores at least ~log(N / (N - k))
    whenever the oracle has no mass in the lowest bin.
    ``bins`` bins with edges ``numpy.linspace(lo, hi, bins + 1)`` (float64, bit-identical)
    over the joint min..max (``[v, v + 1]`` if all values equal ``v``); sample -> bin
    ``searchsorted(edges, x, 'right') - 1`` with the right-most edge inclusive, so every
    sample is counted; p, q = normalised counts; where p > 0 and q < eps, q = eps; q is
    renormalised; KL in nats. Ensemble sizes may differ (each >= 2).

    ``compat="easydub"`` reproduces EasyDUB's ``klom_from_margins(oracle, unlearned)``
    (PyTorch benchmark) exactly, differences included: (1) bins follow ``numpy.digitize``,
    which drops every sample equal to the joint maximum -- a blown-up model whose margins all
    sit at +clip loses its whole sample and scores 0 (perfect) instead of ~11.5; (2) it
    computes KL(unlearned || oracle), the reverse of Definition 3, and does not renormalise
    q after the eps floor; (3) NaN: a NaN unlearned margin makes every bin edge NaN, so
    nothing is counted and the point scores 0.0; a NaN only among the oracle margins is
    dropped and the bins span the unlearned margins alone (Python's ``min``/``max`` skip a
    NaN second argument). float32 inputs keep float32 edges there, as numpy does.

    Points go in chunks of ``chunk_size`` (default 1024 on CPU, cache-sized; 16384 on
    accelerators); a jitted scan over models counts each chunk's bins, compiled once per
    (ensemble sizes, chunk width), so memory is O(N * chunk_size * bins). Subnormal margins
    (|m| < 2.2e-308) may be flushed to zero by XLA on CPU and are outside the exactness claim.
    """
    _check_options(bins, eps, clip, compat, chunk_size)
    oracle = _as_margin_matrix("oracle_margins", oracle_margins)
    unlearned = _as_margin_matrix("unlearned_margins", unlearned_margins)
    if oracle.shape[1] != unlearned.shape[1]:
        raise ValueError(
            f"oracle_margins and unlearned_margins must cover the same points; got "
            f"{oracle.shape[1]} and {unlearned.shape[1]} columns (shapes {oracle.shape} and "
            f"{unlearned.shape})."
        )
    is_compat = compat == "easydub"
    both_f32 = oracle.dtype == np.float32 and unlearned.dtype == np.float32
    dtype = np.float32 if is_compat and both_f32 else np.float64

    n_points = oracle.shape[1]
    if n_points == 0:
        return np.zeros(0, dtype=np.float64)
    # One compiled shape per (N, width): power-of-two widths for inputs narrower than a
    # chunk, else chunk_size with the last chunk overlapping its predecessor.
    if chunk_size is None:
        chunk_size = _CPU_CHUNK if jax.default_backend() == "cpu" else _ACCELERATOR_CHUNK
    width = min(int(chunk_size), 1 << (n_points - 1).bit_length())
    oracle_chunk = _aligned_empty((oracle.shape[0], width), dtype)
    unlearned_chunk = _aligned_empty((unlearned.shape[0], width), dtype)
    values = np.empty(n_points, dtype=np.float64)
    with jax.enable_x64(True):
        clip_value = jnp.asarray(clip, dtype)
        for start in range(0, n_points, width):
            begin = max(0, min(start, n_points - width))
            stop = min(begin + width, n_points)
            _copy_into(oracle_chunk, oracle[:, begin:stop])
            _copy_into(unlearned_chunk, unlearned[:, begin:stop])
            edges = _edges(*_bin_range(oracle_chunk, unlearned_chunk, clip, compat=is_compat), int(bins))
            # np.asarray waits for the kernel, so the buffers it reads in place can be refilled.
            counts = np.asarray(
                _chunk_histograms(oracle_chunk, unlearned_chunk, edges, clip_value, compat=is_compat)
            )
            kl = _kl_from_counts(counts[0], counts[1], eps, compat=is_compat)
            values[start:stop] = kl[start - begin : stop - begin]
    return values


def noise_floor(
    oracle_margins: Any,
    n_models: int | None = None,
    *,
    n_repeats: int = 1,
    seed: int = 0,
    bins: int = 20,
    eps: float = 1e-5,
    clip: float = 100.0,
    compat: str | None = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """KLoM between two disjoint random halves of an oracle pool: the score of perfect unlearning.

    Two independent oracle ensembles of ``n_models`` each still differ by sampling noise,
    and at small N this floor is large (Gaussian margins, p95: ~8.8 at N = 8, ~5 at 20,
    ~1.7 at 50, ~0.7 at 100), so every KLoM at that N must be read against it.
    ``oracle_margins`` is a pool ``(M, n_points)`` with ``M >= 2 * n_models`` (default
    ``n_models = M // 2``). Returns float64 ``(n_repeats, n_points)``, one row per random
    split (seeded numpy permutations), ready for :func:`summarize`'s ``floor``.
    """
    pool = _as_margin_matrix("oracle_margins", oracle_margins)
    size = pool.shape[0] // 2 if n_models is None else n_models
    if not (_is_count(size, 2) and size <= pool.shape[0] // 2):
        raise ValueError(
            f"n_models must be an integer in [2, M // 2] = [2, {pool.shape[0] // 2}] so that two "
            f"disjoint ensembles fit in the pool of M = {pool.shape[0]} oracles; got {n_models!r}."
        )
    if not _is_count(n_repeats, 1):
        raise ValueError(f"n_repeats must be an integer >= 1; got {n_repeats!r}.")
    rng = np.random.default_rng(seed)
    options = dict(bins=bins, eps=eps, clip=clip, compat=compat, chunk_size=chunk_size)
    rows = []
    for _ in range(n_repeats):
        order = rng.permutation(pool.shape[0])
        rows.append(klom(pool[order[:size]], pool[order[size : 2 * size]], **options))
    return np.stack(rows)


def bootstrap_klom(
    oracle_margins: Any,
    unlearned_margins: Any,
    *,
    n_bootstrap: int = 100,
    seed: int = 0,
    bins: int = 20,
    eps: float = 1e-5,
    clip: float = 100.0,
    compat: str | None = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """KLoM recomputed on ensembles resampled over models, for confidence intervals.

    Each replicate draws the oracle and the unlearned models independently with
    replacement (seeded numpy), so the spread reflects which models happened to be trained,
    the dominant uncertainty at small N. Returns float64 ``(n_bootstrap, n_points)``, ready
    for :func:`summarize`'s ``replicates``.
    """
    oracle = _as_margin_matrix("oracle_margins", oracle_margins)
    unlearned = _as_margin_matrix("unlearned_margins", unlearned_margins)
    if not _is_count(n_bootstrap, 1):
        raise ValueError(f"n_bootstrap must be an integer >= 1; got {n_bootstrap!r}.")
    rng = np.random.default_rng(seed)
    options = dict(bins=bins, eps=eps, clip=clip, compat=compat, chunk_size=chunk_size)
    rows = []
    for _ in range(n_bootstrap):
        pick_o = rng.integers(0, oracle.shape[0], size=oracle.shape[0])
        pick_u = rng.integers(0, unlearned.shape[0], size=unlearned.shape[0])
        rows.append(klom(oracle[pick_o], unlearned[pick_u], **options))
    return np.stack(rows)


def summarize(
    klom_values: Any,
    groups: Sequence[Any] | np.ndarray,
    *,
    replicates: Any = None,
    floor: Any = None,
    percentile: float = 95.0,
    ci: float = 0.95,
) -> pd.DataFrame:
    """Per-group KLoM summary as the papers report it (95th percentile, plus the mean).

    ``klom_values`` ``(n_points,)``; ``groups`` ``(n_points,)`` labels such as "forget",
    "retain", "validation" (rows follow first appearance). Optional ``replicates``
    ``(B, n_points)`` from :func:`bootstrap_klom` give percentile confidence intervals, and
    ``floor`` ``(R, n_points)`` or ``(n_points,)`` from :func:`noise_floor` gives the
    statistic of perfect unlearning at the same N (averaged over the R splits).

    Returns a tidy DataFrame, one row per (group, statistic), columns: ``group``;
    ``statistic`` ("p95" -- or ``f"p{percentile:g}"`` -- and "mean"); ``value`` on all
    models; ``ci_low``/``ci_high``, the ``ci`` bootstrap interval (NaN without replicates);
    ``noise_floor`` (NaN without floor); ``n_points`` in the group.
    """
    values = np.asarray(klom_values, dtype=np.float64)
    labels = np.asarray(groups, dtype=object)
    if values.ndim != 1:
        raise ValueError(f"klom_values must have shape (n_points,); got {values.shape}.")
    if labels.shape != values.shape:
        raise ValueError(
            f"groups must give one label per point, shape {values.shape}; got {labels.shape}."
        )
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must lie in [0, 100]; got {percentile!r}.")
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), e.g. 0.95; got {ci!r}.")
    extra = {}
    for name, array in (("replicates", replicates), ("floor", floor)):
        if array is None:
            continue
        array = np.asarray(array, dtype=np.float64)
        array = array[None, :] if array.ndim == 1 else array
        if array.ndim != 2 or array.shape[1] != values.shape[0]:
            raise ValueError(
                f"{name} must have shape (R, n_points) with n_points = {values.shape[0]}; "
                f"got {array.shape}."
            )
        extra[name] = array

    statistics = {
        f"p{percentile:g}": lambda x: np.percentile(x, percentile, axis=-1),
        "mean": lambda x: np.mean(x, axis=-1),
    }
    rows = []
    for group in pd.unique(labels):
        members = labels == group
        for statistic, reduce in statistics.items():
            ci_low = ci_high = floor_value = np.nan
            if "replicates" in extra:
                spread = reduce(extra["replicates"][:, members])
                ci_low, ci_high = np.quantile(spread, [(1 - ci) / 2, (1 + ci) / 2])
            if "floor" in extra:
                floor_value = float(np.mean(reduce(extra["floor"][:, members])))
            value = float(reduce(values[members]))
            rows.append([group, statistic, value, float(ci_low), float(ci_high), floor_value, int(members.sum())])
    columns = ["group", "statistic", "value", "ci_low", "ci_high", "noise_floor", "n_points"]
    return pd.DataFrame(rows, columns=columns)
