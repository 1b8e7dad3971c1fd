"""The ensemble boundary: vmap single-model functions over a model-seed axis, jit, chunk, resume.

Training and unlearning code is written for ONE model:

* ``init(member_key, member_input) -> state``
* ``epoch(state, shared, member_input, member_key, epoch_index) -> (state, metrics)``

:func:`run` vmaps both over members (``member_input`` and the keys carry the member axis,
``shared`` -- typically the data set on device -- does not), jits the epoch once, runs the
members in chunks that fit memory, places each chunk on the device mesh (the one sharding
boundary, :mod:`ascent_jax.sharding`), checkpoints every epoch and resumes from the last
checkpoint. Member ``i``'s randomness is ``fold_in(key(seed), i)``, so its result does not
depend on the ensemble size, the chunking or the number of devices.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ascent_jax import checkpoint, sharding


class EnsembleResult(NamedTuple):
    """Final per-member states (numpy, leading member axis) and per-epoch metrics ``(epochs, K)``."""

    states: Any
    metrics: dict[str, np.ndarray]


def member_keys(seed: int, members: np.ndarray) -> jax.Array:
    """PRNG key of each member: ``fold_in(key(seed), i)`` -- independent of ensemble size."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(members, jnp.uint32))


def fingerprint(config: Any) -> str:
    """A short stable hash of a JSON-able description of a run, to refuse mixing runs."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def digest(array: np.ndarray) -> str:
    """A short content hash of an array (data sets, subsets) for run fingerprints."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


LAYOUTS = ("vmap", "map")


def resolve_layout(layout: str) -> str:
    """``"auto"`` -> ``"map"`` on CPU (plain GEMMs win there, see benchmarks/results), else ``"vmap"``."""
    if layout == "auto":
        return "map" if jax.default_backend() == "cpu" else "vmap"
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be auto or one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


@functools.cache
def compiled(init: Callable, epoch: Callable, layout: str = "vmap"):
    """The jitted ensemble pair for single-model ``init``/``epoch`` (cached: compile once per pair).

    ``"vmap"`` batches the members' arithmetic (best on accelerators); ``"map"`` runs the
    single-model program once per member with ``lax.map`` inside the same jitted epoch, which
    keeps plain (unbatched) GEMMs -- faster on small CPUs, see benchmarks/results.
    """
    if layout == "vmap":
        per_member = jax.vmap(epoch, in_axes=(0, None, 0, 0, None))
    else:
        def per_member(states, shared, inputs, keys, index):
            return jax.lax.map(lambda args: epoch(args[0], shared, args[1], args[2], index), (states, inputs, keys))
    return jax.jit(jax.vmap(init)), jax.jit(per_member, donate_argnums=0)


def _take(tree: Any, index: np.ndarray) -> Any:
    return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[index], tree)


def run(
    init: Callable,
    epoch: Callable,
    *,
    seed: int,
    num_members: int,
    epochs: int,
    first_member: int = 0,
    shared: Any = None,
    member_inputs: Any = None,
    chunk_size: int | None = None,
    checkpoint_dir: str | Path | None = None,
    config: Any = None,
    on_epoch: Callable[[np.ndarray, int, Any, dict], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    desc: str = "ensemble",
    progress: bool = True,
    layout: str = "auto",
) -> EnsembleResult:
    """Run ``epochs`` epochs of ``epoch`` for members ``first_member .. first_member+num_members-1``.

    ``on_epoch(members, epoch_done, states, metrics)`` is called after every epoch (for
    snapshots); ``config`` (JSON-able) is fingerprinted into every checkpoint, and a checkpoint
    from another configuration is refused. Checkpoints are written to ``checkpoint_dir`` as
    ``members-FIRST-LAST.npz``; rerunning the same call resumes from them. ``layout`` picks
    how members are batched inside the jitted epoch (``"vmap"``, ``"map"`` or ``"auto"``, see
    :func:`compiled` and :func:`resolve_layout`).
    """
    if num_members <= 0:
        raise ValueError(f"ensemble size must be positive, got {num_members}")
    if epochs <= 0:
        raise ValueError(f"number of epochs must be positive, got {epochs}")
    chunk_size = min(chunk_size or num_members, num_members)
    tag = fingerprint({"config": config, "seed": seed, "epochs": epochs})
    vinit, vepoch = compiled(init, epoch, resolve_layout(layout))
    starts = range(0, num_members, chunk_size)
    bar = tqdm(total=len(starts) * epochs, desc=desc, disable=not progress, unit="epoch", dynamic_ncols=True)
    states, histories = [], []
    for start in starts:
        positions = sharding.pad_members(np.arange(start, min(start + chunk_size, num_members)), mesh)
        members = first_member + positions[: min(chunk_size, num_members - start)]
        keys = member_keys(seed, first_member + positions)
        inputs = _take(member_inputs, positions) if member_inputs is not None else np.zeros(len(positions))
        keys, inputs = sharding.place(mesh, (keys, inputs)) if mesh is not None else jax.device_put((keys, inputs))
        path = Path(checkpoint_dir) / f"members-{members[0]:04d}-{members[-1]:04d}.npz" if checkpoint_dir else None
        state = jax.eval_shape(vinit, keys, inputs)
        done, history = 0, {}
        if path is not None and path.exists():
            meta = checkpoint.read_meta(path)
            if meta.get("fingerprint") != tag:
                raise ValueError(f"checkpoint {path} was written by a different configuration; "
                                 f"use another output directory or delete {path.parent} to start fresh")
            state, meta = checkpoint.load(path, state)
            state = sharding.place(mesh, state)
            done = meta["epoch"]
            history = {name: list(values) for name, values in meta["metrics"].items()}
            bar.update(done)
        else:
            state = vinit(keys, inputs)
        for index in range(done, epochs):
            state, metrics = vepoch(state, shared, inputs, keys, jnp.int32(index))
            metrics = {name: np.asarray(value)[: len(members)] for name, value in jax.device_get(metrics).items()}
            for name, value in metrics.items():
                history.setdefault(name, []).append(value.tolist())
            if on_epoch is not None:
                on_epoch(members, index + 1, jax.tree_util.tree_map(lambda leaf: leaf[: len(members)], state), metrics)
            if path is not None:
                checkpoint.save(path, state, {"fingerprint": tag, "epoch": index + 1, "metrics": history})
            bar.set_postfix({name: f"{np.mean(value):.3g}" for name, value in metrics.items()})
            bar.update(1)
        states.append(_take(jax.device_get(state), slice(0, len(members))))
        histories.append({name: np.asarray(values) for name, values in history.items()})
    bar.close()
    stacked = jax.tree_util.tree_map(lambda *leaves: np.concatenate(leaves), *states)
    metrics = {name: np.concatenate([h[name] for h in histories], axis=1) for name in histories[0]}
    return EnsembleResult(stacked, metrics)
