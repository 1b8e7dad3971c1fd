"""The ensemble engine: member sharding that splits the work, chunks sized to memory, the orbax store.

The multi-device checks run in a subprocess with 4 forced CPU devices (XLA reads the flag
when the backend starts). They inspect the compiled programs themselves: the text of the
compiled HLO for cross-device collectives, XLA's cost analysis for per-device FLOPs.
"""

import json
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from ascent_jax import ensemble, models, train
from ascent_jax.ensemble import RunOptions

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")

FOUR_DEVICES = r"""
import json, os, re, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import chex, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from ascent_jax import data, ensemble, models, train
assert jax.device_count() == 4, jax.devices()
COLLECTIVES = %r
report = {}

def collectives(compiled):
    text = compiled.as_text()
    return {name: len(re.findall(rf"\b{name}(-start)?\(", text)) for name in COLLECTIVES}

def flops(compiled):
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])

def abstract(tree, sharding):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)

mesh = ensemble.device_mesh()
split, replicated = NamedSharding(mesh, P("members")), NamedSharding(mesh, P())
for name, shape in (("resnet9", (16, 16, 3)), ("cnn", (28, 28, 1))):
    model = models.build(name, 10)
    config = train.TrainConfig(epochs=1, batch_size=8)
    norm = train.Normalization((0.5,) * shape[-1], (0.25,) * shape[-1])
    init, epoch = train.make_init(model, config, 16, shape), train.make_epoch(model, config, norm, 16)
    k = 4
    base = jax.ShapeDtypeStruct((2,), jnp.uint32)
    ids = jax.ShapeDtypeStruct((k,), jnp.uint32)
    inputs = jax.ShapeDtypeStruct((k, 16), jnp.int32)
    shared = (jax.ShapeDtypeStruct((32, *shape), jnp.uint8), jax.ShapeDtypeStruct((32,), jnp.int32))
    for layout in ("vmap", "map"):
        entry = {}
        for label, where in (("sharded", mesh), ("single", None)):
            init_chunk, epoch_chunk = ensemble.training_programs(init, epoch, layout, where)
            s, r = (split, replicated) if where is not None else (None, None)
            states = abstract(jax.eval_shape(init_chunk, base, ids, inputs), s)
            compiled = epoch_chunk.lower(states, abstract(inputs, s), abstract(ids, s), abstract(shared, r),
                                         abstract(base, r), jnp.int32(0)).compile()
            entry[label] = {"collectives": collectives(compiled), "flops": flops(compiled)}
        # The old way: jit of the vmapped epoch with member-sharded inputs (GSPMD decides).
        _, plain = ensemble.training_programs(init, epoch, layout, None)
        states = abstract(jax.eval_shape(ensemble.training_programs(init, epoch, layout, None)[0], base, ids, inputs), split)
        compiled = plain.lower(states, abstract(inputs, split), abstract(ids, split), abstract(shared, replicated),
                               abstract(base, replicated), jnp.int32(0)).compile()
        entry["gspmd"] = {"collectives": collectives(compiled), "flops": flops(compiled)}
        report[f"{name}-{layout}"] = entry

# The evaluation program, sharded.
model = models.build("resnet9", 10)
norm = train.Normalization((0.5,) * 3, (0.25,) * 3)
variables = jax.eval_shape(jax.vmap(lambda key: model.init(key, (16, 16, 3))), jax.random.split(jax.random.key(0), 4))
batched = (jax.ShapeDtypeStruct((2, 8, 16, 16, 3), jnp.uint8, sharding=replicated),
           jax.ShapeDtypeStruct((2, 8), jnp.int32, sharding=replicated))
for group in (1,):
    program = ensemble.evaluation_program(train.margins_fn(model, norm), "vmap", group, mesh)
    report["eval-resnet9"] = {"collectives": collectives(program.lower(abstract(variables, split), batched).compile())}

# Sharded == unsharded, training and evaluation, both layouts; the state really is split.
x, y = data.load("fashion_mnist", "train")
x, y = x[:256], y[:256]
norm = train.Normalization(data.FASHION_MNIST.mean, data.FASHION_MNIST.std)
model = models.build("mlp", 10, hidden=(16,))
config = train.TrainConfig(epochs=2, batch_size=64, peak_lr=0.1)
plain = train.train_ensemble(model, config, x, y, norm, ensemble.RunOptions(progress=False), num_members=3)
plain_margins = train.margin_evaluator(model, norm, x, y)(plain.states)
seen = []
run = ensemble.run
def spy(*args, on_epoch=None, **kwargs):
    def record(members, epoch, states, metrics):
        leaf = jax.tree_util.tree_leaves(states)[0]
        seen.append([len(leaf.sharding.device_set), leaf.shape[0], len(members)])
        on_epoch(members, epoch, states, metrics)
    return run(*args, on_epoch=record, **kwargs)
ensemble.run = spy
for layout in ("vmap", "map"):
    options = ensemble.RunOptions(progress=False, mesh=mesh, layout=layout)
    sharded = train.train_ensemble(model, config, x, y, norm, options, num_members=3)
    chex.assert_trees_all_close(plain.states, sharded.states, rtol=1e-5, atol=1e-6)
    margins = train.margin_evaluator(model, norm, x, y, options)(sharded.states)
    np.testing.assert_allclose(margins[0], plain_margins[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(margins[1], plain_margins[1])
    # a chunk of 2 members is rounded up to the 4 devices: 3 members -> one chunk of 4, padding dropped
    chunked = train.train_ensemble(model, config, x, y, norm, options.replace(chunk_size=2), num_members=3)
    chex.assert_trees_all_close(plain.states, chunked.states, rtol=1e-5, atol=1e-6)
report["seen"] = seen
print("REPORT" + json.dumps(report))
""" % (COLLECTIVES,)


