"""The ensemble engine: the one module that knows about the member axis.

Training, unlearning and evaluation code is written for ONE model:

* ``init(member_key, member_input) -> state``
* ``epoch(state, shared, member_input, member_key, epoch_index) -> (state, metrics)``
* ``evaluate(variables, batch) -> per-example outputs`` (a batch is a tuple of arrays)

The engine runs K members of it as one XLA program per chunk of members:

* **layout** -- ``vmap`` batches the members' arithmetic (accelerators); ``map`` runs the
  single-model program once per member with ``lax.map`` inside the same program (plain GEMMs,
  faster on small CPUs, see benchmarks/results); ``auto`` picks ``map`` on CPU.
* **sharding** -- with a mesh (:func:`device_mesh`) the member axis is split over its devices
  under ``jax.shard_map``: each device runs only its own members, with no cross-device
  collective and 1/D of the FLOPs (``tests/test_engine.py`` checks the compiled HLO). Chunks are
  padded to a multiple of the device count by repeating the last member, whose duplicates are
  dropped. Arrays are created sharded from host data on every process (multi-host safe) and
  gathered with ``process_allgather``.
* **chunking** -- ``chunk_size="auto"`` runs as many members at once as fit the device memory,
  from XLA's memory analysis of the compiled program (:func:`plan_training`); evaluation
  splits each device's members into groups the same way.
* **checkpoints** -- :class:`Store`, on orbax-checkpoint: asynchronous, atomic, sharded,
  every ``checkpoint_every`` epochs; a rerun of the same call resumes, a checkpoint of another
  configuration is refused. Every other cache of the project goes through the same store.

Member ``i``'s randomness is ``fold_in(key(seed), i)``, so its result does not depend on the
ensemble size, the chunking, the layout or the number of devices and processes. All run
options live in one frozen :class:`RunOptions`, so an option set once reaches every stage.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

AXIS = "members"
LAYOUTS = ("vmap", "map")
_MEMBERS, _REPLICATED = PartitionSpec(AXIS), PartitionSpec()

# Device memory where the backend reports no limit (CPU): half the machine's RAM, split over
# the local devices. Override with RunOptions(memory_limit=...).
CPU_MEMORY_FRACTION = 0.5


# --------------------------------------------------------------------------------------------
# Options


def _is_count(value: Any, minimum: int = 1) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How an ensemble runs, set once and read by every stage (pretraining, oracles, unlearning, evaluation).

    ``seed``: member ``i`` uses ``fold_in(key(seed), i)``. ``chunk_size``: members trained at
    once (``"auto"``: as many as fit ``memory_fraction`` of the device memory), always a
    multiple of the device count. ``layout``:
    ``"vmap"``, ``"map"`` or ``"auto"``. ``mesh``: split the member axis over these devices
    (``None``: the default device only). ``checkpoint_every``: epochs between checkpoints
    (the last epoch is always saved). ``memory_limit``: bytes per device for chunk sizing
    (``None``: what the device reports, or the CPU default :data:`CPU_MEMORY_FRACTION`).
    ``eval_batch_size``: images per evaluation step.
    """

    seed: int = 0
    chunk_size: int | str = "auto"
    layout: str = "auto"
    mesh: Mesh | None = None
    progress: bool = True
    checkpoint_every: int = 1
    memory_limit: int | None = None
    memory_fraction: float = 0.85
    eval_batch_size: int = 1024

    def __post_init__(self):
        checks = [
            (_is_count(self.seed, 0) and self.seed < 2**32,
             f"seed must be a whole number in [0, 2**32), got {self.seed!r}"),
            (self.chunk_size == "auto" or _is_count(self.chunk_size),
             f"chunk_size must be a positive integer or 'auto', got {self.chunk_size!r}"),
            (self.layout == "auto" or self.layout in LAYOUTS,
             f"layout must be auto or one of {', '.join(LAYOUTS)}, got {self.layout!r}"),
            (self.mesh is None or (isinstance(self.mesh, Mesh) and self.mesh.axis_names == (AXIS,)),
             f"mesh must be None or a 1-D Mesh with axis {AXIS!r} (see device_mesh()), got {self.mesh!r}"),
            (_is_count(self.checkpoint_every), f"checkpoint_every must be a positive integer, got {self.checkpoint_every!r}"),
            (self.memory_limit is None or _is_count(self.memory_limit),
             f"memory_limit must be None or a positive number of bytes, got {self.memory_limit!r}"),
            (0 < self.memory_fraction <= 1, f"memory_fraction must lie in (0, 1], got {self.memory_fraction!r}"),
            (_is_count(self.eval_batch_size), f"eval_batch_size must be a positive integer, got {self.eval_batch_size!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def replace(self, **changes: Any) -> RunOptions:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def resolved_layout(self) -> str:
        """``"auto"`` -> ``"map"`` on CPU (plain GEMMs win there, see benchmarks/results), else ``"vmap"``."""
        if self.layout == "auto":
            return "map" if jax.default_backend() == "cpu" else "vmap"
        return self.layout

    @property
    def num_shards(self) -> int:
        """Devices the member axis is split over."""
        return 1 if self.mesh is None else self.mesh.shape[AXIS]


def device_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named ``"members"`` over ``devices`` (default: every device of every process)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (AXIS,))


def default_mesh() -> Mesh | None:
    """Every device when there are several (of all processes), else ``None`` (no sharding)."""
    return device_mesh() if jax.device_count() > 1 else None


def initialize_distributed() -> None:
    """Join a multi-process run: ``jax.distributed.initialize()`` with its own cluster detection.

    On SLURM (one task per host, ``srun``) nothing else is needed; elsewhere set
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. CPU processes
    talk through gloo collectives.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes; GPUs use NCCL
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        jax.distributed.initialize(address, int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


def is_writer() -> bool:
    """Whether this process writes tables, reports and plots (process 0 of a multi-process run)."""
    return jax.process_index() == 0


def set_reproducible() -> None:
    """Reproducibility mode for accelerators: full-precision matmuls (no TF32) and deterministic GPU ops.

    Without it GPU results are equal across reruns only to float tolerance (TF32 matmuls and
    atomics in some reductions); on CPU every run is bit-identical either way. Must be called
    before the first computation (XLA flags are read when the backend starts).
    """
    jax.config.update("jax_default_matmul_precision", "highest")
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()


# --------------------------------------------------------------------------------------------
# Fingerprints


def fingerprint(config: Any) -> str:
    """A short stable hash of a JSON-able description of a run, to refuse mixing runs."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def digest(array: np.ndarray) -> str:
    """A short content hash of an array (data sets, subsets) for run fingerprints."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def tree_digest(tree: Any) -> str | None:
    """A short content hash of every leaf of a pytree (``None`` for ``None``)."""
    if tree is None:
        return None
    return fingerprint([digest(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(tree)])


# --------------------------------------------------------------------------------------------
# Placement and gathering


def _put(array: Any, sharding: Any) -> jax.Array:
    """A global array with ``sharding`` from host data every process holds (multi-host safe)."""
    if isinstance(array, jax.Array) and array.sharding == sharding:
        return array
    if isinstance(array, jax.Array) and array.is_fully_addressable:
        return jax.device_put(array, sharding)
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def place(tree: Any, options: RunOptions, *, split: bool) -> Any:
    """Put every leaf of ``tree`` on the devices: split along the member axis, or replicated."""
    if options.mesh is None:
        return jax.tree_util.tree_map(lambda leaf: leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf), tree)
    sharding = NamedSharding(options.mesh, _MEMBERS if split else _REPLICATED)
    return jax.tree_util.tree_map(lambda leaf: _put(leaf, sharding), tree)


def gather(tree: Any) -> Any:
    """Every leaf as a host numpy array holding all members (``process_allgather`` across processes)."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def pad_members(members: np.ndarray, shards: int) -> np.ndarray:
    """Repeat the last member so the chunk divides evenly over ``shards`` devices."""
    extra = -len(members) % shards
    return np.concatenate([members, np.repeat(members[-1:], extra)])


def _member_key(base: jax.Array, member: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(base), member)


def _take(tree: Any, index: Any) -> Any:
    return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[index], tree)


