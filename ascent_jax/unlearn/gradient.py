"""Loss-gradient methods: gradient ascent (GA), gradient descent/ascent (GDA), fine-tuning (GD).

Optimiser default: SGD with momentum 0.9 and no weight decay, as the datamodel-matching authors'
released GA/GD baselines run them (issue #15's reading of their code); the public KLoM benchmark
("Ascent Fails to Forget", App. M) passes only the learning rate to plain SGD, the ``benchmark``
grid preset. Grids: App. M (GA, GDA) and the datamodel-matching paper's App. D.4 (fine-tune).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ascent_jax.unlearn import base
from ascent_jax.unlearn.optimizers import PLAIN_SGD, Optimizer

AUTHORS_OPTIMIZER = Optimizer("sgd", momentum=0.9)


@dataclasses.dataclass(frozen=True)
class GradientAscentConfig(base.MethodConfig):
    """GA: ascent on the forget set's cross-entropy, ``batch_size`` forget points a step."""

    lr: float
    epochs: int
    batch_size: int = 64
    optimizer: Optimizer = AUTHORS_OPTIMIZER


def gradient_ascent_epoch(state, data, key, epoch_index, cfg: GradientAscentConfig):
    """One ascent pass over the forget set's cross-entropy."""
    state, forget_loss = base.ascent_pass(state, data, key, epoch_index, cfg.batch_size)
    return state, {"forget_loss": forget_loss}


@dataclasses.dataclass(frozen=True)
class GradientDescentAscentConfig(base.MethodConfig):
    """GDA: each epoch an ascent pass over the forget set (first ``ascent_epochs`` epochs only),
    then a descent pass over the retain set."""

    lr: float
    epochs: int
    ascent_epochs: int
    forget_batch_size: int = 64
    retain_batch_size: int = 64
    optimizer: Optimizer = AUTHORS_OPTIMIZER


def _maybe_ascent(state, data, key, epoch_index, active, batch_size):
    """An ascent pass when ``active`` (traced), else the state unchanged and a forget loss of 0."""
    return jax.lax.cond(active, lambda s: base.ascent_pass(s, data, key, epoch_index, batch_size),
                        lambda s: (s, jnp.float32(0.0)), state)


def gradient_descent_ascent_epoch(state, data, key, epoch_index, cfg: GradientDescentAscentConfig):
    """An ascent pass over the forget set (first ``ascent_epochs`` epochs), then a descent pass over the retain set.

    ``forget_loss`` is the mean forget cross-entropy of the ascent pass, 0 in epochs without one.
    """
    state, forget_loss = _maybe_ascent(state, data, key, epoch_index, epoch_index < cfg.ascent_epochs,
                                       cfg.forget_batch_size)
    state, retain_loss = base.descent_pass(state, data, key, epoch_index, cfg.retain_batch_size)
    return state, {"forget_loss": forget_loss, "retain_loss": retain_loss}


@dataclasses.dataclass(frozen=True)
class FineTuneConfig(base.MethodConfig):
    """GD ("fine-tune"): descent on the retain set only."""

    lr: float
    epochs: int
    batch_size: int = 64
    optimizer: Optimizer = AUTHORS_OPTIMIZER


def fine_tune_epoch(state, data, key, epoch_index, cfg: FineTuneConfig):
    """One descent pass over the retain set (the same pass GDA ends its epochs with)."""
    state, retain_loss = base.descent_pass(state, data, key, epoch_index, cfg.batch_size)
    return state, {"retain_loss": retain_loss}


def descent_ascent_cost(cfg, num_forget: int, num_retain: int) -> int:
    """Example-gradients of GDA-shaped methods: ascent passes on the forget set plus descent on the retain set."""
    return min(cfg.ascent_epochs, cfg.epochs) * num_forget + cfg.epochs * num_retain


def benchmark(grid: dict) -> dict:
    """A grid run with plain SGD, as the public KLoM benchmark ran it."""
    return {**grid, "optimizer": (PLAIN_SGD,)}


_GA_PAPER = {"lr": (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 1e-2, 5e-2), "epochs": (1, 3, 5, 7, 10)}  # App. M
GDA_PAPER = {"lr": (5e-5, 5e-4, 1e-3, 5e-3), "epochs": (5, 7, 10), "ascent_epochs": (3, 5),
             "forget_batch_size": (32, 64)}  # App. M (also SCRUB's)
_FINETUNE_PAPER = {"lr": (1e-5, 1e-4, 1e-3, 1e-2), "epochs": (1, 3, 5, 7, 10)}  # datamodel-matching App. D.4

base.register("ga", GradientAscentConfig, gradient_ascent_epoch, cost=lambda cfg, f, r: cfg.epochs * f, grids={
    "paper": _GA_PAPER,
    "benchmark": benchmark(_GA_PAPER),
    "cpu": {"lr": (1e-4, 1e-3, 5e-3, 1e-2), "epochs": (1, 3, 5, 10)},
    "main": {"lr": (1e-3, 5e-3, 1e-2), "epochs": (1, 3, 5)},
    "quick": {"lr": (1e-3, 1e-2), "epochs": (1, 3, 5)},
})
base.register("gda", GradientDescentAscentConfig, gradient_descent_ascent_epoch, cost=descent_ascent_cost, grids={
    "paper": GDA_PAPER,
    "benchmark": benchmark(GDA_PAPER),
    "cpu": {"lr": (1e-4, 5e-4, 1e-3), "epochs": (5, 10), "ascent_epochs": (3, 5)},
    "main": {"lr": (1e-3,), "epochs": (3, 5), "ascent_epochs": (3,)},
    "quick": {"lr": (1e-3,), "epochs": (3, 5), "ascent_epochs": (3,)},
})
base.register("finetune", FineTuneConfig, fine_tune_epoch, cost=lambda cfg, f, r: cfg.epochs * r, grids={
    "paper": _FINETUNE_PAPER,
    "benchmark": benchmark(_FINETUNE_PAPER),
    "cpu": {"lr": (1e-5, 1e-4, 1e-3), "epochs": (1, 3, 5, 10)},
    "quick": {"lr": (1e-3,), "epochs": (1, 3, 5)},
})
