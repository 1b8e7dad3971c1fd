"""One prepared GPU check: the ResNet-9 ensemble contenders on CIFAR-shaped random tensors, time-boxed.

Run ``python -m benchmarks.gpu_check`` on one GPU (about 6-8 minutes on an H100/H200, estimated; ``--help``);
it also runs tiny on CPU (the tests do). It writes ``runs/benchmarks/gpu_check.json`` (``--output``;
the committed ``benchmarks/results/`` only when given explicitly) after every step, so a run cut
short keeps what it measured, and starts no contender once ``--budget-seconds`` have passed
(those are recorded as skipped). The data are random uint8 tensors of CIFAR-10's shape with
random labels: throughput only, never accuracy.

Each contender trains ``--steps`` steps of batch ``--batch-size`` per timed epoch; the job --
``--members`` models x ``--epochs`` epochs x ceil(``--train-size`` / batch) steps -- is
extrapolated from its best step time (a last partial chunk counts as full). In order:

* ``plan`` -- the engine's automatic chunk size (:func:`ascent_jax.ensemble.plan_training`) for
  the job's shapes and the device's memory limit; ``--chunk`` overrides it;
* ``torch_grouped`` -- M PyTorch ResNet-9s as one network (grouped convolutions, batch norm over
  M x C channels), as the public unlearning benchmark retrains its oracles; M = the chunk;
* ``torch_loop`` -- a plain PyTorch per-model loop (both: ``bench`` extra, channels-last, cuDNN
  autotuning, bf16 autocast only with ``--dtype bfloat16``);
* ``vmap`` -- the engine's vmapped epoch for one chunk (what :func:`ascent_jax.ensemble.run` runs);
* ``shard_map_1_device`` -- the same under ``shard_map`` on a mesh of this one device;
* ``loop`` -- the single-model epoch jitted once and called per model;
* ``map`` -- the engine's ``lax.map`` layout (one model after another inside one program).

A contender that runs out of memory is retried at half its models (the sizes that failed are in
its ``out_of_memory_at``); ``shard_map_1_device`` starts from the size ``vmap`` ran at.

FLOPs are XLA's cost analysis of the compiled single-model epoch (its scan body, one step, is
counted once); MFU is against the device's dense peak for the dtype in use: bf16 with
``--dtype bfloat16``; with float32 both TF32 (what XLA and cuDNN use for float32 convolutions by
default on these GPUs) and plain FP32. JAX is told not to preallocate GPU memory, so the PyTorch
contenders, run first, find it free.
"""

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C at any moment is one line
    from ascent_jax.cli import quiet_interrupts

    quiet_interrupts()

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # read when jax starts its GPU backend

import argparse  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ascent_jax import batches, ensemble, models, train  # noqa: E402
from ascent_jax.cli import non_negative_float, positive_float, positive_int  # noqa: E402
from benchmarks import common  # noqa: E402