# --------------------------------------------------------------------------------------------
# Programs


def _over_members(fn: Callable, layout: str) -> Callable:
    """``fn`` of one member -> the same over a leading member axis of every argument."""
    if layout == "vmap":
        return jax.vmap(fn)
    return lambda *args: jax.lax.map(lambda member_args: fn(*member_args), args)


def _sharded(program: Callable, mesh: Mesh | None, in_specs: tuple, out_specs: Any) -> Callable:
    """``program`` run per device on its own members under ``shard_map`` (unchanged without a mesh)."""
    if mesh is None:
        return program
    return jax.shard_map(program, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


@functools.cache
def training_programs(init: Callable, epoch: Callable, layout: str = "vmap", mesh: Mesh | None = None):
    """The jitted ``(init_chunk, epoch_chunk)`` of single-model ``init``/``epoch`` (cached per pair).

    ``init_chunk(base_key, members, inputs) -> states`` and
    ``epoch_chunk(states, inputs, members, shared, base_key, epoch_index) -> (states, metrics)``,
    where ``base_key`` is ``key_data(key(seed))`` and ``members`` the member indices; member keys
    are derived inside the program, so they are created where their member lives.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)} (resolve 'auto' with RunOptions), got {layout!r}")

    def init_chunk(base, members, inputs):
        return _over_members(lambda member, member_input: init(_member_key(base, member), member_input), layout)(
            members, inputs)

    def epoch_chunk(states, inputs, members, shared, base, index):
        def one(state, member_input, member):
            return epoch(state, shared, member_input, _member_key(base, member), index)

        return _over_members(one, layout)(states, inputs, members)

    m, r = _MEMBERS, _REPLICATED
    return (jax.jit(_sharded(init_chunk, mesh, (r, m, m), m)),
            jax.jit(_sharded(epoch_chunk, mesh, (m, m, m, r, r, r), m), donate_argnums=0))


# --------------------------------------------------------------------------------------------
# Memory planning


class MemoryPlan(NamedTuple):
    """How many members run at once, and why: bytes are per device, from XLA's memory analysis."""

    bytes_per_member: int
    fixed_bytes: int
    limit_bytes: int
    chunk_size: int
    num_chunks: int

    def describe(self, what: str) -> str:
        return (f"{what}: {self.bytes_per_member / 2**20:.1f} MiB per member + {self.fixed_bytes / 2**20:.1f} MiB "
                f"shared per device, limit {self.limit_bytes / 2**30:.1f} GiB -> {self.chunk_size} members at once, "
                f"{self.num_chunks} chunk(s)")


def device_memory_limit(options: RunOptions) -> int:
    """Usable bytes per device: ``options.memory_limit``, else the device's own limit, else the CPU default.

    GPUs report the memory XLA may allocate (``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the device,
    0.75 by default); CPUs report none, so :data:`CPU_MEMORY_FRACTION` of the RAM is split
    over the local devices.
    """
    if options.memory_limit is not None:
        return int(options.memory_limit)
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(CPU_MEMORY_FRACTION * ram / jax.local_device_count())


def peak_bytes(compiled: Any) -> int:
    """Peak device bytes of a compiled program: arguments + outputs (not aliased) + temporaries."""
    analysis = compiled.memory_analysis()
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
               + analysis.temp_size_in_bytes)


