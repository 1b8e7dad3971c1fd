"""Layers shared by the architectures, initialised like PyTorch's defaults.

PyTorch initialises conv/linear weights and biases uniformly in +-1/sqrt(fan_in); we do the
same so that models trained here start from the distribution the papers' models start from.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

torch_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default bias init."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv(features: int, kernel: int, stride: int = 1, padding: int | None = None, *, fan_in: int = 0,
         use_bias: bool = False, dtype) -> nn.Conv:
    """Conv with explicit symmetric padding (PyTorch semantics; default 'same'), bias-free by default."""
    pad = kernel // 2 if padding is None else padding
    bias_init = torch_bias_init(fan_in) if use_bias else nn.initializers.zeros
    return nn.Conv(
        features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
        use_bias=use_bias, kernel_init=torch_init, bias_init=bias_init, dtype=dtype,
    )


class PatchConv(nn.Module):
    """Stride-1 'same' k x k convolution as one matmul over k*k shifted slices (im2col).

    The same parameters (``kernel`` (k, k, in, out), ``bias``) and values as :func:`conv` with
    ``use_bias=True``. XLA CPU runs convolutions inside a scanned training epoch at ~1% of its
    matmul rate; slices + one GEMM train the small CNN ~25x faster there (benchmarks/README.md).
    """

    features: int
    kernel: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, (n, h, w, c) = self.kernel, x.shape
        kernel = self.param("kernel", torch_init, (k, k, c, self.features), jnp.float32)
        bias = self.param("bias", torch_bias_init(k * k * c), (self.features,), jnp.float32)
        pad = k // 2
        padded = jnp.pad(x.astype(self.dtype), ((0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad), (0, 0)))
        patches = jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(k) for j in range(k)], axis=-1)
        return patches @ kernel.reshape(k * k * c, self.features).astype(self.dtype) + bias.astype(self.dtype)


def dense(features: int, fan_in: int, *, use_bias: bool = True, dtype) -> nn.Dense:
    """Linear layer with PyTorch's default initialisation."""
    return nn.Dense(
        features, use_bias=use_bias, kernel_init=torch_init, bias_init=torch_bias_init(fan_in), dtype=dtype,
    )


def batch_norm(train: bool, dtype) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 == flax 0.9, eps 1e-5), float32 statistics."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=jnp.float32)


def example_mask(mask: jax.Array | None, x: jax.Array) -> jax.Array | None:
    """Broadcast a per-example boolean mask to ``x``'s shape for masked batch statistics."""
    if mask is None:
        return None
    return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x.shape)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 stride-2 max-pool as a reshape + max (same values as ``nn.max_pool``).

    XLA CPU differentiates this several times faster than ``reduce_window``'s
    select-and-scatter gradient; on GPUs the two are equivalent.
    """
    n, h, w, c = x.shape
    return x[:, : h - h % 2, : w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
