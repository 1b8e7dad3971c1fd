"""Pretraining (and oracle retraining): the papers' SGD recipe as a pure single-model step.

``train_step(state, batch)`` updates ONE model; ``make_epoch`` scans it over a shuffled
epoch inside one jitted program; :func:`train_ensemble` hands both to the ensemble engine
(:func:`ascent_jax.ensemble.run`), which runs them over members, chunks, shards and resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ascent_jax import batches, ensemble, klom
from ascent_jax.models import Model


def _is_count(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training recipe; defaults are "Ascent Fails to Forget"'s ResNet-9 CIFAR-10 recipe.

    SGD (momentum 0.9) with weight decay 5e-4 added to the gradient (PyTorch semantics), batch
    512, 24 epochs, learning rate linearly 0 -> ``peak_lr`` at ``peak_fraction`` of training
    (epoch 5 of 24) -> 0 at the end, interpolated per step. ``schedule="cosine"`` is the
    single-peak cosine of the datamodel-matching paper (App. D) with the same peak position.
    """

    epochs: int = 24
    batch_size: int = 512
    peak_lr: float = 0.4
    peak_fraction: float = 5 / 24
    schedule: str = "triangular"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    flip: bool = False
    crop_padding: int = 0
    drop_last: bool = False

    def __post_init__(self):
        checks = [
            (_is_count(self.epochs), f"epochs must be a positive integer, got {self.epochs!r}"),
            (_is_count(self.batch_size), f"batch_size must be a positive integer, got {self.batch_size!r}"),
            (math.isfinite(self.peak_lr) and self.peak_lr > 0, f"peak_lr must be a positive finite number, got {self.peak_lr}"),
            (0 < self.peak_fraction < 1, f"peak_fraction must lie in (0, 1), got {self.peak_fraction}"),
            (self.schedule in ("triangular", "cosine"), f"schedule must be 'triangular' or 'cosine', got {self.schedule!r}"),
            (0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be non-negative, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must lie in [0, 1), got {self.label_smoothing}"),
            (self.crop_padding >= 0, f"crop_padding must be non-negative, got {self.crop_padding}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def lr_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Per-step learning rate: 0 -> peak at ``peak_fraction`` of training -> 0."""
    total = config.epochs * steps_per_epoch
    warmup = max(1, round(config.peak_fraction * total))
    if config.schedule == "cosine":
        return optax.cosine_onecycle_schedule(total, config.peak_lr, pct_start=warmup / total,
                                              div_factor=1e9, final_div_factor=1e9)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.peak_lr, warmup),
         optax.linear_schedule(config.peak_lr, 0.0, max(1, total - warmup))],
        [warmup],
    )


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay, as ``torch.optim.SGD`` does it."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(lr_schedule(config, steps_per_epoch), momentum=config.momentum or None,
                  nesterov=config.nesterov),
    )


class TrainState(NamedTuple):
    """One model's training state: ``variables`` (params + batch stats) and optimiser state."""

    variables: dict
    opt_state: Any


