"""The unlearning study, end to end, shared by ``experiments.fashion`` and ``experiments.cifar``.

Pretrain N replicas; retrain 2N oracles per forget set (0..N-1 are what KLoM compares with,
N..2N-1 are oracle matching's targets); run every config of every method's grid on the N
replicas; score every config -- diverged or not -- by KLoM on the forget, retain and
validation (test) points against the oracles. Every stage is cached in the run directory,
so a rerun (after a crash or a kill) resumes where it stopped and rebuilds the same table:

    run.json                    what the directory holds (another configuration is refused)
    pretrain/                   per-epoch checkpoints of the N replicas
    sets/SET/forget.npy         the forget set (full-split indices; another set of that name is refused)
    sets/SET/oracles/           margins of the 2N oracles, target logits of oracles N..2N-1
    sets/SET/rows/RUN/          result rows of one grid run (one row per epoch count)
    work/                       checkpoints of the run in progress (pruned once it is done)
    results.parquet / .csv      one row per (forget set, method, hyper-parameters, epochs)

Reference rows sit beside the methods in the table: ``pretrained`` (do nothing) and
``oracle`` -- the N target oracles scored against the N evaluation oracles, i.e. the KLoM of
perfect unlearning at this N (the noise floor). With datamodels, ``dm_direct`` (train points
only: the datamodels predict train margins) and the ``dmm`` method are added.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import textwrap
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ascent_jax import datamodels, ensemble, files, forget_sets, klom, train, unlearn
from ascent_jax.cli import add_engine_arguments, positive_float, positive_int, prng_seed, read_run_file
from ascent_jax.models import Model
from ascent_jax.unlearn import grids
from experiments import plots


DATAMODEL_FLAGS = {  # target sources built from files the user passes, and the flag that passes each
    "datamodels": "--datamodels (datamodels.npz of python -m ascent_jax.forget_sets)",
    "class_datamodels": "--class-datamodels (class_datamodels.npz of python -m ascent_jax.forget_sets --logits "
                        "--fit-classes)"}
PARTIAL = "partial_retrain"  # rows of retraining stopped after k of its E epochs
NO_DATAMODELS = "none"  # a text column's value where it does not apply (not "": CSV would read it back as NaN)
MIN_REPLICAS = 2  # KLoM compares margin distributions over replicas
MAX_STEPS = 2**31 - 1  # optimiser step counters are int32
HOST_MEMORY_FRACTION = 0.8  # of the machine's RAM a plan may use for what the study holds on the host
FLOOR_SPLITS = 50  # random re-splits of the oracles behind the noise floor's interval


@dataclasses.dataclass
class Setup:
    """What a study runs on and what it runs; built and validated by the CLIs before any output."""

    dataset: str
    model: Model
    train: train.TrainConfig
    images: np.ndarray  # the study's training points (uint8 NHWC)
    labels: np.ndarray
    subset: np.ndarray  # their indices in the full train split
    test_images: np.ndarray
    test_labels: np.ndarray
    norm: train.Normalization
    ensemble: int
    options: ensemble.RunOptions  # seed, chunking, layout, mesh, checkpoint policy, progress
    forget_sets: dict[str, np.ndarray]  # name -> full-split indices
    methods: tuple[str, ...]
    grid: str
    lr: float | None = None
    datamodel_matrix: np.ndarray | None = None  # (n, n) margin datamodels on the study points
    class_datamodels: datamodels.ClassDatamodels | None = None  # per-class logit datamodels of some rows
    keep_checkpoints: bool = False
    notes: tuple[str, ...] = ()  # printed with the plan (e.g. that forget sets fell back to random ones)
    smoke: bool = False  # a smoke-run preset: its N is too small for KLoM to mean anything, and it says so

    def fingerprint_config(self) -> dict:
        """What pretraining and the oracles depend on: a run directory holds exactly one of these."""
        return {"dataset": self.dataset, "model": self.model.name, "train": dataclasses.asdict(self.train),
                "ensemble": self.ensemble, "seed": self.options.seed, "subset": ensemble.digest(self.subset),
                "test": ensemble.digest(self.test_labels)}

    def identity(self) -> dict:
        """The run's identity, a column each in every result row, so two studies' rows never pass as one's."""
        return {"dataset": self.dataset, "model": self.model.name, "ensemble": self.ensemble, "seed": self.options.seed,
                "pretrain": json.dumps(dataclasses.asdict(self.train), sort_keys=True),
                "subset_digest": ensemble.digest(self.subset), "test_digest": ensemble.digest(self.test_labels)}

    def datamodels_digest(self, source: str | None = "datamodels") -> str:
        """Digest of the datamodels a target source uses (``"none"`` for other sources or without them)."""
        if source == "datamodels" and self.datamodel_matrix is not None:
            return ensemble.digest(self.datamodel_matrix)
        if source == "class_datamodels" and self.class_datamodels is not None:
            cdm = self.class_datamodels
            return ensemble.fingerprint([ensemble.digest(a) for a in (cdm.rows, cdm.matrix, cdm.bias)])
        return NO_DATAMODELS

    def sources(self) -> frozenset[str]:
        """The target sources this study can build: the oracles always, datamodels when given."""
        return frozenset({"oracles"} | {source for source in DATAMODEL_FLAGS
                                        if self.datamodels_digest(source) != NO_DATAMODELS})


