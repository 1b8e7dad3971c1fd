"""The unlearning study on CIFAR-10 at paper scale (GPU-oriented; runs anywhere, slowly).

    python -m experiments.cifar --ensemble 100 --data-dir DIR
    python -m experiments.cifar --ensemble 100 --data-dir DIR --forget-set forget_set_3.npy --dry-run

The same pipeline as ``experiments.fashion`` (see ``experiments/study.py``) on all 50,000
training images with ResNet-9 (``--model resnet18`` for ResNet-18, torchvision's ImageNet stem
unless ``--resnet18-stem cifar``): N replicas, 2N oracles per forget set, the ``paper`` grid.
The replica axis is split over every device (``ascent_jax.ensemble``, ``shard_map``) and trained
``--chunk-size`` replicas at a time (``auto``: as many as fit the device memory); ``--dtype
bfloat16`` computes in bf16; ``--distributed`` spans several processes (see the README).
DIR must hold the official ``cifar-10-python.tar.gz`` / ``cifar-10-batches-py/`` or the binary
``cifar-10-binary.tar.gz`` / ``cifar-10-batches-bin/`` (or a tensorflow-datasets data dir).
Forget sets: ``random10`` / ``random100`` / ``random500`` (drawn by --seed), or index files such
as the officially published ones (validated; full-split indices). ``--dry-run`` prints the
plan -- trainings, estimated FLOPs and time, memory per member and chunk size -- and exits
without training; it needs no ``--data-dir`` (CIFAR-10's sizes are known).
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C at any moment is one line
    from ascent_jax.cli import quiet_interrupts

    quiet_interrupts()

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

from ascent_jax import data, forget_sets, models, train, unlearn
from ascent_jax.cli import ArgumentParser, check_writable, run_main, run_options
from experiments import study


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m experiments.cifar", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_arguments(parser, ensemble_size=100, model="resnet9", models=["resnet9", "resnet18"], epochs=24,
                        grid="paper", out="runs/cifar", forget_help="forget set: random10, random100, random500, "
                        "'all' (the three), or an index file (.npy/.txt/.json); repeatable (default random100)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype (bfloat16: mixed precision, parameters stay float32)")
    parser.add_argument("--resnet18-stem", choices=["imagenet", "cifar"], default="imagenet",
                        help="ResNet-18 stem: torchvision's (as the public benchmark) or the 3x3 CIFAR stem")
    parser.add_argument("--flip", action="store_true", help="random horizontal flips in (re)training")
    parser.add_argument("--crop-padding", type=int, default=0, help="random crops after padding by this many pixels")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and estimated FLOPs, train nothing")
    return parser.parse_args(argv)


def build_setup(args: argparse.Namespace) -> study.Setup:
    """Validate every flag and load CIFAR-10, before anything is written."""
    options = run_options(args, args.seed)  # first: a distributed run is joined before JAX starts
    if args.data_dir is None and not args.dry_run:
        raise ValueError("python -m experiments.cifar needs --data-dir DIR holding CIFAR-10 (cifar-10-python.tar.gz, "
                         "cifar-10-batches-py/, cifar-10-binary.tar.gz, cifar-10-batches-bin/ or a tfds data dir)")
    if args.crop_padding < 0:
        raise ValueError(f"--crop-padding must be non-negative, got {args.crop_padding}")
    check_writable(Path(args.out))
    if args.snapshot is not None:
        check_writable(args.snapshot)
    methods = study.check_methods(args.method, args.grid)
    info = data.CIFAR10
    if args.data_dir is None:  # a dry run plans from CIFAR-10's known sizes; nothing is loaded
        x_train, y_train = np.zeros((info.num_train, *info.image_shape), np.uint8), np.zeros(info.num_train, np.int32)
        x_test, y_test = np.zeros((info.num_test, *info.image_shape), np.uint8), np.zeros(info.num_test, np.int32)
    else:
        x_train, y_train = data.load("cifar10", "train", args.data_dir)
        x_test, y_test = data.load("cifar10", "test", args.data_dir)
    subset = np.arange(len(y_train))
    recipes = [r for r in forget_sets.default_recipes() if r.kind == "random" and r.size < len(subset)]
    built = forget_sets.build_sets(recipes, subset, None, args.seed)
    available = {f"random{r.size}": built[r.name] for r in recipes}
    chosen = study.resolve_forget_sets(args.forget_set or ["random100"], available, len(y_train), subset)
    architecture = {"stem": args.resnet18_stem} if args.model == "resnet18" else {}
    return study.Setup(
        dataset="cifar10", model=models.build(args.model, info.num_classes, dtype=args.dtype, **architecture),
        train=train.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, peak_lr=args.pretrain_lr,
                                flip=args.flip, crop_padding=args.crop_padding),
        images=x_train, labels=y_train, subset=subset, test_images=x_test, test_labels=y_test,
        norm=train.Normalization(info.mean, info.std), ensemble=args.ensemble, options=options,
        forget_sets=chosen, methods=methods, grid=args.grid, lr=args.lr, keep_checkpoints=args.keep_checkpoints)


def forward_flops(setup: study.Setup) -> float:
    """FLOPs of one eval-mode forward pass of one image, from XLA's cost analysis (nothing runs)."""
    shape = (1, *setup.images.shape[1:])
    variables = jax.eval_shape(lambda key: setup.model.init(key, shape[1:]), jax.random.key(0))
    x = jax.ShapeDtypeStruct(shape, np.float32)
    cost = jax.jit(lambda v, x: setup.model.apply(v, x, False)[0]).lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


