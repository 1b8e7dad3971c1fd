"""Reference points: do nothing (the pretrained model) and retraining on the retain set.

Retraining is the oracle: pretraining's recipe (:class:`ascent_jax.train.TrainConfig`, its
optimiser, schedule and augmentation, not the unlearning SGD) from a fresh initialisation on
the retain set only. Partial retraining -- the same schedule stopped after k of its epochs, the
cost/quality baseline of the datamodel-matching paper -- is the snapshot at epoch k of one run.
It runs under ``derived_seed(seed, "retrain")``, never under the pretraining seed itself.
"""

from __future__ import annotations

import dataclasses

from ascent_jax import train
from ascent_jax.unlearn import base


@dataclasses.dataclass(frozen=True)
class DoNothingConfig(base.MethodConfig):
    """The no-op baseline; every snapshot is the pretrained model."""

    epochs: int = 1


def do_nothing_init(key, data, cfg):
    """The pretrained model, no optimiser."""
    del key, cfg
    return train.TrainState(data.pretrained, ())


def do_nothing_epoch(state, data, key, epoch_index, cfg):
    """Nothing: every snapshot is the pretrained model."""
    return state, {}


@dataclasses.dataclass(frozen=True)
class RetrainConfig:
    """Retraining with the pretraining recipe ``train``; ``epochs`` is ``train.epochs``."""

    train: train.TrainConfig = train.TrainConfig()

    def __post_init__(self):
        if not isinstance(self.train, train.TrainConfig):
            raise ValueError(f"RetrainConfig.train must be a TrainConfig, got {type(self.train).__name__}")

    @property
    def epochs(self) -> int:
        return self.train.epochs


def retrain_init(key, data, cfg: RetrainConfig):
    """A fresh model exactly as :func:`ascent_jax.train.train_ensemble` initialises member ``key``."""
    return train.make_init(data.model, cfg.train, data.retain.shape[0], data.input_shape)(key, None)


def retrain_epoch(state, data, key, epoch_index, cfg: RetrainConfig):
    """One pretraining epoch on the retain set (shuffle and augmentation keys as pretraining's)."""
    epoch = train.make_epoch(data.model, cfg.train, data.norm, data.retain.shape[0])
    return epoch(state, (data.images, data.labels), data.retain, key, epoch_index)


base.register("do_nothing", DoNothingConfig, do_nothing_epoch, init=do_nothing_init, cost=lambda cfg, f, r: 0)
base.register("retrain", RetrainConfig, retrain_epoch, init=retrain_init, from_scratch=True,
              cost=lambda cfg, f, r: cfg.epochs * r)
