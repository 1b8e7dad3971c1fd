"""CPU-sized models for Fashion-MNIST: an MLP and a small CNN (no batch norm)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ascent_jax.models.layers import PatchConvPool, dense


class MLP(nn.Module):
    """Flatten -> [Dense -> ReLU] x len(hidden) -> Dense."""

    num_classes: int = 10
    hidden: tuple[int, ...] = (256,)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(dense(width, x.shape[-1], dtype=self.dtype)(x))
        return dense(self.num_classes, x.shape[-1], dtype=self.dtype)(x)


class SmallCNN(nn.Module):
    """[conv 3x3 -> ReLU -> max-pool 2] per width, then Dense(hidden) -> ReLU -> Dense.

    Each conv -> ReLU -> pool is one :class:`PatchConvPool` (im2col, hand-written gradient): the same
    function and parameters as ``nn.Conv`` + ``nn.relu`` + ``nn.max_pool``, much faster to train on CPUs.
    """

    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32)
    hidden: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        for index, width in enumerate(self.widths):
            x = PatchConvPool(width, 3, dtype=self.dtype, name=f"Conv_{index}")(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(dense(self.hidden, x.shape[-1], dtype=self.dtype)(x))
        return dense(self.num_classes, self.hidden, dtype=self.dtype)(x)