def _abstract(tree: Any, members: int | None, sharding: Any) -> Any:
    """Shape structs of ``tree`` with the leading member axis resized to ``members`` (None: unchanged)."""

    def one(leaf):
        shape = np.shape(leaf) if members is None else (members, *np.shape(leaf)[1:])
        return jax.ShapeDtypeStruct(shape, jnp.result_type(leaf), sharding=sharding)

    return jax.tree_util.tree_map(one, tree)


def _line(measure: Callable[[int], int]) -> tuple[int, int]:
    """Bytes per member and fixed bytes per device from programs with 1 and 2 members per device."""
    one, two = measure(1), measure(2)
    return max(two - one, 1), max(2 * one - two, 0)


def _chunk_from(per_member: int, fixed: int, limit: int, fraction: float) -> int:
    """Members per device that fit ``fraction`` of ``limit`` (at least one)."""
    return max(1, int((fraction * limit - fixed) // per_member))


def plan_training(init: Callable, epoch: Callable, num_members: int, shared: Any, member_inputs: Any,
                  options: RunOptions) -> MemoryPlan:
    """The chunk size of a training run: from the compiled epoch at 1 and 2 members per device.

    Only shapes are used (``shared`` and ``member_inputs`` may be shape structs), so a plan
    can be printed before anything is loaded or trained.
    """
    shards = options.num_shards
    init_chunk, epoch_chunk = training_programs(init, epoch, options.resolved_layout, options.mesh)
    member_sharding, shared_sharding = _shardings(options)
    base = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shared_sharding)
    inputs = np.zeros(1) if member_inputs is None else member_inputs

    def measure(per_device: int) -> int:
        k = per_device * shards
        ids = jax.ShapeDtypeStruct((k,), jnp.uint32, sharding=member_sharding)
        inputs_k = _abstract(inputs, k, member_sharding)
        states = jax.eval_shape(init_chunk, base, ids, inputs_k)
        states = _abstract(states, None, member_sharding)
        args = (states, inputs_k, ids, _abstract(shared, None, shared_sharding), base, jnp.int32(0))
        return peak_bytes(epoch_chunk.lower(*args).compile())

    per_member, fixed = _line(measure)
    limit = device_memory_limit(options)
    if options.chunk_size == "auto":
        chunk = min(_chunk_from(per_member, fixed, limit, options.memory_fraction) * shards,
                    _round_up(num_members, shards))
    else:
        chunk = _explicit_chunk(options, num_members)
    return MemoryPlan(per_member, fixed, limit, chunk, math.ceil(num_members / chunk))


def _round_up(count: int, multiple: int) -> int:
    return count + (-count % multiple)


def _explicit_chunk(options: RunOptions, num_members: int) -> int:
    """A given chunk size, rounded up to a multiple of the device count (idle devices gain nothing)."""
    return min(_round_up(options.chunk_size, options.num_shards), _round_up(num_members, options.num_shards))


def _shardings(options: RunOptions) -> tuple[Any, Any]:
    if options.mesh is None:
        return None, None
    return NamedSharding(options.mesh, _MEMBERS), NamedSharding(options.mesh, _REPLICATED)


# --------------------------------------------------------------------------------------------
# Store: every checkpoint and cache, on orbax


class Store:
    """Fingerprinted entries under one folder, on orbax-checkpoint.

    An entry is a folder holding a pytree of arrays and a JSON ``meta`` with the fingerprint of
    what produced it. The one resume rule: an entry with the caller's fingerprint is reused, a
    missing one is computed, one with another fingerprint is refused ("use another output
    directory or delete it"), and an unreadable one is named so it can be deleted. Orbax writes
    to a temporary folder and renames it when complete, so a kill mid-write leaves no entry.
    In a multi-process run every process calls :meth:`save` (orbax writes each array once).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()  # orbax refuses relative paths

    def path(self, name: str) -> Path:
        return self.root / name

    def meta(self, name: str) -> dict | None:
        """The ``meta`` of entry ``name``, or ``None`` if there is none."""
        path = self.path(name) / "meta" / "metadata"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cache entry {self.path(name)} is unreadable ({error}); delete it and rerun") from None

    def check(self, name: str, tag: str) -> bool:
        """Whether entry ``name`` exists with fingerprint ``tag`` (raises if it has another)."""
        meta = self.meta(name)
        if meta is None:
            return False
        if meta.get("fingerprint") != tag:
            raise ValueError(f"{self.path(name)} was written by a different configuration; use another output "
                             f"directory or delete {self.path(name)} to start fresh")
        return True

    def load(self, name: str, tag: str) -> tuple[Any, dict] | None:
        """``(arrays as numpy, meta)`` of entry ``name`` if it has fingerprint ``tag``; ``None`` if missing."""
        if not self.check(name, tag):
            return None
        meta = self.meta(name)
        if not (self.path(name) / "arrays").exists():
            return None, meta
        try:
            arrays = ocp.StandardCheckpointer().restore(self.path(name) / "arrays")
        except Exception as error:  # noqa: BLE001 -- orbax raises many kinds on damaged files
            raise ValueError(f"cache entry {self.path(name)} cannot be read ({type(error).__name__}: "
                             f"{str(error)[:200]}); delete it and rerun") from None
        return arrays, meta

    def save(self, name: str, tag: str, arrays: Any = None, meta: dict | None = None) -> None:
        """Write entry ``name`` (replacing an older one) with fingerprint ``tag``; blocks until written."""
        path = self.path(name)
        tmp = path.with_name(f".{path.name}.partial")
        if is_writer():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _sync(f"store-save-{path}")
        if arrays is not None:
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(tmp / "arrays", arrays)
        if is_writer():
            (tmp / "meta").mkdir()
            _write_json(tmp / "meta" / "metadata", {**(meta or {}), "fingerprint": tag})
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        _sync(f"store-saved-{path}")

    def delete(self, name: str) -> None:
        if is_writer():
            shutil.rmtree(self.path(name), ignore_errors=True)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as handle:
        handle.write(json.dumps(value, sort_keys=True))
        handle.flush()
        os.fsync(handle.fileno())


class Checkpoints:
    """The training checkpoints of one chunk of members: an orbax ``CheckpointManager``.

    Saves asynchronously (the device keeps training while the host writes) every ``every``
    epochs and at the last; keeps only the latest; refuses a checkpoint of another fingerprint.
    """

    def __init__(self, directory: Path, tag: str, every: int, last: int):
        self.directory, self.tag, self.last = Path(directory).absolute(), tag, last  # orbax: absolute only
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=1, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def restore(self, like: Any) -> tuple[Any, int, dict] | None:
        """``(state, epochs done, metric history)`` of the latest checkpoint, or ``None``."""
        step = self.manager.latest_step()
        if step is None:
            return None
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"checkpoint {self.directory / str(step)} cannot be read ({type(error).__name__}); "
                             f"delete {self.directory} and rerun") from None
        if meta.get("fingerprint") != self.tag:
            raise ValueError(f"checkpoint {self.directory} was written by a different configuration; "
                             f"use another output directory or delete {self.directory} to start fresh")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like)))
        except Exception as error:  # noqa: BLE001 -- orbax raises many kinds on damaged files
            raise ValueError(f"checkpoint {self.directory / str(step)} cannot be read ({type(error).__name__}); "
                             f"delete {self.directory} and rerun") from None
        return restored.state, step, meta["metrics"]

    def save(self, epoch: int, state: Any, history: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave({"fingerprint": self.tag, "metrics": history}))
        self.manager.save(epoch, args=args, force=epoch == self.last)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def remove_partial(root: str | os.PathLike) -> None:
    """Delete what killed writes left under ``root``: store ``.NAME.partial`` folders and orbax's
    ``*.orbax-checkpoint-tmp-*`` ones (never while another process writes there)."""
    if not is_writer():
        return
    for stale in [*Path(root).rglob(".*.partial"), *Path(root).rglob("*.orbax-checkpoint-tmp*")]:
        shutil.rmtree(stale, ignore_errors=True)


def finished_epochs(checkpoint_dir: str | os.PathLike) -> list[int]:
    """Epochs done by each chunk checkpointed under ``checkpoint_dir`` (for looking at a running study)."""
    done = []
    for chunk in sorted(Path(checkpoint_dir).glob("members-*")):
        steps = [int(p.name) for p in chunk.iterdir() if p.name.isdigit()]
        done.append(max(steps, default=0))
    return done


# --------------------------------------------------------------------------------------------
# Training


class EnsembleResult(NamedTuple):
    """Final per-member states (or ``finalize``'s outputs; numpy, leading member axis) and per-epoch
    metrics ``(epochs, K)``."""

    states: Any
    metrics: dict[str, np.ndarray]


def run(init: Callable, epoch: Callable, options: RunOptions, *, num_members: int, epochs: int,
        first_member: int = 0, shared: Any = None, member_inputs: Any = None,
        checkpoint_dir: str | Path | None = None, config: Any = None,
        on_epoch: Callable[[np.ndarray, int, Any, dict], None] | None = None,
        finalize: Callable[[Any], Any] | None = None, desc: str = "ensemble") -> EnsembleResult:
    """Run ``epochs`` epochs of ``epoch`` for members ``first_member .. first_member+num_members-1``.

    ``member_inputs`` (leading axis ``num_members``) are split over members, ``shared`` is
    replicated. ``on_epoch(members, epochs_done, states, metrics)`` is called after every epoch
    with the chunk's states on the devices (padding members included; ``members`` names the
    real ones). ``config`` (JSON-able) is fingerprinted into every checkpoint; checkpoints go to
    ``checkpoint_dir/members-FIRST-LAST/`` and a rerun of the same call resumes from them.

    ``finalize(states) -> outputs`` (host arrays with a leading member axis, e.g. margins)
    keeps only what a finished chunk is for: its outputs replace the states in the result,
    are stored as ``checkpoint_dir/members-FIRST-LAST.outputs`` and the chunk's checkpoints
    are deleted, so thousands of models need the disk of one chunk.
    """
    if not _is_count(num_members):
        raise ValueError(f"ensemble size must be positive, got {num_members}")
    if not _is_count(epochs):
        raise ValueError(f"number of epochs must be positive, got {epochs}")
    layout = options.resolved_layout
    init_chunk, epoch_chunk = training_programs(init, epoch, layout, options.mesh)
    chunk_size = _training_chunk(init, epoch, num_members, shared, member_inputs, options)
    tag = fingerprint({"config": config, "seed": options.seed, "epochs": epochs})
    base = place(jax.random.key_data(jax.random.key(options.seed)), options, split=False)
    shared = place(shared, options, split=False)
    starts = range(0, num_members, chunk_size)
    bar = tqdm(total=len(starts) * epochs, desc=desc, disable=not options.progress or not is_writer(), unit="epoch",
               dynamic_ncols=True)
    states, histories = [], []
    for start in starts:
        positions = pad_members(np.arange(start, min(start + chunk_size, num_members)), options.num_shards)
        real = min(chunk_size, num_members - start)
        members = first_member + positions[:real]
        ids = place(np.asarray(first_member + positions, np.uint32), options, split=True)
        inputs = place(_take(member_inputs, positions) if member_inputs is not None else np.zeros(len(positions)),
                       options, split=True)
        name = f"members-{members[0]:04d}-{members[-1]:04d}"
        if finalize is not None and checkpoint_dir is not None:
            finished = Store(checkpoint_dir).load(f"{name}.outputs", tag)
            if finished is not None:
                states.append(finished[0])
                histories.append({key: np.asarray(values) for key, values in finished[1]["metrics"].items()})
                bar.update(epochs)
                continue
        state = init_chunk(base, ids, inputs)
        done, history, store = 0, {}, None
        if checkpoint_dir is not None:
            store = Checkpoints(Path(checkpoint_dir) / name, tag, options.checkpoint_every, epochs)
            restored = store.restore(state)
            if restored is not None:
                state, done, history = restored
                bar.update(done)
        try:
            for index in range(done, epochs):
                state, metrics = epoch_chunk(state, inputs, ids, shared, base, jnp.int32(index))
                metrics = {name: value[:real] for name, value in gather(metrics).items()}
                history = history_with(history, metrics)
                if on_epoch is not None:  # first: what it writes (snapshots) must exist before the checkpoint
                    on_epoch(members, index + 1, state, metrics)
                if store is not None:
                    store.save(index + 1, state, history)
                bar.set_postfix({name: f"{np.mean(value):.3g}" for name, value in metrics.items()})
                bar.update(1)
        finally:  # also on an exception (Ctrl-C): let the pending asynchronous save finish
            if store is not None:
                store.close()
        if finalize is None:
            states.append(_take(gather(state), slice(0, real)))
        else:
            outputs = _take(finalize(state), slice(0, real))
            if checkpoint_dir is not None:
                Store(checkpoint_dir).save(f"{name}.outputs", tag, outputs, {"metrics": history})
                Store(checkpoint_dir).delete(name)
            states.append(outputs)
        histories.append({name: np.asarray(values) for name, values in history.items()})
    bar.close()
    stacked = jax.tree_util.tree_map(lambda *leaves: np.concatenate(leaves), *states)
    metrics = {name: np.concatenate([h[name] for h in histories], axis=1) for name in histories[0]}
    return EnsembleResult(stacked, metrics)


def history_with(history: dict, metrics: dict) -> dict:
    """The metric history (JSON-able lists per epoch) with one more epoch."""
    return {**history, **{name: [*history.get(name, []), np.asarray(value).tolist()] for name, value in metrics.items()}}


def _training_chunk(init, epoch, num_members, shared, member_inputs, options: RunOptions) -> int:
    if options.chunk_size != "auto":
        return _explicit_chunk(options, num_members)
    return plan_training(init, epoch, num_members, shared, member_inputs, options).chunk_size


# --------------------------------------------------------------------------------------------
# Evaluation


@functools.cache
def evaluation_program(fn: Callable, layout: str, group: int, mesh: Mesh | None):
    """Jitted ``(variables, batches) -> outputs (K, steps, batch, ...)`` of single-model ``fn(variables, batch)``.

    Each device evaluates its members ``group`` at a time (``vmap`` within a group, ``lax.map``
    over groups; ``map`` layout: one at a time), over the data's batches with ``lax.map``.
    """

    def per_device(variables, data):
        def one(member_variables):
            return jax.lax.map(lambda batch: fn(member_variables, batch), data)

        if layout == "map" or group == 1:
            return jax.lax.map(one, variables)
        local = jax.tree_util.tree_leaves(variables)[0].shape[0]
        grouped = jax.tree_util.tree_map(lambda leaf: leaf.reshape(local // group, group, *leaf.shape[1:]), variables)
        outputs = jax.lax.map(jax.vmap(one), grouped)
        return jax.tree_util.tree_map(lambda leaf: leaf.reshape(local, *leaf.shape[2:]), outputs)

    return jax.jit(_sharded(per_device, mesh, (_MEMBERS, _REPLICATED), _MEMBERS))


def _batched(arrays: tuple, batch_size: int) -> tuple[tuple, int]:
    """Host arrays ``(n, ...)`` -> ``(steps, batch, ...)`` zero-padded, and ``n``."""
    n = len(arrays[0])
    size = min(batch_size, n)
    steps = -(-n // size)
    pad = steps * size - n

    def one(array):
        array = np.asarray(array)
        return np.concatenate([array, np.zeros((pad, *array.shape[1:]), array.dtype)]).reshape(steps, size, *array.shape[1:])

    return tuple(one(a) for a in arrays), n


class Evaluator:
    """Single-model ``fn(variables, batch) -> per-example outputs`` over every member and every example.

    The data goes to the devices once (replicated); members are evaluated where they are (a
    training chunk on its devices) or placed from the host in chunks, each device running its
    members in groups sized to its memory.
    """

    def __init__(self, fn: Callable, arrays: tuple, options: RunOptions):
        self.fn, self.options = fn, options
        batched, self.num_examples = _batched(arrays, options.eval_batch_size)
        self.data = place(batched, options, split=False)
        self.groups: dict[Any, int] = {}

    def _group(self, variables: Any, local: int) -> int:
        """Members per device evaluated at once: the largest divisor of ``local`` that fits memory."""
        layout = self.options.resolved_layout
        if layout == "map":
            return 1
        key = (jax.tree_util.tree_structure(variables), local)
        if key not in self.groups:
            member_sharding, shared_sharding = _shardings(self.options)
            data = _abstract(self.data, None, shared_sharding)
            shards = self.options.num_shards

            def measure(group: int) -> int:
                abstract = _abstract(variables, group * shards, member_sharding)
                return peak_bytes(evaluation_program(self.fn, layout, group, self.options.mesh)
                                  .lower(abstract, data).compile())

            per_member, fixed = _line(measure)
            fits = _chunk_from(per_member, fixed, device_memory_limit(self.options), self.options.memory_fraction)
            self.groups[key] = max(g for g in range(1, local + 1) if local % g == 0 and g <= max(fits, 1))
        return self.groups[key]

    def on_devices(self, variables: Any) -> Any:
        """Outputs ``(K, n, ...)`` (numpy) of members already placed by :func:`run` (K a multiple of the shards)."""
        k = jax.tree_util.tree_leaves(variables)[0].shape[0]
        group = self._group(variables, k // self.options.num_shards)
        program = evaluation_program(self.fn, self.options.resolved_layout, group, self.options.mesh)
        outputs = gather(program(variables, self.data))
        return jax.tree_util.tree_map(lambda leaf: leaf.reshape(k, -1, *leaf.shape[3:])[:, : self.num_examples],
                                      outputs)

    def __call__(self, variables: Any) -> Any:
        """Outputs ``(K, n, ...)`` (numpy) of stacked host ``variables`` of K members."""
        k = jax.tree_util.tree_leaves(variables)[0].shape[0]
        chunk = _round_up(k, self.options.num_shards) if self.options.chunk_size == "auto" else \
            _explicit_chunk(self.options, k)
        results = []
        for start in range(0, k, chunk):
            positions = pad_members(np.arange(start, min(start + chunk, k)), self.options.num_shards)
            placed = place(_take(variables, positions), self.options, split=True)
            out = self.on_devices(placed)
            results.append(_take(out, slice(0, min(chunk, k - start))))
        return jax.tree_util.tree_map(lambda *leaves: np.concatenate(leaves), *results)
