"""The unlearning interface, its building blocks and the shared ensemble driver.

A method is a frozen config dataclass (its hyper-parameters) plus a pure per-epoch function of
ONE model, registered by name::

    epoch(state, data, key, epoch_index, cfg) -> (state, metrics)

``state`` is a :class:`ascent_jax.train.TrainState`; ``data`` an :class:`UnlearnData` (the
training set on device, the forget and retain indices, this replica's pretrained variables and
targets); ``key`` the replica's PRNG key; ``metrics`` a dict of scalars. :func:`unlearn` hands
the function to the ensemble engine (:func:`ascent_jax.ensemble.run`), which runs it over
replicas, chunks, shards and checkpoints, and takes margin snapshots at a list of epoch counts.

Conventions shared by every built-in method:

* Optimiser: the config's ``optimizer`` (:class:`ascent_jax.unlearn.optimizers.Optimizer`), whose
  default is the method's authors' setting; the driver sets epoch ``e``'s learning rate to
  ``lr * epoch_decay ** e`` before the epoch runs (the rate lives in the optimiser state), and a
  method may scale it further, purely. ``gradient_step`` applies it; no method writes an update.
* Batch norm: train mode in every update step (batch statistics normalise, running averages
  are updated, as PyTorch's ``.train()``); eval mode (running averages) for margins and for
  frozen reference models such as SCRUB's teacher.
* Divergence is data: after every epoch the driver checks that the weights and every metric are
  finite; a replica that fails is marked ``diverged`` (with the first epoch that failed) and
  keeps running, so its margins (possibly NaN or +-inf) still reach KLoM.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ascent_jax import batches, ensemble, train
from ascent_jax.models import Model
from ascent_jax.unlearn.optimizers import PLAIN_SGD, Optimizer

# Stream ids folded into a replica's key, one per source of randomness, so streams never share
# draws; pretraining uses 0 (init), 1 (shuffle) and 2 (augmentation).
FORGET_STREAM, RETAIN_STREAM, SAMPLE_STREAM, MATCH_STREAM = 11, 12, 13, 14


# --------------------------------------------------------------------------------------------
# Configs


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class MethodConfig:
    """Base of method configs: checks the hyper-parameters every method names the same way.

    Subclass it with a ``@dataclasses.dataclass(frozen=True)``; ``__post_init__`` then raises
    ``ValueError`` for a field ``lr`` that is not a positive finite number, ``epochs`` or any
    ``*batch_size`` that is not a positive integer, any other ``*_epochs`` that is not a
    non-negative integer, and an ``optimizer`` that is not an :class:`Optimizer`. Override
    ``__post_init__`` (calling ``super()``) to add checks.
    """

    def __post_init__(self):
        for field in dataclasses.fields(self):
            name, value = field.name, getattr(self, field.name)
            if name == "lr":
                if not (isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
                        and math.isfinite(value) and value > 0):
                    raise ValueError(f"{type(self).__name__}: lr must be a positive finite number, got {value!r}")
            elif name == "epochs" or name.endswith("batch_size"):
                if not (is_integer(value) and value > 0):
                    raise ValueError(f"{type(self).__name__}: {name} must be a positive integer, got {value!r}")
            elif name.endswith("_epochs") and not (is_integer(value) and value >= 0):
                raise ValueError(f"{type(self).__name__}: {name} must be a non-negative integer, got {value!r}")
            elif name == "optimizer" and not isinstance(value, Optimizer):
                raise ValueError(f"{type(self).__name__}: optimizer must be an ascent_jax.unlearn.Optimizer, "
                                 f"got {value!r}")


# --------------------------------------------------------------------------------------------
# What one replica's epoch sees


class MemberInput(NamedTuple):
    """Per-replica inputs (leading replica axis, split by the ensemble runner)."""

    pretrained: Any  # variables of pretrained model i (SCRUB's teacher, everyone's start)
    targets: Any  # (n_train, C) target logits of replica i (oracle matching), or None


@dataclasses.dataclass(frozen=True)
class UnlearnData:
    """Everything one replica's epoch reads; built inside the traced epoch, never mutated.

    ``images``/``labels`` are the whole training set on device (uint8, int32), ``forget`` and
    ``retain`` index it; ``retain_pool`` is the part of ``retain`` that has targets (all of it
    unless ``unlearn(..., target_rows=)`` says otherwise), where matching methods sample;
    ``pretrained`` and ``targets`` are this replica's own inputs; ``optimizer`` is the config's
    transformation (``None`` for methods without one). In a method's ``init`` the images and
    labels are ``None`` (only shapes and indices are known).
    """

    model: Model
    norm: train.Normalization
    input_shape: tuple[int, ...]
    optimizer: optax.GradientTransformation | None
    images: Any
    labels: Any
    forget: Any
    retain: Any
    retain_pool: Any
    pretrained: Any
    targets: Any

    def batch(self, indices: jax.Array, valid: jax.Array) -> batches.Batch:
        """Gather and normalise a batch (no augmentation during unlearning)."""
        x = batches.normalize(self.images[indices], self.norm.mean, self.norm.std)
        return batches.Batch(x, self.labels[indices], valid)


# --------------------------------------------------------------------------------------------
# Optimiser and steps


def set_learning_rate(state: train.TrainState, lr: jax.Array) -> train.TrainState:
    """The state with the optimiser's learning rate replaced (for schedules on the epoch index)."""
    hyperparams = {**state.opt_state.hyperparams, "learning_rate": jnp.asarray(lr, jnp.float32)}
    return state._replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


