"""The optimiser of an unlearning method, declared as data: a frozen spec that builds an optax transformation.

Each method config carries an ``optimizer: Optimizer`` field whose default is its authors' setting
(cited in the method's file); the public KLoM benchmark's plain SGD is :data:`PLAIN_SGD` (the
``benchmark`` grid preset). Semantics follow PyTorch, which the reference implementations use:

* ``weight_decay`` is coupled L2 (``g + wd * p`` before the update), as ``torch.optim.SGD`` and
  ``torch.optim.Adam`` apply it: ``optax.add_decayed_weights`` chained before the rule.
* SGD momentum is PyTorch's (no dampening, no Nesterov): ``optax.sgd(lr, momentum)``.
* Adam uses PyTorch's defaults (b1 0.9, b2 0.999, eps 1e-8), which are optax's.
* ``epoch_decay``: the learning rate is ``lr * epoch_decay ** epoch`` during epoch ``epoch``
  (0-based), ``torch.optim.lr_scheduler.ExponentialLR`` stepped once per epoch.

The learning rate lives in the optimiser state (``optax.inject_hyperparams``), so the driver sets
each epoch's rate purely and a method may scale it further (SCRUB's step decay).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

RULES = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optimiser spec: ``rule`` (sgd or adam), ``momentum`` (SGD only), ``weight_decay``, ``epoch_decay``."""

    rule: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    epoch_decay: float = 1.0

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"optimizer rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        for name, low, high in (("momentum", 0.0, 1.0), ("epoch_decay", 0.0, 1.0)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and (low <= value < high if name == "momentum" else low < value <= high)):
                bounds = "[0, 1)" if name == "momentum" else "(0, 1]"
                raise ValueError(f"optimizer {name} must lie in {bounds}, got {value!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ValueError(f"optimizer weight_decay must be a non-negative finite number, got {self.weight_decay!r}")
        if self.rule == "adam" and self.momentum:
            raise ValueError("optimizer momentum applies to sgd only; adam has its own moments")

    def build(self, lr: float) -> optax.GradientTransformation:
        """The optax transformation, its learning rate (initially ``lr``) kept in its state."""

        def make(learning_rate):
            rule = (optax.adam(learning_rate) if self.rule == "adam"
                    else optax.sgd(learning_rate, momentum=self.momentum or None))
            return optax.chain(optax.add_decayed_weights(self.weight_decay), rule) if self.weight_decay else rule

        return optax.inject_hyperparams(make)(learning_rate=lr)

    def epoch_learning_rate(self, lr: float, epoch_index: jax.Array) -> jax.Array:
        """The rate of epoch ``epoch_index`` (0-based): ``lr * epoch_decay ** epoch_index``."""
        return jnp.float32(lr) * jnp.float32(self.epoch_decay) ** jnp.asarray(epoch_index, jnp.float32)

    def describe(self) -> str:
        """A short label for tables, e.g. ``adam, decay 0.95/epoch`` or ``sgd, momentum 0.9, wd 0.0005``."""
        parts = [self.rule]
        if self.momentum:
            parts.append(f"momentum {self.momentum:g}")
        if self.weight_decay:
            parts.append(f"wd {self.weight_decay:g}")
        if self.epoch_decay != 1:
            parts.append(f"decay {self.epoch_decay:g}/epoch")
        return ", ".join(parts)


PLAIN_SGD = Optimizer()
"""The public KLoM benchmark's optimiser: ``torch.optim.SGD(params, lr)``, nothing else."""
