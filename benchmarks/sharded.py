"""Member-sharded ensemble epochs on 4 forced host devices: the engine's shard_map vs GSPMD, from the compiled HLO.

Run ``python -m benchmarks.sharded`` in a fresh process (``--help``): it forces 4 host devices
(``--xla_force_host_platform_device_count=4``, read when jax starts, so it must be set before jax
is imported; an ``XLA_FLAGS`` that already sets a count is kept) and writes
``runs/benchmarks/sharded.json`` (``--output``; the committed file in ``benchmarks/results/`` only
when given explicitly). Random uint8 tensors with random labels: the small CNN on
Fashion-MNIST's shape (28x28x1) and ResNet-9 on ``--image-size`` CIFAR-shaped images. Contenders,
each the vmapped epoch of ``--members`` members:

* ``shard_map`` -- ``training_programs(init, epoch, "vmap", mesh=device_mesh())``: each device runs
  its own members under ``jax.shard_map``;
* ``gspmd`` -- the plain ``jax.jit`` of the vmapped epoch with its member inputs placed
  ``NamedSharding(mesh, P("members"))`` (the old way): the GSPMD partitioner decides;
* ``one_device`` -- the same jitted epoch with every member on one device (the reference).

For each, from the compiled program: collectives in its HLO (``x(`` and async ``x-start(`` ops),
XLA's per-device FLOPs against the single-member epoch's FLOPs x members / devices (1.0: each
device does only its own members' work; = devices: the work is replicated), memory analysis per
device and, for the ``--timed`` architectures, images per second (a model's contenders timed in
interleaved rounds, from random states of the init's shapes).
Forced host devices share the host's cores, so their timings say nothing about real multi-device
speed-ups; the HLO facts are the point.
"""

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C at any moment is one line
    from ascent_jax.cli import quiet_interrupts

    quiet_interrupts()

import os
import sys

DEVICES = 4
if "jax" not in sys.modules:  # XLA reads the flag once, when jax starts its CPU backend
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={DEVICES}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from ascent_jax import batches, ensemble, models, train  # noqa: E402
from ascent_jax.cli import int_at_least, non_negative_float, positive_int  # noqa: E402
from benchmarks import common  # noqa: E402

SEED = 0
SHAPES = {"cnn": lambda size: (28, 28, 1), "resnet9": lambda size: (size, size, 3)}


def _abstract(tree, sharding=None):
    """Shape structs of ``tree``'s leaves, placed with ``sharding``."""
    return jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding),
                                  tree)


def _contender(jitted, args, expected_flops: float) -> tuple[dict, object]:
    """The compiled facts of ``jitted`` on ``args``: collectives, per-device FLOPs and memory, compile time."""
    compiled, compile_s = common.compile_timed(jitted, *args)
    flops = common.cost_flops(compiled)
    return {"collectives": common.collective_counts(compiled), "flops_per_device": flops,
            "expected_flops_per_device": expected_flops, "flops_ratio": flops / expected_flops,
            "memory_per_device": common.memory(compiled), "peak_bytes_per_device": ensemble.peak_bytes(compiled),
            "compile_seconds": compile_s}, compiled


def bench_model(arch: str, args, mesh) -> dict:
    """Compile (and time) the three contenders for one architecture."""
    shape, k, devices = SHAPES[arch](args.image_size), args.members, mesh.shape[ensemble.AXIS]
    rng = np.random.default_rng(SEED)
    shared = (rng.integers(0, 256, (args.points, *shape), dtype=np.uint8),
              rng.integers(0, 10, args.points).astype(np.int32))
    model = models.build(arch, 10)
    config = train.TrainConfig(batch_size=args.batch_size)
    norm = train.Normalization((0.5,) * shape[-1], (0.25,) * shape[-1])
    epoch, init = train.make_epoch(model, config, norm, args.points), train.make_init(model, config, args.points, shape)
    base = jax.random.key_data(jax.random.key(SEED))
    ids = np.arange(k, dtype=np.uint32)
    subsets = np.broadcast_to(np.arange(args.points, dtype=np.int32), (k, args.points))
    init_chunk, plain_epoch = ensemble.training_programs(init, epoch, "vmap")
    _, sharded_epoch = ensemble.training_programs(init, epoch, "vmap", mesh)
    states = jax.eval_shape(init_chunk, base, ids, subsets)
    one = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), states)
    single = common.cost_flops(jax.jit(epoch).lower(one, _abstract(shared), _abstract(subsets[0]),
                                                    jax.random.key(SEED), jnp.int32(0)).compile())
    split, replicated = NamedSharding(mesh, PartitionSpec(ensemble.AXIS)), NamedSharding(mesh, PartitionSpec())
    placed = (*_abstract((subsets, ids), split), *_abstract((shared, base), replicated))
    programs = {"shard_map": (sharded_epoch, split, placed, single * k / devices),
                "gspmd": (plain_epoch, split, placed, single * k / devices),
                "one_device": (plain_epoch, None, _abstract((subsets, ids, shared, base)), single * k)}
    out = {"image_shape": list(shape), "members": k, "batch_size": args.batch_size, "points": args.points,
           "steps_per_epoch": batches.steps_per_epoch(args.points, args.batch_size),
           "single_member_flops": single, "contenders": {}}
    runners = {}
    for name, (jitted, sharding, rest, expected) in programs.items():
        entry, compiled = _contender(jitted, (_abstract(states, sharding), *rest, jnp.int32(0)), expected)
        out["contenders"][name] = entry
        print(f"{arch} {name}: compiled in {entry['compile_seconds']:.1f} s", flush=True)
        if arch in args.timed:
            runners[name] = _runner(compiled, states, (subsets, ids, shared, base), None if sharding is None else mesh)
    samples = common.interleaved(runners, args.repeats, args.min_seconds)
    for name, seconds in samples.items():
        out["contenders"][name].update(seconds_samples=seconds, images_per_s=k * args.points / min(seconds))
    return out


