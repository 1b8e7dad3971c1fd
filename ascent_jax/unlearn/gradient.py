"""Loss-gradient methods: gradient ascent (GA), gradient descent/ascent (GDA), fine-tuning (GD)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ascent_jax.unlearn import base


@dataclasses.dataclass(frozen=True)
class GradientAscentConfig(base.MethodConfig):
    """GA: SGD ascent on the forget set's cross-entropy, ``batch_size`` forget points a step."""

    lr: float
    epochs: int
    batch_size: int = 64


def gradient_ascent_epoch(state, data, key, epoch_index, cfg: GradientAscentConfig):
    """One ascent pass over the forget set."""
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


def _maybe_ascent(state, data, key, epoch_index, active, batch_size):
    """An ascent pass when ``active`` (traced), else the state unchanged and a forget loss of 0."""
    return jax.lax.cond(active, lambda s: base.ascent_pass(s, data, key, epoch_index, batch_size),
                        lambda s: (s, jnp.float32(0.0)), state)


def gradient_descent_ascent_epoch(state, data, key, epoch_index, cfg: GradientDescentAscentConfig):
    """Ascent on the forget set (while ``epoch_index < ascent_epochs``), then descent on the retain set.

    ``forget_loss`` is the mean forget cross-entropy of the ascent pass, 0 in epochs without one.
    """
    state, forget_loss = _maybe_ascent(state, data, key, epoch_index, epoch_index < cfg.ascent_epochs,
                                       cfg.forget_batch_size)
    state, retain_loss = base.descent_pass(state, data, key, epoch_index, cfg.retain_batch_size)
    return state, {"forget_loss": forget_loss, "retain_loss": retain_loss}


@dataclasses.dataclass(frozen=True)
class FineTuneConfig(base.MethodConfig):
    """GD ("fine-tune"): SGD descent on the retain set only."""

    lr: float
    epochs: int
    batch_size: int = 64


def fine_tune_epoch(state, data, key, epoch_index, cfg: FineTuneConfig):
    """One descent pass over the retain set (the same pass GDA ends its epochs with)."""
    state, retain_loss = base.descent_pass(state, data, key, epoch_index, cfg.batch_size)
    return state, {"retain_loss": retain_loss}


def descent_ascent_cost(cfg, num_forget: int, num_retain: int) -> int:
    """Example-gradients of GDA-shaped methods: ascent passes on the forget set plus descent on the retain set."""
    return min(cfg.ascent_epochs, cfg.epochs) * num_forget + cfg.epochs * num_retain


base.register("ga", GradientAscentConfig, gradient_ascent_epoch, cost=lambda cfg, f, r: cfg.epochs * f)
base.register("gda", GradientDescentAscentConfig, gradient_descent_ascent_epoch, cost=descent_ascent_cost)
base.register("finetune", FineTuneConfig, fine_tune_epoch, cost=lambda cfg, f, r: cfg.epochs * r)
