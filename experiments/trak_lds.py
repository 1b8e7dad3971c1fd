"""LDS of TRAK against regression datamodels at equal compute, on real Fashion-MNIST (issue #15 item 6).

    python -m experiments.trak_lds                 # the default run: 20-30 min on 2 shared CPU cores
    python -m experiments.trak_lds --subset-size 200 --models 40 --holdout 10 --budgets 8,16 \\
        --proj-dims 16,32 --epochs 2 --out runs/trak_lds-smoke          # a smoke run, its LDS is noise

One ensemble of M models trains on random alpha-subsets (fixed size round(alpha n)) of a
class-balanced study subset of n train points, with the recipe of ``python -m ascent_jax.forget_sets``
(the 784-256-10 MLP, 10 epochs, the triangular schedule) except for the batch: forget_sets' batch 512
and peak lr 0.4 give a 500-point subset 10 SGD steps in all (accuracy 0.40 on the points a model
did not train on), so the default is batch 64 at peak lr 0.1 (0.77). The last ``--holdout``
models are held out: on them the linear datamodeling score (LDS: per target, the Spearman
correlation across models between predicted and actual margins; averaged over all n targets) scores

* **regression datamodels** (``datamodels.fit_datamodels``) on the first m models for each budget m
  of ``--budgets``: fitted on the first m - v, lambda chosen on the next v = max(1, round(m / 10));
* **TRAK** (``trak.datamodels_from_features``: each member's kernel over its own training subset,
  TRAK's averaging) over the first k models, k = floor(m E a / (E a + n)) with E epochs and a =
  round(alpha n) points per model, so both cost the same in example-gradients: a model costs E a
  to train, TRAK one more gradient per point (n) per model. The first models are shared.

TRAK's features are computed once, at the largest of ``--proj-dims`` (one Gaussian projection
drawn once for every model); a smaller d uses the first d columns, which are a Gaussian
projection to d dims up to a scale the unregularised estimator ignores. At the largest d it
also runs TRAK's Algorithm 1 kernel over all n points ("all-rows") and the plain mean of the
members' scores ("scores-avg"). Wall-clock seconds are reported beside the example-gradients:
a projected gradient costs 2 P d FLOPs on top of the gradient, which the example-gradient count
does not see.

Writes OUT/results.csv (one row per method variant x budget), OUT/lds_vs_compute.png and
OUT/report.md. Training is checkpointed and each finished chunk keeps only its margins (and
features), each estimate is saved when done: rerunning the same command resumes; an OUT of
other settings is refused.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C at any moment is one line
    from ascent_jax.cli import quiet_interrupts

    quiet_interrupts()

import argparse
import csv
import dataclasses
import datetime
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from ascent_jax import batches, data, datamodels, ensemble, files, models, train, trak
from ascent_jax.cli import (
    ArgumentParser,
    add_engine_arguments,
    check_writable,
    float_where,
    int_at_least,
    positive_float,
    positive_int,
    prng_seed,
    read_run_file,
    run_main,
    run_options,
)

FEATURE_CHUNK = 1000  # examples per per-example-gradient call: fewer calls, 0.8 GB of MLP gradients at once
COLUMNS = ("method", "variant", "budget_models", "models", "proj_dim", "kernel", "average", "example_gradients",
           "lds_mean", "lds_median", "targets_scored", "rmse", "wall_seconds")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or values[0] <= 0:
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return tuple(values)


_fraction = float_where(lambda value: 0 < value < 1, "lie strictly between 0 and 1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m experiments.trak_lds", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(data.DATASETS), default="fashion_mnist")
    parser.add_argument("--subset-size", type=positive_int, default=1000,
                        help="class-balanced study subset n, drawn by --seed; the n points are both the training "
                             "pool and the LDS targets (default 1000)")
    parser.add_argument("--models", type=positive_int, default=500,
                        help="ensemble size M: at least the largest budget plus --holdout (default 500)")
    parser.add_argument("--holdout", type=int_at_least(3), default=100,
                        help="the last models, held out for the LDS (default 100, at least 3)")
    parser.add_argument("--budgets", type=_int_list, default=(25, 50, 100, 200, 400),
                        help="regression budgets m in models, comma-separated; TRAK gets the k models of equal "
                             "compute (default 25,50,100,200,400)")
    parser.add_argument("--proj-dims", type=_int_list, default=(64, 128, 256),
                        help="TRAK projection dims, each at most round(alpha n) (default 64,128,256)")
    parser.add_argument("--alpha", type=_fraction, default=0.5, help="fraction of the n points each model trains on "
                        "(default 0.5)")
    parser.add_argument("--model", choices=["mlp", "mlp128", "cnn"], default="mlp", help="architecture (default mlp)")
    parser.add_argument("--epochs", type=positive_int, default=10, help="training epochs per model (default 10)")
    parser.add_argument("--lr", type=positive_float, default=0.1, help="peak learning rate (default 0.1)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="batch size (default 64)")
    parser.add_argument("--fista-steps", type=positive_int, default=50,
                        help="FISTA iterations per lambda of the regression fits (default 50)")
    parser.add_argument("--seed", type=prng_seed, default=0, help="seed of the subset, masks, models and projection")
    parser.add_argument("--data-dir", default=None, help="folder with the data set files")
    parser.add_argument("--out", default="runs/trak_lds", help="output directory (default runs/trak_lds)")
    add_engine_arguments(parser, chunk_default=50)
    return parser.parse_args(argv)


class Plan(NamedTuple):
    """The run's arithmetic, all checked before any work."""

    points_per_model: int  # a = round(alpha n)
    train_cost: int  # example-gradients to train one model: E a
    trak_cost: int  # one TRAK model: E a + n
    trak_models: tuple[int, ...]  # k per budget

    def validation_models(self, budget: int) -> int:
        return max(1, round(budget / 10))


