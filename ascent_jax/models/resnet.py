"""ResNet-9 (the DAWNBench/airbench network of the papers) and torchvision's ResNet-18."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ascent_jax.models.layers import batch_norm, conv, dense, example_mask, max_pool_2x2


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm -> ReLU."""

    features: int
    kernel: int = 3
    stride: int = 1
    padding: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        x = conv(self.features, self.kernel, self.stride, self.padding, dtype=self.dtype)(x)
        x = batch_norm(train, self.dtype)(x, mask=example_mask(mask, x) if train else None)
        return nn.relu(x)


class ResNet9(nn.Module):
    """ResNet-9 exactly as the unlearning benchmarks use it.

    conv-BN-ReLU 64 (3x3); 128 (5x5, stride 2, pad 2); residual[128, 128]; 256 (3x3);
    max-pool 2; residual[256, 256]; 128 (3x3, pad 0); global max-pool; linear (no bias);
    output x 0.2.
    """

    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        block = lambda f, **kw: ConvBN(f, dtype=self.dtype, **kw)  # noqa: E731
        x = block(64)(x, train, mask)
        x = block(128, kernel=5, stride=2, padding=2)(x, train, mask)
        x = x + block(128)(block(128)(x, train, mask), train, mask)
        x = block(256)(x, train, mask)
        x = max_pool_2x2(x)
        x = x + block(256)(block(256)(x, train, mask), train, mask)
        x = block(128, padding=0)(x, train, mask)
        x = jnp.max(x, axis=(1, 2))
        x = dense(self.num_classes, 128, use_bias=False, dtype=self.dtype)(x)
        return x * 0.2


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 conv-BN, identity or 1x1 conv-BN shortcut."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        bn_mask = example_mask(mask, x) if train else None
        y = conv(self.features, 3, self.stride, dtype=self.dtype)(x)
        y = nn.relu(batch_norm(train, self.dtype)(y, mask=_resize(bn_mask, y)))
        y = conv(self.features, 3, dtype=self.dtype)(y)
        y = batch_norm(train, self.dtype)(y, mask=_resize(bn_mask, y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = conv(self.features, 1, self.stride, padding=0, dtype=self.dtype)(x)
            x = batch_norm(train, self.dtype)(x, mask=_resize(bn_mask, x))
        return nn.relu(x + y)


def _resize(mask, like):
    """Re-broadcast an example mask to the shape of another activation."""
    return None if mask is None else jnp.broadcast_to(mask[:, :1, :1, :1], like.shape)


class ResNet18(nn.Module):
    """ResNet-18 as torchvision builds it.

    ``stem="imagenet"`` (default, what the public benchmark uses): 7x7 stride-2 conv + 3x3
    stride-2 max-pool. ``stem="cifar"``: a single 3x3 stride-1 conv and no max-pool.
    """

    num_classes: int = 10
    stem: str = "imagenet"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if self.stem == "imagenet":
            x = conv(64, 7, 2, padding=3, dtype=self.dtype)(x)
        else:
            x = conv(64, 3, dtype=self.dtype)(x)
        x = nn.relu(batch_norm(train, self.dtype)(x, mask=example_mask(mask, x) if train else None))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, features in enumerate((64, 128, 256, 512)):
            for index in range(2):
                stride = 2 if stage > 0 and index == 0 else 1
                x = BasicBlock(features, stride, dtype=self.dtype)(x, train, mask)
        x = jnp.mean(x, axis=(1, 2))
        return dense(self.num_classes, 512, dtype=self.dtype)(x)
