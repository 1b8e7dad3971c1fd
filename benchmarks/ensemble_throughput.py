"""Ensemble training throughput on CPU: the library's ensemble layouts vs a loop of jitted models vs PyTorch.

Run ``python -m benchmarks.ensemble_throughput`` (flags resize it; ``--help``); writes
``runs/benchmarks/ensemble_throughput.json`` (``--output``; the committed file in
``benchmarks/results/`` only when given explicitly) and prints a table. Fashion-MNIST (real images),
the MLP (784-256-10) and the small CNN, the papers' SGD recipe at batch 512 (pretraining) and
batch 64 (unlearning). Contenders, timed in the same process:

* ``vmap`` and ``map`` -- the two layouts :func:`ascent_jax.ensemble.run` compiles
  (:func:`ascent_jax.ensemble.training_programs`) around :func:`ascent_jax.train.make_epoch`: one jitted
  epoch (a ``lax.scan`` over steps, state donated, data on device) for K members, batched with
  ``vmap`` or run one after another with ``lax.map``;
* ``loop`` -- the same single-model epoch jitted once and called for each of the K members from
  a Python loop;
* ``torch`` -- a plain PyTorch per-model training loop of the same architecture (``bench`` extra),
  timed on ``--torch-models`` models (its per-model cost does not depend on K).

All contenders of one architecture and batch size, and a float32 matmul, are compiled first and
then timed in interleaved rounds, so that load from other processes hits them alike. FLOPs are
XLA's cost analysis of one compiled single-model train step times the number of model-steps (XLA
counts a scan body once); the same count is used for PyTorch. Model-epochs/s are full
60,000-image epochs, extrapolated from the measured images/s. Optional probes (``--probes``) time
epochs driven step by step from Python, i.e. without ``lax.scan``.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C at any moment is one line
    from ascent_jax.cli import quiet_interrupts

    quiet_interrupts()

import argparse
import functools
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ascent_jax import batches, data, ensemble, models, train
from ascent_jax.cli import non_negative_float, positive_int
from benchmarks import common

FULL_EPOCH = data.FASHION_MNIST.num_train
SEED = 0
NORM = train.Normalization(data.FASHION_MNIST.mean, data.FASHION_MNIST.std)
LAYOUTS = ensemble.LAYOUTS
PROBES = {
    "steps": "jit(vmap(train step)) called once per step from Python (no lax.scan)",
    "model_steps": "jit(train step) of one model called once per step and model from Python (PyTorch's structure)",
}
ALL_PROBES = "mlp:steps,mlp:model_steps,cnn:steps,cnn:model_steps"
ARCHITECTURES = ("mlp", "cnn")


def _rate(seconds: list[float], model_epochs: int, points: int, flops: float) -> dict:
    best = min(seconds)
    images = model_epochs * points / best
    return {"seconds": best, "seconds_samples": seconds, "images_per_s": images,
            "model_epochs_per_s": images / FULL_EPOCH, "gflops_per_s": flops / best / 1e9}


def _timer(run):
    """Wrap a blocking ``run()`` into a callable that returns its wall-clock seconds."""
    return lambda: common.timed(run, 1)[0]


def bench_architecture(arch: str, batch: int, member_counts: list[int], points: int, images: np.ndarray,
                       labels: np.ndarray, args, torch, probes: list[str], torch_note: str) -> dict:
    """All contenders for one architecture and batch size."""
    model = models.build(arch, data.FASHION_MNIST.num_classes)
    config = train.TrainConfig(batch_size=batch, peak_lr=0.1)
    steps = batches.steps_per_epoch(points, batch)
    shared = (jnp.asarray(images[:points]), jnp.asarray(labels[:points]))
    epoch = train.make_epoch(model, config, NORM, points)
    init = train.make_init(model, config, points, tuple(images.shape[1:]))
    most = max(member_counts)
    subsets = np.broadcast_to(np.arange(points, dtype=np.int32), (most, points))
    ids = np.arange(most, dtype=np.uint32)
    base_key = jax.random.key_data(jax.random.key(SEED))  # what the engine's programs take for the seed
    init_chunk, _ = ensemble.training_programs(init, epoch, "vmap")
    initial = jax.device_get(init_chunk(base_key, ids, subsets))

    def stacked(k):
        """States, subsets and member ids of members 0..k-1 (fresh buffers: the epoch donates its state)."""
        return jax.tree_util.tree_map(lambda leaf: jnp.array(leaf[:k]), initial), subsets[:k], ids[:k]

    def member(i):
        """State, subset and key of member i alone."""
        return (jax.tree_util.tree_map(lambda leaf: jnp.array(leaf[i]), initial), subsets[i],
                jax.random.fold_in(jax.random.key(SEED), i))

    optimizer = train.make_optimizer(config, steps)
    step = functools.partial(train.train_step, model=model, optimizer=optimizer, label_smoothing=config.label_smoothing)

    def body(state, data_set, indices, valid, key):
        """One step of one member: ``make_epoch``'s scan body."""
        return step(state, train.make_batch(*data_set, indices, valid, key, config, NORM))

    state, _, key = member(0)
    example = (np.zeros(min(batch, points), np.int32), np.ones(min(batch, points), bool), key)
    step_flops = common.cost_flops(jax.jit(body).lower(state, shared, *example).compile())
    out = {"architecture": arch, "batch_size": batch, "points_per_timed_epoch": points, "steps_per_epoch": steps,
           "params": models.count_params(initial.variables) // most, "flops_per_model_step": step_flops,
           **{layout: {} for layout in LAYOUTS}, "loop": {}, "probes": {}}

    # Every contender is compiled first, then all are timed in interleaved rounds, so that a burst
    # of load from other processes hits them alike and their ratios stay comparable.
    contenders = {}  # (kind, key) -> (runner returning seconds, model-epochs per run, extra fields)
    for layout in LAYOUTS:
        _, layout_epoch = ensemble.training_programs(init, epoch, layout)  # what ensemble.run(layout=...) runs
        for k in member_counts:
            state, member_subsets, member_ids = stacked(k)
            rest = (member_subsets, member_ids, shared, base_key)
            compiled, compile_s = common.compile_timed(layout_epoch, state, *rest, jnp.int32(0))
            contenders[layout, k] = (_timer(common.Stepper(compiled, [state], [rest])), k, {"compile_seconds": compile_s})

    compiled, compile_s = common.compile_timed(jax.jit(epoch, donate_argnums=0), member(0)[0], shared, subsets[0],
                                               jax.random.key(SEED), jnp.int32(0))
    for k in member_counts:
        members = [member(i) for i in range(k)]
        stepper = common.Stepper(compiled, [m[0] for m in members], [(shared, *m[1:]) for m in members])
        contenders["loop", k] = (_timer(stepper), k, {"compile_seconds": compile_s})

    if torch is not None:
        n = min(args.torch_models, most)
        run = functools.partial(common.torch_train_models, arch, images[:points], labels[:points], models=n, epochs=1,
                                batch_size=batch, mean=NORM.mean, std=NORM.std, peak_lr=config.peak_lr)
        contenders["torch", None] = (run, n, {"models_timed": n, "threads": torch.get_num_threads()})

    probe_k = min(args.probe_members, most)
    if "steps" in probes:
        state, member_subsets, member_ids = stacked(probe_k)
        run, compile_s = _probe_steps(body, [state], shared, [member_subsets], [common.member_keys(SEED, member_ids)],
                                      config, steps, vmapped=True)
        contenders["probe", "steps"] = (run, probe_k, {"members": probe_k, "compile_seconds": compile_s})
    if "model_steps" in probes:
        states, member_subsets, member_keys = zip(*(member(i) for i in range(probe_k)))
        run, compile_s = _probe_steps(body, list(states), shared, member_subsets, member_keys, config, steps,
                                      vmapped=False)
        contenders["probe", "model_steps"] = (run, probe_k, {"members": probe_k, "compile_seconds": compile_s})
    contenders["matmul", None] = (common.matmul_timer(args.matmul_size), 0, {})

    samples = common.interleaved({name: c[0] for name, c in contenders.items()}, args.repeats, args.min_seconds)
    out["matmul_gflops_per_s"] = 2 * args.matmul_size**3 / min(samples["matmul", None]) / 1e9
    out["torch"] = {"skipped": torch_note}
    for (kind, key), (_, model_epochs, extra) in contenders.items():
        if kind == "matmul":
            continue
        entry = {**_rate(samples[kind, key], model_epochs, points, model_epochs * steps * step_flops), **extra}
        entry["matmul_fraction"] = entry["gflops_per_s"] / out["matmul_gflops_per_s"]
        if kind == "probe":
            out["probes"][key] = {**entry, "what": PROBES[key]}
        elif kind == "torch":
            out["torch"] = entry
        else:
            out[kind][key] = entry
    return out