def plan(args: argparse.Namespace) -> Plan:
    """Check the flags against each other (one-line ``ValueError``) and return the budgets' arithmetic."""
    n = args.subset_size
    size = round(args.alpha * n)
    if not 0 < size < n:
        raise ValueError(f"--alpha {args.alpha} of --subset-size {n} gives {size}-point subsets; need between 1 and "
                         f"{n - 1}")
    need = max(args.budgets) + args.holdout
    if args.models < need:
        raise ValueError(f"--budgets up to {max(args.budgets)} plus --holdout {args.holdout} need --models >= {need}, "
                         f"got {args.models}")
    if min(args.budgets) < 3:
        raise ValueError(f"--budgets must be at least 3 models (fit on 2, choose lambda on 1), got {min(args.budgets)}")
    train_cost = args.epochs * size
    trak_cost = train_cost + n
    ks = tuple(m * train_cost // trak_cost for m in args.budgets)
    if ks[0] < 1:
        raise ValueError(f"--budgets {args.budgets[0]} buys no TRAK model at equal compute ({args.budgets[0]} x "
                         f"{train_cost} example-gradients < one TRAK model's {trak_cost}); use larger budgets")
    if max(args.proj_dims) > size:
        raise ValueError(f"--proj-dims {max(args.proj_dims)} exceeds the {size} points each model trains on, so "
                         f"TRAK's kernel over them would be singular; use dims of at most {size}")
    return Plan(size, train_cost, trak_cost, ks)


def trak_variants(dims: tuple[int, ...]) -> list[tuple[str, int, str, str]]:
    """``(name, proj_dim, kernel, average)`` of every TRAK estimate: each dim, and two ablations at the largest."""
    top = max(dims)
    return ([(f"trak-d{d}", d, "subset", "paper") for d in dims]
            + [(f"trak-d{top}-all-rows", top, "all", "paper"), (f"trak-d{top}-scores-avg", top, "subset", "scores")])


def _score(estimate: datamodels.Datamodels, masks: np.ndarray, margins: np.ndarray) -> dict:
    scores = datamodels.lds(estimate, masks, margins)
    finite = np.isfinite(scores)
    return {"lds_mean": float(np.mean(scores[finite])) if finite.any() else float("nan"),
            "lds_median": float(np.median(scores[finite])) if finite.any() else float("nan"),
            "targets_scored": int(finite.sum()),
            "rmse": float(np.sqrt(np.mean((estimate.predict(masks) - margins) ** 2)))}


def _cached(path: Path, compute) -> list[dict]:
    """The rows saved at ``path``, or ``compute()``'s, saved there first."""
    if path.exists():
        return json.loads(path.read_text())
    rows = compute()
    files.atomic_write(path, lambda handle: handle.write(json.dumps(rows, indent=1).encode()))
    return rows


def _timed_stage(out: Path, name: str, folder: Path, work):
    """``work()``, its wall seconds recorded once in OUT/timings.json (``resumed`` if ``folder`` already existed)."""
    path = out / "timings.json"
    resumed = folder.exists()
    started = time.time()
    result = work()
    timings = json.loads(path.read_text()) if path.exists() else {}
    if name not in timings:
        timings[name] = {"seconds": time.time() - started, "resumed": resumed}
        files.atomic_write(path, lambda handle: handle.write(json.dumps(timings, indent=1).encode()))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).absolute()  # orbax refuses relative checkpoint paths
    check_writable(out)
    budget = plan(args)
    options = run_options(args, args.seed)  # first: a distributed run is joined before JAX starts
    info = data.get_info(args.dataset)
    images_all, labels_all = data.load(args.dataset, "train", args.data_dir)
    subset = datamodels.study_subset(labels_all, args.subset_size, args.seed)
    images, labels = images_all[subset], labels_all[subset]
    n, total, held = len(subset), args.models, args.holdout
    norm = train.Normalization(info.mean, info.std)
    model = models.build(args.model, info.num_classes)
    config = train.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, peak_lr=args.lr)
    settings = {"dataset": args.dataset, "model": args.model, "models": total, "holdout": held, "alpha": args.alpha,
                "seed": args.seed, "subset_size": n, "subset_digest": ensemble.digest(subset),
                "budgets": list(args.budgets), "proj_dims": list(args.proj_dims), "fista_steps": args.fista_steps,
                "train": dataclasses.asdict(config)}
    run_tag = ensemble.fingerprint(settings)
    tag_file = out / "run.json"
    if tag_file.exists() and read_run_file(tag_file).get("fingerprint") != run_tag:
        raise ValueError(f"{out} holds a run with other settings ({tag_file}); use another --out or delete it")
    files.atomic_write(tag_file, lambda h: h.write(json.dumps({"fingerprint": run_tag, **settings}, indent=2).encode()))
    k_max, top = max(budget.trak_models), max(args.proj_dims)
    print(f"{args.dataset}: {n} class-balanced study points (seed {args.seed}); {total} x {args.model} on "
          f"{budget.points_per_model}-point subsets (alpha {args.alpha}), {args.epochs} epochs, LDS on the last "
          f"{held}; regression m = {', '.join(map(str, args.budgets))} vs TRAK k = "
          f"{', '.join(map(str, budget.trak_models))} "
          f"({budget.train_cost} vs {budget.trak_cost} example-gradients per model); TRAK features of the first "
          f"{k_max} models at {top} dims; run dir {out}", flush=True)

    masks = datamodels.subset_masks(total, n, args.alpha, args.seed)
    features, margins, timings = train_models(args, out, model, config, images, labels, norm, masks, options, k_max)
    rows = estimate_rows(args, out, budget, features, margins, masks, timings)
    write_csv(out / "results.csv", rows)
    plot(out / "lds_vs_compute.png", rows)
    accuracy = float(np.mean([(margins[j][~masks[j]] > 0).mean() for j in range(total)]))
    command = " ".join(["python -m experiments.trak_lds", *(sys.argv[1:] if argv is None else argv)])
    report = write_report(args, command, budget, rows, timings, accuracy)
    files.atomic_write(out / "report.md", lambda h: h.write(report.encode()))
    print(report)
    return 0