def learning_rate(state: train.TrainState) -> jax.Array:
    """The optimiser's current learning rate."""
    return state.opt_state.hyperparams["learning_rate"]


def start_from_pretrained(key: jax.Array, data: UnlearnData, cfg: Any) -> train.TrainState:
    """Default ``init``: this replica's pretrained variables and a fresh state of the config's optimiser."""
    del key, cfg
    return train.TrainState(data.pretrained, data.optimizer.init(data.pretrained["params"]))


def gradient_step(state: train.TrainState, batch: batches.Batch, objective: Callable[[jax.Array], jax.Array],
                  model: Model, optimizer: optax.GradientTransformation) -> tuple[train.TrainState, jax.Array]:
    """One ``optimizer`` step of ONE model minimising ``objective(logits)``; batch norm in train mode.

    Returns the new state and the objective before the step. Pure.
    """
    params = state.variables["params"]

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.variables["batch_stats"]}
        logits, batch_stats = model.apply(variables, batch.x, True, mask=batch.valid)
        return objective(logits), batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)  # the rate comes from the state
    variables = {"params": optax.apply_updates(params, updates), "batch_stats": batch_stats}
    return train.TrainState(variables, opt_state), loss


def stream_key(key: jax.Array, stream: int, epoch_index: jax.Array) -> jax.Array:
    """The key of one source of randomness (``stream``) in one epoch."""
    return jax.random.fold_in(jax.random.fold_in(key, stream), epoch_index)


def run_pass(state: train.TrainState, data: UnlearnData, subset: jax.Array, key: jax.Array, batch_size: int,
             objective: Callable[[jax.Array, batches.Batch, jax.Array], jax.Array]):
    """One shuffled pass over ``subset`` in batches, an optimiser step on each; ``(state, mean objective)``.

    ``objective(logits, batch, indices)`` is minimised; ``indices`` are the batch's positions in
    the training set (to look up per-point targets). A subset smaller than ``batch_size`` forms
    one batch; the last batch is padded and masked.
    """
    indices, valid = batches.epoch_batches(key, subset, batch_size)

    def body(state, inputs):
        batch_indices, batch_valid = inputs
        batch = data.batch(batch_indices, batch_valid)
        return gradient_step(state, batch, lambda logits: objective(logits, batch, batch_indices), data.model,
                             data.optimizer)

    state, losses = jax.lax.scan(body, state, (indices, valid))
    return state, jnp.mean(losses)


def ascent_pass(state, data: UnlearnData, key, epoch_index, batch_size: int):
    """Gradient ascent on the forget set's cross-entropy; returns ``(state, mean forget CE)``."""
    state, loss = run_pass(state, data, data.forget, stream_key(key, FORGET_STREAM, epoch_index), batch_size,
                           lambda logits, batch, _: -train.cross_entropy(logits, batch.y, batch.valid))
    return state, -loss