# --------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser, *, ensemble_size: int, model: str, models: list[str], epochs: int,
                  grid: str, out: str, forget_help: str) -> None:
    """The flags both study CLIs share (the issue's list plus the engine's: chunking, layout, checkpoints, processes)."""
    parser.add_argument("--ensemble", type=positive_int, default=ensemble_size,
                        help=f"replicas N; 2N oracles are trained per forget set (default {ensemble_size})")
    parser.add_argument("--model", choices=models, default=model, help=f"architecture (default {model})")
    parser.add_argument("--epochs", type=positive_int, default=epochs, help=f"pretraining epochs (default {epochs})")
    parser.add_argument("--pretrain-lr", type=positive_float, default=0.4, help="peak pretraining learning rate (default 0.4)")
    parser.add_argument("--batch-size", type=positive_int, default=512, help="pretraining batch size (default 512)")
    parser.add_argument("--method", action="append", default=None,
                        help="unlearning method, repeatable (default: every method of the grid; "
                             f"registered: {', '.join(grid_methods())})")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="run every method at this learning rate instead of its grid's rates")
    parser.add_argument("--forget-set", action="append", default=None, metavar="NAME|FILE", help=forget_help)
    parser.add_argument("--grid", default=grid, help=f"grid preset: {', '.join(grids.presets())} (default {grid})")
    parser.add_argument("--data-dir", default=None, help="folder with the data set files")
    parser.add_argument("--out", default=out, help=f"run directory (default {out}); rerunning resumes")
    parser.add_argument("--seed", type=prng_seed, default=0, help="base seed (replica i uses fold_in(key(seed), i))")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep every finished run's checkpoints under RUN_DIR/work (default: prune them)")
    parser.add_argument("--snapshot", type=Path, default=None, metavar="DIR",
                        help="train nothing: tabulate what --out has finished so far (table, report, plots) into "
                             "DIR; safe while the study runs in another process")
    add_engine_arguments(parser)


def grid_methods() -> tuple[str, ...]:
    """Registered methods that some grid preset runs (the references, do-nothing and retraining, have none)."""
    return tuple(name for name in unlearn.names() if unlearn.get(name).grids)


def needs_datamodels(method: str) -> bool:
    """Whether the study builds ``method``'s targets from datamodels (DM-direct's predictions)."""
    return unlearn.get(method).targets in DATAMODEL_FLAGS


def check_methods(requested: list[str] | None, grid: str, sources: frozenset[str] = frozenset({"oracles"})
                  ) -> tuple[str, ...]:
    """The methods to run, validated against the registry, the grid preset and the target ``sources`` at hand.

    Without ``requested``: every method of the grid whose targets can be built.
    """
    presets = grids.presets()
    if grid not in presets:
        raise ValueError(f"unknown grid preset {grid!r}; choose one of {', '.join(presets)}")
    available = [m for m in grid_methods() if m in presets[grid]]
    if requested is None:
        return tuple(m for m in available if unlearn.get(m).targets in sources | {None})
    for name in requested:
        unlearn.get(name)  # unknown names: the registry's message
        if name not in presets[grid]:
            raise ValueError(f"grid {grid!r} has no configs for method {name!r}; it covers {', '.join(available)}")
        source = unlearn.get(name).targets
        if source in DATAMODEL_FLAGS and source not in sources:
            raise ValueError(f"method {name} needs datamodels: pass {DATAMODEL_FLAGS[source]}")
    return tuple(dict.fromkeys(requested))


def resolve_forget_sets(requested: list[str], available: dict[str, np.ndarray], num_train: int,
                        subset: np.ndarray) -> dict[str, np.ndarray]:
    """Forget sets by name (of ``available``), ``all``, or index file; each must lie in the study subset."""
    chosen: dict[str, np.ndarray] = {}
    files_named: dict[str, Path] = {}  # set name -> the index file it came from
    for item in requested:
        if item == "all":
            chosen.update(available)
        elif item in available:
            chosen[item] = available[item]
        elif Path(item).suffix in (".npy", ".txt", ".json") or Path(item).exists():
            path, name = Path(item), Path(item).stem
            if name in available:
                raise ValueError(f"forget set file {path} is named {name!r} like a set of the forget-sets folder; "
                                 "rename the file (forget-set names must be unique in a run)")
            if name in files_named and files_named[name].resolve() != path.resolve():
                raise ValueError(f"forget set files {files_named[name]} and {path} are both named {name!r}; rename "
                                 "one (forget-set names must be unique in a run)")
            files_named[name] = path
            chosen[name] = forget_sets.load_index_file(item, num_train)
        else:
            raise ValueError(f"unknown forget set {item!r}: give a set name ({', '.join(available) or 'none available'}), "
                             "'all', or an index file (.npy/.txt/.json)")
    for name, indices in chosen.items():
        outside = np.setdiff1d(indices, subset)
        if outside.size:
            raise ValueError(f"forget set {name}: {outside.size} indices are not in the study's training subset, "
                             f"e.g. {outside[:5].tolist()}; forget sets must be drawn from the study points")
        if len(indices) >= len(subset):
            raise ValueError(f"forget set {name} has {len(indices)} points, nothing of the {len(subset)} study points "
                             "would be retained")
    return chosen


def grid_configs(method: str, grid: str, lr: float | None) -> list:
    """The grid's configs for ``method``; with ``lr`` every config runs at that rate instead (deduplicated)."""
    configs = grids.expand(method, grid)
    if lr is not None:
        configs = list(dict.fromkeys(dataclasses.replace(c, lr=lr) for c in configs))
    return configs


