"""experiments.plots: one-line errors, the terminal summary's width, markers, and the noise-floor marking."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from experiments import plots
from test_bad_inputs import assert_user_error, call_cli

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "experiments" / "results" / "fashion_mnist" / "results.parquet"
PROG = "python -m experiments.plots"
SCRUB = {"ascent_epochs": 3, "ce_weight": 0.99, "epochs": 5, "forget_batch_size": 64, "kl_weight": 0.1, "lr": 0.001,
         "lr_decay": 0.1, "lr_decay_after": [3, 5, 9], "retain_batch_size": 64, "temperature": 4.0}


def planted(rows: list[dict], **common) -> pd.DataFrame:
    """A results table with every column the plots read; ``rows`` override the defaults of one forget set."""
    base = {"forget_set": "s", "forget_size": 10, "method": "ga", "params": "{}", "lr": float("nan"), "epochs": 0,
            **{column: 1.0 for column in plots.KLOM_COLUMNS}, "acc_forget": 0.9, "acc_retain": 0.9, "acc_val": 0.85,
            **{column: 0.5 for column in plots.MARGIN_COLUMNS}, "klom_p95_forget_a": 1.0, "klom_p95_forget_b": 1.0,
            "acc_val_a": 0.85, "acc_val_b": 0.85, "diverged": False, "diverged_fraction": 0.0,
            "diverged_fraction_a": 0.0, "diverged_epoch": -1, "relative_cost": 0.0, "wall_time_s": 0.0,
            "device": "cpu:cpu", "ensemble": 8, "model": "mlp", "dataset": "fashion_mnist", **common}
    table = pd.DataFrame([{**base, **row} for row in rows])
    assert set(plots.REQUIRED) <= set(table.columns)
    return table


def references(pretrained: float = 5.0, oracle: float = 1.0, **extra) -> list[dict]:
    return [{"method": "pretrained", "klom_p95_forget": pretrained},
            {"method": "oracle", "klom_p95_forget": oracle, "relative_cost": 1.0, **extra}]


def config(method: str, forget: float, **params) -> dict:
    return {"method": method, "params": json.dumps(params, sort_keys=True), "epochs": params.get("epochs", 0),
            "lr": params.get("lr", float("nan")), "klom_p95_forget": forget, "relative_cost": 0.01}


def summary_line(text: str, method: str) -> str:
    (line,) = [line for line in text.splitlines() if line.split(" ", 1)[0] == method]
    return line


# --- one-line errors, nothing written ---------------------------------------------------------

def assert_plots_error(capsys, run_dir: Path, message: str, *args: str) -> None:
    before = sorted(run_dir.rglob("*"))
    assert_user_error(call_cli(capsys, str(run_dir), *args, main=plots.main), f"^error: {re.escape(message)}$",
                      prog=PROG)
    assert sorted(run_dir.rglob("*")) == before  # no plot, no report


def test_a_table_without_a_needed_column(capsys, tmp_path):
    planted(references()).drop(columns=["klom_p95_forget", "acc_val"]).to_csv(tmp_path / "results.csv", index=False)
    assert_plots_error(capsys, tmp_path, f"{tmp_path / 'results.csv'} lacks the column(s) klom_p95_forget, acc_val "
                       "that the plots and report need; it is not the results table of a complete study (rerun the "
                       f"study into {tmp_path})")


def test_a_table_without_rows(capsys, tmp_path):
    planted(references()).iloc[:0].to_csv(tmp_path / "results.csv", index=False)
    assert_plots_error(capsys, tmp_path, f"{tmp_path / 'results.csv'} has no rows; rerun the study into {tmp_path}")


def test_a_results_parquet_that_is_a_directory(capsys, tmp_path):
    (tmp_path / "results.parquet").mkdir()
    assert_plots_error(capsys, tmp_path, f"{tmp_path / 'results.parquet'} is a directory, not a results table; "
                       f"move it out of {tmp_path} (or pass the run directory of a study)")


@pytest.mark.parametrize("name, content, kind", [
    ("results.parquet", b"not a parquet file", "parquet"),
    ("results.parquet", b"PAR1" + bytes(64), "parquet"),
    ("results.csv", b"", "CSV"),
    ("results.csv", b"\xff\xfe\x00bad", "CSV"),
])
def test_a_corrupt_table(capsys, tmp_path, name, content, kind):
    (tmp_path / name).write_bytes(content)
    assert_plots_error(capsys, tmp_path, f"{tmp_path / name} is not a readable {kind} table (corrupt or truncated?); "
                       f"rerun the study into {tmp_path} to rewrite it")


def test_an_unknown_time_method(capsys, tmp_path):
    plots.save(planted([*references(), config("ga", 2.0, lr=0.1), config("om", 2.0, lr=0.1)]), tmp_path)
    assert_plots_error(capsys, tmp_path, f"--time-method scrub is not a method of {tmp_path / 'results.parquet'}; "
                       "choose one of: ga, om", "--time-method", "scrub")


# --- the terminal summary ----------------------------------------------------------------------

def assert_fits(text: str) -> None:
    too_wide = [line for line in text.splitlines() if len(line) > plots.WIDTH]
    assert not too_wide, too_wide


def test_summary_of_the_committed_table_fits_100_columns():
    table = pd.read_parquet(COMMITTED)
    text = plots.summary(table)
    assert_fits(text)
    assert "{" not in text  # params in brief, not JSON
    assert re.search(r"^scrub +lr=\S+ ep=\d+ ascent_ep=\d+ ", text, re.M)
    assert re.search(r"^oracle +- +0\.673 ", text, re.M)  # left-aligned text, references without params


def test_summary_of_a_tiny_table_fits_and_hides_run_identity():
    table = planted([*references(), config("scrub", 2.0, **SCRUB), config("a_very_long_method_name", 3.0, lr=0.1)],
                    forget_set="x" * 150, seed=123456789, subset_digest="f" * 64, forget_digest="e" * 64)
    text = plots.summary(table)
    assert_fits(text)
    assert "123456789" not in text and "f" * 16 not in text and "e" * 16 not in text
    main_tables = plots.report(table).split("## Mean margins")[0]
    assert "123456789" not in main_tables and "f" * 16 not in main_tables


# --- markers -----------------------------------------------------------------------------------

def test_markers_for_a_method_plots_does_not_know():
    chosen = plots.markers(["pretrained", "oracle", "dm_direct", "ga", "zz_brand_new", "om"])
    assert chosen["pretrained"] == "*" and chosen["oracle"] == "D" and chosen["dm_direct"] == "h"
    assert chosen["zz_brand_new"] in plots.METHOD_MARKERS
    assert len({chosen[m] for m in ("ga", "zz_brand_new", "om")}) == 3  # each method its own marker
    assert set(plots.METHOD_MARKERS).isdisjoint(style[0] for style in plots.REFERENCE_STYLES.values())


def test_render_with_a_new_method_and_coinciding_points(tmp_path):
    # every KLoM the same saturated value (a tiny study): all points coincide
    rows = [*references(pretrained=10.5, oracle=10.5), *(config(m, 10.5, lr=lr) for m in ("ga", "zz_brand_new")
                                                         for lr in (0.1, 0.01))]
    table = planted(rows, **{column: 10.5 for column in plots.KLOM_COLUMNS if column != "klom_p95_forget"})
    plots.save(table, tmp_path)
    paths = plots.render(tmp_path)
    assert [p.name for p in paths] == ["forget_vs_val.png", "forget_vs_retain.png", "klom_over_time.png", "report.md"]
    assert all(p.stat().st_size > 0 for p in paths)
    offsets, groups = plots._fan_offsets(table["klom_p95_val"].to_numpy(float),
                                         table["klom_p95_forget"].to_numpy(float))
    assert list(groups.values()) == [(10.5, 10.5, 6)]
    assert len({tuple(o) for o in offsets}) == 6  # six distinct marker positions


# --- the noise floor ---------------------------------------------------------------------------

def test_a_method_within_the_floor_is_marked_and_one_above_is_not():
    table = planted([*references(), config("ga", 0.9, lr=0.1), config("om", 4.0, lr=0.1)])
    text = plots.summary(table)
    assert summary_line(text, "ga").split()[2] == "0.9*"
    assert summary_line(text, "om").split()[2] == "4"
    assert summary_line(text, "oracle").split()[2] == "1"  # the floor itself
    assert "* within the noise floor" in text
    report = plots.report(table)
    assert "| 0.9 \u2248floor |" in report and "| 4 |" in report and "4 \u2248floor" not in report


def test_the_floor_uses_the_oracles_interval_when_the_table_has_one():
    rows = [*references(klom_p95_forget_ci_high=1.5), config("ga", 1.2, lr=0.1), config("om", 1.6, lr=0.1)]
    table = planted(rows)
    table.loc[table["method"] != "oracle", "klom_p95_forget_ci_high"] = float("nan")
    assert plots.within_floor(table, "klom_p95_forget").tolist() == [False, False, True, False]
    text = plots.summary(table)
    assert summary_line(text, "ga").split()[2] == "1.2*" and summary_line(text, "om").split()[2] == "1.6"
    assert "(the upper end of its interval over re-splits of the oracles)" in " ".join(text.split())
    without = planted([*references(), config("ga", 1.2, lr=0.1)])
    assert not plots.within_floor(without, "klom_p95_forget").iloc[2]


def test_small_n_warning_when_pretrained_is_within_the_floor():
    table = planted([*references(pretrained=1.1, oracle=1.0), config("ga", 0.9, lr=0.1)])
    warning = ("warning: N = 8 is too small for KLoM to resolve the gap on s: the pretrained models' forget KLoM p95 "
               "(1.1) is not clearly above the oracle floor (1; less than 1.25x it), so at this N doing nothing "
               "scores like retraining and no forget KLoM of this set can be told from the floor. If the floor "
               "shrinks like 1/N (as klom.noise_floor's Gaussian figures do), it would come down to the observed "
               "gap (0.1) at N ~ 80.")
    assert plots.resolution_warnings(table) == {"s": warning}
    text = plots.summary(table)
    assert_fits(text)
    assert " ".join(text.split()).count(warning) == 1
    assert "> **Warning.** " + warning.removeprefix("warning: ") in plots.report(table)


def test_small_n_warning_without_any_gap_and_with_an_interval():
    equal = plots.resolution_warnings(planted(references(pretrained=1.0, oracle=1.0)))
    assert equal["s"].endswith("No excess over the floor is seen at all, so the N that would resolve a gap cannot "
                               "be estimated from this table.")
    inside = planted(references(pretrained=2.0, oracle=1.0, klom_p95_forget_ci_high=2.5))  # 2x, but inside the interval
    assert "its interval reaches 2.5" in plots.resolution_warnings(inside)["s"]


def test_no_small_n_warning_when_pretrained_is_far_above_the_floor():
    table = planted([*references(pretrained=5.0, oracle=1.0), config("ga", 0.9, lr=0.1)])
    assert plots.resolution_warnings(table) == {}
    assert "warning" not in plots.summary(table).lower()
    assert "Warning" not in plots.report(table)


# --- what the numbers say --------------------------------------------------------------------

def two_sets(ga_hard: float, om_hard: float) -> pd.DataFrame:
    """A random-like set (gap 5 -> 1) and a hard set (gap 9 -> 1) with GA and OM rows."""
    easy = [*references(5.0, 1.0), config("ga", 3.0, lr=0.01, epochs=1), config("om", 1.4, lr=0.01, epochs=1)]
    hard = [{**row, "forget_set": "hard"} for row in
            [*references(9.0, 1.0), config("ga", ga_hard, lr=0.01, epochs=1), config("om", om_hard, lr=0.01, epochs=1)]]
    return planted([*easy, *hard])


def test_findings_read_the_numbers_from_the_table():
    first, second, third = plots.findings(two_sets(ga_hard=8.6, om_hard=3.0))
    assert first.startswith("Doing nothing scores forget KLoM p95 5.00 and 9.00 on s and hard, against noise floors "
                            "(retraining vs retraining at N = 8) of 1.00 and 1.00.")
    # gaps closed: GA (5-3)/4 = 50% and (9-8.6)/8 = 5%; OM (5-1.4)/4 = 90% and (9-3)/8 = 75%
    assert second == ("Of that gap, each method's best config closes (s vs hard): ga 50% vs 5%; om 90% vs 75%: om comes "
                      "closest to the floor on every set, every method closes least on hard, on hard ga closes less "
                      "than 10% of it.")
    assert third.startswith("Picking the best of the grid after the fact flatters")


def test_findings_make_no_claim_the_numbers_do_not_support():
    _, second, _ = plots.findings(two_sets(ga_hard=1.5, om_hard=5.0))  # GA best on the hard set, OM stalls less
    assert "comes closest to the floor on every set" not in second
    assert "close less than 10%" not in second
    assert "ga 50% vs 94%; om 90% vs 50%" in second
    assert second.endswith(": ga closes less on s than on any other set.")  # s is the harder set here