# Dense peak TFLOP/s of an H100 SXM by compute precision: bf16; float32 matmuls run as TF32 at
# JAX's default precision; --reproducible ("highest") computes them in true float32.
H100_PEAK_TFLOPS = {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9}


def plan(setup: study.Setup, dtype: str, reproducible: bool) -> str:
    """Example-gradients and forward passes of the whole study, FLOPs (backward ~ 2 x forward) and the
    time at 40% of the peak of the precision actually used."""
    s = setup
    n_train, n_eval = len(s.images), len(s.images) + len(s.test_images)
    gradients = s.ensemble * s.train.epochs * n_train
    forwards = s.ensemble * n_eval
    for forget in s.forget_sets.values():
        n_retain = n_train - len(forget)
        gradients += 2 * s.ensemble * s.train.epochs * n_retain
        forwards += 2 * s.ensemble * n_eval
        for method in s.methods:
            for run in unlearn.grids.group_runs(study.grid_configs(method, s.grid, s.lr)):
                cost = unlearn.get(run.config).cost
                gradients += s.ensemble * (cost(run.config, len(forget), n_retain) if cost else 0)
                forwards += s.ensemble * n_eval * len(run.snapshot_epochs)
    flops = forward_flops(s) * (3 * gradients + forwards)
    precision = "bfloat16" if dtype == "bfloat16" else "float32" if reproducible else "tf32"
    peak = H100_PEAK_TFLOPS[precision] * 1e12
    return (f"{gradients:.3g} example-gradients and {forwards:.3g} example forward passes: about {flops:.3g} FLOPs "
            f"({flops / 1e15:.3g} PFLOP; at 40% of an H100's dense {precision} peak of {peak / 1e12:g} TFLOP/s, "
            f"about {flops / (0.4 * peak) / 3600:.2g} h)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = build_setup(args)
    if args.dry_run:
        print(study.describe(setup) + "\n" + plan(setup, args.dtype, args.reproducible) + "\n"
              + study.memory_plan(setup))
        return 0
    return study.execute(setup, Path(args.out), snapshot=args.snapshot,
                         extra_plan=plan(setup, args.dtype, args.reproducible))


if __name__ == "__main__":
    sys.exit(run_main(main))
