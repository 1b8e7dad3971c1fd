"""The study pipeline end to end on real Fashion-MNIST at a tiny size: smoke, divergence,
determinism, and resuming after SIGKILL at several points gives the uninterrupted table."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ascent_jax.cli import run_main
from experiments import fashion, merge, plots

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--ensemble", "4", "--epochs", "1", "--subset-size", "600", "--forget-set", "fallback-random10", "--grid", "quick",
        "--no-progress"]
KILLABLE = ["--ensemble", "2", "--epochs", "2", "--subset-size", "3000", "--forget-set", "fallback-random10", "--grid", "quick",
            "--method", "finetune", "--no-progress"]
VOLATILE = ["wall_time_s", "device"]


def stable(table: pd.DataFrame) -> pd.DataFrame:
    """The table without the columns that legitimately change between runs."""
    return table.drop(columns=VOLATILE).reset_index(drop=True)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "run"
    assert run_main(fashion.main, [*TINY, "--method", "ga", "--method", "om", "--out", str(out)]) == 0
    return out


def test_smoke_writes_table_report_and_plots(smoke):
    table = pd.read_parquet(smoke / "results.parquet")
    assert list(dict.fromkeys(table["method"])) == ["pretrained", "oracle", "ga", "om"]
    assert len(table) == 2 + 6 + 3  # references + quick grid: GA 2 lrs x 3 epochs, OM 1 lr x 3 epochs
    assert set(table["forget_set"]) == {"fallback-random10"} and (table["forget_size"] == 10).all()
    for split in ("forget", "retain", "val"):
        assert table[f"klom_p95_{split}"].between(0, 1e3).all()
        assert table[f"acc_{split}"].between(0, 1).all()
    ga = table[table["method"] == "ga"]
    # GA's cost is epochs x |F| example-gradients over 1 epoch x |retain| = 590 of retraining
    np.testing.assert_allclose(ga["relative_cost"], ga["epochs"] * 10 / 590)
    assert table.loc[table["method"] == "oracle", "relative_cost"].item() == 1.0
    pd.testing.assert_frame_equal(pd.read_csv(smoke / "results.csv"), table, check_dtype=False)
    for name in ("forget_vs_val.png", "forget_vs_retain.png", "klom_over_time.png", "report.md",
                 "pretrain_accuracy.csv"):
        assert (smoke / name).stat().st_size > 0
    assert "Selection: declared protocol" in (smoke / "report.md").read_text()
    assert not (smoke / "work").exists() or not any((smoke / "work").rglob("*.npz"))  # pruned


def test_rerun_is_cached_and_identical(smoke, capsys):
    before = pd.read_parquet(smoke / "results.parquet")
    assert run_main(fashion.main, [*TINY, "--method", "ga", "--method", "om", "--out", str(smoke)]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(smoke / "results.parquet"), before)
    assert "pretrain" not in capsys.readouterr().err  # no training progress: every stage came from the cache


def test_plots_cli_regenerates_from_the_table(smoke):
    (smoke / "forget_vs_val.png").unlink()
    assert run_main(plots.main, [str(smoke), "--time-method", "ga"]) == 0
    assert (smoke / "forget_vs_val.png").stat().st_size > 0


def test_selection_follows_the_declared_protocol(smoke):
    table = pd.read_parquet(smoke / "results.parquet")
    chosen = plots.selection(table).set_index("method")
    ga = table[table["method"] == "ga"]
    floor = table.loc[table["method"] == "pretrained", "acc_val_a"].item() - plots.MAX_ACCURACY_DROP
    eligible = ga[(ga["diverged_fraction_a"] == 0) & (ga["acc_val_a"] >= floor)]
    best = eligible.loc[eligible["klom_p95_forget_a"].idxmin()]
    assert chosen.loc["ga", "chosen"] == best["params"]
    assert chosen.loc["ga", "fresh_b"] == best["klom_p95_forget_b"]
    assert chosen.loc["ga", "best_after_fact_b"] == ga["klom_p95_forget_b"].min()


def test_pieces_of_a_study_merge_into_the_whole_study(smoke, tmp_path):
    whole = tmp_path / "whole"  # the smoke study with fine-tune added to its run directory
    shutil.copytree(smoke, whole)
    assert run_main(fashion.main, [*TINY, "--method", "ga", "--method", "om", "--method", "finetune",
                                   "--out", str(whole)]) == 0
    piece = tmp_path / "piece"  # fine-tune alone in a fresh run directory: same seed, same replicas and oracles
    assert run_main(fashion.main, [*TINY, "--method", "finetune", "--out", str(piece)]) == 0
    out = tmp_path / "merged"
    assert run_main(merge.main, [str(out), str(smoke), str(piece)]) == 0
    merged = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(stable(merged), stable(pd.read_parquet(whole / "results.parquet")))
    assert json.loads((out / "merged_from.json").read_text()) == {
        "rows": 11 + 3, "sources": {str(smoke): 11, str(piece): 2 + 3}}
    assert "finetune" in (out / "report.md").read_text() and (out / "forget_vs_val.png").stat().st_size > 0


def test_divergence_is_a_result(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--method", "ga", "--lr", "1e30", "--out", str(out)]
    assert run_main(fashion.main, args) == 0
    table = pd.read_parquet(out / "results.parquet")
    ga = table[table["method"] == "ga"].set_index("epochs")
    # one step of 1e30 leaves finite (huge) weights; the next epoch overflows. Rows report divergence
    # "by then": not after 1 epoch, in every replica after 3 and 5, first in epoch 2
    assert not ga.loc[1, "diverged"] and ga.loc[1, "diverged_epoch"] == -1
    assert ga.loc[[3, 5], "diverged"].all() and (ga.loc[[3, 5], "diverged_fraction"] == 1.0).all()
    assert (ga.loc[[3, 5], "diverged_epoch"] == 2).all()
    assert (ga.loc[[3, 5], "acc_val"] == 0).all()  # NaN margins count as wrong
    assert np.isfinite(ga.loc[[3, 5], "klom_p95_forget"]).all()  # KLoM still scores them (NaN -> -clip)
    assert not table[table["method"] != "ga"]["diverged"].any()


def test_different_seeds_give_different_replicas(tmp_path):
    accuracies = []
    for seed in ("0", "1"):
        out = tmp_path / seed
        assert run_main(fashion.main, [*KILLABLE, "--seed", seed, "--pretrain-only", "--out", str(out)]) == 0
        accuracies.append(pd.read_csv(out / "pretrain_accuracy.csv")["test_accuracy"].to_numpy())
    assert not np.array_equal(*accuracies)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert run_main(fashion.main, [*KILLABLE, "--out", str(out)]) == 0
    return pd.read_parquet(out / "results.parquet")


def _kill_when(out: Path, pattern: str, timeout: float = 300) -> None:
    """Start the study as a process and SIGKILL it as soon as a file matching ``pattern`` exists."""
    process = subprocess.Popen([sys.executable, "-m", "experiments.fashion", *KILLABLE, "--out", str(out)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not any(out.glob(pattern)):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"the study ended (or timed out) before {pattern} appeared")
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("pattern", ["pretrain/members-*/1", "sets/*/oracles/meta", "work/*/finetune-*/members-*/1",
                                     "sets/*/rows/*/meta"],
                         ids=["pretraining", "after-oracles", "unlearning", "after-rows"])
def test_killed_run_resumes_to_the_same_table(tmp_path, uninterrupted, pattern):
    out = tmp_path / "run"
    _kill_when(out, pattern)
    assert not (out / "results.parquet").exists() or pattern == "sets/*/rows/*/meta"
    # what kills in the middle of writes leave: a truncated temp file beside a result file, a
    # store entry's partial folder, an orbax checkpoint's temporary folder
    half_written = [out / ".results.parquet.k1ll3d.tmp", out / "sets" / ".oracles.partial" / "meta",
                    out / "pretrain" / "members-0000-0001" / "2.orbax-checkpoint-tmp-1234" / "state"]
    for path in half_written:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"PK\x03\x04 truncated")
    assert run_main(fashion.main, [*KILLABLE, "--out", str(out)]) == 0
    pd.testing.assert_frame_equal(stable(pd.read_parquet(out / "results.parquet")), stable(uninterrupted))
    assert not any(path.exists() for path in half_written)
    assert not (out / "sets" / ".oracles.partial").exists()


def test_run_dir_of_another_configuration_is_refused(smoke, capsys):
    before = (smoke / "run.json").read_text()
    assert run_main(fashion.main, [*TINY, "--ensemble", "6", "--out", str(smoke)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {smoke} holds a study with another configuration (differs in: ensemble); "
                            f"use another --out, or delete {smoke} to start fresh")
    assert (smoke / "run.json").read_text() == before
    assert json.loads(before)["config"]["ensemble"] == 4


def test_another_forget_set_under_a_cached_name_is_refused(smoke, tmp_path, capsys):
    cached = np.load(smoke / "sets" / "fallback-random10" / "forget.npy")
    held = smoke / "sets" / "custom"
    held.mkdir()
    try:
        np.save(held / "forget.npy", cached[:-1])  # what an earlier invocation ran under the name "custom"
        other = tmp_path / "custom.npy"  # same name, one point more
        np.save(other, cached)
        assert run_main(fashion.main, [*TINY, "--forget-set", str(other), "--method", "ga", "--out", str(smoke)]) == 2
        assert capsys.readouterr().err.startswith(
            f"error: {held} holds results for another forget set named 'custom'")
    finally:
        shutil.rmtree(held)


def test_snapshot_tabulates_finished_stages_without_touching_the_run(smoke, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in smoke.rglob("*")}
    snapshot = tmp_path / "snapshot"
    args = [*TINY, "--method", "ga", "--method", "om", "--method", "finetune", "--out", str(smoke),
            "--snapshot", str(snapshot)]
    assert run_main(fashion.main, args) == 0
    assert {p: p.stat().st_mtime_ns for p in smoke.rglob("*")} == before  # nothing written, nothing trained
    table = pd.read_parquet(snapshot / "results.parquet")
    pd.testing.assert_frame_equal(stable(table), stable(pd.read_parquet(smoke / "results.parquet")))  # no finetune rows
    assert (snapshot / "report.md").exists() and (snapshot / "forget_vs_val.png").exists()


def test_cifar_dry_run_plans_without_data_from_the_engine_memory_plan():
    """CIFAR-10's sizes are known: the plan needs no --data-dir; it prints the time against the peak of
    the precision used and the chunk the engine's memory plan gives for the limit asked for."""
    result = subprocess.run([sys.executable, "-m", "experiments.cifar", "--ensemble", "100", "--dry-run", "--dtype",
                             "bfloat16", "--layout", "vmap", "--memory-limit", "8", "--out", "unused"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "H100's dense bfloat16 peak of 989.4 TFLOP/s" in result.stdout
    memory = re.search(r"pretraining memory on 1 cpu device\(s\), layout vmap: ([\d.]+) MiB per member \+ ([\d.]+) MiB "
                       r"shared per device, limit 8.0 GiB -> (\d+) members at once, (\d+) chunk\(s\)", result.stdout)
    assert memory, result.stdout
    per, fixed, chunk, chunks = float(memory[1]), float(memory[2]), int(memory[3]), int(memory[4])
    assert per > 100  # ResNet-9 activations at batch 512: hundreds of MiB per member
    assert abs(chunk - (0.85 * 8 * 1024 - fixed) // per) <= 1 and chunks == -(-100 // chunk)  # MiB are rounded
    assert not Path(ROOT / "unused").exists()


def test_rerun_with_other_methods_keeps_every_finished_row(smoke, tmp_path):
    """A run directory's table accumulates: an invocation with only fine-tune keeps GA's and OM's rows."""
    run = tmp_path / "run"
    shutil.copytree(smoke, run)
    before = pd.read_parquet(smoke / "results.parquet")
    assert run_main(fashion.main, [*TINY, "--method", "finetune", "--out", str(run)]) == 0
    after = pd.read_parquet(run / "results.parquet")
    assert len(after) == len(before) + 3 and set(after["method"]) == set(before["method"]) | {"finetune"}
    kept = after[after["method"] != "finetune"].sort_values(["method", "params", "epochs"]).reset_index(drop=True)
    expected = before.sort_values(["method", "params", "epochs"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(stable(kept), stable(expected))
    identity = ["dataset", "model", "ensemble", "seed", "pretrain", "subset_digest", "test_digest", "forget_digest"]
    assert (after[identity].nunique() == 1).all() and (after["seed"] == 0).all()


def test_damaged_cache_entry_is_one_line_naming_what_to_delete(smoke, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(smoke, run)
    entry = run / "sets" / "fallback-random10" / "oracles"
    for path in (entry / "arrays").rglob("*"):
        if path.is_file() and path.stat().st_size > 64:
            path.write_bytes(path.read_bytes()[:32])  # truncated, as by a failing disk
    assert run_main(fashion.main, [*TINY, "--method", "ga", "--out", str(run)]) == 2
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: cache entry {entry} cannot be read (")
    assert error[0].endswith("; delete it and rerun")
    shutil.rmtree(entry)  # the oracles recompute; now a damaged training checkpoint
    checkpoint = next((run / "pretrain").glob("members-*"))
    for path in checkpoint.rglob("*"):
        if path.is_file() and "state" in path.parts and path.stat().st_size > 64:
            path.write_bytes(path.read_bytes()[:32])
    assert run_main(fashion.main, [*TINY, "--method", "ga", "--out", str(run)]) == 2
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 1 and re.fullmatch(rf"error: checkpoint {re.escape(str(checkpoint))}/\d+ cannot be read "
                                            rf"\(\w+\); delete {re.escape(str(checkpoint))} and rerun", error[0]), error
    shutil.rmtree(run / "pretrain")  # pretraining reruns; now a damaged forget-set file
    forget = run / "sets" / "fallback-random10" / "forget.npy"
    forget.write_bytes(forget.read_bytes()[:40])
    assert run_main(fashion.main, [*TINY, "--method", "ga", "--out", str(run)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {forget} is damaged (ValueError); delete {forget.parent} and rerun to recompute that forget set's "
        "stages"]


def test_ctrl_c_is_one_line_and_the_rerun_resumes(tmp_path, uninterrupted):
    """SIGINT mid-pretraining: exit 130, one line, no traceback (and no SIGSEGV); the rerun gives the same table."""
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "experiments.fashion", *KILLABLE, "--out", str(out)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(out.glob("pretrain/members-*/1")):
        assert process.poll() is None and time.time() < deadline, "the study ended before the first checkpoint"
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.splitlines() == ["interrupted; rerun the same command to resume"]
    assert run_main(fashion.main, [*KILLABLE, "--out", str(out)]) == 0
    pd.testing.assert_frame_equal(stable(pd.read_parquet(out / "results.parquet")), stable(uninterrupted))


def test_presets_fill_only_the_flags_not_given():
    main = fashion.parse_args([])
    assert (main.ensemble, main.model, main.epochs, main.subset_size, main.grid, main.out) == (
        50, "mlp128", 10, 10_000, "main", "runs/fashion")
    assert main.preset is fashion.MAIN and main.method is None and main.forget_set is None
    quick = fashion.parse_args(["--quick"])
    assert (quick.ensemble, quick.epochs, quick.subset_size, quick.grid, quick.out) == (
        4, 2, 2_000, "quick", "runs/fashion-quick")
    assert quick.preset.smoke and not main.preset.smoke
    mixed = fashion.parse_args(["--quick", "--ensemble", "6", "--grid", "cpu", "--method", "ga"])
    assert (mixed.ensemble, mixed.grid, mixed.method, mixed.epochs) == (6, "cpu", ["ga"], 2)


@pytest.mark.slow
def test_quick_preset_labels_itself_a_smoke_run(tmp_path):
    out = tmp_path / "quick"
    result = subprocess.run([sys.executable, "-m", "experiments.fashion", "--quick", "--out", str(out), "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("SMOKE RUN (--quick)") and result.stdout.count("SMOKE RUN (--quick)") == 2
    table = pd.read_parquet(out / "results.parquet")
    assert set(table["method"]) == {"pretrained", "oracle", "partial_retrain", "ga", "om"}
    assert (table["ensemble"] == 4).all()
    # partial retraining: the target oracles after 1 of their 2 epochs, at half of retraining's cost
    partial, oracle = table[table["method"] == "partial_retrain"], table[table["method"] == "oracle"]
    assert partial["epochs"].tolist() == [1] and partial["relative_cost"].tolist() == [0.5]
    assert partial["acc_val"].item() < oracle["acc_val"].item()
    om = table[table["method"] == "om"]
    assert set(om["optimizer"]) == {"adam, decay 0.95/epoch"} and set(om["target"]) == {"mean"}
    assert set(table.loc[table["method"] == "ga", "optimizer"]) == {"sgd, momentum 0.9"}
    assert set(table.loc[table["method"].isin(["pretrained", "oracle", "partial_retrain"]), "optimizer"]) == {"none"}


def test_a_subset_too_small_for_the_default_random_set_falls_back_to_a_smaller_one():
    setup = fashion.build_setup(fashion.parse_args(["--subset-size", "20", "--out", "unused", "--no-progress"]))
    assert list(setup.forget_sets) == ["fallback-random10"] and len(setup.forget_sets["fallback-random10"]) == 10
    assert any("using random sets named fallback-random*" in note for note in setup.notes)
    assert not Path("unused").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "never"
    assert run_main(fashion.main, ["--dry-run", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "N = 50 replicas, 100 oracles per forget set; forget sets: set2-random100 (100), set8-pc2-top100 (100)" in printed
    assert "work: pretraining 5.3 M, oracles 21.1 M, unlearning 17.7 M example-gradients" in printed
    assert re.search(r"pretraining memory on 1 cpu device\(s\), layout map: [\d.]+ MiB per member", printed)
    assert not out.exists()
    assert run_main(fashion.main, ["--dry-run", "--ensemble", "1", "--out", str(out)]) == 2  # the same checks as a run
