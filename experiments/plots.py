"""Plots and the markdown report of a study, regenerated from its results table.

    python -m experiments.plots RUN_DIR [--time-method ga]

Reads RUN_DIR/results.parquet (or results.csv) and writes into RUN_DIR:

* ``forget_vs_val.png`` -- the papers' Fig. 1/6: KLoM p95 on the forget set against KLoM p95
  on validation points, one point per config, colour = compute relative to retraining; the
  pretrained model (star) and the independent oracles (diamond, the noise floor) marked;
  diverged configs circled in red.
* ``forget_vs_retain.png`` -- Fig. 7: the same with retain points.
* ``klom_over_time.png`` -- Fig. 2 (right): mean KLoM against unlearning epochs for one
  hyper-parameter setting per method (the best final forget KLoM, or ``--time-method``'s),
  starting at epoch 0 from the pretrained models.
* ``report.md`` -- every row, the references beside them, and the selection analysis.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ascent_jax import files  # noqa: E402
from ascent_jax.cli import ArgumentParser, run_main  # noqa: E402

REFERENCES = ("pretrained", "oracle", "dm_direct")
MARKERS = dict(zip(["ga", "gda", "scrub", "finetune", "om", "dmm"], "o^sPvX"))
MAX_ACCURACY_DROP = 0.05


def load(run_dir: Path) -> pd.DataFrame:
    """The results table of ``run_dir`` (parquet, else csv)."""
    for name, reader in (("results.parquet", pd.read_parquet), ("results.csv", pd.read_csv)):
        if (run_dir / name).exists():
            return reader(run_dir / name)
    raise FileNotFoundError(f"{run_dir} has no results.parquet or results.csv; run a study into it first")


def save(table: pd.DataFrame, directory: Path) -> None:
    """Write ``table`` as ``directory``/results.parquet and results.csv (atomically)."""
    files.atomic_write(directory / "results.parquet", lambda h: table.to_parquet(h, index=False))
    files.atomic_write(directory / "results.csv", lambda h: h.write(table.to_csv(index=False).encode()))


def _without_epochs(params: str) -> str:
    values = json.loads(params)
    values.pop("epochs", None)
    return json.dumps(values, sort_keys=True)


def _scatter(table: pd.DataFrame, x: str, y: str, path: Path, title: str) -> Path:
    sets = list(dict.fromkeys(table["forget_set"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.4), squeeze=False)
    methods = table[~table["method"].isin(REFERENCES)]
    positive = methods["relative_cost"][methods["relative_cost"] > 0]
    norm = mcolors.LogNorm(vmin=max(positive.min(), 1e-5), vmax=max(positive.max(), 1e-4)) if len(positive) else None
    for ax, name in zip(axes[0], sets):
        rows = methods[methods["forget_set"] == name]
        for method, group in rows.groupby("method", sort=False):
            points = ax.scatter(group[x], group[y], c=group["relative_cost"].clip(lower=1e-5), norm=norm, cmap="viridis",
                                marker=MARKERS.get(method, "o"), s=36, label=method, edgecolors="none")
            bad = group[group["diverged"].astype(bool)]
            ax.scatter(bad[x], bad[y], s=110, facecolors="none", edgecolors="red", linewidths=1.2)
        refs = table[(table["forget_set"] == name) & table["method"].isin(REFERENCES)]
        for _, ref in refs.iterrows():
            style = {"pretrained": ("*", "black", 180), "oracle": ("D", "tab:green", 80),
                     "dm_direct": ("h", "tab:purple", 80)}[ref["method"]]
            if np.isfinite(ref[x]) and np.isfinite(ref[y]):
                ax.scatter(ref[x], ref[y], marker=style[0], color=style[1], s=style[2], label=ref["method"], zorder=3)
            if ref["method"] == "oracle":
                ax.axhline(ref[y], color="tab:green", ls="--", lw=0.8)
                ax.axvline(ref[x], color="tab:green", ls="--", lw=0.8)
        ax.set_title(f"{name} ({int(refs['forget_size'].iloc[0]) if len(refs) else '?'} points)")
        ax.set_xlabel(f"KLoM p95, {x.rsplit('_', 1)[-1]} points")
        ax.set_ylabel("KLoM p95, forget points")
        ax.legend(fontsize=7, loc="best")
    if norm is not None:
        fig.colorbar(points, ax=axes[0].tolist(), label="compute relative to retraining")
    n = int(table["ensemble"].iloc[0])
    fig.suptitle(f"{title} -- N = {n}; dashed: independent oracles (noise floor); red rings: diverged")
    files.atomic_write(path, lambda h: fig.savefig(h, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _over_time(table: pd.DataFrame, path: Path, method: str | None) -> Path:
    sets = list(dict.fromkeys(table["forget_set"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.2), squeeze=False)
    for ax, name in zip(axes[0], sets):
        rows = table[(table["forget_set"] == name) & ~table["method"].isin(REFERENCES)].copy()
        rows["setting"] = rows["params"].map(_without_epochs)
        if method is not None:
            rows = rows[rows["method"] == method]
        start = table[(table["forget_set"] == name) & (table["method"] == "pretrained")]
        for (m, setting), group in _best_settings(rows):
            group = pd.concat([start.assign(epochs=0), group.sort_values("epochs")])  # every run starts pretrained
            line, = ax.plot(group["epochs"], group["klom_mean_forget"], marker="o", label=f"{m} forget")
            ax.plot(group["epochs"], group["klom_mean_val"], marker=".", ls="--", color=line.get_color(),
                    label=f"{m} val")
        oracle = table[(table["forget_set"] == name) & (table["method"] == "oracle")]
        if len(oracle):
            ax.axhline(oracle["klom_mean_forget"].iloc[0], color="tab:green", ls=":", label="oracle forget (floor)")
        ax.set_title(name)
        ax.set_xlabel("unlearning epochs")
        ax.set_ylabel("mean KLoM")
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="center left", bbox_to_anchor=(0.905, 0.5))
    fig.suptitle("Mean KLoM over unlearning time (epoch 0: the pretrained models), the best-final-forget-KLoM "
                 "setting of each method")
    files.atomic_write(path, lambda h: fig.savefig(h, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _best_settings(rows: pd.DataFrame):
    """Per method, the hyper-parameter setting whose longest run ends with the lowest mean forget KLoM."""
    for m, group in rows.groupby("method", sort=False):
        final = group.sort_values("epochs").groupby("setting").tail(1)
        best = final.loc[final["klom_mean_forget"].idxmin(), "setting"] if final["klom_mean_forget"].notna().any() \
            else final["setting"].iloc[0]
        yield (m, best), group[group["setting"] == best]


def selection(table: pd.DataFrame) -> pd.DataFrame:
    """The declared selection protocol against picking the best KLoM after the fact.

    Declared before looking (replicas split in halves A = 0..N/2-1 and B = N/2..N-1): per
    forget set and method, among configs whose A replicas never diverged and whose A test
    accuracy is at most 5 points below the pretrained models', choose the lowest forget KLoM
    p95 on A; report that config's forget KLoM p95 on the fresh replicas B. After the fact:
    the lowest forget KLoM p95 on B over all configs. The oracle row is the floor at N/2.
    """
    out = []
    for name, rows in table.groupby("forget_set", sort=False):
        pretrained = rows[rows["method"] == "pretrained"]
        oracle = rows[rows["method"] == "oracle"]
        floor_acc = pretrained["acc_val_a"].iloc[0] - MAX_ACCURACY_DROP if len(pretrained) else -np.inf
        for method, group in rows[~rows["method"].isin(REFERENCES)].groupby("method", sort=False):
            ok = group[(group["diverged_fraction_a"] == 0) & (group["acc_val_a"] >= floor_acc)]
            entry = {"forget_set": name, "method": method, "configs": len(group), "eligible": len(ok)}
            if len(ok) and ok["klom_p95_forget_a"].notna().any():
                chosen = ok.loc[ok["klom_p95_forget_a"].idxmin()]
                entry.update(chosen=chosen["params"], selected_on_a=chosen["klom_p95_forget_a"],
                             fresh_b=chosen["klom_p95_forget_b"])
            entry["best_after_fact_b"] = group["klom_p95_forget_b"].min()
            entry["oracle_floor_b"] = oracle["klom_p95_forget_b"].iloc[0] if len(oracle) else np.nan
            entry["pretrained_b"] = pretrained["klom_p95_forget_b"].iloc[0] if len(pretrained) else np.nan
            out.append(entry)
    return pd.DataFrame(out)


def _markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    def cell(value):
        if isinstance(value, (float, np.floating)):
            return "" if np.isnan(value) else f"{value:.{digits}g}"
        return str(value).replace("|", "/")

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


COLUMNS = ["method", "params", "klom_p95_forget", "klom_p95_retain", "klom_p95_val", "klom_mean_forget",
           "acc_forget", "acc_retain", "acc_val", "diverged_fraction", "relative_cost"]


def summary(table: pd.DataFrame) -> str:
    """References and each method's lowest forget KLoM p95, per forget set (for the terminal)."""
    parts = []
    for name, rows in table.groupby("forget_set", sort=False):
        best = rows[~rows["method"].isin(REFERENCES)].sort_values("klom_p95_forget").groupby("method", sort=False).head(1)
        frame = pd.concat([rows[rows["method"].isin(REFERENCES)], best])[["method", "params", "klom_p95_forget",
                                                                          "klom_p95_val", "acc_val", "relative_cost"]]
        parts.append(f"{name}:\n" + frame.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return "\n\n".join(parts)


def report(table: pd.DataFrame) -> str:
    """The markdown report: setup, every row per forget set, the selection analysis."""
    first = table.iloc[0]
    lines = [f"# Unlearning study: {first['dataset']}, {first['model']}, N = {int(first['ensemble'])}", "",
             f"Device: {first['device']}. KLoM p95/mean over forget, retain and validation (test) points against "
             f"{int(first['ensemble'])} oracles. Read every number against the `oracle` row: independent oracles, "
             "i.e. the KLoM of perfect unlearning at this N (the noise floor). `pretrained` is doing nothing. "
             "Accuracies are fractions of (replica, point) pairs classified correctly; diverged replicas count as "
             "wrong. Cost = example-gradients relative to retraining.", ""]
    for name, rows in table.groupby("forget_set", sort=False):
        lines += [f"## {name} ({int(rows['forget_size'].iloc[0])} points)", "", _markdown(rows[COLUMNS]), ""]
    references = table[table["method"].isin(REFERENCES)]
    lines += ["## Mean margins against the oracles' (datamodel-matching paper, Fig. 4)", "",
              "Correlation and mean absolute difference between each reference's mean margin and the evaluation "
              "oracles' mean margin, per point; `dm_direct` is the datamodels' prediction of the oracle margins.", "",
              _markdown(references[["forget_set", "method", "margin_corr_forget", "margin_mae_forget",
                                    "margin_corr_retain", "margin_mae_retain"]]), ""]
    lines += ["## Selection: declared protocol vs best after the fact", "", selection.__doc__.split("\n\n")[1].strip()
              .replace("\n    ", " "), "", _markdown(selection(table)), ""]
    return "\n".join(lines)


def render(run_dir: Path, time_method: str | None = None) -> list[Path]:
    """Write the three plots and report.md into ``run_dir``; returns their paths."""
    table = load(run_dir)
    paths = [_scatter(table, "klom_p95_val", "klom_p95_forget", run_dir / "forget_vs_val.png",
                      "Forget vs validation KLoM (Fig. 1/6 style)"),
             _scatter(table, "klom_p95_retain", "klom_p95_forget", run_dir / "forget_vs_retain.png",
                      "Forget vs retain KLoM (Fig. 7 style)"),
             _over_time(table, run_dir / "klom_over_time.png", time_method)]
    files.atomic_write(run_dir / "report.md", lambda h: h.write(report(table).encode()))
    return [*paths, run_dir / "report.md"]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m experiments.plots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a study's run directory (holds results.parquet)")
    parser.add_argument("--time-method", default=None, help="method of the KLoM-over-time plot (default: every method)")
    args = parser.parse_args(argv)
    for path in render(args.run_dir, args.time_method):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
