"""ResNet-9 ensemble throughput for one GPU: the papers' 100 models x 24 epochs on CIFAR-10-shaped data.

Run ``python -m benchmarks.resnet9_gpu`` on a GPU machine (``--help``; it also runs on CPU at a
tiny size, which the tests do); writes ``benchmarks/results/resnet9_gpu.json`` after every
contender, so a run cut short keeps what it measured. The data are random uint8 tensors of
CIFAR-10's shape: the figures are throughput only, never accuracy.

A device command is capped at 10 minutes, so every contender trains a fixed number of steps
(``--steps`` per timed epoch) and the full job -- ``--members`` models x ``--epochs`` epochs x
ceil(``--train-size`` / batch) steps -- is extrapolated from the measured step time. Contenders:
the vmapped ensemble in chunks of each ``--chunks`` size (the pair :func:`ascent_jax.ensemble.run`
compiles), the same single-model epoch jitted and looped over models, and a plain PyTorch
per-model loop (bf16 autocast, channels-last). FLOPs come from XLA's cost analysis of one
compiled train step; MFU is against the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ascent_jax import batches, ensemble, models, train
from benchmarks import common

CIFAR_NORM = train.Normalization((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
SEED = 0
# Dense bf16 peak TFLOP/s (no sparsity) by device-kind substring; the first match wins.
BF16_PEAK_TFLOPS = (("H200", 989.4), ("GH200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.0), ("H100", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0))


def _ints(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value]


def bf16_peak_tflops(device_kind: str) -> float | None:
    """The dense bf16 peak of a known accelerator, else ``None``."""
    return next((peak for name, peak in BF16_PEAK_TFLOPS if name.lower() in device_kind.lower()), None)


def _is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def _memory(compiled) -> dict:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    return {"argument_bytes": analysis.argument_size_in_bytes, "output_bytes": analysis.output_size_in_bytes,
            "temp_bytes": analysis.temp_size_in_bytes, "alias_bytes": analysis.alias_size_in_bytes}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--members", type=int, default=100, help="ensemble size of the extrapolated job")
    parser.add_argument("--epochs", type=int, default=24, help="epochs of the extrapolated job")
    parser.add_argument("--train-size", type=int, default=50_000, help="training images of the extrapolated job")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8, help="steps per timed epoch")
    parser.add_argument("--chunks", type=_ints, default=[10, 25, 50, 100], help="ensemble chunk sizes to time")
    parser.add_argument("--loop-models", type=int, default=2, help="models timed in the per-model loops")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="compute dtype")
    parser.add_argument("--image-size", type=int, default=32, help="image height and width (CIFAR-10: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="most timed epochs per measurement (best is kept)")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="stop repeating once this much was timed")
    parser.add_argument("--matmul-size", type=int, default=8192, help="n of the n x n matmul-rate probe")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by device)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch contender")
    parser.add_argument("--output", type=Path, default=common.RESULTS / "resnet9_gpu.json")
    args = parser.parse_args(argv)

    torch = None if args.no_torch else common.torch_or_none()
    torch_note = "skipped (--no-torch)" if args.no_torch else common.TORCH_MISSING
    device = jax.devices()[0]
    peak = args.peak_tflops or bf16_peak_tflops(device.device_kind)
    batch = args.batch_size
    points = args.steps * batch
    full_steps = batches.steps_per_epoch(args.train_size, batch)
    shape = (args.image_size, args.image_size, 3)
    rng = np.random.default_rng(SEED)
    images = rng.integers(0, 256, (points, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, points).astype(np.int32)
    shared = (jnp.asarray(images), jnp.asarray(labels))

    model = models.build("resnet9", 10, dtype=args.dtype)
    config = train.TrainConfig(batch_size=batch, epochs=args.epochs)
    epoch = train.make_epoch(model, config, CIFAR_NORM, points)
    init = train.make_init(model, config, points, shape)
    vinit, vepoch = ensemble.compiled(init, epoch)  # the pair ensemble.run compiles
    most = max([*args.chunks, args.loop_models])
    subsets = np.broadcast_to(np.arange(points, dtype=np.int32), (most, points))
    initial = jax.device_get(vinit(ensemble.member_keys(SEED, np.arange(most)), subsets))

    def member(i):
        return jax.tree_util.tree_map(lambda leaf: jnp.array(leaf[i]), initial)

    optimizer = train.make_optimizer(config, args.steps)

    def body(state, data_set, indices, valid, key):
        """One step of one model: ``make_epoch``'s scan body."""
        batch_ = train.make_batch(*data_set, indices, valid, key, config, CIFAR_NORM)
        return train.train_step(state, batch_, model=model, optimizer=optimizer)

    example = (np.zeros(batch, np.int32), np.ones(batch, bool), jax.random.key(SEED))
    step_flops = common.cost_flops(jax.jit(body).lower(member(0), shared, *example).compile())
    job_flops = args.members * args.epochs * full_steps * step_flops

    def rates(seconds: list[float], models_per_step: int, models_in_job_per_call: float) -> dict:
        """Step time, throughput, MFU and the extrapolated job time of one contender."""
        step = min(seconds) / args.steps
        achieved = models_per_step * step_flops / step / 1e12
        return {"seconds_samples": seconds, "step_seconds": step, "images_per_s": models_per_step * batch / step,
                "tflops_per_s": achieved, "mfu_bf16": achieved / peak if peak else None,
                "extrapolated_job_seconds": models_in_job_per_call * args.epochs * full_steps * step}

    result = {
        "benchmark": "ResNet-9 ensemble training throughput: vmapped chunks vs jitted per-model loop vs PyTorch loop",
        **common.metadata("benchmarks.resnet9_gpu", argv, torch),
        "data": "random uint8 tensors of CIFAR-10's shape: throughput only, never accuracy",
        "method": (f"each contender times epochs of --steps={args.steps} steps; the job ({args.members} models x "
                   f"{args.epochs} epochs x {full_steps} steps of batch {batch}) is extrapolated from the best step "
                   "time; a chunk size that does not divide the ensemble counts its last chunk as full"),
        "dtype": args.dtype, "image_shape": list(shape), "batch_size": batch, "steps_timed": args.steps,
        "job": {"members": args.members, "epochs": args.epochs, "train_size": args.train_size, "steps_per_epoch": full_steps},
        "flops_per_model_step": step_flops,
        "flops": "XLA cost_analysis of one compiled single-model train step (scan bodies are counted once)",
        "job_pflop": job_flops / 1e15,
        "bf16_peak_tflops": peak,
        "matmul_tflops_per_s": common.matmul_gflops(args.matmul_size, jnp.dtype(args.dtype)) / 1e3,
        "chunks": {},
    }

    def save() -> None:
        result["load_average_1min"] = common.load_average()
        result["peak_bytes_in_use"] = _peak_bytes()
        common.write_json(args.output, result)

    for chunk in sorted(args.chunks):
        state = jax.tree_util.tree_map(lambda leaf: jnp.array(leaf[:chunk]), initial)
        rest = (shared, subsets[:chunk], ensemble.member_keys(SEED, np.arange(chunk)))
        try:
            compiled, compile_s = common.compile_timed(vepoch, state, *rest, jnp.int32(0))
            seconds = common.measure(common.Stepper(compiled, [state], [rest]), args.repeats, args.min_seconds)
        except Exception as error:  # noqa: BLE001 -- an out-of-memory chunk ends the sweep; others propagate
            if not _is_out_of_memory(error):
                raise
            result["chunks"][chunk] = {"error": "out of memory"}
            save()
            break
        result["chunks"][chunk] = {**rates(seconds, chunk, math.ceil(args.members / chunk)),
                                   "compile_seconds": compile_s, **_memory(compiled), "peak_bytes_in_use": _peak_bytes()}
        save()

    n = args.loop_models
    members = [(member(i), (shared, subsets[i], jax.random.fold_in(jax.random.key(SEED), i))) for i in range(n)]
    compiled, compile_s = common.compile_timed(jax.jit(epoch, donate_argnums=0), members[0][0], *members[0][1],
                                               jnp.int32(0))
    stepper = common.Stepper(compiled, [m[0] for m in members], [m[1] for m in members])
    seconds = [s / n for s in common.measure(stepper, args.repeats, args.min_seconds)]
    result["loop"] = {**rates(seconds, 1, args.members), "models_timed": n, "compile_seconds": compile_s}
    save()

    if torch is None:
        result["torch"] = {"skipped": torch_note}
    else:
        cuda = torch.cuda.is_available()
        run = functools.partial(common.torch_train_models, "resnet9", images, labels, models=n, epochs=1,
                                batch_size=batch, mean=CIFAR_NORM.mean, std=CIFAR_NORM.std,
                                device="cuda" if cuda else "cpu", bf16=args.dtype == "bfloat16")
        elapsed = [s / n for s in common.repeat_until(run, args.repeats, args.min_seconds)]
        result["torch"] = {**rates(elapsed, 1, args.members), "models_timed": n,
                           "device": torch.cuda.get_device_name() if cuda else "cpu",
                           "autocast_bf16": cuda and args.dtype == "bfloat16"}

    timed_chunks = {c: v for c, v in result["chunks"].items() if "step_seconds" in v}
    if timed_chunks:
        best = min(timed_chunks, key=lambda c: timed_chunks[c]["extrapolated_job_seconds"])
        fastest = timed_chunks[best]
        result["best_chunk"] = best
        result["summary"] = {
            "best_chunk": best,
            "extrapolated_job_minutes": fastest["extrapolated_job_seconds"] / 60,
            "mfu_bf16": fastest["mfu_bf16"],
            "vs_loop": result["loop"]["extrapolated_job_seconds"] / fastest["extrapolated_job_seconds"],
            "vs_torch": (result["torch"]["extrapolated_job_seconds"] / fastest["extrapolated_job_seconds"]
                         if "step_seconds" in result["torch"] else None),
        }
        result["summary"]["targets"] = {
            "job_le_10_minutes": result["summary"]["extrapolated_job_minutes"] <= 10,
            "mfu_ge_35pct": None if fastest["mfu_bf16"] is None else fastest["mfu_bf16"] >= 0.35,
            "ge_5x_torch": None if result["summary"]["vs_torch"] is None else result["summary"]["vs_torch"] >= 5,
        }
    save()

    rows = [{"contender": f"vmap chunk {c}", **v} for c, v in result["chunks"].items() if "step_seconds" in v]
    rows += [{"contender": "jitted loop", **result["loop"]}]
    if "step_seconds" in result["torch"]:
        rows.append({"contender": "torch loop", **result["torch"]})
    for row in rows:
        row["job_min"] = row["extrapolated_job_seconds"] / 60
        row["step_ms"] = 1e3 * row["step_seconds"]
        row["mfu_pct"] = None if row["mfu_bf16"] is None else 100 * row["mfu_bf16"]
    print(common.table(rows, [("contender", "contender", "s"), ("step_ms", "step ms", ".2f"),
                              ("images_per_s", "img/s", ",.0f"), ("tflops_per_s", "TFLOP/s", ".3f"),
                              ("mfu_pct", "MFU %", ".1f"), ("job_min", "job min (extrap.)", ",.1f")]))
    print(f"{result['device']}; {args.members} x ResNet-9 x {args.epochs} epochs = {result['job_pflop']:.3g} PFLOP; "
          f"random CIFAR-shaped data (throughput only); load average {result['load_average_1min']:.2f}")
    if torch is None:
        print(torch_note)
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