@pytest.fixture(scope="module")
def four_devices():
    result = subprocess.run([sys.executable, "-c", FOUR_DEVICES], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.split("REPORT", 1)[1])


@pytest.mark.parametrize("name", ["resnet9-vmap", "resnet9-map", "cnn-vmap", "cnn-map"])
def test_sharded_epoch_has_no_collectives(four_devices, name):
    """The member-sharded epoch (shard_map) compiles to zero cross-device collectives."""
    assert four_devices[name]["sharded"]["collectives"] == dict.fromkeys(COLLECTIVES, 0)


@pytest.mark.parametrize("name", ["resnet9", "cnn"])
def test_sharded_epoch_does_a_quarter_of_the_work_per_device(four_devices, name):
    """4 members on 4 devices: each device's FLOPs are the unsharded program's divided by 4."""
    entry = four_devices[f"{name}-vmap"]
    assert entry["sharded"]["flops"] == pytest.approx(entry["single"]["flops"] / 4, rel=1e-3)


def test_gspmd_replicates_resnet9_work_and_shard_map_does_not(four_devices):
    """What shard_map fixes: jit with member-sharded inputs all-gathers ResNet-9's activations and
    kernels, and every device does every member's work."""
    gspmd = four_devices["resnet9-vmap"]["gspmd"]
    assert gspmd["collectives"]["all-gather"] > 0
    assert gspmd["flops"] > 2 * four_devices["resnet9-vmap"]["sharded"]["flops"]


def test_sharded_evaluation_has_no_collectives(four_devices):
    assert four_devices["eval-resnet9"]["collectives"] == dict.fromkeys(COLLECTIVES, 0)


def test_sharded_training_is_split_and_equals_unsharded(four_devices):
    """The subprocess asserted equality (states, margins, chunked); here: the state spanned 4 devices
    with 4 member slots (3 members + 1 padding) in every epoch of both layouts and both chunkings."""
    assert four_devices["seen"] == [[4, 4, 3]] * 8


# --------------------------------------------------------------------------------------------
# Chunks sized to memory


TINY = train.TrainConfig(epochs=2, batch_size=64, peak_lr=0.1)


@pytest.fixture(scope="module")
def mlp_setup(fashion_small, fashion_norm):
    model = models.build("mlp", 10, hidden=(16,))
    x, y = fashion_small[0][:256], fashion_small[1][:256]
    return model, x, y, fashion_norm


def _plan(mlp_setup, **options):
    model, x, y, norm = mlp_setup
    init, epoch = train.make_init(model, TINY, len(x), x.shape[1:]), train.make_epoch(model, TINY, norm, len(x))
    return ensemble.plan_training(init, epoch, 10, (x, y), np.zeros((10, len(x)), np.int32),
                                  RunOptions(layout="vmap", **options))


def test_auto_chunk_follows_the_injected_memory_limit(mlp_setup):
    """The plan's line (bytes per member, fixed bytes) from the 1- and 2-member programs; the chunk is
    what fits the limit's usable fraction."""
    roomy = _plan(mlp_setup)
    assert roomy.chunk_size == 10 and roomy.num_chunks == 1 and roomy.bytes_per_member > 0
    per, fixed = roomy.bytes_per_member, roomy.fixed_bytes
    limit = int((fixed + 3.5 * per) / 0.85)
    tight = _plan(mlp_setup, memory_limit=limit)
    assert (tight.bytes_per_member, tight.fixed_bytes, tight.limit_bytes) == (per, fixed, limit)
    assert (tight.chunk_size, tight.num_chunks) == (3, 4)
    assert _plan(mlp_setup, memory_limit=1).chunk_size == 1  # at least one member per device
    assert _plan(mlp_setup, chunk_size=4, memory_limit=1).chunk_size == 4  # an explicit size wins
    text = tight.describe("pretrain")
    assert "MiB per member" in text and "3 members at once, 4 chunk(s)" in text