def cross_entropy(logits: jax.Array, labels: jax.Array, valid: jax.Array, label_smoothing: float = 0.0):
    """Mean cross-entropy over the valid examples of a (possibly padded) batch."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def accuracy(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    """Fraction of valid examples whose arg-max logit is the label."""
    hits = (jnp.argmax(logits, -1) == labels) & valid
    return jnp.sum(hits) / jnp.maximum(jnp.sum(valid), 1)


def train_step(state: TrainState, batch: batches.Batch, *, model: Model, optimizer: optax.GradientTransformation,
               label_smoothing: float = 0.0) -> tuple[TrainState, dict]:
    """One SGD step of ONE model on ``batch``; pure: ``(state, batch) -> (state, metrics)``."""

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.variables["batch_stats"]}
        logits, batch_stats = model.apply(variables, batch.x, True, mask=batch.valid)
        return cross_entropy(logits, batch.y, batch.valid, label_smoothing), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.variables["params"])
    updates, opt_state = optimizer.update(grads, state.opt_state, state.variables["params"])
    params = optax.apply_updates(state.variables["params"], updates)
    new_state = TrainState({"params": params, "batch_stats": batch_stats}, opt_state)
    return new_state, {"loss": loss, "accuracy": accuracy(logits, batch.y, batch.valid)}


class Normalization(NamedTuple):
    """Per-channel mean and std applied to uint8 images scaled to [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


def make_batch(images, labels, indices, valid, key, config: TrainConfig, norm: Normalization) -> batches.Batch:
    """Gather a batch from the on-device data set, augment it and normalise it."""
    x = batches.augment(key, images[indices], flip=config.flip, crop_padding=config.crop_padding)
    return batches.Batch(batches.normalize(x, norm.mean, norm.std), labels[indices], valid)


@functools.cache
def make_epoch(model: Model, config: TrainConfig, norm: Normalization, num_points: int):
    """Build the single-model ``epoch(state, data, subset, key, epoch_index)`` for the ensemble runner.

    ``data = (images, labels)`` is the whole data set on device; ``subset`` the indices this
    member trains on. The shuffle of epoch ``e`` uses ``fold_in(fold_in(key, 1), e)``.
    Cached, so repeated runs of one recipe reuse the compiled program.
    """
    optimizer = make_optimizer(config, batches.steps_per_epoch(num_points, config.batch_size, config.drop_last))
    step = functools.partial(train_step, model=model, optimizer=optimizer, label_smoothing=config.label_smoothing)

    def epoch(state, data, subset, key, epoch_index):
        images, labels = data
        shuffle_key = jax.random.fold_in(jax.random.fold_in(key, 1), epoch_index)
        augment_key = jax.random.fold_in(jax.random.fold_in(key, 2), epoch_index)
        indices, valid = batches.epoch_batches(shuffle_key, subset, config.batch_size, config.drop_last)
        step_keys = jax.random.split(augment_key, indices.shape[0])

        def body(state, inputs):
            batch_indices, batch_valid, step_key = inputs
            return step(state, make_batch(images, labels, batch_indices, batch_valid, step_key, config, norm))

        state, metrics = jax.lax.scan(body, state, (indices, valid, step_keys))
        return state, jax.tree_util.tree_map(jnp.mean, metrics)

    return epoch


@functools.cache
def make_init(model: Model, config: TrainConfig, num_points: int, input_shape: tuple):
    """Build the single-model ``init(key, member_input) -> TrainState`` matching :func:`make_epoch`.

    The model is initialised with ``fold_in(key, 0)``; the optimiser state starts fresh.
    """
    optimizer = make_optimizer(config, batches.steps_per_epoch(num_points, config.batch_size, config.drop_last))

    def init(key, _member_input):
        variables = model.init(jax.random.fold_in(key, 0), input_shape)
        return TrainState(variables, optimizer.init(variables["params"]))

    return init


class DivergedError(RuntimeError):
    """Pretraining produced a non-finite loss; lower the learning rate."""


def train_ensemble(
    model: Model,
    config: TrainConfig,
    images: np.ndarray,
    labels: np.ndarray,
    norm: Normalization,
    options: ensemble.RunOptions = ensemble.RunOptions(),
    *,
    num_members: int,
    first_member: int = 0,
    subsets: np.ndarray | None = None,
    checkpoint_dir: str | Path | None = None,
    finalize: Callable[[Any], Any] | None = None,
    desc: str = "pretrain",
) -> ensemble.EnsembleResult:
    """Train members ``first_member ..``; member ``i`` uses key ``fold_in(key(options.seed), i)``.

    ``subsets`` (``(num_members, m)`` indices into ``images``) gives each member its own
    training subset -- oracles (retain set) and datamodel subsets use it; ``None`` trains
    every member on all of ``images``. Returns final variables stacked over members (numpy),
    or ``finalize(variables on the devices)`` of each chunk (see :func:`ascent_jax.ensemble.run`).
    """
    if not _is_count(num_members):
        raise ValueError(f"ensemble size must be positive, got {num_members!r}")
    if subsets is None:
        subsets = np.broadcast_to(np.arange(len(images)), (num_members, len(images)))
    subsets = np.asarray(subsets)
    if subsets.ndim != 2 or subsets.shape[0] != num_members:
        raise ValueError(f"subsets must have shape ({num_members}, points), got {subsets.shape}")
    if subsets.size and (subsets.min() < 0 or subsets.max() >= len(images)):
        raise ValueError(f"subset indices must lie in [0, {len(images)}), got {subsets.min()}..{subsets.max()}")
    epoch = make_epoch(model, config, norm, subsets.shape[1])
    init = make_init(model, config, subsets.shape[1], tuple(images.shape[1:]))

    def check_finite(members, epoch_done, _states, metrics):
        bad = ~np.isfinite(metrics["loss"])
        if bad.any():
            raise DivergedError(f"member(s) {members[bad].tolist()} reached a non-finite loss in epoch {epoch_done}; "
                                f"lower the learning rate (peak_lr={config.peak_lr})")

    run_config = {"model": model.name, "train": dataclasses.asdict(config), "norm": norm._asdict(),
                  "data": [list(images.shape), ensemble.digest(images), ensemble.digest(labels)], "subsets": ensemble.digest(subsets)}
    result = ensemble.run(
        init, epoch, options, num_members=num_members, first_member=first_member, epochs=config.epochs,
        shared=(np.asarray(images), np.asarray(labels)), member_inputs=subsets, checkpoint_dir=checkpoint_dir,
        config=run_config, on_epoch=check_finite, desc=desc,
        finalize=None if finalize is None else lambda states: finalize(states.variables),
    )
    return ensemble.EnsembleResult(result.states if finalize else result.states.variables, result.metrics)


@functools.cache
def logits_fn(model: Model, norm: Normalization):
    """Single-model eval-mode logits of a batch ``(uint8 images,)`` -- what :func:`predict` evaluates."""

    def logits(variables, batch):
        return model.apply(variables, batches.normalize(batch[0], norm.mean, norm.std), False)[0]

    return logits


@functools.cache
def margins_fn(model: Model, norm: Normalization):
    """Single-model eval-mode ``(margins, correct)`` of a batch ``(uint8 images, labels)``.

    ``correct``: the argmax is the label and the logits are finite.
    """

    def margins_and_correct(variables, batch):
        images, labels = batch
        logits = logits_fn(model, norm)(variables, (images,))
        correct = (jnp.argmax(logits, -1) == labels) & jnp.all(jnp.isfinite(logits), -1)
        return klom.margins(logits, labels), correct

    return margins_and_correct


def margin_evaluator(model: Model, norm: Normalization, images: np.ndarray, labels: np.ndarray,
                     options: ensemble.RunOptions = ensemble.RunOptions()) -> ensemble.Evaluator:
    """An evaluator ``stacked variables -> (margins (K, n), correct (K, n) bool)`` on ``images``.

    The images go to the devices once; call it on host variables, or its ``on_devices`` on a
    training chunk's variables where they are.
    """
    return ensemble.Evaluator(margins_fn(model, norm), (images, np.asarray(labels, np.int32)), options)


def predict(model: Model, variables: Any, images: np.ndarray, norm: Normalization,
            options: ensemble.RunOptions = ensemble.RunOptions()) -> np.ndarray:
    """Eval-mode logits ``(K, n, classes)`` of every member on every image, memory-bounded by the engine."""
    return ensemble.Evaluator(logits_fn(model, norm), (images,), options)(variables)