# --------------------------------------------------------------------------------------------
# Scoring


def accuracy(correct: np.ndarray | None) -> float:
    """Fraction of (replica, point) pairs classified correctly (NaN without predictions)."""
    return float(np.mean(correct)) if correct is not None and correct.size else float("nan")


def mean_margins(margins: np.ndarray) -> np.ndarray:
    """Mean over replicas of each point's margin, ignoring non-finite ones (NaN where none is finite)."""
    finite = np.isfinite(margins)
    with np.errstate(invalid="ignore"):
        return np.where(finite, margins, 0).sum(axis=0) / finite.sum(axis=0)


def p95(values: np.ndarray) -> float:
    """95th percentile of the finite values (NaN if none is)."""
    finite = values[np.isfinite(values)]
    return float(np.percentile(finite, 95)) if finite.size else float("nan")


def floor_interval(oracle: np.ndarray, targets: np.ndarray, positions: dict[str, np.ndarray]) -> dict[str, float]:
    """95 % range of the noise floor's KLoM p95 per split over random re-splits of the 2N oracles into two
    disjoint groups of N (:func:`ascent_jax.klom.noise_floor`): what two independent retrainings score against
    each other at this N. A method's KLoM inside it cannot be told from retraining. (Resampling models with
    replacement would not do: duplicated models make the histograms spikier and inflate KLoM.)"""
    pool, row = np.concatenate([oracle, targets]), {}
    for split, where in positions.items():
        if not len(where):
            continue
        splits = klom.noise_floor(pool[:, where], len(oracle), n_repeats=FLOOR_SPLITS)
        low, high = np.quantile([p95(values) for values in splits], [0.025, 0.975])
        row[f"klom_p95_{split}_ci_low"], row[f"klom_p95_{split}_ci_high"] = float(low), float(high)
    return row


def score(oracle: np.ndarray, unlearned: np.ndarray, correct: np.ndarray | None,
          positions: dict[str, np.ndarray]) -> dict[str, float]:
    """KLoM p95/mean per split vs the evaluation oracles, on all replicas and on halves A/B; accuracies;
    correlation and mean absolute difference of the mean margins with the oracles' on forget/retain points.

    ``correct`` ``(K, n_eval)``: whether each replica classifies each point correctly (``None``:
    accuracies are NaN, as for DM-direct, which predicts margins only).
    """
    values = klom.klom(oracle, unlearned)
    row: dict[str, float] = {}
    for split, where in positions.items():
        part = values[where]
        finite = part[np.isfinite(part)]
        row[f"klom_p95_{split}"] = p95(part)
        row[f"klom_mean_{split}"] = float(np.mean(finite)) if finite.size else float("nan")
        row[f"acc_{split}"] = accuracy(None if correct is None else correct[:, where])
    for split in ("forget", "retain"):  # the datamodel-matching paper's Fig. 4: mean margins vs the oracles'
        ours, theirs = mean_margins(unlearned[:, positions[split]]), oracle[:, positions[split]].mean(axis=0)
        usable = np.isfinite(ours)
        row[f"margin_corr_{split}"] = (float(np.corrcoef(ours[usable], theirs[usable])[0, 1])
                                       if usable.sum() > 2 and np.std(ours[usable]) > 0 else float("nan"))
        row[f"margin_mae_{split}"] = float(np.mean(np.abs(ours[usable] - theirs[usable]))) if usable.any() else float("nan")
    half = len(unlearned) // 2
    for name, rows in (("a", slice(0, half)), ("b", slice(half, None))):
        if half >= 2:
            forget = klom.klom(oracle[:, positions["forget"]], unlearned[rows][:, positions["forget"]])
            row[f"klom_p95_forget_{name}"] = p95(forget)
        else:
            row[f"klom_p95_forget_{name}"] = float("nan")
        row[f"acc_val_{name}"] = accuracy(None if correct is None else correct[rows][:, positions["val"]])
    return row