def test_measured_bytes_are_linear_in_members(mlp_setup):
    """vmap's memory is affine in the members per device: the 3-member program lies on the line."""
    model, x, y, norm = mlp_setup
    init, epoch = train.make_init(model, TINY, len(x), x.shape[1:]), train.make_epoch(model, TINY, norm, len(x))
    plan = _plan(mlp_setup)
    init_chunk, epoch_chunk = ensemble.training_programs(init, epoch, "vmap", None)
    ids = jax.ShapeDtypeStruct((3,), np.uint32)
    inputs = jax.ShapeDtypeStruct((3, len(x)), np.int32)
    base = jax.ShapeDtypeStruct((2,), np.uint32)
    states = jax.eval_shape(init_chunk, base, ids, inputs)
    three = ensemble.peak_bytes(epoch_chunk.lower(states, inputs, ids, (x, y), base, np.int32(0)).compile())
    assert abs(three - (plan.fixed_bytes + 3 * plan.bytes_per_member)) <= 0.02 * three


def test_auto_chunks_train_the_same_members(mlp_setup):
    model, x, y, norm = mlp_setup
    whole = train.train_ensemble(model, TINY, x, y, norm, RunOptions(progress=False, layout="vmap"), num_members=5)
    plan = _plan(mlp_setup)
    limit = int((plan.fixed_bytes + 2.5 * plan.bytes_per_member) / 0.85)
    tight = RunOptions(progress=False, layout="vmap", memory_limit=limit)
    chunked = train.train_ensemble(model, TINY, x, y, norm, tight, num_members=5)
    chex.assert_trees_all_close(whole.states, chunked.states, rtol=1e-5, atol=1e-6)


def test_evaluation_groups_fit_the_limit_and_agree(mlp_setup):
    model, x, y, norm = mlp_setup
    variables = train.train_ensemble(model, TINY, x, y, norm, RunOptions(progress=False), num_members=6).states
    roomy = train.margin_evaluator(model, norm, x, y, RunOptions(layout="vmap", eval_batch_size=64))
    tight = train.margin_evaluator(model, norm, x, y, RunOptions(layout="vmap", eval_batch_size=64, memory_limit=1))
    np.testing.assert_allclose(roomy(variables)[0], tight(variables)[0], rtol=1e-5, atol=1e-5)  # float rounding only
    assert set(roomy.groups.values()) == {6} and set(tight.groups.values()) == {1}


@pytest.mark.parametrize("bad,message", [
    (dict(chunk_size=0), "chunk_size must be a positive integer or 'auto', got 0"),
    (dict(layout="pmap"), "layout must be auto or one of vmap, map, got 'pmap'"),
    (dict(seed=2**32), "seed must be a whole number in [0, 2**32), got 4294967296"),
    (dict(seed=-1), "seed must be a whole number in [0, 2**32), got -1"),
    (dict(checkpoint_every=0), "checkpoint_every must be a positive integer, got 0"),
    (dict(memory_fraction=1.5), "memory_fraction must lie in (0, 1], got 1.5"),
    (dict(memory_limit=-5), "memory_limit must be None or a positive number of bytes, got -5"),
])
def test_run_options_validation(bad, message):
    with pytest.raises(ValueError) as error:
        RunOptions(**bad)
    assert str(error.value) == message


# --------------------------------------------------------------------------------------------
# The store and checkpoints


