"""Fashion-MNIST ensemble pretraining on real data (the README's main job, CPU scale).

    python -m experiments.fashion --ensemble 8 --epochs 2

Trains N replicas as one vmapped program with a progress bar, checkpoints every epoch into
``--out`` (rerunning the same command resumes), prints each member's test accuracy and writes
``pretrain_accuracy.csv`` there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from ascent_jax import checkpoint, data, models, train
from ascent_jax.cli import positive_float, positive_int, run_main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.fashion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ensemble", type=positive_int, default=8, help="number of replicas N (default 8)")
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp",
                        help="architecture (default mlp; cnn is ~20x slower on CPU)")
    parser.add_argument("--epochs", type=positive_int, default=10, help="training epochs (default 10)")
    parser.add_argument("--lr", type=positive_float, default=0.4, help="peak learning rate (default 0.4)")
    parser.add_argument("--batch-size", type=positive_int, default=512, help="batch size (default 512)")
    parser.add_argument("--train-size", type=positive_int, default=None,
                        help="train on the first N training images (default: all 60,000)")
    parser.add_argument("--chunk-size", type=positive_int, default=None,
                        help="members trained at once (default: all); lower it to save memory")
    parser.add_argument("--seed", type=int, default=0, help="base seed; member i uses fold_in(key(seed), i)")
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx .gz files "
                        f"(default {data.FASHION_MNIST_DEFAULT_DIR})")
    parser.add_argument("--out", default="runs/fashion", help="run directory (default runs/fashion)")
    parser.add_argument("--layout", choices=["auto", "vmap", "map"], default="auto",
                        help="how members are batched in the jitted epoch: vmap (accelerators) or lax.map "
                             "(faster on CPU, see benchmarks); auto picks map on CPU (default)")
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    return parser.parse_args(argv)


def check_writable(out: Path) -> None:
    """Fail before any work if the run directory cannot be created or written."""
    existing = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"output directory {out} is not writable; pass --out to a writable folder")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    check_writable(out)
    x_train, y_train = data.load("fashion_mnist", "train", args.data_dir)
    x_test, y_test = data.load("fashion_mnist", "test", args.data_dir)
    if args.train_size is not None:
        if args.train_size > len(x_train):
            raise ValueError(f"--train-size {args.train_size} exceeds the {len(x_train)} training images")
        x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    info = data.FASHION_MNIST
    norm = train.Normalization(info.mean, info.std)
    model = models.build(args.model, info.num_classes)
    config = train.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, peak_lr=args.lr)
    print(f"Fashion-MNIST: {len(x_train)} train / {len(x_test)} test images; {args.ensemble} x {args.model}, "
          f"{args.epochs} epochs, batch {args.batch_size}, peak lr {args.lr}; run dir {out}", flush=True)
    layout = args.layout if args.layout != "auto" else ("map" if jax.default_backend() == "cpu" else "vmap")
    started = time.time()
    result = train.train_ensemble(model, config, x_train, y_train, norm, seed=args.seed, num_members=args.ensemble,
                                  chunk_size=args.chunk_size, checkpoint_dir=out / "pretrain",
                                  progress=not args.no_progress, layout=layout)
    logits = train.predict(model, result.states, x_test, norm)
    accuracy = (logits.argmax(-1) == y_test).mean(axis=1)
    table = pd.DataFrame({"member": np.arange(args.ensemble), "model": args.model, "epochs": args.epochs,
                          "train_loss": result.metrics["loss"][-1], "test_accuracy": accuracy})
    checkpoint.atomic_write(out / "pretrain_accuracy.csv", lambda f: f.write(table.to_csv(index=False).encode()))
    for member, value in enumerate(accuracy):
        print(f"member {member:3d}: test accuracy {value:.4f}")
    print(f"mean {accuracy.mean():.4f}  min {accuracy.min():.4f}  max {accuracy.max():.4f}  "
          f"({time.time() - started:.0f} s; table in {out / 'pretrain_accuracy.csv'})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
