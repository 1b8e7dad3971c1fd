"""Merge the results tables of several run directories of ONE study into one table, report and plots.

    python -m experiments.merge OUT RUN_DIR [RUN_DIR ...]

A long study is often run in pieces: some methods in one run directory, more methods (or
forget sets) later in another, on another machine or after the first directory was lost.
Same seed, same replicas: every piece retrains the same pretrained replicas and oracles, so
their reference rows (``pretrained``, ``oracle``) are identical, and this is what the merge
checks. Rows are keyed by (forget set, method, hyper-parameters, epochs). A key present in
several tables must agree on every column but wall time and device, and every forget set
that several tables share must have its ``pretrained`` and ``oracle`` rows in each of them;
otherwise the tables come from different studies (another seed, N, recipe or subset) and
the merge is refused. OUT (which may be one of the RUN_DIRs) receives ``results.parquet``,
``results.csv``, ``merged_from.json``, ``report.md`` and the three plots.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C at any moment is one line
    from ascent_jax.cli import quiet_interrupts

    quiet_interrupts()

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ascent_jax import files
from ascent_jax.cli import ArgumentParser, check_writable, run_main
from experiments import plots

KEY = ["forget_set", "method", "params", "epochs", "datamodels_digest"]
VOLATILE = ["wall_time_s", "device"]  # legitimately differ between two runs of the same config
# the run's identity (experiments.study.Setup.identity): one value per table and across tables
STUDY = ["dataset", "model", "ensemble", "seed", "pretrain", "subset_digest", "test_digest"]
PER_SET = ["forget_size", "forget_digest"]  # one value per forget set, across tables
WITNESSES = ("pretrained", "oracle")  # equal rows prove the same replicas and oracles


def _same(a, b) -> bool:
    """Cell equality with NaN equal to NaN."""
    if isinstance(a, (float, np.floating)) and isinstance(b, (float, np.floating)):
        return bool(a == b or (np.isnan(a) and np.isnan(b)))
    return bool(a == b)


def _check_columns(tables: dict[str, pd.DataFrame]) -> None:
    """Every table has the key and identity columns (tables written before rows carried their identity do not)."""
    for source, table in tables.items():
        missing = [c for c in [*KEY, *STUDY, *PER_SET] if c not in table.columns]
        if missing:
            raise ValueError(f"the table of {source} has no column {', '.join(missing)}: it is not a study's results "
                             "table, or one written before rows carried the run's identity (rerun its study, or its "
                             "--snapshot, with this version)")


def _check_study(tables: dict[str, pd.DataFrame]) -> None:
    """Every table describes one study (dataset, model, N, seed, recipe, subset), the same for all; a forget
    set's name means the same points in every table."""
    for column in STUDY:
        values = {source: sorted(map(str, table[column].unique())) for source, table in tables.items()}
        if any(len(v) != 1 for v in values.values()) or len({v[0] for v in values.values()}) != 1:
            listed = "; ".join(f"{source}: {', '.join(v)}" for source, v in values.items())
            raise ValueError(f"the tables are not one study: they differ in {column} ({listed})")
    for column in PER_SET:
        seen: dict[str, tuple[str, str]] = {}
        for source, table in tables.items():
            for name, values in table.groupby("forget_set")[column]:
                value = sorted(map(str, values.unique()))
                if len(value) != 1 or seen.setdefault(name, (source, value[0]))[1] != value[0]:
                    listed = f"{seen[name][0]}: {seen[name][1]}; {source}: {', '.join(value)}"
                    raise ValueError(f"forget set {name} is not the same set in every table: {column} differs "
                                     f"({listed}); merge only pieces of one study")


def _check_agreement(tables: dict[str, pd.DataFrame]) -> None:
    """Shared keys agree on every stable column; shared forget sets carry both witnesses in every table."""
    seen: dict[tuple, tuple[str, pd.Series]] = {}
    for source, table in tables.items():
        if table.duplicated(KEY).any():
            first = table[table.duplicated(KEY)].iloc[0]
            raise ValueError(f"{source} has two rows for forget set {first['forget_set']}, method {first['method']}, "
                             f"params {first['params']}, {first['epochs']} epochs; it is not a study's results table")
        for _, row in table.iterrows():
            key = tuple(row[k] for k in KEY)
            if key not in seen:
                seen[key] = (source, row)
                continue
            other_source, other = seen[key]
            differ = [c for c in row.index if c not in VOLATILE and c in other.index and not _same(row[c], other[c])]
            if differ:
                raise ValueError(f"{other_source} and {source} disagree on the {row['method']} row of forget set "
                                 f"{row['forget_set']} ({', '.join(differ[:5])}): they are not the same study "
                                 "(seed, N, recipe, subset or code differ); merge only pieces of one study")
    owners: dict[str, list[str]] = {}
    for source, table in tables.items():
        for name in table["forget_set"].unique():
            owners.setdefault(name, []).append(source)
    for name, sources in owners.items():
        if len(sources) < 2:
            continue
        for source in sources:
            table = tables[source]
            missing = [w for w in WITNESSES if not ((table["forget_set"] == name) & (table["method"] == w)).any()]
            if missing:
                raise ValueError(f"{source} has no {' or '.join(missing)} row for forget set {name}, so it cannot be "
                                 "checked to be the same study as the other tables; merge complete results tables")


def merge(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One table from the results ``tables`` (by source name), checked to be one study.

    Rows keep the order of the first table that has them; later tables add only new keys.
    """
    _check_columns(tables)
    _check_study(tables)
    _check_agreement(tables)
    merged = pd.concat(list(tables.values()), ignore_index=True)
    return merged.drop_duplicates(KEY, keep="first").reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m experiments.merge", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the merged table, report and plots (created if needed)")
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                        help="run directories (each holds results.parquet or results.csv) of one study")
    parser.add_argument("--time-method", default=None, help="method of the KLoM-over-time plot (default: every method)")
    args = parser.parse_args(argv)
    check_writable(args.out, "OUT")
    if len(set(map(Path.resolve, args.run_dirs))) != len(args.run_dirs):
        raise ValueError("a RUN_DIR is named twice; name each run directory once")
    tables = {str(source): plots.load(source) for source in args.run_dirs}
    table = merge(tables)
    plots.check(table, args.out / "results.parquet", args.time_method)
    plots.save(table, args.out)
    provenance = {"rows": len(table), "sources": {source: len(rows) for source, rows in tables.items()}}
    files.atomic_write(args.out / "merged_from.json", lambda h: h.write(json.dumps(provenance, indent=2).encode()))
    for path in plots.render(args.out, args.time_method):
        print(path)
    print(f"{len(table)} rows from {len(args.run_dirs)} tables in {args.out / 'results.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