def test_store_reuses_refuses_and_names_damaged_entries(tmp_path):
    store = ensemble.Store(tmp_path)
    arrays = {"margins": np.arange(6, dtype=np.float32).reshape(2, 3), "correct": np.array([True, False])}
    assert store.load("entry", "tag-a") is None
    store.save("entry", "tag-a", arrays, {"rows": [{"x": float("nan")}]})
    loaded, meta = store.load("entry", "tag-a")
    np.testing.assert_array_equal(loaded["margins"], arrays["margins"])
    assert loaded["correct"].dtype == bool and np.isnan(meta["rows"][0]["x"])
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'entry'} was written by a different configuration; use "
                                          rf"another output directory or delete {tmp_path / 'entry'} to start fresh$"):
        store.load("entry", "tag-b")
    (tmp_path / "entry" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(ValueError, match=r"cache entry .*entry is unreadable .*; delete it and rerun"):
        store.load("entry", "tag-a")


def test_store_save_is_all_or_nothing(tmp_path, monkeypatch):
    """A save killed before its rename leaves no entry (only a partial folder the next save replaces)."""
    store = ensemble.Store(tmp_path)
    monkeypatch.setattr(ensemble.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        store.save("entry", "tag", {"a": np.ones(3)})
    assert store.load("entry", "tag") is None and (tmp_path / ".entry.partial").exists()
    monkeypatch.undo()
    store.save("entry", "tag", {"a": np.ones(3)})
    assert store.load("entry", "tag")[0]["a"].tolist() == [1, 1, 1] and not (tmp_path / ".entry.partial").exists()


@pytest.mark.parametrize("every", [1, 2])
def test_resume_from_every_kth_epoch_equals_uninterrupted(tmp_path, mlp_setup, monkeypatch, every):
    """Checkpoints every k epochs (and at the last, keeping only the latest); a run interrupted in
    epoch 4 (before its checkpoint) resumes from epoch 3 // k * k, bit-identical to an uninterrupted run."""
    model, x, y, norm = mlp_setup
    config = train.TrainConfig(epochs=5, batch_size=64, peak_lr=0.1)
    options = RunOptions(progress=False, checkpoint_every=every)
    whole = train.train_ensemble(model, config, x, y, norm, options, num_members=2)
    real_run = ensemble.run

    def interrupted_run(*args, on_epoch, **kwargs):
        def stop(members, epoch, states, metrics):
            on_epoch(members, epoch, states, metrics)
            if epoch == 4:
                raise KeyboardInterrupt
        return real_run(*args, on_epoch=stop, **kwargs)

    monkeypatch.setattr(ensemble, "run", interrupted_run)
    with pytest.raises(KeyboardInterrupt):
        train.train_ensemble(model, config, x, y, norm, options, num_members=2, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    assert ensemble.finished_epochs(tmp_path) == [3 // every * every]
    resumed = train.train_ensemble(model, config, x, y, norm, options, num_members=2, checkpoint_dir=tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "members-0000-0001").iterdir() if p.name.isdigit())
    assert steps == [5]
    chex.assert_trees_all_equal(whole.states, resumed.states)
    np.testing.assert_array_equal(whole.metrics["loss"], resumed.metrics["loss"])


def test_finalize_keeps_outputs_and_drops_checkpoints(tmp_path, mlp_setup):
    """A finished chunk keeps only finalize's outputs; a rerun reads them without training."""
    model, x, y, norm = mlp_setup
    evaluator = train.margin_evaluator(model, norm, x, y)
    options = RunOptions(progress=False, chunk_size=2)
    result = train.train_ensemble(model, TINY, x, y, norm, options, num_members=3, checkpoint_dir=tmp_path,
                                  finalize=lambda v: evaluator.on_devices(v)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["members-0000-0001.outputs", "members-0002-0002.outputs"]
    states = train.train_ensemble(model, TINY, x, y, norm, options, num_members=3).states
    np.testing.assert_allclose(result.states, evaluator(states)[0], rtol=1e-6)
    again = train.train_ensemble(model, TINY, x, y, norm, options, num_members=3, checkpoint_dir=tmp_path,
                                 finalize=lambda v: pytest.fail("a finished chunk was trained again"))
    np.testing.assert_array_equal(again.states, result.states)
    np.testing.assert_array_equal(again.metrics["loss"], result.metrics["loss"])


def test_a_relative_checkpoint_directory_works(tmp_path, mlp_setup, monkeypatch):
    """orbax refuses relative paths; the engine resolves them (the README's main job writes to runs/...)."""
    model, x, y, norm = mlp_setup
    monkeypatch.chdir(tmp_path)
    options = RunOptions(progress=False)
    first = train.train_ensemble(model, TINY, x, y, norm, options, num_members=2, checkpoint_dir="runs/relative")
    again = train.train_ensemble(model, TINY, x, y, norm, options, num_members=2, checkpoint_dir="runs/relative")
    chex.assert_trees_all_equal(again.states, first.states)
    assert ensemble.finished_epochs(tmp_path / "runs" / "relative") == [TINY.epochs]
    store = ensemble.Store("runs/store")
    store.save("entry", "tag", {"a": np.arange(3)})
    np.testing.assert_array_equal(ensemble.Store(tmp_path / "runs" / "store").load("entry", "tag")[0]["a"], np.arange(3))
