"""Plots and the markdown report of a study, regenerated from its results table.

    python -m experiments.plots RUN_DIR [--time-method ga]

Reads RUN_DIR/results.parquet (or results.csv) and writes into RUN_DIR:

* ``forget_vs_val.png`` -- the papers' Fig. 1/6: KLoM p95 on the forget set against KLoM p95
  on validation points, one point per config, marker = method, colour = compute relative to
  retraining; the pretrained model (star) and the independent oracles (diamond) marked, the
  noise floor (the oracles' KLoM, or its interval over re-splits of the oracles where the table has one) shaded;
  diverged configs circled in red. Points at one value are fanned out around it (a ``+``, a
  dashed circle and ``xn`` mark groups of three or more), so no method hides behind another.
* ``forget_vs_retain.png`` -- Fig. 7: the same with retain points.
* ``klom_over_time.png`` -- Fig. 2 (right): mean KLoM against unlearning epochs for one
  hyper-parameter setting per method (the best final forget KLoM, or ``--time-method``'s),
  starting at epoch 0 from the pretrained models.
* ``report.md`` -- every row, the references beside them, and the selection analysis; KLoMs
  within the noise floor are marked ``≈floor``, and a warning says where N is too small for
  KLoM to tell the pretrained models from the oracles.

:func:`summary` is the same in brief for the terminal (at most 100 columns). A table that
cannot be read, lacks a column or has no rows, and an unknown ``--time-method``, are one-line
errors (exit 2) before anything is written.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C at any moment is one line
    from ascent_jax.cli import quiet_interrupts

    quiet_interrupts()

import argparse
import json
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.cm as cm  # noqa: E402
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.transforms as transforms  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ascent_jax import files  # noqa: E402
from ascent_jax.cli import ArgumentParser, run_main  # noqa: E402

REFERENCES = ("pretrained", "oracle", "dm_direct", "dm_direct_class")
REFERENCE_STYLES = {"pretrained": ("*", "black", 180), "oracle": ("D", "tab:green", 80),
                    "dm_direct": ("h", "tab:purple", 80), "dm_direct_class": ("H", "tab:pink", 80)}  # marker, colour, size
METHOD_MARKERS = "o^sPvX<>pd"  # taken in turn by the unlearning methods (none is a reference's)
MAX_ACCURACY_DROP = 0.05
WIDTH = 100  # columns of the terminal summary
CLEARLY_ABOVE = 1.25  # without an interval, "clearly above the floor" means above this many times the oracle's KLoM
INTERVAL = ("_ci_low", "_ci_high")  # the oracle row's interval over re-splits of the oracles (study.floor_interval)
KLOM_COLUMNS = tuple(f"klom_{stat}_{split}" for stat in ("p95", "mean") for split in ("forget", "retain", "val"))
TABLES = ("results.parquet", "results.csv")


def markers(methods) -> dict[str, str]:
    """The marker of each method: the references keep theirs; the unlearning methods, sorted by name, take
    :data:`METHOD_MARKERS` in turn (so a newly registered method gets one without editing this file)."""
    present = list(dict.fromkeys(methods))
    names = sorted(m for m in present if m not in REFERENCES)
    chosen = {m: METHOD_MARKERS[i % len(METHOD_MARKERS)] for i, m in enumerate(names)}
    return {m: REFERENCE_STYLES[m][0] if m in REFERENCES else chosen[m] for m in present}


def _table_path(run_dir: Path) -> Path:
    """The results table of ``run_dir`` that :func:`load` reads (parquet first)."""
    for name in TABLES:
        if (run_dir / name).exists():
            return run_dir / name
    raise FileNotFoundError(f"{run_dir} has no results.parquet or results.csv; run a study into it first")


def load(run_dir: Path) -> pd.DataFrame:
    """The results table of ``run_dir`` (parquet, else csv); a one-line error if it cannot be read."""
    path = _table_path(run_dir)
    kind = "parquet" if path.suffix == ".parquet" else "CSV"
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a results table; move it out of {run_dir} "
                         "(or pass the run directory of a study)")
    try:
        return pd.read_parquet(path) if kind == "parquet" else pd.read_csv(path)
    except Exception as error:  # noqa: BLE001 -- every reader failure is one line naming the file
        if isinstance(error, OSError) and error.errno is not None:
            raise ValueError(f"cannot read {path}: {error.strerror}; fix its permissions or pass another "
                             "run directory") from error
        raise ValueError(f"{path} is not a readable {kind} table (corrupt or truncated?); rerun the study into "
                         f"{run_dir} to rewrite it") from error


def save(table: pd.DataFrame, directory: Path) -> None:
    """Write ``table`` as ``directory``/results.parquet and results.csv (atomically)."""
    files.atomic_write(directory / "results.parquet", lambda h: table.to_parquet(h, index=False))
    files.atomic_write(directory / "results.csv", lambda h: h.write(table.to_csv(index=False).encode()))


COLUMNS = ["method", "params", "klom_p95_forget", "klom_p95_retain", "klom_p95_val", "klom_mean_forget",
           "acc_forget", "acc_retain", "acc_val", "diverged_fraction", "relative_cost"]
MARGIN_COLUMNS = ["margin_corr_forget", "margin_mae_forget", "margin_corr_retain", "margin_mae_retain"]
REQUIRED = tuple(dict.fromkeys([
    "forget_set", "forget_size", *COLUMNS, "epochs", "klom_mean_val", "diverged", *MARGIN_COLUMNS,
    "klom_p95_forget_a", "klom_p95_forget_b", "acc_val_a", "diverged_fraction_a", "ensemble", "dataset", "model",
    "device"]))  # what the plots, the report and the summary read


def check(table: pd.DataFrame, source: Path, time_method: str | None = None) -> None:
    """Fail with one line naming ``source`` if ``table`` lacks what :func:`render` needs."""
    missing = [column for column in REQUIRED if column not in table.columns]
    if missing:
        raise ValueError(f"{source} lacks the column(s) {', '.join(missing)} that the plots and report need; "
                         f"it is not the results table of a complete study (rerun the study into {source.parent})")
    if table.empty:
        raise ValueError(f"{source} has no rows; rerun the study into {source.parent}")
    if time_method is not None:
        methods = sorted(set(table["method"]) - set(REFERENCES))
        if time_method not in methods:
            raise ValueError(f"--time-method {time_method} is not a method of {source}; choose one of: "
                             f"{', '.join(methods) if methods else '(none: the table has no unlearning rows)'}")


# --- the noise floor ------------------------------------------------------------------------

def _bound(row: pd.Series, column: str, side: int) -> tuple[float, bool]:
    """``row``'s lower (side 0) or upper (side 1) bound of ``column``: its interval's, when the table
    has one and it is finite, else the value itself; and whether it came from an interval."""
    name = column + INTERVAL[side]
    if name in row.index and pd.notna(row[name]) and np.isfinite(float(row[name])):
        return float(row[name]), True
    return float(row[column]), False


def floors(table: pd.DataFrame, column: str) -> pd.Series:
    """Per row, the noise floor of ``column``: the upper end of the ``oracle`` row's KLoM for the same forget set
    (its interval's, when the table has one; else the oracle's value). NaN without an oracle row."""
    oracle = table[table["method"] == "oracle"].drop_duplicates("forget_set").set_index("forget_set")
    edge = {name: _bound(row, column, 1)[0] for name, row in oracle.iterrows()}
    return table["forget_set"].map(edge).astype(float)


def within_floor(table: pd.DataFrame, column: str) -> pd.Series:
    """Whether each row's ``column`` (a KLoM) lies within the noise floor (the oracle rows, the floor, never do)."""
    values = pd.to_numeric(table[column], errors="coerce")
    return (table["method"] != "oracle") & values.notna() & (values <= floors(table, column))