CIFAR_NORM = train.Normalization((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
SEED = 0
# Dense peak TFLOP/s (no sparsity) as (bf16, TF32, FP32) by device-kind substring; the first match wins.
PEAK_TFLOPS = (("H200", (989.4, 494.7, 66.9)), ("H100 PCIe", (756.5, 378.0, 51.2)), ("H100 NVL", (835.5, 417.5, 60.0)),
               ("H100", (989.4, 494.7, 66.9)), ("A100", (312.0, 156.0, 19.5)), ("L40S", (362.1, 183.0, 91.6)),
               ("L4", (121.0, 60.0, 30.3)))
PEAK_KINDS = ("bfloat16", "tf32", "float32")


def peak_tflops(device_kind: str, dtype: str) -> dict[str, float]:
    """The dense peaks that apply to compute dtype ``dtype`` on a known accelerator (empty if unknown).

    ``bfloat16`` -> its bf16 peak; ``float32`` -> the TF32 tensor-core and the plain FP32 peak.
    """
    peaks = next((dict(zip(PEAK_KINDS, values)) for name, values in PEAK_TFLOPS
                  if name.lower() in device_kind.lower()), {})
    kinds = ("bfloat16",) if dtype == "bfloat16" else ("tf32", "float32")
    return {kind: peaks[kind] for kind in kinds if kind in peaks}


def _is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _fitting(run: Callable[[int], dict], k: int) -> dict:
    """``run(k)``, halving ``k`` after each out-of-memory error (the sizes that failed are recorded)."""
    failed = []
    while True:
        try:
            return {**run(k), "out_of_memory_at": failed}
        except Exception as error:  # noqa: BLE001 -- only out of memory is retried
            if not _is_out_of_memory(error) or k == 1:
                raise
        failed.append(k)
        k //= 2


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


class Bench:
    """Data, programs and initial states shared by the contenders of one run, and their rates."""

    def __init__(self, args, peaks: dict[str, float]):
        self.args, self.peaks = args, peaks
        self.shape = (args.image_size, args.image_size, 3)
        self.points = args.steps * args.batch_size
        rng = np.random.default_rng(SEED)
        self.images = rng.integers(0, 256, (self.points, *self.shape), dtype=np.uint8)
        self.labels = rng.integers(0, 10, self.points).astype(np.int32)
        self.shared = jax.device_put((self.images, self.labels))
        self.model = models.build(args.model, 10, dtype=args.dtype)
        self.config = train.TrainConfig(batch_size=args.batch_size, epochs=args.epochs)
        self.epoch = train.make_epoch(self.model, self.config, CIFAR_NORM, self.points)
        self.init = train.make_init(self.model, self.config, self.points, self.shape)
        self.base = jax.random.key_data(jax.random.key(SEED))
        self.full_steps = batches.steps_per_epoch(args.train_size, args.batch_size)
        self.initial = None
        one = jax.eval_shape(self.init, jax.random.key(SEED), None)
        self.loop_epoch, self.loop_compile_s = common.compile_timed(
            jax.jit(self.epoch, donate_argnums=0), one, self.shared, np.arange(self.points, dtype=np.int32),
            jax.random.key(SEED), jnp.int32(0))
        self.step_flops = common.cost_flops(self.loop_epoch)

    def plan(self) -> ensemble.MemoryPlan:
        """The engine's chunk size for the job's shapes (the whole training set on the device)."""
        args = self.args
        shared = (jax.ShapeDtypeStruct((args.train_size, *self.shape), jnp.uint8),
                  jax.ShapeDtypeStruct((args.train_size,), jnp.int32))
        subsets = jax.ShapeDtypeStruct((args.members, args.train_size), jnp.int32)
        return ensemble.plan_training(self.init, self.epoch, args.members, shared, subsets,
                                      ensemble.RunOptions(layout="vmap", progress=False))

    def prepare(self, members: int) -> None:
        """Initial states of members 0..members-1 (host), from the engine's init program."""
        init_chunk, _ = ensemble.training_programs(self.init, self.epoch, "vmap")
        ids = np.arange(members, dtype=np.uint32)
        self.initial = jax.device_get(init_chunk(self.base, ids, self._subsets(members)))

    def _subsets(self, k: int) -> np.ndarray:
        return np.broadcast_to(np.arange(self.points, dtype=np.int32), (k, self.points))

    def rates(self, seconds: list[float], models_per_call: int) -> dict:
        """Step time, throughput, MFU and extrapolated job time from timed epochs of ``models_per_call`` models."""
        args = self.args
        step = min(seconds) / args.steps
        achieved = models_per_call * self.step_flops / step / 1e12
        calls = math.ceil(args.members / models_per_call)
        return {"seconds_samples": seconds, "models_per_call": models_per_call, "step_seconds": step,
                "images_per_s": models_per_call * args.batch_size / step, "tflops_per_s": achieved,
                "mfu": {kind: achieved / peak for kind, peak in self.peaks.items()},
                "extrapolated_job_seconds": calls * args.epochs * self.full_steps * step}

    def ensemble(self, layout: str, k: int, mesh=None) -> dict:
        """The engine's epoch program of ``k`` members in ``layout`` (on ``mesh``: under shard_map)."""
        options = ensemble.RunOptions(layout=layout, mesh=mesh)
        _, epoch_chunk = ensemble.training_programs(self.init, self.epoch, layout, mesh)
        states = ensemble.place(jax.tree_util.tree_map(lambda leaf: leaf[:k], self.initial), options, split=True)
        rest = (*ensemble.place((self._subsets(k), np.arange(k, dtype=np.uint32)), options, split=True),
                *ensemble.place((self.shared, self.base), options, split=False))
        compiled, compile_s = common.compile_timed(epoch_chunk, states, *rest, jnp.int32(0))
        seconds = common.measure(common.Stepper(compiled, [states], [rest]), self.args.repeats, self.args.min_seconds)
        return {**self.rates(seconds, k), "compile_seconds": compile_s, **common.memory(compiled),
                "peak_bytes_in_use": _peak_bytes()}

    def loop(self, k: int) -> dict:
        """The jitted single-model epoch called for each of ``k`` models from Python."""
        states = [jax.tree_util.tree_map(lambda leaf, i=i: jnp.array(leaf[i]), self.initial) for i in range(k)]
        rest = [(self.shared, jnp.arange(self.points, dtype=jnp.int32), jax.random.fold_in(jax.random.key(SEED), i))
                for i in range(k)]
        stepper = common.Stepper(self.loop_epoch, states, rest)
        seconds = common.measure(stepper, self.args.repeats, self.args.min_seconds)
        return {**self.rates(seconds, k), "compile_seconds": self.loop_compile_s, "peak_bytes_in_use": _peak_bytes()}

    def torch(self, torch, k: int, *, grouped: bool) -> dict:
        """PyTorch: ``k`` models one after another, or all ``k`` as one grouped network."""
        cuda = torch.cuda.is_available()
        run = functools.partial(common.torch_train_models, self.args.model, self.images, self.labels, models=k,
                                epochs=1, batch_size=self.args.batch_size, mean=CIFAR_NORM.mean, std=CIFAR_NORM.std,
                                device="cuda" if cuda else "cpu", bf16=self.args.dtype == "bfloat16", grouped=grouped)
        try:
            seconds = common.repeat_until(run, self.args.repeats, self.args.min_seconds)
        finally:
            if cuda:
                torch.cuda.empty_cache()  # hand the memory back for the JAX contenders
        return {**self.rates(seconds, k), "device": torch.cuda.get_device_name() if cuda else "cpu",
                "autocast_bf16": cuda and self.args.dtype == "bfloat16",
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


class Record:
    """The result file of one run and its time box: every step is recorded (or why it is missing), then saved."""

    def __init__(self, result: dict, path: Path, budget: float):
        self.result, self.path, self.budget, self.start = result, path, budget, time.perf_counter()

    def run(self, name: str, contender: Callable[[], dict]) -> None:
        spent = time.perf_counter() - self.start
        if spent > self.budget:
            entry = {"skipped": f"time budget spent ({spent:.0f} s of --budget-seconds {self.budget:.0f})"}
        else:
            try:
                entry = contender()
            except Exception as error:  # noqa: BLE001 -- out of memory is a result; anything else propagates
                if not _is_out_of_memory(error):
                    raise
                entry = {"error": f"out of memory: {str(error)[:300]}"}
        self.result["contenders"][name] = entry
        self.save()

    def save(self) -> None:
        self.result.update(seconds=time.perf_counter() - self.start, load_average_1min=common.load_average(),
                           peak_bytes_in_use=_peak_bytes(), summary=summarize(self.result))
        common.write_json(self.path, self.result)


def summarize(result: dict) -> dict | None:
    """The fastest timed contender, its extrapolated job time and MFU, its speed-ups over PyTorch and the targets."""
    timed = {name: entry for name, entry in result["contenders"].items() if "step_seconds" in entry}
    if not timed:
        return None
    best = min(timed, key=lambda name: timed[name]["extrapolated_job_seconds"])
    job = timed[best]["extrapolated_job_seconds"]
    versus = {name: timed[name]["extrapolated_job_seconds"] / job if name in timed else None
              for name in ("torch_loop", "torch_grouped")}
    mfu = next(iter(timed[best]["mfu"].values()), None)  # bf16, or TF32 for float32
    return {"fastest": best, "extrapolated_job_minutes": job / 60, "mfu": timed[best]["mfu"],
            "vs_torch_loop": versus["torch_loop"], "vs_torch_grouped": versus["torch_grouped"],
            "targets": {"job_le_10_minutes": job <= 600, "mfu_ge_35pct": None if mfu is None else mfu >= 0.35,
                        "ge_5x_torch_loop": None if versus["torch_loop"] is None else versus["torch_loop"] >= 5}}


def _torch_note(torch, args) -> str | None:
    """Why the PyTorch contenders are skipped, or ``None`` when they run."""
    if args.no_torch:
        return "skipped (--no-torch)"
    if torch is None:
        return common.TORCH_MISSING
    if jax.default_backend() == "gpu" and not torch.cuda.is_available():
        return f"skipped: torch {torch.__version__} has no CUDA device (a CPU build?)"
    return None


def parser():
    parser = common.parser("benchmarks.gpu_check", __doc__)
    parser.add_argument("--members", type=positive_int, default=100, help="ensemble size of the extrapolated job")
    parser.add_argument("--epochs", type=positive_int, default=24, help="epochs of the extrapolated job")
    parser.add_argument("--train-size", type=positive_int, default=50_000,
                        help="training images of the extrapolated job")
    parser.add_argument("--batch-size", type=positive_int, default=512)
    parser.add_argument("--steps", type=positive_int, default=8, help="steps per timed epoch")
    parser.add_argument("--chunk", type=positive_int, default=None,
                        help="members of the vmap contenders (default: the plan's)")
    parser.add_argument("--grouped-models", type=positive_int, default=None,
                        help="M of torch_grouped (default: the chunk)")
    parser.add_argument("--loop-models", type=positive_int, default=2, help="models timed in loop, map and torch_loop")
    parser.add_argument("--model", choices=["resnet9", "cnn", "mlp"], default="resnet9", help="cnn, mlp: smoke runs")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    parser.add_argument("--image-size", type=positive_int, default=32, help="image height and width (CIFAR-10: 32)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="most timed epochs per contender (best is kept)")
    parser.add_argument("--min-seconds", type=non_negative_float, default=2.0,
                        help="stop repeating once this much was timed")
    parser.add_argument("--matmul-size", type=positive_int, default=8192, help="n of the n x n matmul-rate probe")
    parser.add_argument("--peak-tflops", type=positive_float, default=None,
                        help="dense peak of the dtype (default: by device)")
    parser.add_argument("--budget-seconds", type=non_negative_float, default=420,
                        help="start no contender after this many seconds")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch contenders")
    parser.add_argument("--output", default=str(common.OUTPUT_DIR / "gpu_check.json"), help="result file")
    return parser


def parse(argv=None) -> argparse.Namespace:
    """The validated arguments (the output file checked before any work)."""
    args = parser().parse_args(argv)
    args.output = common.output_file(args.output)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch = None if args.no_torch else common.torch_or_none()
    torch_note = _torch_note(torch, args)
    kind = jax.devices()[0].device_kind
    peaks = ({"bfloat16" if args.dtype == "bfloat16" else "tf32": args.peak_tflops} if args.peak_tflops
             else peak_tflops(kind, args.dtype))
    result = {
        "benchmark": f"{args.model} ensemble training throughput on one device: the engine's layouts vs per-model "
                     "loops vs PyTorch (per-model and grouped)",
        **common.metadata("benchmarks.gpu_check", argv, torch),
        "data": "random uint8 tensors of CIFAR-10's shape with random labels: throughput only, never accuracy",
        "method": (f"each contender times epochs of --steps={args.steps} steps of batch {args.batch_size}; the job is "
                   "extrapolated from the best step time; a chunk that does not divide the ensemble counts as full"),
        "model": args.model, "dtype": args.dtype, "image_shape": [args.image_size, args.image_size, 3],
        "batch_size": args.batch_size, "steps_timed": args.steps, "budget_seconds": args.budget_seconds,
        "job": {"members": args.members, "epochs": args.epochs, "train_size": args.train_size},
        "flops": "XLA cost_analysis of the compiled single-model epoch (its scan body, one train step, counted once)",
        "peak_tflops": peaks, "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "contenders": {},
    }
    record = Record(result, args.output, args.budget_seconds)
    result["matmul_tflops_per_s"] = common.matmul_gflops(args.matmul_size, jnp.dtype(args.dtype)) / 1e3
    bench = Bench(args, peaks)
    result["job"]["steps_per_epoch"] = bench.full_steps
    result["flops_per_model_step"] = bench.step_flops
    result["job_pflop"] = args.members * args.epochs * bench.full_steps * bench.step_flops / 1e15
    plan = bench.plan()
    chunk = min(args.chunk or plan.chunk_size, args.members)
    result["plan"] = {**plan._asdict(), "describe": plan.describe("vmap epoch"), "chunk_used": chunk}
    record.save()
    bench.prepare(max(chunk, args.loop_models))
    torch_runs = (("torch_grouped", True, args.grouped_models or chunk), ("torch_loop", False, args.loop_models))
    for name, grouped, k in torch_runs:
        record.run(name, (lambda: {"skipped": torch_note}) if torch_note
                   else functools.partial(_fitting, functools.partial(bench.torch, torch, grouped=grouped), k))
    record.run("vmap", lambda: _fitting(functools.partial(bench.ensemble, "vmap"), chunk))
    fitted = result["contenders"]["vmap"].get("models_per_call", chunk)
    one_device = ensemble.device_mesh(jax.devices()[:1])
    record.run("shard_map_1_device", lambda: _fitting(lambda k: bench.ensemble("vmap", k, one_device), fitted))
    record.run("loop", lambda: bench.loop(args.loop_models))
    record.run("map", lambda: bench.ensemble("map", args.loop_models))
    _print(result)
    return result


def _print(result: dict) -> None:
    rows = [{"contender": name, **entry, "step_ms": 1e3 * entry["step_seconds"],
             "mfu_pct": 100 * next(iter(entry["mfu"].values()), math.nan),
             "job_min": entry["extrapolated_job_seconds"] / 60}
            for name, entry in result["contenders"].items() if "step_seconds" in entry]
    print(common.table(rows, [("contender", "contender", "s"), ("models_per_call", "models", "d"),
                              ("step_ms", "step ms", ".2f"), ("images_per_s", "img/s", ",.0f"),
                              ("tflops_per_s", "TFLOP/s", ".3f"), ("mfu_pct", "MFU %", ".1f"),
                              ("job_min", "job min (extrap.)", ",.1f")]))
    for name, entry in result["contenders"].items():
        if "step_seconds" not in entry:
            print(f"{name}: {entry}")
    print(f"{result['device']}; plan: {result['plan']['describe']}; job {result['job_pflop']:.3g} PFLOP; "
          f"{result['seconds']:.0f} s; load average {result['load_average_1min']:.2f}")
    print(f"summary: {result['summary']}")


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