def _random_states(states, seed: int = SEED):
    """Host states of the init's shapes drawn at random (floats ~ N(0, 0.05^2), integers 0).

    The epoch's arithmetic does not depend on the values, and XLA CPU compiles the engine's
    init program (random initialisers for every layer, vmapped) 2-4x slower than the epoch.
    """
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map(draw, states)


def _runner(compiled, states, rest, mesh):
    """A callable timing one epoch of ``compiled`` (seconds) from host ``states``, placed as it was compiled."""
    options = ensemble.RunOptions(mesh=mesh)
    subsets, ids, shared, base = rest
    stepper = common.Stepper(compiled, [ensemble.place(_random_states(states), options, split=True)],
                             [(*ensemble.place((subsets, ids), options, split=True),
                               *ensemble.place((shared, base), options, split=False))])
    return lambda: common.timed(stepper, 1)[0]


def parser():
    parser = common.parser("benchmarks.sharded", __doc__)
    parser.add_argument("--models", type=common.name_list(tuple(SHAPES)), default="cnn,resnet9",
                        help=f"architectures ({', '.join(SHAPES)})")
    parser.add_argument("--members", type=positive_int, default=4, help="ensemble members (a multiple of the devices)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--points", type=positive_int, default=32, help="training images per member and timed epoch")
    parser.add_argument("--image-size", type=int_at_least(16), default=16,
                        help="ResNet-9 image height and width (at least 16)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="most timed epochs per contender (best is kept)")
    parser.add_argument("--min-seconds", type=non_negative_float, default=5.0,
                        help="stop repeating once this much was timed")
    parser.add_argument("--timed", type=common.name_list(tuple(SHAPES), allow_empty=True), default="cnn,resnet9",
                        help="architectures also trained and timed (others: compiled and analysed only; '' for none)")
    parser.add_argument("--output", default=str(common.OUTPUT_DIR / "sharded.json"), help="result file")
    return parser


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    args.output = common.output_file(args.output)
    devices = jax.device_count()
    if devices < 2:
        raise ValueError(f"found {devices} device; run `python -m benchmarks.sharded` in a fresh process (it forces "
                         f"{DEVICES} host devices before jax starts)")
    if args.members % devices:
        raise ValueError(f"--members must be a multiple of the {devices} devices, got {args.members}")
    mesh = ensemble.device_mesh()
    meta = common.metadata("benchmarks.sharded", argv)
    forced = jax.default_backend() == "cpu"
    result = {
        "benchmark": "member-sharded ensemble epoch: shard_map (the engine) vs GSPMD (jit with member-sharded inputs)"
                     " vs one device",
        **meta,
        "device": (f"{devices} forced host devices on {common.device_description()}" if forced
                   else f"{devices} x {common.device_description()}"),
        "devices": devices,
        "data": "random uint8 tensors with random labels (CNN: 28x28x1; ResNet-9: CIFAR-shaped at --image-size)",
        "flops": ("XLA cost_analysis of each compiled program, per device (scan bodies counted once); "
                  "expected_flops_per_device = single-member epoch FLOPs x members / devices (one_device: x members)"),
        "collectives": "ops in compiled.as_text(): name( and async name-start(",
        "timing": ("--timed architectures only: best epoch of up to --repeats after a warm-up, a model's contenders "
                   "in interleaved rounds; forced host devices share the host's cores"),
        "results": {arch: bench_model(arch, args, mesh) for arch in args.models},
        "load_average_1min": common.load_average(),
    }
    common.write_json(args.output, result)
    rows = [{"model": arch, "contender": name, **entry, "all_gathers": entry["collectives"]["all-gather"],
             "collectives_total": sum(entry["collectives"].values()), "gflops": entry["flops_per_device"] / 1e9}
            for arch, res in result["results"].items() for name, entry in res["contenders"].items()]
    print(common.table(rows, [("model", "model", "s"), ("contender", "contender", "s"),
                              ("collectives_total", "collectives", "d"), ("all_gathers", "all-gathers", "d"),
                              ("gflops", "GFLOP/device", ".3f"), ("flops_ratio", "FLOPs/expected", ".3f"),
                              ("images_per_s", "img/s", ",.0f")]))
    print(f"{result['device']}; load average {result['load_average_1min']:.2f}; wrote {args.output}")
    return result


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