def descent_pass(state, data: UnlearnData, key, epoch_index, batch_size: int):
    """Gradient descent on the retain set's cross-entropy; returns ``(state, mean retain CE)``."""
    return run_pass(state, data, data.retain, stream_key(key, RETAIN_STREAM, epoch_index), batch_size,
                    lambda logits, batch, _: train.cross_entropy(logits, batch.y, batch.valid))


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value in ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


# --------------------------------------------------------------------------------------------
# Registry


class Method(NamedTuple):
    """A registered method: everything about it, declared in its one file by one :func:`register` call.

    ``init(key, data, cfg) -> state`` (default: the pretrained model and a fresh optimiser state).
    ``from_scratch`` methods ignore the pretrained models and run under a seed derived from the
    user's (:func:`derived_seed`), so they never replay pretraining's keys. ``targets`` names
    where a method's per-replica target logits come from (one of :data:`TARGET_SOURCES`, or
    ``None``: it takes none); a study builds them from that source, never from the method's name;
    ``prepare_targets(cfg, targets) -> targets`` (optional) applies the config's convention to
    them (oracle matching's ``mean`` target). ``cost(cfg, num_forget, num_retain)`` counts the
    example-gradients one replica computes (``None``: unknown), for the papers' cost axis.
    ``grids`` maps a grid preset's name to this method's grid in it (``{field: values}``, see
    :mod:`ascent_jax.unlearn.grids`).
    """

    name: str
    config: type
    epoch: Callable
    init: Callable
    from_scratch: bool
    targets: str | None
    cost: Callable[[Any, int, int], float] | None
    grids: dict[str, dict[str, tuple]]
    prepare_targets: Callable[[Any, np.ndarray], np.ndarray] | None

    @property
    def needs_targets(self) -> bool:
        return self.targets is not None

    @property
    def summary(self) -> str:
        """The first line of the epoch function's docstring: what one epoch does."""
        return (self.epoch.__doc__ or "").strip().split("\n", 1)[0]


# Where target logits come from: retrained oracles (held out from KLoM's), DM-direct's predictions from
# margin datamodels (the true-class logit moved), or from per-class logit datamodels (the paper's DMM)
TARGET_SOURCES = ("oracles", "datamodels", "class_datamodels")


_METHODS: dict[str, Method] = {}


def register(name: str, config: type, epoch: Callable, *, init: Callable | None = None,
             from_scratch: bool = False, targets: str | None = None,
             cost: Callable[[Any, int, int], float] | None = None,
             grids: dict[str, dict[str, tuple]] | None = None,
             prepare_targets: Callable[[Any, np.ndarray], np.ndarray] | None = None) -> Method:
    """Register ``epoch`` (pure, one model) under ``name`` with its frozen config dataclass.

    ``targets``: the source of the per-replica target logits it matches (:data:`TARGET_SOURCES`),
    ``prepare_targets`` the config's convention applied to them. ``cost(cfg, num_forget,
    num_retain)``, optional, is the number of example-gradients one replica computes in a run of
    ``cfg`` (see :func:`relative_cost`). ``grids``: ``{preset: {field: values}}``, this method's
    grid in each preset it takes part in (a study offers the method under those presets).
    """
    if targets is not None and targets not in TARGET_SOURCES:
        raise ValueError(f"targets of method {name!r} must be one of {', '.join(TARGET_SOURCES)} or None, got "
                         f"{targets!r}")
    if not (dataclasses.is_dataclass(config) and isinstance(config, type) and config.__dataclass_params__.frozen):
        raise ValueError(f"config of method {name!r} must be a frozen dataclass type, got {config!r}")
    if name in _METHODS:
        raise ValueError(f"an unlearning method named {name!r} is already registered")
    if any(method.config is config for method in _METHODS.values()):
        raise ValueError(f"{config.__name__} is already the config of another method; give {name!r} its own class")
    fields = {field.name for field in dataclasses.fields(config)}
    for preset, grid in (grids or {}).items():
        unknown = sorted(set(grid) - fields)
        if unknown or not all(isinstance(values, tuple) and values for values in grid.values()):
            raise ValueError(f"grid {preset!r} of method {name!r} must map fields of {config.__name__} to non-empty "
                             f"tuples of values" + (f"; it names {', '.join(unknown)}" if unknown else ""))
    method = Method(name, config, epoch, init or start_from_pretrained, from_scratch, targets, cost,
                    dict(grids or {}), prepare_targets)
    _METHODS[name] = method
    return method