def read_saved_forget_set(path: Path) -> np.ndarray:
    """A run directory's ``sets/NAME/forget.npy``; a damaged one is named with what to delete."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path} is damaged ({type(error).__name__}); delete {path.parent} and rerun to recompute "
                         "that forget set's stages") from None


def device_name() -> str:
    """The accelerator (or CPU) the study runs on, for the table."""
    device = jax.devices()[0]
    return f"{device.platform}:{device.device_kind}"


# --------------------------------------------------------------------------------------------
# Stages


class Study:
    """Runs the stages of :class:`Setup` into a run directory; every stage is cached there."""

    def __init__(self, setup: Setup, out: Path):
        self.setup, self.out = setup, Path(out)
        self.num_train = len(setup.images)
        self.eval_labels = np.concatenate([setup.labels, setup.test_labels])
        self.device = device_name()

    # ---- bookkeeping

    def claim(self, read_only: bool = False) -> None:
        """Create the run directory, or check that it holds this configuration.

        Also deletes the half-written temp files a killed run leaves behind (one study process
        per run directory) -- unless ``read_only`` (a snapshot of a run in progress).
        """
        config = self.setup.fingerprint_config()
        tag = ensemble.fingerprint(config)
        path = self.out / "run.json"
        if path.exists():
            held = read_run_file(path)
            if held.get("fingerprint") != tag:
                differ = sorted(k for k in config if held.get("config", {}).get(k) != json.loads(json.dumps(config[k])))
                raise ValueError(f"{self.out} holds a study with another configuration (differs in: "
                                 f"{', '.join(differ) or 'fingerprint'}); use another --out, or delete {self.out} to "
                                 "start fresh")
            if not read_only and ensemble.is_writer():
                for stale in self.out.rglob(".*.tmp"):
                    stale.unlink()
                ensemble.remove_partial(self.out)
            return
        if read_only:
            raise ValueError(f"{self.out} holds no study yet (no run.json); nothing to snapshot")
        self.out.mkdir(parents=True, exist_ok=True)
        files.atomic_write(path, lambda h: h.write(json.dumps({"fingerprint": tag, "config": config},
                                                                     indent=2, default=str).encode()))

    def check_set(self, name: str, forget: np.ndarray, read_only: bool = False) -> None:
        """Record ``sets/NAME/forget.npy``, or check that the cached stages of NAME used these indices."""
        path = self.out / "sets" / name / "forget.npy"
        if path.exists() or read_only:
            if not np.array_equal(read_saved_forget_set(path), forget):
                raise ValueError(f"{path.parent} holds results for another forget set named {name!r}; rename the "
                                 f"set's file, use another --out, or delete {path.parent}")
            return
        files.atomic_write(path, lambda h: np.save(h, np.asarray(forget, np.int64)))

    def release(self) -> None:
        """Remove what :meth:`claim` and pretraining wrote into a fresh run directory (the folder too if it is empty)."""
        if not ensemble.is_writer():
            return
        shutil.rmtree(self.out / "pretrain", ignore_errors=True)
        for name in ("run.json", "pretrain_accuracy.csv"):
            (self.out / name).unlink(missing_ok=True)
        if not any(self.out.iterdir()):
            self.out.rmdir()

    def prune(self, directory: Path) -> None:
        """Delete a finished stage's checkpoints unless --keep-checkpoints."""
        if not self.setup.keep_checkpoints:
            shutil.rmtree(directory, ignore_errors=True)

    def positions(self, forget: np.ndarray) -> dict[str, np.ndarray]:
        """Positions of the forget / retain / validation points in the evaluation margins."""
        forget_pos = datamodels.positions_in_subset(self.setup.subset, forget)
        retain_pos = np.setdiff1d(np.arange(self.num_train), forget_pos)
        return {"forget": forget_pos, "retain": retain_pos,
                "val": np.arange(self.num_train, self.num_train + len(self.setup.test_labels))}

    # ---- stages

    def pretrain(self, read_only: bool = False) -> tuple[Any, np.ndarray, np.ndarray]:
        """The N pretrained replicas (variables), their margins and correctness on the evaluation points.

        ``read_only``: only if pretraining has finished (else ``ValueError``); nothing is written.
        """
        s = self.setup
        if read_only:
            done = ensemble.finished_epochs(self.out / "pretrain")
            if not done or min(done) < s.train.epochs:
                raise ValueError(f"pretraining in {self.out} has not finished; nothing to snapshot yet")
        fresh, started = not any((self.out / "pretrain").glob("members-*")), time.time()
        result = train.train_ensemble(s.model, s.train, s.images, s.labels, s.norm, s.options, num_members=s.ensemble,
                                      checkpoint_dir=self.out / "pretrain", desc="pretrain")
        seconds = time.time() - started
        margins, correct = train.margin_evaluator(s.model, s.norm, np.concatenate([s.images, s.test_images]),
                                                  self.eval_labels, s.options)(result.states)
        broken = ~np.isfinite(margins).all(axis=1)
        if broken.any():  # the loss checked each epoch was finite, but the last step left non-finite weights
            raise train.DivergedError(f"member(s) {np.flatnonzero(broken).tolist()} have non-finite outputs after "
                                      f"pretraining; lower the learning rate (peak_lr={s.train.peak_lr})")
        test_accuracy = np.mean(correct[:, self.num_train:], axis=1)
        table = pd.DataFrame({"member": np.arange(s.ensemble), "model": s.model.name, "epochs": s.train.epochs,
                              "train_loss": result.metrics["loss"][-1], "test_accuracy": test_accuracy})
        if read_only:
            return result.states, margins, correct
        files.atomic_write(self.out / "pretrain_accuracy.csv", lambda h: h.write(table.to_csv(index=False).encode()))
        if ensemble.is_writer():
            print(f"pretrained replicas: test accuracy mean {test_accuracy.mean():.4f}, min {test_accuracy.min():.4f}, "
                  f"max {test_accuracy.max():.4f} (per member: {self.out / 'pretrain_accuracy.csv'})", flush=True)
            if fresh:
                print(estimate(s, seconds), flush=True)
        return result.states, margins, correct

    def oracles(self, name: str, forget: np.ndarray) -> dict[str, np.ndarray]:
        """2N oracles retrained without ``forget``: margins of all, target logits of N..2N-1 (cached).

        Also the margins of oracles N..2N-1 after each of the first E-1 epochs (``partial_margins``
        ``(E-1, N, n_eval)``): partial retraining, the same recipe stopped after k of its E epochs.
        """
        s = self.setup
        store, tag = ensemble.Store(self.out / "sets" / name), self.stage_tag(forget)
        cached = store.load("oracles", tag)
        if cached is not None:
            return cached[0]
        positions = datamodels.positions_in_subset(s.subset, forget)
        work = self.out / "work" / name / "oracles"
        epochs = s.train.epochs
        result = unlearn.unlearn(unlearn.RetrainConfig(train=s.train), s.model, None, s.images, s.labels, s.norm,
                                 positions, s.options, num_members=2 * s.ensemble, test_images=s.test_images,
                                 test_labels=s.test_labels, keep_variables=True, checkpoint_dir=work,
                                 snapshot_epochs=range(1, epochs + 1))
        if result.diverged.any():
            raise ValueError(f"retraining the oracles of forget set {name} diverged (oracles "
                             f"{np.flatnonzero(result.diverged).tolist()[:5]}...) under the pretraining recipe; delete "
                             f"{self.out} and rerun with a lower --pretrain-lr")
        _, targets = unlearn.split_oracles(result.variables[epochs], s.ensemble)
        arrays = {"margins": result.margins[epochs], "correct": result.correct[epochs],
                  "target_logits": unlearn.target_logits(s.model, targets, s.images, s.norm, s.options).astype(np.float32)}
        if epochs > 1:  # the store keeps no empty arrays
            arrays["partial_margins"] = np.stack([result.margins[k][s.ensemble:] for k in range(1, epochs)])
            arrays["partial_correct"] = np.stack([result.correct[k][s.ensemble:] for k in range(1, epochs)])
        store.save("oracles", tag, arrays)
        self.prune(work)
        return arrays

    def reference_rows(self, name: str, forget: np.ndarray, oracle: dict, pretrained_margins: np.ndarray,
                       pretrained_correct: np.ndarray, dm_margins: np.ndarray | None,
                       class_targets: tuple[np.ndarray, np.ndarray] | None = None, read_only: bool = False) -> list[dict]:
        """The pretrained model, the independent oracles (noise floor), partial retraining and DM-direct, scored
        like methods.

        Partial retraining (``partial_retrain``, epochs k < E, cost k/E) is the target oracles'
        snapshot after k epochs, scored against the evaluation oracles as the oracle row is.
        ``dm_direct_class`` (per-class datamodels' DM-direct) is scored on the rows they cover only:
        the forget set and, as its retain split, the covered retain points.

        Their rows are also kept in the set's store (``rows/references``, ``rows/dm_direct-DIGEST``)
        so the table of a later invocation still has them (:meth:`finished_rows`).
        """
        n = self.setup.ensemble
        positions = self.positions(forget)
        evaluation = oracle["margins"][:n]
        entries = {"rows/references": [
            self.row(name, forget, "pretrained", {}, 0.0, score(evaluation, pretrained_margins, pretrained_correct,
                                                                 positions)),
            self.row(name, forget, "oracle", {}, 1.0, {
                **score(evaluation, oracle["margins"][n:], oracle["correct"][n:], positions),
                **floor_interval(evaluation, oracle["margins"][n:], positions)})]}
        epochs = self.setup.train.epochs
        for k, (margins, correct) in enumerate(zip(oracle.get("partial_margins", []), oracle.get("partial_correct", [])),
                                               start=1):
            entries["rows/references"].append(self.row(name, forget, PARTIAL, {"epochs": k}, k / epochs,
                                                        score(evaluation, margins, correct, positions)))
        if dm_margins is not None:
            train_positions = {k: v for k, v in positions.items() if k != "val"}
            scores = score(evaluation[:, : self.num_train], dm_margins, None, {**train_positions, "val": np.arange(0)})
            digest = self.setup.datamodels_digest()
            entries[f"rows/dm_direct-{digest}"] = [self.row(name, forget, "dm_direct", {}, 0.0, scores,
                                                            datamodels=digest)]
        if class_targets is not None:
            targets, covered = class_targets
            predicted = np.full((targets.shape[0], self.num_train), np.nan, np.float32)
            predicted[:, covered] = klom.margins(targets[:, covered], self.setup.labels[covered])
            split = {"forget": positions["forget"], "retain": np.setdiff1d(covered, positions["forget"]),
                     "val": np.arange(0)}
            scores = score(evaluation[:, : self.num_train], predicted, None, split)
            digest = self.setup.datamodels_digest("class_datamodels")
            entries[f"rows/dm_direct_class-{digest}"] = [self.row(name, forget, "dm_direct_class", {}, 0.0, scores,
                                                                  datamodels=digest)]
        store, tag = ensemble.Store(self.out / "sets" / name), self.stage_tag(forget)
        rows = []
        for entry, entry_rows in entries.items():
            entry_rows = json.loads(json.dumps(entry_rows))  # exactly as a later invocation reads them back
            if not read_only and not store.check(entry, tag):
                store.save(entry, tag, meta={"rows": entry_rows})
            rows += entry_rows
        return rows

    def finished_rows(self, have: set[tuple[str, str]]) -> list[dict]:
        """Rows of every stage finished in the run directory by any invocation, except the entries ``have``.

        A run directory's table accumulates: rerunning it with other methods or forget sets adds
        rows and never drops those an earlier invocation computed.
        """
        rows = []
        for forget_file in sorted((self.out / "sets").glob("*/forget.npy")):
            name = forget_file.parent.name
            store, tag = ensemble.Store(forget_file.parent), self.stage_tag(read_saved_forget_set(forget_file))
            for entry in sorted(p.name for p in (forget_file.parent / "rows").glob("[!.]*")):
                if (name, f"rows/{entry}") not in have and store.check(f"rows/{entry}", tag):
                    rows += store.meta(f"rows/{entry}")["rows"]
        return rows

    def row(self, name, forget, method, params: dict, cost: float, scores: dict, *, datamodels: str = NO_DATAMODELS,
            **extra) -> dict:
        """One tidy result row, with the run's identity and the digests of its forget set and datamodels.

        ``params`` is the method's config as a dict (:func:`dataclasses.asdict`); its optimiser
        and its matching target convention also get columns of their own (``"none"`` without).
        """
        optimizer = params.get("optimizer")
        return {"forget_set": name, "forget_size": len(forget), "method": method,
                "params": json.dumps(params, sort_keys=True), "lr": params.get("lr", np.nan),
                "epochs": params.get("epochs", 0),
                "optimizer": unlearn.Optimizer(**optimizer).describe() if optimizer else NO_DATAMODELS,
                "target": params.get("target", NO_DATAMODELS), **scores, "diverged": False, "diverged_fraction": 0.0,
                "diverged_fraction_a": 0.0, "diverged_epoch": -1, "relative_cost": cost, "wall_time_s": 0.0,
                "device": self.device, **self.setup.identity(), "forget_digest": ensemble.digest(np.asarray(forget, np.int64)),
                "datamodels_digest": datamodels, **extra}

    def rows_datamodels(self, method: str) -> str:
        """The datamodels digest a method's rows depend on (``"none"`` unless its targets come from datamodels)."""
        return self.setup.datamodels_digest(unlearn.get(method).targets)

    def rows_entry(self, run: grids.Run) -> str:
        """The store entry (under ``sets/SET``) of the rows of one grid run."""
        method = unlearn.get(run.config).name
        key = ensemble.fingerprint({"config": dataclasses.asdict(run.config), "snapshots": run.snapshot_epochs,
                                    "datamodels": self.rows_datamodels(method)})
        return f"rows/{method}-{key}"

    def stage_tag(self, forget: np.ndarray) -> str:
        """The fingerprint of a forget set's cached stages: the study's configuration and the set."""
        return ensemble.fingerprint({"study": self.setup.fingerprint_config(),
                                     "forget": ensemble.digest(np.asarray(forget, np.int64))})

    def class_targets(self, forget: np.ndarray, pretrained_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """DMM's per-class targets ``(K, n, C)``: DM-direct's predicted logits on the rows the class datamodels
        cover (the pretrained logits elsewhere, never read), and those rows."""
        cdm = self.setup.class_datamodels
        predicted = datamodels.dm_direct_logits(pretrained_logits[:, cdm.rows], cdm,
                                                datamodels.positions_in_subset(self.setup.subset, forget))
        targets = np.array(pretrained_logits, np.float32)
        targets[:, cdm.rows] = predicted
        return targets, cdm.rows

    def grid_run(self, name: str, forget: np.ndarray, run: grids.Run, pretrained: Any, targets: np.ndarray | None,
                 oracle_margins: np.ndarray, target_rows: np.ndarray | None = None) -> list[dict]:
        """Run one grid run (one config at its largest epoch count, snapshotted at the others); cached rows."""
        s = self.setup
        method = unlearn.get(run.config).name
        store, entry, tag = ensemble.Store(self.out / "sets" / name), self.rows_entry(run), self.stage_tag(forget)
        cached = store.load(entry, tag)
        if cached is not None:
            return cached[1]["rows"]
        positions = self.positions(forget)
        work = self.out / "work" / name / Path(entry).name
        started = time.time()
        result = unlearn.unlearn(run.config, s.model, pretrained, s.images, s.labels, s.norm, positions["forget"],
                                 s.options.replace(progress=False), snapshot_epochs=run.snapshot_epochs,
                                 test_images=s.test_images, test_labels=s.test_labels, targets=targets,
                                 target_rows=target_rows, checkpoint_dir=work)
        wall = time.time() - started
        half = s.ensemble // 2
        rows = []
        for epochs in run.snapshot_epochs:
            config = dataclasses.replace(run.config, epochs=epochs)
            diverged = result.diverged_by(epochs)
            cost = unlearn.relative_cost(config, len(positions["forget"]), len(positions["retain"]), s.train.epochs)
            rows.append(self.row(
                name, forget, method, dataclasses.asdict(config), cost,
                score(oracle_margins, result.margins[epochs], result.correct[epochs], positions),
                diverged=bool(diverged.any()),
                diverged_fraction=float(diverged.mean()), diverged_fraction_a=float(diverged[:half].mean()),
                diverged_epoch=int(result.diverged_epoch[diverged].min()) if diverged.any() else -1,
                wall_time_s=wall, datamodels=self.rows_datamodels(method)))
        rows = json.loads(json.dumps(rows))  # exactly as a resumed run reads them back
        store.save(entry, tag, meta={"rows": rows})
        self.prune(work)
        return rows

    # ---- the whole study

    def run(self, pretrain_only: bool = False, snapshot: Path | None = None) -> pd.DataFrame | None:
        """All stages; returns the results table (also written as results.parquet and results.csv).

        ``pretrain_only`` stops after pretraining (and its accuracy table) and returns ``None``.
        ``snapshot``: train nothing and write nothing into the run directory; tabulate the stages
        finished so far into the folder ``snapshot`` (safe while another process runs the study).
        """
        s = self.setup
        read_only = snapshot is not None
        fresh = not (self.out / "run.json").exists()
        self.claim(read_only)
        try:
            pretrained, pretrained_margins, pretrained_correct = self.pretrain(read_only)
        except train.DivergedError as error:
            if fresh:  # nothing of this study exists yet: do not leave a run directory the fix would be refused by
                self.release()
            raise ValueError(f"pretraining diverged: {error}" + (f"; nothing was kept in {self.out}" if fresh else "")
                             ) from None
        if pretrain_only:
            return None
        dm, class_targets = None, {}
        if s.datamodel_matrix is not None or s.class_datamodels is not None:
            dm = {"pretrained_logits": unlearn.target_logits(s.model, pretrained, s.images, s.norm, s.options)}
        rows, oracles, runs, have = [], {}, [], set()
        sets = dict(s.forget_sets)
        for name, forget in s.forget_sets.items():
            if read_only and not ensemble.Store(self.out / "sets" / name).check("oracles", self.stage_tag(forget)):
                del sets[name]
                continue
            self.check_set(name, forget, read_only)
        for name, forget in sets.items():
            oracles[name] = self.oracles(name, forget)
            dm_margins = None
            if s.datamodel_matrix is not None:
                forget_pos = datamodels.positions_in_subset(s.subset, forget)
                dm_margins = datamodels.dm_direct_margins(pretrained_margins[:, : self.num_train],
                                                          s.datamodel_matrix, forget_pos).astype(np.float32)
                dm[name] = unlearn.datamodel_targets(dm["pretrained_logits"], s.labels, dm_margins)
            if s.class_datamodels is not None:
                class_targets[name] = self.class_targets(forget, dm["pretrained_logits"])
            rows += self.reference_rows(name, forget, oracles[name], pretrained_margins, pretrained_correct, dm_margins,
                                        class_targets.get(name), read_only)
            have |= {(name, "rows/references"), (name, f"rows/dm_direct-{s.datamodels_digest()}"),
                     (name, f"rows/dm_direct_class-{s.datamodels_digest('class_datamodels')}")}
        # methods outer, sets inner: a partial run already compares every set for the first methods
        for method in s.methods:
            for name in sets:
                runs += [(name, method, run) for run in grids.group_runs(grid_configs(method, s.grid, s.lr))]
        if read_only:
            runs = [(name, method, run) for name, method, run in runs
                    if ensemble.Store(self.out / "sets" / name).check(self.rows_entry(run), self.stage_tag(sets[name]))]
        bar = tqdm(runs, desc="unlearning runs", unit="run", dynamic_ncols=True,
                   disable=not s.options.progress or not ensemble.is_writer())
        for name, method, run in bar:
            bar.set_postfix_str(f"{name} {method} lr={run.config.lr:g}")
            sources = {"oracles": (oracles[name].get("target_logits"), None), "datamodels": ((dm or {}).get(name), None),
                       "class_datamodels": class_targets.get(name, (None, None))}
            targets, target_rows = sources.get(unlearn.get(method).targets, (None, None))
            rows += self.grid_run(name, s.forget_sets[name], run, pretrained, targets,
                                  oracles[name]["margins"][: s.ensemble], target_rows)
            have.add((name, self.rows_entry(run)))
        table = pd.DataFrame(rows + self.finished_rows(have))
        plots.save(table, snapshot or self.out)
        return table


def host_bytes(setup: Setup) -> int:
    """Bytes the study holds on the host at its peak: replicas' and oracles' variables, margins and targets."""
    s = setup
    shapes = jax.eval_shape(lambda key: s.model.init(key, tuple(s.images.shape[1:])), jax.random.key(0))
    per_model = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(shapes))
    n_eval = len(s.images) + len(s.test_images)
    num_classes = int(max(s.labels.max(), s.test_labels.max())) + 1
    margins = n_eval * (4 + 1)  # float32 margin and a correctness flag per point
    return int(3 * s.ensemble * per_model  # pretrained replicas + 2N oracles' variables
               + 4 * s.ensemble * margins  # pretrained, 2N oracles and one unlearning run's margins
               + 2 * s.ensemble * len(s.images) * num_classes * 4)  # target logits (OM, DMM)


