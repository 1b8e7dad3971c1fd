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
import scipy.special

from ascent_jax import ensemble, train
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


def target_logits(model: Model, variables: Any, images: np.ndarray, norm: train.Normalization,
                  options: ensemble.RunOptions = ensemble.RunOptions()) -> np.ndarray:
    """Eval-mode logits ``(K, n, C)`` of target models on the training images, OM's ``targets``."""
    return train.predict(model, variables, images, norm, options)


def split_oracles(variables: Any, num_eval: int) -> tuple[Any, Any]:
    """Split 2N stacked oracles into (evaluation oracles 0..N-1, target oracles N..)."""
    total = jax.tree_util.tree_leaves(variables)[0].shape[0]
    if not 0 < num_eval < total:
        raise ValueError(f"need 0 < num_eval < {total} oracles so both groups are non-empty, got {num_eval}")
    head = jax.tree_util.tree_map(lambda leaf: leaf[:num_eval], variables)
    tail = jax.tree_util.tree_map(lambda leaf: leaf[num_eval:], variables)
    return head, tail


@dataclasses.dataclass(frozen=True)
class DatamodelMatchingConfig(OracleMatchingConfig):
    """DMM (datamodel-matching paper, Algorithm C.3): OM towards DM-direct's predictions, not an oracle's outputs."""


def datamodel_targets(pretrained_logits: np.ndarray, labels: np.ndarray, predicted_margins: np.ndarray) -> np.ndarray:
    """DMM targets from margin datamodels: each pretrained model's logits with the true class shifted.

    Our datamodels predict margins (Algorithm C.2 on margins, :func:`ascent_jax.datamodels.dm_direct_margins`),
    not the paper's per-class logits, so the target of point x is the pretrained logits with the
    true-class logit set to ``h(x) + logsumexp`` of the others: its margin is exactly ``h(x)``
    and the other classes are left as the pretrained model has them. Shapes ``(K, n, C)``,
    ``(n,)``, ``(K, n)`` -> ``(K, n, C)``.
    """
    logits = np.asarray(pretrained_logits, np.float32)
    labels = np.asarray(labels)
    predicted = np.asarray(predicted_margins, np.float32)
    if logits.ndim != 3 or predicted.shape != logits.shape[:2] or labels.shape != logits.shape[1:2]:
        raise ValueError(f"need logits (K, n, C), labels (n,) and predicted margins (K, n); got {logits.shape}, "
                         f"{labels.shape} and {predicted.shape}")
    others = scipy.special.logsumexp(np.where(np.arange(logits.shape[-1]) == labels[:, None], -np.inf, logits), axis=-1)
    targets = logits.copy()
    np.put_along_axis(targets, labels[None, :, None], (others + predicted)[..., None], axis=-1)
    return targets


def matching_cost(cfg: OracleMatchingConfig, num_forget: int, num_retain: int) -> int:
    """Example-gradients of OM/DMM: each epoch the forget set plus the retain sample."""
    return cfg.epochs * (num_forget + retain_sample_size(cfg, num_retain))


base.register("om", OracleMatchingConfig, oracle_matching_epoch, targets="oracles", cost=matching_cost)
base.register("dmm", DatamodelMatchingConfig, oracle_matching_epoch, targets="datamodels", cost=matching_cost)