def names() -> tuple[str, ...]:
    """Names of the registered methods."""
    return tuple(_METHODS)


def get(name_or_config: str | Any) -> Method:
    """The registered method of a name or of a config instance."""
    if isinstance(name_or_config, str):
        if name_or_config not in _METHODS:
            raise ValueError(f"unknown unlearning method {name_or_config!r}; choose one of {', '.join(_METHODS)}")
        return _METHODS[name_or_config]
    for method in _METHODS.values():
        if type(name_or_config) is method.config:
            return method
    raise ValueError(f"{type(name_or_config).__name__} is not the config of a registered unlearning method "
                     f"(registered: {', '.join(_METHODS)}); call register() first")


def make(name: str, **hyperparameters: Any) -> Any:
    """A config of method ``name``, e.g. ``make("ga", lr=1e-3, epochs=5)``."""
    return get(name).config(**hyperparameters)


def relative_cost(config: Any, num_forget: int, num_retain: int, retrain_epochs: int) -> float:
    """Example-gradients of a run of ``config`` over those of retraining (``retrain_epochs`` x retain set).

    The papers' x-axis ("compute relative to full retraining"); NaN for a method registered
    without a ``cost``.
    """
    method = get(config)
    if method.cost is None:
        return float("nan")
    return float(method.cost(config, num_forget, num_retain)) / (retrain_epochs * num_retain)