def _probe_steps(body, states, shared, subsets, keys, config, steps, vmapped):
    """A timed epoch as Python loops over jitted train steps (the scan body outside ``lax.scan``).

    ``vmapped``: one ``jit(vmap(step))`` call per step for the stacked members in ``states[0]``;
    otherwise one ``jit(step)`` call per step and model, model after model (PyTorch's structure).
    Returns ``(runner returning seconds, compile seconds)``.
    """

    def plan(subset, key, index):
        order_key = jax.random.fold_in(jax.random.fold_in(key, 1), index)
        indices, valid = batches.epoch_batches(order_key, subset, config.batch_size, config.drop_last)
        return indices, valid, jax.random.split(jax.random.fold_in(jax.random.fold_in(key, 2), index), steps)

    def one_step(state, data_set, member_plan, t):
        return body(state, data_set, *jax.tree_util.tree_map(lambda leaf: leaf[t], member_plan))

    if vmapped:
        plan, one_step = jax.vmap(plan, in_axes=(0, 0, None)), jax.vmap(one_step, in_axes=(0, None, 0, None))
    planner = jax.jit(plan)
    example_plan = planner(subsets[0], keys[0], jnp.int32(0))
    compiled, compile_s = common.compile_timed(jax.jit(one_step, donate_argnums=0), states[0], shared, example_plan,
                                               jnp.int32(0))
    epochs = itertools.count()

    def run():
        index = jnp.int32(next(epochs))
        for i, (subset, key) in enumerate(zip(subsets, keys)):
            member_plan = planner(subset, key, index)
            for t in range(steps):
                states[i], metrics = compiled(states[i], shared, member_plan, jnp.int32(t))
        jax.block_until_ready((states, metrics))

    return _timer(run), compile_s