SMOKE = ("SMOKE RUN (--quick): at this N, KLoM's noise floor is as large as any gap, so these numbers show that "
         "the pipeline runs, not what the methods do. Drop --quick for the finding.")


def check_plan(setup: Setup, pretrain_only: bool = False) -> None:
    """Refuse a plan that would fail after training started, before anything is trained or written."""
    s = setup
    if s.ensemble < MIN_REPLICAS and not pretrain_only:
        raise ValueError(f"--ensemble {s.ensemble}: KLoM compares the margin distributions of N replicas with N "
                         f"oracles and needs N >= {MIN_REPLICAS}; pass --ensemble {MIN_REPLICAS} or more "
                         "(or --pretrain-only)")
    steps = s.train.epochs * -(-len(s.images) // s.train.batch_size)
    if steps > MAX_STEPS:
        raise ValueError(f"--epochs {s.train.epochs}: {steps} optimiser steps at batch {s.train.batch_size} exceed the "
                         f"step counter's {MAX_STEPS}; pass fewer --epochs")
    needed, available = host_bytes(s), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > HOST_MEMORY_FRACTION * available:
        raise ValueError(f"--ensemble {s.ensemble}: the study would hold about {needed / 2**30:.1f} GiB on the host "
                         f"(replicas' and oracles' weights and margins), more than {HOST_MEMORY_FRACTION:.0%} of this "
                         f"machine's {available / 2**30:.1f} GiB; pass a smaller --ensemble")


def execute(setup: Setup, out: Path, *, pretrain_only: bool = False, snapshot: Path | None = None,
            extra_plan: str | None = None) -> int:
    """What both CLIs do: check and print the plan, run (resuming), draw the plots, print the summary.

    With ``snapshot`` nothing is trained: what ``out`` has finished is tabulated into ``snapshot``.
    """
    check_plan(setup, pretrain_only)
    if ensemble.is_writer():
        print(describe(setup) + (f"\n{extra_plan}" if extra_plan else "") + f"\n{memory_plan(setup)}", flush=True)
    table = Study(setup, out).run(pretrain_only=pretrain_only, snapshot=snapshot)
    if table is None or not ensemble.is_writer():
        return 0
    if snapshot is not None:
        written = plots.render(snapshot)
        print(plots.summary(table))
        print(f"snapshot of {out}: {len(table)} finished rows in {snapshot / 'results.parquet'}; report and plots: "
              + ", ".join(str(p) for p in written))
        return 0
    written = plots.render(out)
    print(plots.summary(table))
    print(f"{len(table)} rows in {out / 'results.parquet'}; report and plots: " + ", ".join(str(p) for p in written))
    for text in [SMOKE if setup.smoke else "What this shows:", *plots.findings(table)]:
        print(textwrap.fill(text, width=plots.WIDTH, subsequent_indent="  "))
    print(f"run directory {out}: {directory_size(out) / 2**20:.1f} MiB ("
          + ("finished runs' checkpoints kept: --keep-checkpoints" if setup.keep_checkpoints else
             "finished runs' checkpoints pruned; the pretrained replicas and oracle margins are kept for reruns") + ")")
    return 0


def directory_size(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def work(setup: Setup) -> dict[str, float]:
    """The plan's example-gradients per stage (evaluation forward passes count a third of one), for its time
    estimate: a run's time is about proportional to them."""
    s = setup
    n, n_eval = len(s.images), len(s.images) + len(s.test_images)
    out = {"pretraining": s.ensemble * (s.train.epochs * n + n_eval / 3), "oracles": 0.0, "unlearning": 0.0}
    for forget in s.forget_sets.values():
        out["oracles"] += 2 * s.ensemble * (s.train.epochs * (n - len(forget)) + n_eval / 3)
        for method in s.methods:
            for run in grids.group_runs(grid_configs(method, s.grid, s.lr)):
                cost = unlearn.get(run.config).cost
                steps = cost(run.config, len(forget), n - len(forget)) if cost is not None else n
                out["unlearning"] += s.ensemble * (steps + len(run.snapshot_epochs) * n_eval / 3)
    return out


def estimate(setup: Setup, pretraining_seconds: float) -> str:
    """The remaining stages' time at the speed pretraining just ran at."""
    stages = work(setup)
    rate = stages["pretraining"] / max(pretraining_seconds, 1e-3)
    rest = (stages["oracles"] + stages["unlearning"]) / rate
    return (f"pretraining took {pretraining_seconds:.0f} s ({rate:,.0f} example-gradients/s); at that speed the "
            f"oracles and unlearning runs ({(stages['oracles'] + stages['unlearning']) / stages['pretraining']:.1f}x "
            f"its work) take about {rest / 60:.1f} min more")


def describe(setup: Setup) -> str:
    """The plan in a few lines: what will be trained and evaluated."""
    s = setup
    runs = {m: len(grids.group_runs(grid_configs(m, s.grid, s.lr))) for m in s.methods}
    configs = {m: len(grid_configs(m, s.grid, s.lr)) for m in s.methods}
    sets = ", ".join(f"{name} ({len(idx)})" for name, idx in s.forget_sets.items())
    lines = ([SMOKE] if s.smoke else []) + [
             f"{s.dataset}: {len(s.images)} training points, {len(s.test_images)} validation (test) points; "
             f"{s.model.name}, {s.train.epochs} epochs, batch {s.train.batch_size}, peak lr {s.train.peak_lr}",
             f"N = {s.ensemble} replicas, {2 * s.ensemble} oracles per forget set; forget sets: {sets}",
             f"grid {s.grid!r}{'' if s.lr is None else f' at lr {s.lr:g}'}: "
             + ", ".join(f"{m} {configs[m]} configs in {runs[m]} runs" for m in s.methods),
             f"trainings: {s.ensemble} pretrained + {2 * s.ensemble * len(s.forget_sets)} oracles + "
             f"{s.ensemble * sum(runs.values()) * len(s.forget_sets)} unlearning runs of one replica",
             "work: " + ", ".join(f"{stage} {count / 1e6:.1f} M" for stage, count in work(s).items())
             + " example-gradients; the time estimate follows pretraining, from its measured speed"]
    return "\n".join(lines + [f"note: {note}" for note in s.notes])



def memory_plan(setup: Setup) -> str:
    """How pretraining's members are chunked to fit the device memory (from XLA's memory analysis)."""
    s = setup
    n = len(s.images)
    plan = ensemble.plan_training(
        train.make_init(s.model, s.train, n, tuple(s.images.shape[1:])), train.make_epoch(s.model, s.train, s.norm, n),
        s.ensemble, (jax.ShapeDtypeStruct(s.images.shape, np.uint8), jax.ShapeDtypeStruct(s.labels.shape, np.int32)),
        jax.ShapeDtypeStruct((s.ensemble, n), np.int32), s.options)
    devices = f"{s.options.num_shards} {jax.devices()[0].platform} device(s), layout {s.options.resolved_layout}"
    return plan.describe(f"pretraining memory on {devices}")