def derived_seed(seed: int, purpose: str) -> int:
    """A 31-bit seed derived from ``(purpose, seed)`` by SHA-256, e.g. ``derived_seed(0, "retrain")``.

    Retraining runs under ``derived_seed(seed, "retrain")``, so oracles retrained with the seed
    the pretrained models were trained with still get independent initialisations and orders.
    """
    digest = hashlib.sha256(f"{purpose}:{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


# --------------------------------------------------------------------------------------------
# Driver


class UnlearnResult(NamedTuple):
    """Margins at every snapshot epoch and per-replica divergence.

    ``margins[e]`` is ``(K, n_eval)`` (train points in index order, then test points) after
    ``e`` epochs and ``correct[e]`` whether each point is classified correctly then (argmax
    equals the label and the logits are finite); ``metrics[name]`` is ``(epochs, K)``; ``diverged`` ``(K,)`` flags replicas whose
    loss or weights became non-finite, first in epoch ``diverged_epoch`` (1-based; -1 if never);
    ``variables[e]`` holds stacked variables at the last snapshot ``e`` when asked for, else ``None``.
    """

    margins: dict[int, np.ndarray]
    metrics: dict[str, np.ndarray]
    diverged: np.ndarray
    diverged_epoch: np.ndarray
    variables: dict[int, Any] | None
    correct: dict[int, np.ndarray]

    def diverged_by(self, epoch: int) -> np.ndarray:
        """``(K,)`` replicas that had diverged within the first ``epoch`` epochs."""
        return self.diverged & (self.diverged_epoch <= epoch)


def _num_members(tree: Any) -> int:
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree_util.tree_leaves(tree)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError("pretrained variables must be stacked with one leading replica axis on every leaf, "
                         f"got leading sizes {sorted(map(str, sizes))}")
    return sizes.pop()


def split_indices(forget: Any, num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(forget, retain)`` int32 index arrays of a training set of ``num_points``."""
    forget = np.asarray(forget)
    if forget.ndim != 1 or forget.size == 0 or not np.issubdtype(forget.dtype, np.integer):
        raise ValueError(f"forget indices must be a non-empty 1-D integer array, got shape {forget.shape} "
                         f"and dtype {forget.dtype}")
    if forget.min() < 0 or forget.max() >= num_points:
        raise ValueError(f"forget indices must lie in [0, {num_points}), got {forget.min()}..{forget.max()}")
    if len(np.unique(forget)) != len(forget):
        raise ValueError("forget indices contain duplicates")
    if len(forget) == num_points:
        raise ValueError("the forget set covers the whole training set; nothing would be retained")
    return forget.astype(np.int32), batches.retain_indices(num_points, forget).astype(np.int32)


@functools.cache
def single_model(config: Any, model: Model, norm: train.Normalization, input_shape: tuple[int, ...],
                 num_forget: int, num_retain: int, num_pool: int | None = None):
    """The single-replica ``(init, epoch)`` that :func:`unlearn` hands to the ensemble runner.

    ``init(key, member_input)`` and ``epoch(state, shared, member_input, key, epoch_index)``
    follow :func:`ascent_jax.ensemble.run`, with ``shared = (images, labels, forget, retain,
    retain_pool)`` and ``member_input`` one replica's :class:`MemberInput`. ``init`` sees the
    index sets only as shapes (``jax.ShapeDtypeStruct``). The config's ``optimizer`` (plain SGD
    for a config with an ``lr`` and no ``optimizer``) is built once; the epoch first sets its rate
    to ``optimizer.epoch_learning_rate(lr, epoch_index)``. The epoch adds
    the metric ``nonfinite`` (weights or a metric not finite). Cached, so equal runs reuse the
    compiled program.
    """
    method = get(config)
    spec = getattr(config, "optimizer", PLAIN_SGD if hasattr(config, "lr") else None)
    optimizer = None if spec is None else spec.build(config.lr)
    placeholders = (None, None, *(jax.ShapeDtypeStruct((size,), jnp.int32)
                                  for size in (num_forget, num_retain, num_pool or num_retain)))

    def init(key, member):
        data = UnlearnData(model, norm, input_shape, optimizer, *placeholders, member.pretrained, member.targets)
        return method.init(key, data, config)

    def epoch(state, shared, member, key, epoch_index):
        data = UnlearnData(model, norm, input_shape, optimizer, *shared, member.pretrained, member.targets)
        if spec is not None:
            state = set_learning_rate(state, spec.epoch_learning_rate(config.lr, epoch_index))
        state, metrics = method.epoch(state, data, key, epoch_index, config)
        metrics = dict(metrics)
        metrics["nonfinite"] = ~(all_finite(state.variables) & all_finite(metrics))
        return state, metrics

    return init, epoch


class _Snapshots:
    """Margins and correctness of every replica at every snapshot epoch (optionally variables at the last).

    Each (chunk, epoch) snapshot is also saved in the store ``directory/snapshots`` when
    checkpointing, so snapshots taken before an interruption are read back after the resume.
    """

    def __init__(self, epochs, num_members, first_member, num_eval, keep_variables, directory, tag):
        self.margins = {e: np.full((num_members, num_eval), np.nan, np.float32) for e in epochs}
        self.correct = {e: np.zeros((num_members, num_eval), bool) for e in epochs}
        self.filled = {e: np.zeros(num_members, bool) for e in epochs}
        self.variables = {max(epochs): [None] * num_members} if keep_variables else None
        self.first_member, self.num_eval, self.tag = first_member, num_eval, tag
        self.store = None if directory is None else ensemble.Store(directory / "snapshots")

    @staticmethod
    def _name(epoch, members):
        return f"epoch-{epoch:04d}-members-{members[0]:04d}-{members[-1]:04d}"

    def _store(self, epoch, members, snapshot):
        rows = np.asarray(members) - self.first_member
        self.margins[epoch][rows] = snapshot["margins"]
        self.correct[epoch][rows] = snapshot["correct"]
        self.filled[epoch][rows] = True
        if self.variables is not None and epoch in self.variables:
            for position, row in enumerate(rows):
                self.variables[epoch][row] = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf[position]),
                                                                    snapshot["variables"])

    def take(self, epoch, members, variables, evaluator: ensemble.Evaluator):
        """Evaluate the chunk's ``variables`` (on the devices, padding members included)."""
        real = len(members)
        margins, correct = evaluator.on_devices(variables)
        snapshot = {"margins": margins[:real], "correct": correct[:real]}
        if self.variables is not None and epoch in self.variables:
            snapshot["variables"] = jax.tree_util.tree_map(lambda leaf: leaf[:real], ensemble.gather(variables))
        self._store(epoch, members, snapshot)
        if self.store is not None:
            self.store.save(self._name(epoch, members), self.tag, snapshot,
                            {"members": [int(members[0]), int(members[-1])], "epoch": epoch})

    def complete(self):
        """Read back the snapshots this process did not take; raise if any is missing."""
        for epoch, filled in self.filled.items():
            if not filled.all() and self.store is not None and self.store.root.exists():
                for path in sorted(self.store.root.glob(f"epoch-{epoch:04d}-members-*")):
                    meta = self.store.meta(path.name)
                    if meta is None or meta.get("fingerprint") != self.tag:
                        continue
                    rows = np.arange(meta["members"][0], meta["members"][1] + 1) - self.first_member
                    if rows.min() < 0 or rows.max() >= len(filled) or filled[rows].all():
                        continue
                    self._store(epoch, rows + self.first_member, self.store.load(path.name, self.tag)[0])
            if not filled.all():
                missing = (np.flatnonzero(~filled) + self.first_member).tolist()
                raise ValueError(f"the snapshot after epoch {epoch} of replicas {missing} is missing from "
                                 f"{self.store.root if self.store else 'this run'}; delete that directory to start fresh")
        if self.variables is None:
            return None
        return {e: jax.tree_util.tree_map(lambda *rows: np.stack(rows), *rows) for e, rows in self.variables.items()}


def unlearn(
    config: Any,
    model: Model,
    pretrained: Any,
    images: np.ndarray,
    labels: np.ndarray,
    norm: train.Normalization,
    forget: np.ndarray,
    options: ensemble.RunOptions = ensemble.RunOptions(),
    *,
    snapshot_epochs: Iterable[int] | None = None,
    test_images: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    target_rows: np.ndarray | None = None,
    num_members: int | None = None,
    first_member: int = 0,
    keep_variables: bool = False,
    checkpoint_dir: str | Path | None = None,
) -> UnlearnResult:
    """Run method ``config`` on every replica and return margin snapshots; see the module doc.

    ``pretrained``: stacked variables (numpy, leading replica axis K); replica i starts from
    row i. ``forget`` indexes ``images``. The run lasts ``config.epochs`` epochs; margins are
    taken after each epoch count in ``snapshot_epochs`` (default: the last) on the training
    images followed by ``test_images``, so one run serves every epoch count of a grid.
    ``targets`` ``(K, n_train, C)``: replica i's target logits (oracle matching), after the
    method's ``prepare_targets``; ``target_rows`` (optional) are the training indices where they are
    known (they must hold the forget set; matching methods then sample retain points only there,
    ``UnlearnData.retain_pool``, and other rows of ``targets`` are never read).
    Replica i is ensemble member ``first_member + i`` with key ``fold_in(key(options.seed), member)``
    (``from_scratch`` methods: ``derived_seed(options.seed, name)``), so a replica's result does
    not depend on K, the chunking or the devices. ``num_members`` is needed only without
    ``pretrained`` (retraining). ``checkpoint_dir``: checkpoints and snapshots; rerunning resumes.
    """
    method = get(config)
    try:
        hash(config)
    except TypeError:
        raise ValueError(f"{type(config).__name__} must be hashable (it keys the compiled program): "
                         "use tuples, not lists, in its fields") from None
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim < 2 or labels.shape != (len(images),):
        raise ValueError(f"images must be (n, ...) with labels (n,), got {images.shape} and {labels.shape}")
    if pretrained is None:
        if not method.from_scratch:
            raise ValueError(f"method {method.name!r} starts from the pretrained models; pass their stacked variables")
        if not (is_integer(num_members) and num_members > 0):
            raise ValueError(f"without pretrained models give num_members as a positive integer, got {num_members!r}")
    else:
        size = _num_members(pretrained)
        if num_members is not None and num_members != size:
            raise ValueError(f"num_members={num_members} disagrees with the {size} pretrained replicas")
        num_members = size
    if not (is_integer(first_member) and first_member >= 0):
        raise ValueError(f"first_member must be a non-negative integer, got {first_member!r}")
    if method.from_scratch:
        pretrained = None  # never needed on the device
    forget, retain = split_indices(forget, len(images))
    pool = retain
    if method.needs_targets:
        if targets is None:
            raise ValueError(f"method {method.name!r} needs targets: per-replica target logits (K, n_train, C)")
        targets = np.asarray(targets, np.float32)
        if targets.ndim != 3 or targets.shape[:2] != (num_members, len(images)):
            raise ValueError(f"targets must have shape ({num_members}, {len(images)}, classes), got {targets.shape}")
        if target_rows is not None:
            rows = np.unique(np.asarray(target_rows, np.int64))
            if rows.size == 0 or rows.min() < 0 or rows.max() >= len(images):
                raise ValueError(f"target_rows must be indices in [0, {len(images)}), got {np.asarray(target_rows)!r}")
            if not np.isin(forget, rows).all():
                raise ValueError("target_rows must contain every forget index (targets are matched on the forget set)")
            pool = retain[np.isin(retain, rows)]
            if pool.size == 0:
                raise ValueError("target_rows hold no retain point; matching needs targets on some retain points")
            targets = np.where(np.isin(np.arange(len(images)), rows)[None, :, None], targets, 0.0).astype(np.float32)
        if not np.isfinite(targets[:, np.concatenate([forget, pool])]).all():
            raise ValueError("targets contain non-finite values")
        if method.prepare_targets is not None:
            targets = np.asarray(method.prepare_targets(config, targets), np.float32)
    elif targets is not None or target_rows is not None:
        raise ValueError(f"method {method.name!r} takes no targets")
    epochs = config.epochs
    snapshots = sorted({int(e) for e in (snapshot_epochs if snapshot_epochs is not None else [epochs])})
    if not snapshots or snapshots[0] < 1 or snapshots[-1] > epochs:
        raise ValueError(f"snapshot epochs must be a non-empty subset of 1..{epochs} (the config's epochs), "
                         f"got {snapshot_epochs!r}")
    if (test_images is None) != (test_labels is None):
        raise ValueError("pass test_images and test_labels together")
    eval_images, eval_labels = images, labels
    if test_images is not None:
        eval_images = np.concatenate([images, np.asarray(test_images)])
        eval_labels = np.concatenate([labels, np.asarray(test_labels)])

    init, epoch = single_model(config, model, norm, tuple(images.shape[1:]), len(forget), len(retain), len(pool))
    run_options = options.replace(seed=derived_seed(options.seed, method.name)) if method.from_scratch else options
    run_config = {
        "method": method.name, "config": dataclasses.asdict(config), "model": model.name, "norm": norm._asdict(),
        "data": [list(images.shape), ensemble.digest(images), ensemble.digest(labels)],
        "forget": ensemble.digest(forget), "pool": ensemble.digest(pool), "pretrained": ensemble.tree_digest(pretrained),
        "targets": None if targets is None else ensemble.digest(targets),
        "eval": [ensemble.digest(eval_images), ensemble.digest(eval_labels)],
        "snapshots": snapshots, "keep_variables": keep_variables,
    }
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    tag = ensemble.fingerprint({"config": run_config, "seed": run_options.seed, "epochs": epochs, "first": first_member})
    store = _Snapshots(snapshots, num_members, first_member, len(eval_images), keep_variables, directory, tag)
    evaluator = train.margin_evaluator(model, norm, eval_images, eval_labels, options)

    def on_epoch(members, epoch_done, states, _metrics):
        if epoch_done in store.margins:
            store.take(epoch_done, members, states.variables, evaluator)

    result = ensemble.run(
        init, epoch, run_options, num_members=num_members, first_member=first_member, epochs=epochs,
        shared=(images, labels, forget, retain, pool), member_inputs=MemberInput(pretrained, targets),
        checkpoint_dir=directory, config=run_config, on_epoch=on_epoch, desc=method.name,
    )
    variables = store.complete()
    nonfinite = np.asarray(result.metrics["nonfinite"], bool)
    diverged = nonfinite.any(axis=0)
    diverged_epoch = np.where(diverged, nonfinite.argmax(axis=0) + 1, -1)
    return UnlearnResult(store.margins, result.metrics, diverged, diverged_epoch, variables, store.correct)
