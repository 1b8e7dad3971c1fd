"""Oracle matching (OM; datamodel-matching paper, Sec. 4.2 and Algorithm C.1).

Each epoch the fine-tuning set is the whole forget set plus a fresh random sample of
``round(retain_fraction * |retain|)`` retain points; the model is fine-tuned (plain SGD) to
minimise the squared error between its logits and the targets on those points, averaged over
classes and examples (PyTorch's ``mse_loss``, what the public implementation uses).

Replica i matches targets[i] -- the logits of target oracle i, one model retrained without the
forget set -- so the unlearned ensemble can reproduce the oracle *distribution*. The target
oracles must not be the oracles KLoM evaluates against (that biases KLoM towards 0): retrain 2N
oracles, evaluate against members 0..N-1 and match members N..2N-1 (:func:`split_oracles`).
The targets are an argument: datamodel matching (DMM) is OM with simulated target logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ascent_jax import train
from ascent_jax.models import Model
from ascent_jax.unlearn import base


@dataclasses.dataclass(frozen=True)
class OracleMatchingConfig(base.MethodConfig):
    """OM hyper-parameters; ``retain_fraction`` >= 0.05 generalises (Fig. G.2 of the paper)."""

    lr: float
    epochs: int
    retain_fraction: float = 0.05
    batch_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.retain_fraction <= 1:
            raise ValueError(f"{type(self).__name__}: retain_fraction must lie in (0, 1], got {self.retain_fraction!r}")


def retain_sample_size(cfg: OracleMatchingConfig, num_retain: int) -> int:
    """Number of retain points sampled each epoch (at least one)."""
    return max(1, round(cfg.retain_fraction * num_retain))


def squared_error(logits, targets, valid) -> jax.Array:
    """Mean over valid examples of the per-class mean squared difference of logits."""
    per_example = jnp.mean((logits - targets) ** 2, axis=-1)
    return jnp.sum(jnp.where(valid, per_example, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def oracle_matching_epoch(state, data, key, epoch_index, cfg: OracleMatchingConfig):
    """Match ``data.targets`` on the forget set plus a fresh retain sample, one shuffled pass."""
    sample_key = base.stream_key(key, base.SAMPLE_STREAM, epoch_index)
    sample = jax.random.choice(sample_key, data.retain, (retain_sample_size(cfg, data.retain.shape[0]),), replace=False)
    subset = jnp.concatenate([data.forget, sample])

    def objective(logits, batch, indices):
        return squared_error(logits, data.targets[indices], batch.valid)

    state, loss = base.run_pass(state, data, subset, base.stream_key(key, base.MATCH_STREAM, epoch_index),
                                cfg.batch_size, objective)
    return state, {"matching_loss": loss}


def target_logits(model: Model, variables: Any, images: np.ndarray, norm: train.Normalization) -> np.ndarray:
    """Eval-mode logits ``(K, n, C)`` of target models on the training images, OM's ``targets``."""
    return train.predict(model, variables, images, norm)


def split_oracles(variables: Any, num_eval: int) -> tuple[Any, Any]:
    """Split 2N stacked oracles into (evaluation oracles 0..N-1, target oracles N..)."""
    total = jax.tree_util.tree_leaves(variables)[0].shape[0]
    if not 0 < num_eval < total:
        raise ValueError(f"need 0 < num_eval < {total} oracles so both groups are non-empty, got {num_eval}")
    head = jax.tree_util.tree_map(lambda leaf: leaf[:num_eval], variables)
    tail = jax.tree_util.tree_map(lambda leaf: leaf[num_eval:], variables)
    return head, tail


base.register("om", OracleMatchingConfig, oracle_matching_epoch, needs_targets=True)
