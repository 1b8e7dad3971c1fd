"""Pure-function image classifiers: ``build(name, num_classes)`` -> ``Model(init, apply)``.

Every model follows one functional contract, so training and unlearning code never
special-cases an architecture and never knows whether it runs inside an ensemble:

* ``init(key, input_shape) -> variables`` with ``variables = {"params": ..., "batch_stats": ...}``
  (``batch_stats`` is an empty dict for models without batch norm);
* ``apply(variables, x, train, mask=None) -> (logits, batch_stats)``. In train mode batch norm
  normalises with batch statistics (only the examples where ``mask`` is true count, so padded
  batches are exact) and the returned ``batch_stats`` are the updated running averages; in
  eval mode the running averages are used and returned unchanged.

``x`` is a float NHWC batch (already normalised); ``input_shape`` excludes the batch axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ascent_jax.models import resnet, small

Variables = dict[str, Any]


class Model(NamedTuple):
    """A classifier as two pure functions plus its name."""

    name: str
    init: Callable[[jax.Array, tuple[int, ...]], Variables]
    apply: Callable[..., tuple[jax.Array, Any]]


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "resnet9": resnet.ResNet9,
    "resnet18": resnet.ResNet18,
    "cnn": small.SmallCNN,
    "mlp": small.MLP,
    "mlp128": functools.partial(small.MLP, hidden=(128,)),  # half the width: the main job's N = 50 fits in minutes
}

NAMES = tuple(_FACTORIES)


@functools.cache
def build(name: str, num_classes: int, *, dtype: str = "float32", **options: Any) -> Model:
    """Return the pure ``init``/``apply`` pair of architecture ``name``.

    ``dtype`` is the compute dtype ("float32" or "bfloat16" for mixed precision on GPUs);
    parameters and batch statistics always stay float32. ``options`` are architecture
    specific (e.g. ``stem="cifar"`` for ResNet-18, ``hidden=(256,)`` for the MLP). Builds are
    cached, so equal arguments return the same functions and jitted code is reused.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(NAMES)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    module = _FACTORIES[name](num_classes=num_classes, dtype=jnp.dtype(dtype), **options)

    def init(key: jax.Array, input_shape: tuple[int, ...]) -> Variables:
        dummy = jnp.zeros((1, *input_shape), jnp.float32)
        variables = module.init(key, dummy, train=False)
        return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    def apply(variables: Variables, x: jax.Array, train: bool, mask: jax.Array | None = None):
        if not train:
            logits = module.apply(variables, x, train=False)
            return logits.astype(jnp.float32), variables["batch_stats"]
        logits, updates = module.apply(variables, x, train=True, mask=mask, mutable=["batch_stats"])
        return logits.astype(jnp.float32), updates.get("batch_stats", {})

    return Model(name, init, apply)


def count_params(variables: Variables) -> int:
    """Number of trainable parameters (batch statistics excluded)."""
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"]))