def train_models(args, out: Path, model, config, images, labels, norm, masks, options, k_max: int):
    """Train all M models in two engine runs: the first ``k_max`` keep their TRAK features (``trak.train_features``),
    the others only their margins. Returns features ``(k_max, n, d)``, margins ``(M, n)`` and the stage timings."""
    total = len(masks)
    features, trak_margins = _timed_stage(out, "trak_models", out / "trak_models", lambda: trak.train_features(
        model, config, images, labels, norm, masks[:k_max], options, proj_dim=max(args.proj_dims),
        key=jax.random.key(args.seed), out_dir=out / "trak_models", chunk=min(FEATURE_CHUNK, len(images)),
        log=lambda m: print(m, flush=True)))
    evaluator = train.margin_evaluator(model, norm, images, labels, options)
    other = _timed_stage(out, "other_models", out / "other_models", lambda: train.train_ensemble(
        model, config, images, labels, norm, options, num_members=total - k_max, first_member=k_max,
        subsets=batches.subsets_from_masks(masks[k_max:]), checkpoint_dir=out / "other_models",
        finalize=lambda variables: evaluator.on_devices(variables)[0], desc="other models").states)
    margins = np.concatenate([trak_margins, np.asarray(other, np.float32)])
    return features, margins, json.loads((out / "timings.json").read_text())


