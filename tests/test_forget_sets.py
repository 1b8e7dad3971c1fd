"""Forget sets: recipes, index-file validation, manifest, and the CLI end to end."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest

from ascent_jax import data, datamodels, forget_sets
from ascent_jax.cli import run_main


def test_default_recipes_are_the_nine_app_m_sets():
    recipes = forget_sets.default_recipes()
    assert [r.name for r in recipes] == [
        "set1-random10", "set2-random100", "set3-random500", "set4-pc1-top10", "set5-pc1-top100",
        "set6-pc1-top250-bottom250", "set7-pc2-top10", "set8-pc2-top100", "set9-pc2-top250-bottom250"]
    assert [r.total for r in recipes] == [10, 100, 500, 10, 100, 500, 10, 100, 500]
    with pytest.raises(ValueError, match="kind"):
        forget_sets.Recipe("x", "cluster", 3)


def test_build_sets_top_bottom_random_and_determinism():
    subset = np.arange(0, 200, 10)  # 20 study points, indices into a 200-point split
    scores = np.stack([np.arange(20.0), -np.arange(20.0)], axis=1)
    recipes = forget_sets.default_recipes((4,), (3,), 2, (1, 2))
    sets = forget_sets.build_sets(recipes, subset, scores, seed=7)
    np.testing.assert_array_equal(sets["set2-pc1-top3"], [170, 180, 190])
    np.testing.assert_array_equal(sets["set3-pc1-top2-bottom2"], [0, 10, 180, 190])
    np.testing.assert_array_equal(sets["set4-pc2-top3"], [0, 10, 20])
    random_set = sets["set1-random4"]
    assert len(random_set) == 4 and np.isin(random_set, subset).all() and np.all(np.diff(random_set) > 0)
    assert all(v.dtype == np.int64 for v in sets.values())
    again = forget_sets.build_sets(recipes, subset, scores, seed=7)
    assert all(np.array_equal(sets[k], again[k]) for k in sets)
    with pytest.raises(ValueError, match="needs 40 points"):
        forget_sets.build_sets(forget_sets.default_recipes((40,), (), 1, ()), subset, scores, seed=0)
    with pytest.raises(ValueError, match="needs PC 3"):
        forget_sets.build_sets(forget_sets.default_recipes((), (1,), 1, (3,)), subset, scores, seed=0)


@pytest.mark.parametrize("suffix, write", [
    (".npy", lambda p: np.save(p, np.array([5, 1, 3]))),
    (".txt", lambda p: p.write_text("5\n1, 3\n")),
    (".json", lambda p: p.write_text("[5, 1, 3.0]")),
    (".json", lambda p: p.write_text('{"indices": [5, 1, 3]}')),
])
def test_load_index_file_accepts_formats(tmp_path, suffix, write):
    path = tmp_path / f"forget{suffix}"
    write(path)
    indices = forget_sets.load_index_file(path, 10)
    np.testing.assert_array_equal(indices, [1, 3, 5])
    assert indices.dtype == np.int64


@pytest.mark.parametrize("name, content, message", [
    ("F.npy", np.array([1, 60001, 70000]), r"F.npy: indices out of range \[0, 60000\): \[60001, 70000\]$"),
    ("F.npy", np.array([3, -1, 2]), r"F.npy: negative indices: \[-1\]$"),
    ("F.npy", np.array([1.0, 2.5]), r"F.npy: non-integer values: \[2.5\]$"),
    ("F.npy", np.array([], dtype=np.int64), r"F.npy: contains no indices$"),
    ("F.npy", np.zeros((2, 2), int), r"F.npy: expected a 1-D array, got shape \(2, 2\)$"),
    ("F.txt", "4 7 4 9 7", r"F.txt: duplicate indices: \[4, 7\]$"),
    ("F.txt", "1 two 3", r"F.txt: non-integer values: \['two'\]$"),
    ("F.txt", "  \n", r"F.txt: contains no indices$"),
    ("F.json", "[1, true, null]", r"F.json: non-integer values: \[True, None\]$"),
    ("F.json", "[1, 2", r"F.json: cannot read it"),
    ("F.json", '{"a": 1}', r"F.json: expected a JSON list"),
    ("F.csv", "1,2", r"F.csv: unsupported format '.csv'"),
])
def test_load_index_file_rejects_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    np.save(path, content) if isinstance(content, np.ndarray) else path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        forget_sets.load_index_file(path, 60_000)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_load_index_file_missing_and_long_lists(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npy does not exist"):
        forget_sets.load_index_file(tmp_path / "nope.npy", 10)
    path = tmp_path / "many.txt"
    path.write_text(" ".join(str(i) for i in range(100, 120)))
    with pytest.raises(ValueError, match=r"\[100, 101, 102, 103, 104\] \(and 15 more\)"):
        forget_sets.load_index_file(path, 50)


def test_write_sets_manifest_and_histograms(tmp_path):
    labels = np.array([0, 1, 1, 2, 2, 2])
    manifest = forget_sets.write_sets(tmp_path, {"a": np.array([1, 3, 4])}, labels, 3, {"seed": 1})
    assert manifest["sets"]["a"]["class_histogram"] == [0, 1, 2]
    on_disk = json.loads((tmp_path / "forget_sets.json").read_text())
    assert on_disk == manifest and on_disk["provenance"] == {"seed": 1}
    stored = np.load(tmp_path / "a.npy")
    assert stored.dtype == np.int64 and stored.tolist() == [1, 3, 4]


@pytest.fixture
def synthetic_data(monkeypatch):
    """A 200-image, 10-class stand-in for the train split (so the CLI runs in seconds)."""
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10, dtype=np.int32), 20)
    images = (rng.integers(0, 60, (200, 28, 28, 1)) + 19 * labels[:, None, None, None]).astype(np.uint8)
    monkeypatch.setattr(forget_sets.data, "load", lambda name, split, data_dir=None: (images, labels))
    return images, labels


def test_cli_import_validates_files(tmp_path, synthetic_data, capsys):
    good = tmp_path / "official_set1.txt"
    good.write_text("3 1 2")
    assert run_main(forget_sets.main, ["--import", str(good), "--out", str(tmp_path / "out")]) == 0
    assert np.load(tmp_path / "out" / "official_set1.npy").tolist() == [1, 2, 3]
    manifest = json.loads((tmp_path / "out" / "forget_sets.json").read_text())
    assert manifest["provenance"]["source"] == "imported"
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([1, 250]))
    assert run_main(forget_sets.main, ["--import", str(bad), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: forget set file {bad}: indices out of range [0, 200): [250]"


def test_cli_rejects_bad_arguments(tmp_path, synthetic_data, capsys):
    with pytest.raises(SystemExit) as exit_info:
        forget_sets.main(["--alpha", "1.5"])
    assert exit_info.value.code == 2
    assert run_main(forget_sets.main, ["--subset-size", "100", "--out", str(tmp_path)]) == 2
    assert "largest forget set has 500 points" in capsys.readouterr().err
    args = ["--subset-size", "60", "--models", "6", "--random-sizes", "2", "--top-sizes", "2", "--split-size", "2",
            "--out", str(tmp_path)]
    assert run_main(forget_sets.main, args) == 2
    assert "at least 8 models" in capsys.readouterr().err


def test_cli_end_to_end_tiny_and_resumes(tmp_path, synthetic_data, capsys):
    out = tmp_path / "run"
    args = ["--subset-size", "100", "--models", "12", "--epochs", "1", "--batch-size", "25", "--chunk-size", "6",
            "--random-sizes", "3,5,10", "--top-sizes", "3,5", "--split-size", "5", "--fista-steps", "30",
            "--no-progress", "--out", str(out)]
    assert run_main(forget_sets.main, args) == 0
    first = capsys.readouterr().out
    assert "study subset of 100 class-balanced" in first and "LDS" in first
    manifest = json.loads((out / "forget_sets.json").read_text())
    assert len(manifest["sets"]) == 9
    assert manifest["provenance"]["models"] == 12 and manifest["provenance"]["alpha"] == 0.5
    subset = np.load(out / "study_subset.npy")
    for entry in manifest["sets"].values():
        indices = np.load(out / entry["file"])
        assert len(indices) == entry["size"] == sum(entry["class_histogram"]) and np.isin(indices, subset).all()
    for name in ("report.md", "pc_images.png", "datamodels.npz"):
        assert (out / name).is_file()
    assert "datamodel fit: targets chunk 1/1 done" in first
    assert not (out / "fit").exists()  # the fit's chunk checkpoints are dropped once datamodels.npz holds them
    sets = {name: np.load(out / e["file"]) for name, e in manifest["sets"].items()}
    chunks = sorted(p.name for p in (out / "margins").iterdir())
    assert chunks == ["members-0000-0005.outputs", "members-0006-0011.outputs"]  # margins only, no checkpoints
    kept = (out / "margins" / chunks[0] / "meta" / "metadata").stat().st_mtime_ns
    shutil.rmtree(out / "margins" / chunks[1])  # as if killed while training the second chunk
    assert run_main(forget_sets.main, args) == 0  # rerun: chunk 1 is reused, chunk 2 retrained identically
    assert (out / "margins" / chunks[0] / "meta" / "metadata").stat().st_mtime_ns == kept
    assert (out / "margins" / chunks[1]).is_dir()
    assert all(np.array_equal(np.load(out / f"{name}.npy"), v) for name, v in sets.items())
    assert run_main(forget_sets.main, [*args[:3], "13", *args[4:]]) == 2
    assert "holds a run with other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_real_fashion_mnist_tiny(tmp_path, capsys):
    """The brief's tiny real run: 500 points, 40 models, 2 epochs (about a minute on CPU)."""
    try:
        data.load("fashion_mnist", "train")
    except FileNotFoundError as error:
        pytest.skip(str(error))
    args = ["--subset-size", "500", "--models", "40", "--epochs", "2", "--chunk-size", "20", "--no-progress",
            "--out", str(tmp_path)]
    assert run_main(forget_sets.main, args) == 0
    assert "LDS" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "forget_sets.json").read_text())["sets"]) == 9