def _size_needed(n: int, pretrained: float, oracle: float) -> str:
    """Where the floor would reach the observed gap, if it shrinks like 1/N; '' if there is no gap to reach."""
    gap = pretrained - oracle
    if not (np.isfinite(gap) and gap > 0 and oracle > 0):
        return ("No excess over the floor is seen at all, so the N that would resolve a gap cannot be "
                "estimated from this table.")
    needed = float(f"{n * oracle / gap:.2g}")
    return (f"If the floor shrinks like 1/N (as klom.noise_floor's Gaussian figures do), it would come down to the "
            f"observed gap ({gap:.2g}) at N ~ {needed:.0f}.")


def resolution_warnings(table: pd.DataFrame) -> dict[str, str]:
    """Per forget set where the pretrained models' forget KLoM p95 is not clearly above the oracle floor: a
    warning that N is too small for KLoM to resolve the gap between doing nothing and retraining.

    "Clearly above": the pretrained row's interval (or value) above the oracle's interval, when the table has
    intervals; else above :data:`CLEARLY_ABOVE` times the oracle's value.
    """
    out = {}
    column = "klom_p95_forget"
    for name, rows in table.groupby("forget_set", sort=False):
        pretrained, oracle = rows[rows["method"] == "pretrained"], rows[rows["method"] == "oracle"]
        if not (len(pretrained) and len(oracle)):
            continue
        p, o = pretrained.iloc[0], oracle.iloc[0]
        low, _ = _bound(p, column, 0)
        high, interval = _bound(o, column, 1)
        value, floor = float(p[column]), float(o[column])
        if not (np.isfinite(value) and np.isfinite(floor)):
            continue
        if (low > high) if interval else (value > CLEARLY_ABOVE * floor):
            continue
        n = int(rows["ensemble"].iloc[0])
        what = f"its interval reaches {high:.3g}" if interval else f"less than {CLEARLY_ABOVE:g}x it"
        out[name] = (f"warning: N = {n} is too small for KLoM to resolve the gap on {name}: the pretrained "
                     f"models' forget KLoM p95 ({value:.3g}) is not clearly above the oracle floor ({floor:.3g}; "
                     f"{what}), so at this N doing nothing scores like retraining and no forget KLoM of this set "
                     f"can be told from the floor. {_size_needed(n, value, floor)}")
    return out