def summarize(results: list[dict]) -> tuple[list[dict], dict]:
    """Table rows (one per architecture, batch size and K) and the issue's targets, per architecture and batch."""
    rows, targets = [], {}
    for res in results:
        torch = res["torch"].get("images_per_s")
        loop = {k: v["images_per_s"] for k, v in res["loop"].items()}
        for k in loop:
            row = {"arch": res["architecture"], "batch": res["batch_size"], "K": k, "loop": loop[k], "torch": torch}
            for layout in LAYOUTS:
                entry = res[layout][k]
                row.update({layout: entry["images_per_s"], f"{layout}_vs_loop": entry["images_per_s"] / loop[k],
                            f"{layout}_vs_torch": entry["images_per_s"] / torch if torch else None,
                            f"{layout}_matmul_pct": 100 * entry["matmul_fraction"]})
            rows.append(row)
        for probe in res["probes"].values():
            k = probe["members"]
            probe["vs_loop_same_K"] = probe["images_per_s"] / loop[k] if k in loop else None
            probe["vs_torch"] = probe["images_per_s"] / torch if torch else None
        entry = {}
        for layout in LAYOUTS:
            ratios = {k: v["images_per_s"] / loop[k] for k, v in res[layout].items()}
            entry[f"{layout}_vs_loop_by_K"] = ratios
            entry[f"{layout}_ge_1x_loop_all_K"] = min(ratios.values()) >= 1.0
            if res["batch_size"] == 512:
                fractions = {k: v["matmul_fraction"] for k, v in res[layout].items()}
                entry[f"{layout}_matmul_fraction_by_K"] = fractions
                entry[f"{layout}_ge_60pct_matmul_all_K"] = min(fractions.values()) >= 0.6
            if res["batch_size"] == 64 and torch:
                versus = {k: v["images_per_s"] / torch for k, v in res[layout].items()}
                entry[f"{layout}_vs_torch_by_K"] = versus
                entry[f"{layout}_ge_3x_torch_all_K"] = min(versus.values()) >= 3.0
        targets[f"{res['architecture']}_batch{res['batch_size']}"] = entry
    return rows, targets


COLUMNS = [("arch", "arch", "s"), ("batch", "batch", "d"), ("K", "K", "d"), ("vmap", "vmap img/s", ",.0f"),
           ("map", "map img/s", ",.0f"), ("loop", "loop img/s", ",.0f"), ("torch", "torch img/s", ",.0f"),
           ("vmap_vs_loop", "vmap/loop", ".2f"), ("map_vs_loop", "map/loop", ".2f"),
           ("vmap_vs_torch", "vmap/torch", ".2f"), ("map_vs_torch", "map/torch", ".2f"),
           ("vmap_matmul_pct", "vmap %mm", ".0f"), ("map_matmul_pct", "map %mm", ".0f")]