def test_class_rows_are_the_sets_and_a_seeded_pool():
    subset = np.arange(100, 300, 2)  # 100 study points
    sets = {"a": np.array([100, 102]), "b": np.array([102, 298])}
    rows = forget_sets.class_rows(sets, subset, 10, seed=3)
    assert rows.dtype == np.int64 and np.all(np.diff(rows) > 0)
    pool = np.random.default_rng([3, forget_sets.CLASS_POOL_STREAM]).choice(100, 10, replace=False)
    np.testing.assert_array_equal(rows, np.union1d(pool, [0, 1, 99]))
    np.testing.assert_array_equal(forget_sets.class_rows(sets, subset, 0, seed=3), [0, 1, 99])
    with pytest.raises(ValueError, match="pool of 101 points"):
        forget_sets.class_rows(sets, subset, 101, seed=3)


@pytest.mark.parametrize("extra, message", [
    (["--fit-classes"], "--fit-classes fits datamodels of the class logits, which only a run with --logits records; "
                        "add --logits"),
    (["--logits", "--class-pool", "5"], "--class-pool chooses the rows of the per-class datamodels; add --fit-classes "
                                        "or drop --class-pool"),
    (["--logits", "--fit-classes", "--class-sets", "set2-random5,set9"],
     "--class-sets names unknown forget sets set9; choose from set1-random3, set2-random5, set3-random10, set4-pc1-top3, "
     "set5-pc1-top5, set6-pc1-top5-bottom5, set7-pc2-top3, set8-pc2-top5, set9-pc2-top5-bottom5"),
    (["--logits", "--fit-classes", "--class-pool", "101"], "--class-pool 101 exceeds the study subset of 100 points; "
                                                           "pass at most 100"),
], ids=["fit-classes-without-logits", "pool-without-fit-classes", "unknown-class-set", "pool-too-big"])
def test_cli_rejects_bad_class_flags_before_any_work(tmp_path, synthetic_data, capsys, extra, message):
    args = ["--subset-size", "100", "--models", "12", "--random-sizes", "3,5,10", "--top-sizes", "3,5",
            "--split-size", "5", "--out", str(tmp_path / "run"), *extra]
    assert run_main(forget_sets.main, args) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "run").exists()


