"""On-device batching: per-member shuffles of an index subset, padding masks, augmentation.

Data stays on the device as one uint8 array; a batch is a gather of indices into it. Every
shuffle is a pure function of a PRNG key, so an ensemble member's data order depends only on
its own key (the ensemble trainer derives it from (seed, member index, epoch)).

An epoch over ``m`` points in batches of ``B`` has ``ceil(m / B)`` steps (``floor`` with
``drop_last``); the last batch is padded with repeated indices whose ``valid`` flag is false,
so losses and batch-norm statistics count exactly the real examples while every step keeps
one static shape (required by ``lax.scan`` and ``vmap``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Batch(NamedTuple):
    """A batch as the train step sees it: float inputs, integer labels, validity mask."""

    x: jax.Array
    y: jax.Array
    valid: jax.Array


def steps_per_epoch(num_points: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of optimiser steps one pass over ``num_points`` takes (batch ``min(batch_size, num_points)``)."""
    if num_points <= 0:
        raise ValueError(f"cannot make batches from an empty set ({num_points} points)")
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    batch_size = min(batch_size, num_points)
    if drop_last:
        return num_points // batch_size
    return math.ceil(num_points / batch_size)


def epoch_batches(key: jax.Array, subset: jax.Array, batch_size: int, drop_last: bool = False):
    """Shuffle ``subset`` (indices into the data) with ``key`` and cut it into batches.

    Returns ``(indices, valid)``, both ``(steps, batch)``; ``batch = min(batch_size, m)``
    so a forget set smaller than the batch size forms one full-size batch.
    """
    m = subset.shape[0]
    batch = min(batch_size, m)
    steps = steps_per_epoch(m, batch_size, drop_last)
    order = subset[jax.random.permutation(key, m)]
    total = steps * batch
    if total <= m:
        return order[:total].reshape(steps, batch), jnp.ones((steps, batch), bool)
    padding = total - m
    indices = jnp.concatenate([order, order[:padding]]).reshape(steps, batch)
    valid = (jnp.arange(total) < m).reshape(steps, batch)
    return indices, valid


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """uint8 NHWC -> float32, scaled to [0, 1] then standardised per channel."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(key: jax.Array, images: jax.Array, *, flip: bool, crop_padding: int) -> jax.Array:
    """Random horizontal flip and random translation (pad-and-crop), one draw per image."""
    if not flip and crop_padding == 0:
        return images
    flip_key, crop_key = jax.random.split(key)
    n, h, w, _ = images.shape
    if flip:
        mirrored = jax.random.bernoulli(flip_key, 0.5, (n,))
        images = jnp.where(mirrored[:, None, None, None], images[:, :, ::-1, :], images)
    if crop_padding:
        p = crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * p + 1)
        crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))  # noqa: E731
        images = jax.vmap(crop)(padded, offsets)
    return images


def retain_indices(num_points: int, forget: np.ndarray) -> np.ndarray:
    """All indices ``0..num_points-1`` except the forget set, in increasing order."""
    keep = np.ones(num_points, bool)
    keep[np.asarray(forget, dtype=np.int64)] = False
    return np.flatnonzero(keep)


def subsets_from_masks(masks: np.ndarray) -> np.ndarray:
    """Per-member boolean masks ``(K, n)`` -> index sets ``(K, m)`` (equal ``m`` required for vmap)."""
    masks = np.asarray(masks, bool)
    if masks.ndim != 2:
        raise ValueError(f"subset masks must be (members, points), got shape {masks.shape}")
    counts = masks.sum(axis=1)
    if counts.min() != counts.max():
        raise ValueError(
            f"every member must train on the same number of points (got {counts.min()}..{counts.max()}); "
            "draw fixed-size subsets"
        )
    if counts[0] == 0:
        raise ValueError("subset masks select no training points")
    return np.stack([np.flatnonzero(row) for row in masks])
