"""The unlearning study on real Fashion-MNIST at CPU scale (the README's main job).

    python -m experiments.fashion                # the finding, about 5 minutes on 2 idle CPU cores
    python -m experiments.fashion --quick        # a smoke run under a minute: its KLoM is noise
    python -m experiments.fashion --ensemble 100 --model mlp --forget-set all --grid cpu

The default (``MAIN``) is the smallest study that shows the papers' headline: N = 50 replicas
of a 128-wide MLP (100 oracles per forget set), large enough that KLoM's noise floor sits well
below doing nothing, on one random and one PC-aligned forget set (``set2-random100``,
``set8-pc2-top100``: the 100 points with the highest PC2 projection of our datamodels), with the
``main`` grid of GA, GDA and OM. It ends with what the table shows, read from it. Flags go up to
the full study; a preset only fills the flags not given. Forget sets come from the committed
output of ``python -m ascent_jax.forget_sets`` (``--forget-sets-dir``); without it, random sets
named ``fallback-randomK`` are used and say so. Results: RUN_DIR/results.parquet (+ .csv),
report.md and plots (``python -m experiments.plots RUN_DIR`` redraws them). Rerunning the same
command resumes; a run directory of another configuration is refused.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C at any moment is one line
    from ascent_jax.cli import quiet_interrupts

    quiet_interrupts()

import argparse
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ascent_jax import data, datamodels, ensemble, forget_sets, models, train
from ascent_jax.cli import ArgumentParser, check_writable, positive_int, prng_seed, run_main, run_options
from experiments import study

FORGET_SETS_DIR = Path(__file__).parent / "forget_sets" / "fashion_mnist"


class Preset(NamedTuple):
    """Defaults of the flags a user does not give."""

    ensemble: int
    model: str
    epochs: int
    subset_size: int
    methods: tuple[str, ...]
    grid: str
    forget_sets: tuple[str, ...]  # used when --forget-sets-dir's sets were drawn from this subset
    out: str
    smoke: bool  # KLoM at this N is noise: the run says so


MAIN = Preset(ensemble=50, model="mlp128", epochs=10, subset_size=10_000, methods=("ga", "gda", "om"), grid="main",
              forget_sets=("set2-random100", "set8-pc2-top100"), out="runs/fashion", smoke=False)
QUICK = Preset(ensemble=4, model="mlp128", epochs=2, subset_size=2_000, methods=("ga", "om"), grid="quick",
               forget_sets=(), out="runs/fashion-quick", smoke=True)  # no datamodel sets of its subset: random


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m experiments.fashion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_arguments(parser, ensemble_size=MAIN.ensemble, model=MAIN.model, models=["mlp", "mlp128", "cnn"],
                        epochs=MAIN.epochs, grid=MAIN.grid, out=MAIN.out,
                        forget_help="forget set: a name from --forget-sets-dir, 'all', or an index file of full-split "
                        "indices; repeatable (default: " + " and ".join(MAIN.forget_sets) + ", or "
                        "fallback-random100 (smaller if the subset is) without datamodel sets of this subset)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run under a minute: N = {QUICK.ensemble}, {QUICK.epochs} epochs, a "
                             f"{QUICK.subset_size}-image subset, {' and '.join(QUICK.methods)}, into {QUICK.out}; "
                             "its KLoM is noise (flags given still apply)")
    parser.add_argument("--subset-size", type=positive_int, default=MAIN.subset_size,
                        help=f"class-balanced study subset of the 60,000 training images (default {MAIN.subset_size})")
    parser.add_argument("--subset-seed", type=prng_seed, default=0, help="seed that draws the study subset (default 0)")
    parser.add_argument("--forget-sets-dir", type=Path, default=FORGET_SETS_DIR,
                        help="output of python -m ascent_jax.forget_sets (default: the committed Fashion-MNIST sets)")
    parser.add_argument("--datamodels", type=Path, default=None,
                        help="datamodels.npz of ascent_jax.forget_sets on the same subset: adds dm_direct and dmm_margin")
    parser.add_argument("--class-datamodels", type=Path, default=None,
                        help="class_datamodels.npz of ascent_jax.forget_sets --logits --fit-classes on the same subset: "
                             "adds dm_direct_class and dmm (per-class targets, the paper's)")
    parser.add_argument("--pretrain-only", action="store_true",
                        help="stop after pretraining the replicas and printing their test accuracy")
    parser.add_argument("--dry-run", action="store_true",
                        help="check and print the plan (work, memory), train and write nothing")
    quick = parser.parse_known_args(argv)[0].quick
    preset = QUICK if quick else MAIN
    parser.set_defaults(ensemble=preset.ensemble, model=preset.model, epochs=preset.epochs,
                        subset_size=preset.subset_size, grid=preset.grid, out=preset.out)
    args = parser.parse_args(argv)
    args.preset = preset
    return args


def available_sets(directory: Path, subset: np.ndarray, labels: np.ndarray, seed: int) -> tuple[dict, str | None]:
    """Datamodel forget sets of ``directory`` if drawn from ``subset``, else random fallbacks and a note why."""
    manifest = forget_sets.read_manifest(directory)
    if manifest is not None:
        if manifest["provenance"].get("subset_digest") == ensemble.digest(subset):
            return {name: forget_sets.load_index_file(directory / entry["file"], len(labels))
                    for name, entry in manifest["sets"].items()}, None
        note = f"the forget sets in {directory} were drawn from another study subset"
    else:
        note = f"no datamodel forget sets in {directory}"
    recipes = [r for r in forget_sets.default_recipes() if r.kind == "random" and r.size < len(subset)]
    sets = forget_sets.build_sets(recipes, subset, None, seed)
    note += ("; using random sets named fallback-random* (python -m ascent_jax.forget_sets computes the "
             "PC-aligned ones)")
    return {f"fallback-random{r.size}": sets[r.name] for r in recipes}, note


def load_datamodels(path: Path, subset: np.ndarray) -> np.ndarray:
    """The ``(n, n)`` datamodel matrix of ``path``, checked to be fitted on the study subset of ``n`` points."""
    what = "pass the datamodels.npz that python -m ascent_jax.forget_sets wrote"
    if not path.exists():
        raise FileNotFoundError(f"datamodels file {path} does not exist; {what}")
    if path.is_dir():
        raise ValueError(f"datamodels file {path} is a directory; {what}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"datamodels file {path} is not an .npz archive; {what}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "matrix" not in archive.files or "subset" not in archive.files:
                raise ValueError(f"{path} is not a datamodels.npz of ascent_jax.forget_sets (needs 'matrix' and "
                                 f"'subset'); {what}")
            if not np.array_equal(archive["subset"], subset):
                raise ValueError(f"the datamodels in {path} were fitted on another study subset; use the same "
                                 "--subset-size and --subset-seed as the forget-sets run")
            matrix = archive["matrix"]
    except (AttributeError, TypeError, OSError, EOFError, zipfile.BadZipFile) as error:
        # np.load returns an array, not an archive, for a .npy: AttributeError/TypeError on .files
        raise ValueError(f"{path} is not a readable datamodels.npz ({type(error).__name__}); {what}") from None
    n = len(subset)
    if matrix.shape != (n, n) or not np.issubdtype(matrix.dtype, np.floating):
        raise ValueError(f"the datamodel matrix in {path} has shape {matrix.shape} and dtype {matrix.dtype}; the "
                         f"study subset needs a float ({n}, {n}) matrix; {what}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"the datamodel matrix in {path} has non-finite entries; fit the datamodels again")
    return matrix


def build_setup(args: argparse.Namespace) -> study.Setup:
    """Validate every flag and load everything a study needs, before anything is written."""
    options = run_options(args, args.seed)  # first: a distributed run is joined before JAX starts
    check_writable(Path(args.out))
    if args.snapshot is not None:
        check_writable(args.snapshot)
    given = {"datamodels": args.datamodels, "class_datamodels": args.class_datamodels}
    sources = frozenset({"oracles"} | {source for source, path in given.items() if path is not None})
    methods = study.check_methods(args.method or list(args.preset.methods), args.grid, sources)
    x_train, y_train = data.load("fashion_mnist", "train", args.data_dir)
    x_test, y_test = data.load("fashion_mnist", "test", args.data_dir)
    subset = datamodels.study_subset(y_train, args.subset_size, args.subset_seed)
    sets, note = available_sets(args.forget_sets_dir, subset, y_train, args.subset_seed)
    if not sets:
        raise ValueError(f"--subset-size {args.subset_size} is too small for any forget set (the smallest random "
                         "fallback has 10 points); pass a larger --subset-size")
    fallback = "fallback-random100" if "fallback-random100" in sets else max(sets, key=lambda n: len(sets[n]))
    requested = args.forget_set or (list(args.preset.forget_sets) if note is None else [fallback])
    chosen = study.resolve_forget_sets(requested, sets, len(y_train), subset)
    matrix = load_datamodels(args.datamodels, subset) if args.datamodels is not None else None
    class_dm = None
    if args.class_datamodels is not None:
        class_dm = datamodels.load_class_datamodels(args.class_datamodels, subset)
        for name, indices in chosen.items():
            missing = np.setdiff1d(datamodels.positions_in_subset(subset, indices), class_dm.rows)
            if missing.size:
                raise ValueError(f"the class datamodels in {args.class_datamodels} do not cover {missing.size} points of "
                                 f"forget set {name}; fit them with python -m ascent_jax.forget_sets --logits "
                                 "--fit-classes on forget sets that include it")
    info = data.FASHION_MNIST
    return study.Setup(
        dataset="fashion_mnist", model=models.build(args.model, info.num_classes),
        train=train.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, peak_lr=args.pretrain_lr),
        images=x_train[subset], labels=y_train[subset], subset=subset, test_images=x_test, test_labels=y_test,
        norm=train.Normalization(info.mean, info.std), ensemble=args.ensemble, options=options,
        forget_sets=chosen, methods=methods, grid=args.grid, lr=args.lr, datamodel_matrix=matrix, class_datamodels=class_dm,
        keep_checkpoints=args.keep_checkpoints, notes=(note,) if note else (), smoke=args.preset.smoke)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = build_setup(args)
    if args.dry_run:
        study.check_plan(setup, args.pretrain_only)
        print(study.describe(setup) + "\n" + study.memory_plan(setup))
        return 0
    return study.execute(setup, Path(args.out), pretrain_only=args.pretrain_only, snapshot=args.snapshot)


if __name__ == "__main__":
    sys.exit(run_main(main))