def _probe_list(text: str) -> list[tuple[str, str]]:
    """argparse type: comma-separated ``arch:probe`` pairs (``''``: none)."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        arch, _, probe = item.partition(":")
        if arch not in ARCHITECTURES or probe not in PROBES:
            raise argparse.ArgumentTypeError(f"expected arch:probe with arch in {', '.join(ARCHITECTURES)} and probe "
                                             f"in {', '.join(PROBES)}, got {item!r}")
        pairs.append((arch, probe))
    return pairs


def parser():
    parser = common.parser("benchmarks.ensemble_throughput", __doc__)
    parser.add_argument("--models", type=common.name_list(ARCHITECTURES), default="mlp,cnn",
                        help=f"architectures ({', '.join(ARCHITECTURES)})")
    parser.add_argument("--members", type=common.int_list(1), default=[1, 8, 32, 100],
                        help="ensemble sizes K for the MLP")
    parser.add_argument("--cnn-members", type=common.int_list(1), default=[2],
                        help="ensemble sizes K for the CNN (XLA CPU runs its scanned epoch slowly; see README)")
    parser.add_argument("--batch-sizes", type=common.int_list(1), default=[512, 64],
                        help="512: pretraining; 64: unlearning")
    parser.add_argument("--points", type=positive_int, default=1024, help="Fashion-MNIST images per timed MLP epoch")
    parser.add_argument("--cnn-points", type=positive_int, default=512, help="Fashion-MNIST images per timed CNN epoch")
    parser.add_argument("--torch-models", type=positive_int, default=4,
                        help="models timed in the PyTorch loop (its per-model cost does not depend on K)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="most timed epochs per measurement (best is kept)")
    parser.add_argument("--min-seconds", type=non_negative_float, default=2.5,
                        help="stop repeating once this much was timed")
    parser.add_argument("--probes", type=_probe_list, default="", help=f"step-driven probes as comma-separated "
                        f"arch:probe (probe: {', '.join(PROBES)}), e.g. {ALL_PROBES}")
    parser.add_argument("--probe-members", type=positive_int, default=8,
                        help="K of the probes (at most the largest K)")
    parser.add_argument("--matmul-size", type=positive_int, default=2048,
                        help="n of the n x n float32 matmul-rate probe")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch contender")
    parser.add_argument("--output", default=str(common.OUTPUT_DIR / "ensemble_throughput.json"), help="result file")
    return parser


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    args.output = common.output_file(args.output)

    torch = None if args.no_torch else common.torch_or_none()
    torch_note = "skipped (--no-torch)" if args.no_torch else common.TORCH_MISSING
    meta = common.metadata("benchmarks.ensemble_throughput", argv, torch)
    images, labels = data.load("fashion_mnist", "train")
    probes = args.probes
    results = []
    for arch in args.models:
        counts, points = (args.members, args.points) if arch == "mlp" else (args.cnn_members, args.cnn_points)
        for batch in args.batch_sizes:
            wanted = [probe for name, probe in probes if name == arch]
            results.append(bench_architecture(arch, batch, counts, points, images, labels, args, torch, wanted,
                                              torch_note))
    rows, targets = summarize(results)
    matmul = [res["matmul_gflops_per_s"] for res in results]
    result = {
        "benchmark": "ensemble training throughput: ensemble.run's vmap and map layouts vs a loop of jitted single "
                     "models vs a PyTorch loop",
        **meta,
        "load_average_1min": common.load_average(),
        "data": "Fashion-MNIST train images (real), the first --points / --cnn-points of them per timed epoch",
        "flops": "XLA cost_analysis of one compiled single-model train step x model-steps (scan bodies are counted once)",
        "model_epochs": f"full {FULL_EPOCH}-image epochs, extrapolated from images/s",
        "timing": ("contenders compiled first, then timed in interleaved rounds after one warm-up round; best epoch "
                   "of up to --repeats, fewer once --min-seconds were timed (a warm-up that long is the sample)"),
        "matmul": (f"float32 {args.matmul_size}^3 jnp.dot timed in the same interleaved rounds as each architecture "
                   "and batch size; matmul_fraction compares with that section's best"),
        "matmul_gflops_per_s": {"by_section": matmul, "best": max(matmul)},
        "torch": None if torch is not None else torch_note,
        "results": results,
        "targets": targets,
    }
    common.write_json(args.output, result)
    print(common.table(rows, COLUMNS))
    print(f"img/s: training images per second over all K models; %mm: achieved GFLOP/s as % of the float32 matmul "
          f"rate measured alongside ({min(matmul):.0f}-{max(matmul):.0f} GFLOP/s); load average "
          f"{result['load_average_1min']:.2f}; wrote {args.output}")
    for res in results:
        for name, probe in res["probes"].items():
            versus = [f"{probe[key]:.2f}x {label}" for key, label in (("vs_loop_same_K", "loop"), ("vs_torch", "torch"))
                      if probe[key]]
            print(f"probe {res['architecture']} batch {res['batch_size']} K={probe['members']} {name}: "
                  f"{probe['images_per_s']:,.0f} img/s = {', '.join(versus)} ({probe['what']})")
    if torch is None:
        print(torch_note)
    return result


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