# --- plots ----------------------------------------------------------------------------------

FAN_STEP = 6.0  # points: spacing of coinciding markers fanned out on a sunflower spiral
GOLDEN_ANGLE = np.pi * (3 - np.sqrt(5))
PANEL_POINTS = 230  # about the smaller side of a scatter panel, in points


def _clusters(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A cluster id per point (-1: not finite): points closer than 1/1000 of the panel's span in both
    coordinates coincide (on screen they are one marker)."""
    ids = np.full(len(x), -1)
    finite = np.isfinite(x) & np.isfinite(y)
    keys = {}
    spans = [max(np.ptp(v[finite]) / 1000 if finite.any() else 0.0, np.abs(v[finite]).max() * 1e-6 if finite.any()
                 else 0.0, 1e-12) for v in (x, y)]
    for i in np.flatnonzero(finite):
        key = (round(x[i] / spans[0]), round(y[i] / spans[1]))
        ids[i] = keys.setdefault(key, len(keys))
    return ids


def _fan_offsets(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, dict[int, tuple[float, float, int]]]:
    """Deterministic offsets (in points) spreading each group of coinciding points on a sunflower spiral around
    their shared position, in row order; and per group of more than one, its (x, y, size)."""
    ids = _clusters(x, y)
    offsets = np.zeros((len(x), 2))
    groups = {}
    for cluster in np.unique(ids[ids >= 0]):
        members = np.flatnonzero(ids == cluster)
        if len(members) < 2:
            continue
        k = np.arange(len(members))
        radius = np.where(k == 0, 0.0, FAN_STEP * np.sqrt(k + 0.5))  # the first (a reference, if any) stays put
        offsets[members] = np.c_[radius * np.cos(k * GOLDEN_ANGLE), radius * np.sin(k * GOLDEN_ANGLE)]
        groups[int(cluster)] = (float(x[members[0]]), float(y[members[0]]), len(members))
    return offsets, groups


def _labelled(groups: dict, x: np.ndarray, y: np.ndarray) -> list[tuple[float, float, int]]:
    """The fans of three or more points to circle and label (pairs are plainly side by side), largest first,
    leaving out those whose circle would crowd a larger one's (within 1/20 of the panel's span)."""
    finite = np.isfinite(x) & np.isfinite(y)
    spans = [max(np.ptp(v[finite]), 1e-12) if finite.any() else 1.0 for v in (x, y)]
    kept = []
    for gx, gy, size in sorted((g for g in groups.values() if g[2] >= 3), key=lambda g: -g[2]):
        if all(abs(gx - kx) > spans[0] / 20 or abs(gy - ky) > spans[1] / 20 for kx, ky, _ in kept):
            kept.append((gx, gy, size))
    return kept


def _scatter(table: pd.DataFrame, x: str, y: str, path: Path, title: str) -> Path:
    sets = list(dict.fromkeys(table["forget_set"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(4.6 * len(sets) + 2.6, 5.2), squeeze=False, layout="constrained")
    methods = table[~table["method"].isin(REFERENCES)]
    positive = methods["relative_cost"][methods["relative_cost"] > 0]
    norm = mcolors.LogNorm(vmin=max(positive.min(), 1e-5), vmax=max(positive.max(), 1e-4)) if len(positive) \
        else mcolors.LogNorm(vmin=1e-5, vmax=1)
    cmap = plt.get_cmap("viridis")
    marker_of = markers(table["method"])
    floor_x, floor_y = floors(table, x), floors(table, y)
    interval = f"{y}{INTERVAL[1]}" in table.columns
    warned = resolution_warnings(table)
    fanned = diverged = False
    drawn = set()
    for ax, name in zip(axes[0], sets):
        rows = table[table["forget_set"] == name]
        rows = pd.concat([rows[rows["method"].isin(REFERENCES)], rows[~rows["method"].isin(REFERENCES)]])
        px, py = rows[x].to_numpy(float), rows[y].to_numpy(float)
        offsets, groups = _fan_offsets(px, py)
        fanned |= bool(groups)
        for (_, row), (dx, dy), xv, yv in zip(rows.iterrows(), offsets, px, py):
            if not (np.isfinite(xv) and np.isfinite(yv)):
                continue
            where = transforms.offset_copy(ax.transData, fig=fig, x=dx, y=dy, units="points")
            if row["method"] in REFERENCES:
                drawn.add(row["method"])
                marker, colour, size = REFERENCE_STYLES[row["method"]]
                ax.scatter([xv], [yv], marker=marker, color=colour, s=size, zorder=4, transform=where,
                           edgecolors="white", linewidths=0.5)
                continue
            ax.scatter([xv], [yv], c=[max(row["relative_cost"], 1e-5)], norm=norm, cmap=cmap, s=36, zorder=3,
                       marker=marker_of[row["method"]], edgecolors="none", transform=where)
            if bool(row["diverged"]):
                diverged = True
                ax.scatter([xv], [yv], s=110, facecolors="none", edgecolors="red", linewidths=1.2, zorder=3,
                           transform=where)
        for gx, gy, size in _labelled(groups, px, py):
            reach = FAN_STEP * np.sqrt(size - 0.5) + 5
            ax.scatter([gx], [gy], s=(2 * reach) ** 2, facecolors="none", edgecolors="0.45", linewidths=0.6,
                       linestyles="--", alpha=0.7, zorder=2)  # a dashed circle around the fan, centred on the value
            ax.scatter([gx], [gy], marker="+", s=25, color="0.2", linewidths=0.8, zorder=6)
            ax.annotate(f"\u00d7{size}", (gx, gy), xytext=(reach * 0.72, reach * 0.72), textcoords="offset points",
                        fontsize=7.5, color="0.2", zorder=6)
        ax.update_datalim(np.c_[px, py][np.isfinite(px) & np.isfinite(py)])
        reach = max((FAN_STEP * np.sqrt(size - 0.5) + 9 for *_, size in groups.values()), default=0) / PANEL_POINTS
        ax.margins(max(0.08, reach / (1 - 2 * reach)))  # room for the fans: they are offsets in points, not data
        ax.autoscale_view()
        fx, fy = floor_x[rows.index[0]], floor_y[rows.index[0]]
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        if np.isfinite(fy):
            ax.axhspan(y0 - (y1 - y0), fy, color="tab:green", alpha=0.12, lw=0, zorder=0)
            ax.axhline(fy, color="tab:green", ls="--", lw=0.8, zorder=1)
        if np.isfinite(fx):
            ax.axvspan(x0 - (x1 - x0), fx, color="tab:green", alpha=0.12, lw=0, zorder=0)
            ax.axvline(fx, color="tab:green", ls="--", lw=0.8, zorder=1)
        ax.set_xlim(x0, max(x1, fx) if np.isfinite(fx) else x1)
        ax.set_ylim(y0, max(y1, fy) if np.isfinite(fy) else y1)
        size = rows["forget_size"].iloc[0]
        ax.set_title(f"{name} ({int(size)} points)", fontsize=10)
        if name in warned:
            ax.text(0.5, 0.98, "N too small: pretrained within the floor", transform=ax.transAxes, ha="center",
                    va="top", fontsize=7.5, color="tab:red")
        ax.set_xlabel(f"KLoM p95, {x.rsplit('_', 1)[-1]} points")
    axes[0][0].set_ylabel("KLoM p95, forget points")
    present = set(table["method"])
    handles = [Line2D([], [], ls="none", marker=marker_of[m], color="0.35", markersize=6, label=m)
               for m in sorted(present - set(REFERENCES))]
    handles += [Line2D([], [], ls="none", marker=REFERENCE_STYLES[m][0], color=REFERENCE_STYLES[m][1],
                       markersize=np.sqrt(REFERENCE_STYLES[m][2]) * 0.8, label=m) for m in REFERENCES if m in drawn]
    handles.append(Patch(color="tab:green", alpha=0.25,
                         label="noise floor (oracle interval)" if interval else "noise floor (<= oracle)"))
    if diverged:
        handles.append(Line2D([], [], ls="none", marker="o", markersize=10, markerfacecolor="none",
                              markeredgecolor="red", label="diverged"))
    if fanned:
        handles.append(Line2D([], [], ls="none", marker="$\u00d7n$", color="0.2", markersize=11,
                              label="n points at one value (+),\nfanned out to show each\n(pairs: side by side)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 2 + 2 * len(sets)), fontsize=7.5,
               frameon=False)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[0].tolist(), label="compute relative to retraining",
                 location="right", shrink=0.8)
    n = int(table["ensemble"].iloc[0])
    fig.suptitle(f"{title} -- N = {n}\ngreen: the noise floor (independent oracles); a point inside it is "
                 "indistinguishable from retraining at this N", fontsize=9.5)
    files.atomic_write(path, lambda h: fig.savefig(h, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _without_epochs(params: str) -> str:
    values = json.loads(params)
    values.pop("epochs", None)
    return json.dumps(values, sort_keys=True)


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


def _markdown(frame: pd.DataFrame, digits: int = 3, marks: dict[str, pd.Series] | None = None) -> str:
    """``frame`` as a markdown table; cells of ``marks[column]`` true get `` ≈floor``."""
    def cell(value):
        if isinstance(value, (float, np.floating)):
            return "" if np.isnan(value) else f"{value:.{digits}g}"
        return str(value).replace("|", "/")

    marks = marks or {}
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for index, row in zip(frame.index, frame.itertuples(index=False)):
        cells = [cell(v) + (" \u2248floor" if c in marks and bool(marks[c].get(index, False)) else "")
                 for c, v in zip(frame.columns, row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the terminal summary -------------------------------------------------------------------

_SHORT_WORDS = (("batch_size", "bs"), ("epochs", "ep"), ("fraction", "frac"), ("weight", "w"),
                ("temperature", "temp"))


def _short_key(key: str) -> str:
    for long, short in _SHORT_WORDS:
        key = key.replace(long, short)
    return key


def _short_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return ",".join(map(_short_value, value))
    return str(value)


def _parse(params) -> dict:
    try:
        values = json.loads(params)
    except (TypeError, ValueError):
        return {"params": str(params)}
    return values if isinstance(values, dict) else {"params": values}


def short_params(table: pd.DataFrame) -> pd.Series:
    """Per row, its hyper-parameters in brief (``lr=0.01 ep=3``): only those that vary among the method's
    configs in ``table`` (all of them if none varies), learning rate and epochs first, names shortened."""
    parsed = table["params"].map(_parse)
    out = pd.Series("", index=table.index, dtype=object)
    for _, index in table.groupby("method", sort=False).groups.items():
        configs = parsed[index]
        keys = sorted(set().union(*configs))
        varying = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
        order = sorted(varying or keys, key=lambda k: (k != "lr", k != "epochs", k))
        out[index] = [" ".join(f"{_short_key(k)}={_short_value(c[k])}" for k in order if k in c) for c in configs]
    return out


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def _number(value, marked: bool = False) -> str:
    value = float(value) if pd.notna(value) else np.nan
    return ("-" if not np.isfinite(value) else f"{value:.3g}") + ("*" if marked else " ")


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, width=WIDTH, subsequent_indent="  ", break_long_words=True, break_on_hyphens=False)


def summary(table: pd.DataFrame) -> str:
    """References and each method's lowest forget KLoM p95, per forget set, at most :data:`WIDTH` columns wide
    (for the terminal; the full values are in the table and report.md)."""
    table = table.reset_index(drop=True)
    short = short_params(table)
    marks = {c: within_floor(table, c) for c in ("klom_p95_forget", "klom_p95_val")}
    warnings = resolution_warnings(table)
    head = ["method", "params", "forget p95 ", "val p95 ", "acc val ", "cost "]
    numbers = ["klom_p95_forget", "klom_p95_val", "acc_val", "relative_cost"]
    parts = []
    for name, rows in table.groupby("forget_set", sort=False):
        best = rows[~rows["method"].isin(REFERENCES)].sort_values("klom_p95_forget", kind="stable") \
            .groupby("method", sort=False).head(1)
        shown = pd.concat([rows[rows["method"].isin(REFERENCES)], best])
        body = [[str(r["method"]), short[i] or "-", *(_number(r[c], c in marks and bool(marks[c][i])) for c in numbers)]
                for i, r in shown.iterrows()]
        widths = [max(len(line[k]) for line in [head, *body]) for k in range(len(head))]
        widths[0] = min(widths[0], 14)
        widths[1] = max(min(widths[1], WIDTH - sum(widths) + widths[1] - 2 * (len(head) - 1)), 6)
        lines = [_clip(f"{name}: {int(rows['forget_size'].iloc[0])} forget points, N = {int(rows['ensemble'].iloc[0])}",
                       WIDTH)]
        for line in [head, *body]:
            cells = [_clip(line[0], widths[0]).ljust(widths[0]), _clip(line[1], widths[1]).ljust(widths[1]),
                     *(cell.rjust(w) for cell, w in zip(line[2:], widths[2:]))]
            lines.append("  ".join(cells).rstrip())
        if name in warnings:
            lines += _wrap(warnings[name])
        parts.append("\n".join(lines))
    interval = f"klom_p95_forget{INTERVAL[1]}" in table.columns
    notes = ["* within the noise floor: at most the oracle row's KLoM for the same forget set and split"
             + (" (the upper end of its interval over re-splits of the oracles)" if interval else "")
             + ", so not distinguishable from retraining at this N."] if any(m.any() for m in marks.values()) else []
    notes.append("params: the hyper-parameters that vary within each method (bs = batch_size, ep = epochs); cost: "
                 "compute relative to retraining; full values in results.parquet and report.md.")
    return "\n\n".join(parts) + "\n\n" + "\n".join(line for note in notes for line in _wrap(note))


# --- what the numbers say -------------------------------------------------------------------

STALLED = 0.1  # a best config that closes less of the gap than this has not unlearned the set


def _verb(subjects: list[str], singular: str, plural: str) -> str:
    return f"{' and '.join(subjects)} {singular if len(subjects) == 1 else plural}"


def gap_closed(table: pd.DataFrame) -> pd.DataFrame:
    """Per forget set and method, the best config's forget KLoM p95 and the share of the gap between doing
    nothing (``pretrained``) and retraining (the ``oracle`` floor) it closes: 1 = at the floor, 0 = no better
    than doing nothing, negative = worse."""
    out = []
    for name, rows in table.groupby("forget_set", sort=False):
        pretrained, oracle = rows[rows["method"] == "pretrained"], rows[rows["method"] == "oracle"]
        if not (len(pretrained) and len(oracle)):
            continue
        before, floor = float(pretrained["klom_p95_forget"].iloc[0]), float(oracle["klom_p95_forget"].iloc[0])
        for method, group in rows[~rows["method"].isin(REFERENCES)].groupby("method", sort=False):
            best = group.loc[group["klom_p95_forget"].idxmin()] if group["klom_p95_forget"].notna().any() else None
            value = np.nan if best is None else float(best["klom_p95_forget"])
            out.append({"forget_set": name, "method": method, "pretrained": before, "floor": floor, "best": value,
                        "closed": (before - value) / (before - floor) if before > floor else np.nan,
                        "acc_val": np.nan if best is None else float(best["acc_val"])})
    return pd.DataFrame(out)


def findings(table: pd.DataFrame) -> list[str]:
    """Three sentences read from the table, never written in advance: how far doing nothing is from the noise
    floor on each forget set, how much of that gap each method's best config closes (and where methods fail),
    and what choosing a config on fresh replicas costs against the best of the grid after the fact."""
    gaps = gap_closed(table)
    if gaps.empty:
        return []
    sets = gaps.drop_duplicates("forget_set")
    unresolved = resolution_warnings(table)
    n = int(table["ensemble"].iloc[0])
    names = " and ".join(sets["forget_set"])
    sentences = [
        "Doing nothing scores forget KLoM p95 " + " and ".join(f"{r.pretrained:.2f}" for r in sets.itertuples())
        + f" on {names}, against {'noise floors' if len(sets) > 1 else 'a noise floor'} (retraining vs retraining "
        f"at N = {n}) of "
        + " and ".join(f"{r.floor:.2f}" for r in sets.itertuples())
        + ("" if not unresolved else f"; at this N the gap is not resolved on {', '.join(unresolved)}") + "."]
    closed = gaps.pivot(index="method", columns="forget_set", values="closed")[list(sets["forget_set"])]
    closed = closed.dropna(axis=1, how="all").dropna(axis=0, how="any")  # sets with a gap, methods scored on all
    if closed.empty:
        return sentences + ["With no gap between doing nothing and retraining, no method can be told to unlearn "
                            "anything here."]
    listed = "; ".join(f"{method} " + " vs ".join(f"{value:.0%}" for value in row) for method, row in closed.iterrows())
    claims = []
    leaders = closed.idxmax()
    if leaders.nunique() == 1:
        claims.append(f"{leaders.iloc[0]} comes closest to the floor on every set")
    if closed.shape[1] > 1:
        hardest = closed.mean().idxmin()
        least = [m for m in closed.index if closed.loc[m, hardest] < closed.loc[m].drop(hardest).min()]
        if len(least) == len(closed):
            claims.append(f"every method closes least on {hardest}")
        elif least:
            claims.append(f"{_verb(least, 'closes', 'close')} less on {hardest} than on any other set")
        stalled = [m for m, value in closed[hardest].items() if value < STALLED]
        if stalled:
            claims.append(f"on {hardest} {_verb(stalled, 'closes', 'close')} less than {STALLED:.0%} of it")
    sentences.append(f"Of that gap, each method's best config closes ({' vs '.join(closed.columns)}): {listed}"
                     + (": " + ", ".join(claims) if claims else "") + ".")
    chosen = selection(table)
    if "fresh_b" in chosen and chosen["fresh_b"].notna().any():
        chosen = chosen.assign(illusion=chosen["fresh_b"] - chosen["best_after_fact_b"])
        worst = chosen.loc[chosen["illusion"].idxmax()]
        sentences.append(
            f"Picking the best of the grid after the fact flatters: the config chosen on replicas A scores "
            f"{worst['fresh_b']:.2f} on fresh replicas B for {worst['method']} on {worst['forget_set']}, where the "
            f"grid's best B score is {worst['best_after_fact_b']:.2f} (pretrained {worst['pretrained_b']:.2f}, floor "
            f"{worst['oracle_floor_b']:.2f} at N/2); over every method and set the chosen config is "
            f"{chosen['illusion'].mean():.2f} worse on average.")
    return sentences


# --- the report -----------------------------------------------------------------------------

def report(table: pd.DataFrame) -> str:
    """The markdown report: setup, every row per forget set, the selection analysis."""
    table = table.reset_index(drop=True)
    first = table.iloc[0]
    marks = {c: within_floor(table, c) for c in KLOM_COLUMNS if c in COLUMNS}
    warnings = resolution_warnings(table)
    interval = f"klom_p95_forget{INTERVAL[1]}" in table.columns
    lines = [f"# Unlearning study: {first['dataset']}, {first['model']}, N = {int(first['ensemble'])}", "",
             f"Device: {first['device']}. KLoM p95/mean over forget, retain and validation (test) points against "
             f"{int(first['ensemble'])} oracles. Read every number against the `oracle` row: independent oracles, "
             "i.e. the KLoM of perfect unlearning at this N (the noise floor). `pretrained` is doing nothing. "
             "Accuracies are fractions of (replica, point) pairs classified correctly; diverged replicas count as "
             "wrong. Cost = example-gradients relative to retraining.", "",
             "`\u2248floor` marks a KLoM within the noise floor: at most the `oracle` row's KLoM for the same forget "
             "set and split" + (" (the upper end of its interval over re-splits of the oracles)" if interval else "") + ", so this N "
             "cannot tell it from retraining.", ""]
    if warnings:
        n = int(first["ensemble"])
        lines += [f"> **Warning.** N = {n} is too small for KLoM to resolve the gap between doing nothing and "
                  f"retraining on {', '.join(warnings)}: see "
                  f"{'its section' if len(warnings) == 1 else 'their sections'}.",
                  ""]
    said = findings(table)
    if said:
        lines += ["## What this shows (read from the table below)", "", " ".join(said), ""]
    for name, rows in table.groupby("forget_set", sort=False):
        lines += [f"## {name} ({int(rows['forget_size'].iloc[0])} points)", ""]
        if name in warnings:
            lines += [f"> **Warning.** {warnings[name].removeprefix('warning: ')}", ""]
        lines += [_markdown(rows[COLUMNS], marks=marks), ""]
    references = table[table["method"].isin(REFERENCES)]
    lines += ["## Mean margins against the oracles' (datamodel-matching paper, Fig. 4)", "",
              "Correlation and mean absolute difference between each reference's mean margin and the evaluation "
              "oracles' mean margin, per point; `dm_direct` is the datamodels' prediction of the oracle margins "
              "(`dm_direct_class`: from per-class datamodels, scored on the points they cover); `partial_retrain` "
              "is retraining stopped after `epochs` of its epochs.", "",
              _markdown(references[["forget_set", "method", *MARGIN_COLUMNS]]), ""]
    chosen = selection(table)
    chosen_marks = {"fresh_b": chosen["fresh_b"] <= chosen["oracle_floor_b"]} if "fresh_b" in chosen else {}
    lines += ["## Selection: declared protocol vs best after the fact", "", selection.__doc__.split("\n\n")[1].strip()
              .replace("\n    ", " ") + " `\u2248floor`: the fresh B score is at most the oracle's floor at N/2.", "",
              _markdown(chosen, marks=chosen_marks), ""]
    return "\n".join(lines)


def render(run_dir: Path, time_method: str | None = None) -> list[Path]:
    """Write the three plots and report.md into ``run_dir``; returns their paths.

    Everything is checked before anything is written: an unreadable table, missing columns or an unknown
    ``time_method`` is a one-line ``ValueError`` and leaves ``run_dir`` as it was.
    """
    source = _table_path(run_dir)
    table = load(run_dir)
    check(table, source, time_method)
    text = report(table)
    paths = [_scatter(table, "klom_p95_val", "klom_p95_forget", run_dir / "forget_vs_val.png",
                      "Forget vs validation KLoM (Fig. 1/6 style)"),
             _scatter(table, "klom_p95_retain", "klom_p95_forget", run_dir / "forget_vs_retain.png",
                      "Forget vs retain KLoM (Fig. 7 style)"),
             _over_time(table, run_dir / "klom_over_time.png", time_method)]
    files.atomic_write(run_dir / "report.md", lambda h: h.write(text.encode()))
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
