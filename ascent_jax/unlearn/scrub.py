"""SCRUB (Kurmanji et al., 2023): a student distilled away from its teacher on the forget set.

The student starts as a copy of the pretrained model (the teacher) and is the only model
optimised; the teacher is this replica's pretrained variables, read-only and in eval mode.
Each epoch: during the first ``ascent_epochs`` epochs a max-pass over the forget set that
maximises KL(teacher || student) at temperature T (scaled by T^2, as in knowledge
distillation), then a min-pass over the retain set minimising
``ce_weight * CE + kl_weight * KL``. The learning rate is multiplied by ``lr_decay`` after each
epoch in ``lr_decay_after`` (1-based; the reference decays after epochs 3, 5 and 9).

Defaults are the authors' wrapper (``unlearning_benchmarks/scrub.py``, as read in issue #15):
SGD with momentum 0.9 and weight decay 5e-4, forget batch 16, KL weight 0.1, CE weight 0.99,
T = 4. Without weight decay the first max-pass on a network without batch norm has an exactly
zero gradient (student = teacher); the decay moves the student first. The paper's beta = 0.999
is the weight of its SWA average, not momentum, and is not implemented.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ascent_jax import train
from ascent_jax.unlearn import base
from ascent_jax.unlearn.gradient import GDA_PAPER, benchmark, descent_ascent_cost
from ascent_jax.unlearn.optimizers import Optimizer

AUTHORS_OPTIMIZER = Optimizer("sgd", momentum=0.9, weight_decay=5e-4)


@dataclasses.dataclass(frozen=True)
class ScrubConfig(base.MethodConfig):
    """SCRUB hyper-parameters; defaults are the authors' (see the module doc)."""

    lr: float
    epochs: int
    ascent_epochs: int
    forget_batch_size: int = 16
    retain_batch_size: int = 64
    temperature: float = 4.0
    ce_weight: float = 0.99
    kl_weight: float = 0.1
    lr_decay: float = 0.1
    lr_decay_after: tuple[int, ...] = (3, 5, 9)
    optimizer: Optimizer = AUTHORS_OPTIMIZER

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"{name}: temperature must be a positive finite number, got {self.temperature!r}")
        for field in ("ce_weight", "kl_weight"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: {field} must be a non-negative finite number, got {value!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"{name}: lr_decay must lie in (0, 1], got {self.lr_decay!r}")
        after = self.lr_decay_after
        if not (isinstance(after, tuple) and all(base.is_integer(e) and e > 0 for e in after)):
            raise ValueError(f"{name}: lr_decay_after must be a tuple of positive integers, got {after!r}")


def distillation_kl(student_logits, teacher_logits, valid, temperature: float) -> jax.Array:
    """Mean over valid examples of ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``."""
    teacher = jax.nn.log_softmax(teacher_logits / temperature)
    student = jax.nn.log_softmax(student_logits / temperature)
    per_example = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1) * temperature**2
    return jnp.sum(jnp.where(valid, per_example, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def scrub_learning_rate(cfg: ScrubConfig, epoch_index: jax.Array) -> jax.Array:
    """The optimiser's epoch rate times ``lr_decay ** (number of decay epochs already completed)``."""
    done = jnp.sum(epoch_index >= jnp.asarray(cfg.lr_decay_after, jnp.int32))
    return cfg.optimizer.epoch_learning_rate(cfg.lr, epoch_index) * jnp.float32(cfg.lr_decay) ** done


def scrub_epoch(state, data, key, epoch_index, cfg: ScrubConfig):
    """A max-pass away from the teacher on the forget set (first ``ascent_epochs`` epochs), then a min-pass on the retain set.

    ``forget_kl`` is the max-pass's mean KL (0 in epochs without one).
    """
    state = base.set_learning_rate(state, scrub_learning_rate(cfg, epoch_index))

    def teacher_logits(batch):
        return jax.lax.stop_gradient(data.model.apply(data.pretrained, batch.x, False)[0])

    def away_from_teacher(logits, batch, _):
        return -distillation_kl(logits, teacher_logits(batch), batch.valid, cfg.temperature)

    def close_to_teacher(logits, batch, _):
        return (cfg.ce_weight * train.cross_entropy(logits, batch.y, batch.valid)
                + cfg.kl_weight * distillation_kl(logits, teacher_logits(batch), batch.valid, cfg.temperature))

    def max_pass(state):
        state, loss = base.run_pass(state, data, data.forget, base.stream_key(key, base.FORGET_STREAM, epoch_index),
                                    cfg.forget_batch_size, away_from_teacher)
        return state, -loss

    state, forget_kl = jax.lax.cond(epoch_index < cfg.ascent_epochs, max_pass, lambda s: (s, jnp.float32(0.0)), state)
    state, retain_loss = base.run_pass(state, data, data.retain, base.stream_key(key, base.RETAIN_STREAM, epoch_index),
                                       cfg.retain_batch_size, close_to_teacher)
    return state, {"forget_kl": forget_kl, "retain_loss": retain_loss, "lr": base.learning_rate(state)}


base.register("scrub", ScrubConfig, scrub_epoch, cost=descent_ascent_cost, grids={
    "paper": GDA_PAPER,  # App. M
    "benchmark": benchmark(GDA_PAPER),
    "cpu": {"lr": (5e-4, 1e-3, 5e-3), "epochs": (5, 10), "ascent_epochs": (3, 5)},
    "quick": {"lr": (1e-3,), "epochs": (3, 5), "ascent_epochs": (3,)},
})