def estimate_rows(args, out: Path, budget: Plan, features, margins, masks, timings: dict) -> list[dict]:
    """Every estimate's row of results.csv (each saved under OUT/estimates when done), scored on the held-out models."""
    total, k_max = len(masks), len(features)
    test_masks, test_margins = masks[total - args.holdout:], margins[total - args.holdout:]
    per_model = timings["other_models"]["seconds"] / (total - k_max)
    per_features = max(0.0, timings["trak_models"]["seconds"] / k_max - per_model)
    rows = []
    for m in args.budgets:
        def fit(m=m):
            started, v = time.time(), budget.validation_models(m)
            dm = datamodels.fit_datamodels(masks[:m - v], margins[:m - v], masks[m - v:m], margins[m - v:m],
                                           steps=args.fista_steps)
            seconds = time.time() - started
            return [{"method": "regression", "variant": "regression", "budget_models": m, "models": m, "proj_dim": "",
                     "kernel": "", "average": "", "example_gradients": m * budget.train_cost,
                     **_score(dm, test_masks, test_margins), "wall_seconds": m * per_model + seconds}]

        rows += _cached(out / "estimates" / f"regression-m{m}.json", fit)
        print(f"regression datamodels, m = {m}: LDS {rows[-1]['lds_mean']:.3f}", flush=True)
    for name, dim, kernel, average in trak_variants(args.proj_dims):
        def estimate(name=name, dim=dim, kernel=kernel, average=average):
            started = time.time()
            estimates = trak.datamodels_from_features(features[:, :, :dim], margins[:k_max], masks[:k_max],
                                                      counts=budget.trak_models, kernel=kernel, average=average)
            seconds = time.time() - started
            return [{"method": "trak", "variant": name, "budget_models": m, "models": k, "proj_dim": dim,
                     "kernel": kernel, "average": average, "example_gradients": k * budget.trak_cost,
                     **_score(dm, test_masks, test_margins),
                     "wall_seconds": k * (per_model + per_features) + seconds * k / k_max}
                    for m, k, dm in zip(args.budgets, budget.trak_models, estimates)]

        rows += _cached(out / "estimates" / f"{name}.json", estimate)
        print(f"{name}: LDS " + ", ".join(f"{r['lds_mean']:.3f} (k={r['models']})" for r in rows[-len(args.budgets):]),
              flush=True)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    files.atomic_write(path, lambda handle: handle.write(buffer.getvalue().encode()))


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    series: dict[str, list[dict]] = {}
    for row in rows:
        series.setdefault(row["variant"], []).append(row)
    return series


