"""Layers shared by the architectures, initialised like PyTorch's defaults.

PyTorch initialises conv/linear weights and biases uniformly in +-1/sqrt(fan_in); we do the
same so that models trained here start from the distribution the papers' models start from.
"""

from __future__ import annotations

import functools
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


# Examples per sequential chunk in PatchConvPool on CPU: a 16-image chunk's patches (<= 2 MB for the small
# CNN) stay in cache; the whole-batch patch matrix (58 MB at batch 512) does not.
CPU_CHUNK = 16


def _patches(x: jax.Array, k: int) -> jax.Array:
    """(n, h, w, c) -> (n, h, w, k*k*c): each pixel's zero-padded k x k neighbourhood, ordered (i, j, c) as HWIO."""
    h, w, pad = x.shape[1], x.shape[2], k // 2
    padded = jnp.pad(x, ((0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad), (0, 0)))
    return jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(k) for j in range(k)], axis=-1)


def _patches_transpose(d: jax.Array, k: int) -> jax.Array:
    """Adjoint of :func:`_patches`: adds every patch entry back onto the pixel it was copied from."""
    h, w, pad = d.shape[1], d.shape[2], k // 2
    c = d.shape[3] // (k * k)
    total = 0
    for i in range(k):
        for j in range(k):
            tap = d[..., (i * k + j) * c:(i * k + j + 1) * c]
            total = total + jnp.pad(tap, ((0, 0), (i, k - 1 - i), (j, k - 1 - j), (0, 0)))
    return total[:, pad:pad + h, pad:pad + w]


def _relu_max_pool(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ReLU + 2x2 stride-2 max-pool (odd last row/column dropped, as ``nn.max_pool``), and per output the int8
    position (row-major, 0..3) of the window's first maximum -- the one ``nn.max_pool``'s gradient picks --
    or 4 where the ReLU zeroes it."""
    h, w = y.shape[1:3]
    y = y[:, : h - h % 2, : w - w % 2]
    w0, w1, w2, w3 = y[:, 0::2, 0::2], y[:, 0::2, 1::2], y[:, 1::2, 0::2], y[:, 1::2, 1::2]
    top = jnp.maximum(jnp.maximum(w0, w1), jnp.maximum(w2, w3))
    position = jnp.where(w0 == top, 0, jnp.where(w1 == top, 1, jnp.where(w2 == top, 2, 3)))
    return jnp.maximum(top, 0), jnp.where(top <= 0, 4, position).astype(jnp.int8)


def _relu_max_pool_transpose(g: jax.Array, position: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Gradient of :func:`_relu_max_pool`: each output's cotangent goes to its window's maximum (none if ReLU-zeroed)."""
    n, h2, w2, c = g.shape

    def upsample(a):  # nearest-neighbour x2, as one broadcast that XLA fuses into the select
        return jnp.broadcast_to(a[:, :, None, :, None], (n, h2, 2, w2, 2, c)).reshape(n, 2 * h2, 2 * w2, c)

    rows, cols = jnp.arange(2 * h2) % 2, jnp.arange(2 * w2) % 2
    here = (2 * rows[:, None, None] + cols[None, :, None]).astype(jnp.int8)
    dy = jnp.where(upsample(position) == here, upsample(g), 0)
    return jnp.pad(dy, ((0, 0), (0, shape[1] - 2 * h2), (0, shape[2] - 2 * w2), (0, 0)))


def _over_chunks(fn, size: int, *args):
    """``fn(*chunk) -> (rows, sums)`` over consecutive ``size``-example chunks of ``args`` in a sequential loop
    (plus the remainder): ``rows`` are concatenated along the batch axis, ``sums`` added up."""
    n = args[0].shape[0]
    full = n - n % size
    if full <= size:
        return fn(*args)
    stacked = tuple(a[:full].reshape(full // size, size, *a.shape[1:]) for a in args)
    rows, sums = jax.lax.map(lambda chunk: fn(*chunk), stacked)
    rows = jax.tree_util.tree_map(lambda r: r.reshape(full, *r.shape[2:]), rows)
    sums = jax.tree_util.tree_map(lambda s: s.sum(0), sums)
    if full < n:
        rest_rows, rest_sums = fn(*(a[full:] for a in args))
        rows = jax.tree_util.tree_map(lambda r, q: jnp.concatenate([r, q]), rows, rest_rows)
        sums = jax.tree_util.tree_map(jnp.add, sums, rest_sums)
    return rows, sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def conv_relu_max_pool(chunk: int, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``nn.max_pool(relu(conv(x, kernel) + bias), (2, 2), (2, 2))`` for a stride-1 'same' HWIO ``kernel``.

    im2col (shifted slices + one GEMM), ``chunk`` examples at a time. The gradient is written by hand: it
    keeps only ``x`` and int8 pool positions (not the 9x larger patches, which it recomputes per chunk) and
    routes pool gradients with one select, without ``reduce_window``'s select-and-scatter (slow on XLA CPU)
    or the tie counting of ``reduce_max``'s gradient.
    """
    return _conv_relu_max_pool_fwd(chunk, x, kernel, bias)[0]


def _conv_relu_max_pool_fwd(chunk, x, kernel, bias):
    k, _, c, f = kernel.shape

    def forward(x):
        return _relu_max_pool(_patches(x, k) @ kernel.reshape(k * k * c, f) + bias), ()

    (out, position), _ = _over_chunks(forward, chunk, x)
    return out, (x, kernel, position)


def _conv_relu_max_pool_bwd(chunk, residuals, g):
    x, kernel, position = residuals
    k, _, c, f = kernel.shape

    def backward(x, position, g):
        dy = _relu_max_pool_transpose(g, position, x.shape[:3] + (f,))
        # dy^T @ patches rather than patches^T @ dy: XLA CPU then skips transposing the patches (step 5-30% faster)
        dkernel = (dy.reshape(-1, f).T @ _patches(x, k).reshape(-1, k * k * c)).T.reshape(kernel.shape)
        dx = _patches_transpose(dy @ kernel.reshape(k * k * c, f).T, k)
        return dx, (dkernel, dy.sum((0, 1, 2)))

    dx, (dkernel, dbias) = _over_chunks(backward, chunk, x, position, g)
    return dx, dkernel, dbias


conv_relu_max_pool.defvjp(_conv_relu_max_pool_fwd, _conv_relu_max_pool_bwd)


class PatchConvPool(nn.Module):
    """Stride-1 'same' k x k convolution -> ReLU -> 2x2 max-pool, as one layer (:func:`conv_relu_max_pool`).

    The same parameters (``kernel`` (k, k, in, out), ``bias``) and values as :func:`conv` with
    ``use_bias=True`` followed by ``nn.relu`` and ``nn.max_pool``. XLA CPU runs convolutions inside a
    scanned training epoch at ~1% of its matmul rate, so the convolution is an im2col GEMM; on CPU the
    batch goes through in :data:`CPU_CHUNK`-example chunks, which keeps the patches in cache.
    """

    features: int
    kernel: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c = self.kernel, x.shape[-1]
        kernel = self.param("kernel", torch_init, (k, k, c, self.features), jnp.float32)
        bias = self.param("bias", torch_bias_init(k * k * c), (self.features,), jnp.float32)
        chunk = CPU_CHUNK if jax.default_backend() == "cpu" else max(x.shape[0], 1)
        return conv_relu_max_pool(chunk, x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype))


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