def test_cli_import_refuses_the_class_flags(tmp_path, synthetic_data, capsys):
    good = tmp_path / "set.txt"
    good.write_text("1 2")
    assert run_main(forget_sets.main, ["--import", str(good), "--logits", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == ("error: --import copies index files and trains nothing, so --logits and "
                                               "--fit-classes do not apply; drop them (or drop --import)")
    assert not (tmp_path / "run").exists()


def test_cli_logits_keep_the_sets_and_a_killed_class_fit_resumes(tmp_path, synthetic_data, capsys, monkeypatch):
    base = ["--subset-size", "100", "--models", "12", "--epochs", "1", "--batch-size", "25", "--chunk-size", "6",
            "--random-sizes", "3,5,10", "--top-sizes", "3,5", "--split-size", "5", "--fista-steps", "30",
            "--no-progress"]
    assert run_main(forget_sets.main, [*base, "--out", str(tmp_path / "plain")]) == 0
    out = tmp_path / "run"
    args = [*base, "--logits", "--fit-classes", "--class-pool", "10", "--out", str(out)]
    monkeypatch.setattr(datamodels, "fit_class_datamodels",
                        functools.partial(datamodels.fit_class_datamodels, target_chunk=100))
    real, calls = datamodels._lasso_path, []

    def killed_at_third_chunk(x, y, *rest):  # the margin fit is the first call, class chunks follow
        calls.append(y.shape[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(x, y, *rest)

    monkeypatch.setattr(datamodels, "_lasso_path", killed_at_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        forget_sets.main(args)
    manifest = json.loads((out / "forget_sets.json").read_text())
    for name, entry in manifest["sets"].items():  # the sets were written before the class fit, as without --logits
        assert (out / entry["file"]).read_bytes() == (tmp_path / "plain" / entry["file"]).read_bytes(), name
    logits = np.load(out / "logits.npy")
    assert logits.dtype == np.float16 and logits.shape == (12, 100, 10)
    chunks = out / "margins" / datamodels.LOGITS_FOLDER
    stamps = {p.name: (p / "meta" / "metadata").stat().st_mtime_ns for p in chunks.iterdir()}
    capsys.readouterr()
    calls.clear()
    monkeypatch.setattr(datamodels, "_lasso_path", lambda x, y, *rest: calls.append(y.shape[1]) or real(x, y, *rest))
    assert run_main(forget_sets.main, args) == 0  # rerun: nothing trained, the margin fit and class chunk 1 reloaded
    printed = capsys.readouterr().out
    assert {p.name: (p / "meta" / "metadata").stat().st_mtime_ns for p in chunks.iterdir()} == stamps
    subset = np.load(out / "study_subset.npy")
    cdm = datamodels.load_class_datamodels(out / forget_sets.CLASS_DATAMODELS, subset)
    targets = cdm.matrix.shape[0] * cdm.matrix.shape[1]
    assert calls == [min(100, targets - lo) for lo in range(100, targets, 100)]
    assert "targets chunk 2/" in printed and "(loaded)" in printed and "fitted in" in printed
    for entry in manifest["sets"].values():
        assert np.isin(datamodels.positions_in_subset(subset, np.load(out / entry["file"])), cdm.rows).all()
    assert "Per-class LDS" in printed and "forget-set rows" in (out / "report.md").read_text()
    assert not (out / "fit").exists() and not (out / "fit-classes").exists()