def plot(path: Path, rows: list[dict]) -> None:
    """Mean LDS against example-gradients (left) and wall seconds (right), one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    series = _series(rows)
    trak_names = [name for name in series if name != "regression"]
    colours = plt.cm.viridis(np.linspace(0.15, 0.85, max(1, len(trak_names))))
    for axis, x, label in zip(axes, ("example_gradients", "wall_seconds"),
                              ("compute (example-gradients)", "wall seconds (2 CPU cores, this run)")):
        for name, points in series.items():
            style = (dict(color="black", marker="o", lw=2) if name == "regression"
                     else dict(color=colours[trak_names.index(name)], marker="s", lw=1.5,
                               ls="-" if "-all-rows" not in name and "-scores" not in name else "--"))
            axis.plot([p[x] for p in points], [p["lds_mean"] for p in points], label=name, **style)
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(plt.NullFormatter())  # unlabelled minor ticks: no overlaps
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("LDS (mean Spearman over targets, held-out models)")
    axes[0].legend(fontsize=8)
    fig.suptitle("TRAK vs regression datamodels at equal compute")
    fig.tight_layout()
    files.atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    plt.close(fig)


def write_report(args, command: str, budget: Plan, rows: list[dict], timings: dict, accuracy: float) -> str:
    total, k_max = args.models, max(budget.trak_models)
    per_model = timings["other_models"]["seconds"] / (total - k_max)
    per_features = max(0.0, timings["trak_models"]["seconds"] / k_max - per_model)
    series = _series(rows)
    names = list(series)
    load = os.getloadavg()
    resumed = [name for name, t in timings.items() if t["resumed"]]
    lines = [f"# TRAK vs regression datamodels at equal compute: {args.dataset}, n = {args.subset_size}, "
             f"M = {args.models} x {args.model}", "",
             f"Run {datetime.date.today().isoformat()} on {os.cpu_count()} CPU cores (load average "
             f"{load[0]:.1f} at the end), JAX {jax.__version__} on {jax.default_backend()}. Command: `{command}`", "",
             f"{args.models} models ({args.model}, {args.epochs} epochs, batch {args.batch_size}, peak lr {args.lr}) "
             "on "
             f"random {budget.points_per_model}-point subsets (alpha {args.alpha}) of {args.subset_size} "
             f"class-balanced {args.dataset} train points (seed {args.seed}); their accuracy on the study points they "
             f"did not train on: {accuracy:.3f}. LDS: mean over the {args.subset_size} targets of the Spearman "
             f"correlation between predicted and actual margins across the last {args.holdout} models (held out from "
             "every estimate).", "",
             f"Compute in example-gradients: a model costs {budget.train_cost} to train; TRAK adds one projected "
             f"gradient per point, {budget.trak_cost} per model, so a budget of m models buys TRAK "
             f"k = floor(m x {budget.train_cost} / {budget.trak_cost}) models. Regression's m include its "
             "lambda-validation models (a tenth). Wall seconds measured here: "
             f"{per_model:.2f} s to train a model, {per_features:.2f} s for a model's TRAK features "
             f"({args.subset_size} projected gradients of {max(args.proj_dims)} dims) -- on a CPU the projection, "
             "2 P d FLOPs per gradient, costs far more than the example-gradient count says."
             + (f" Stage times of {', '.join(resumed)} cover only the run that finished them (resumed)."
                if resumed else ""),
             "", "## Mean LDS per budget", "",
             "| budget m | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for index, m in enumerate(args.budgets):
        cells = [f"{series[name][index]['lds_mean']:.3f}" + (f" (k={series[name][index]['models']})"
                                                               if name != "regression" else "") for name in names]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    main_name = f"trak-d{max(args.proj_dims)}"
    wins = [m for index, m in enumerate(args.budgets)
            if series[main_name][index]["lds_mean"] > series["regression"][index]["lds_mean"]]
    lines += ["", f"**Reading.** At equal example-gradients {main_name} (subset kernel, TRAK's averaging) beats the "
              f"regression datamodels at budgets {', '.join(map(str, wins)) if wins else 'none'} of "
              f"{', '.join(map(str, args.budgets))}; regression LDS {series['regression'][-1]['lds_mean']:.3f} vs "
              f"TRAK {series[main_name][-1]['lds_mean']:.3f} at the largest budget.", "",
              "TRAK variants: `trak-dD` = projection to D dims (first D columns of one Gaussian projection), "
              "each model's kernel over its own training subset, TRAK's averaging (mean kernel term x mean Q); "
              "`-all-rows` = TRAK Algorithm 1's kernel over all n points; `-scores-avg` = the plain mean of the "
              "members' Q-weighted scores. `rmse`: root mean squared error of predicted margins on the held-out "
              "models (TRAK's scale is uncalibrated, its bias is the least-squares intercept on its own models).", "",
              "![LDS vs compute](lds_vs_compute.png)", "", "## Every row (results.csv)", "",
              "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                                       for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(run_main(main))
