"""The benchmark scripts run end to end at tiny sizes on CPU and write complete, consistent JSON (no timing checks);
their command lines follow the project's contract (one ``error:`` line and exit 2 on bad input) and write outside
the committed ``benchmarks/results/`` unless told to."""

import json
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from ascent_jax import models
from benchmarks import __main__ as cpu_set
from benchmarks import common, ensemble_throughput, gpu_check, klom_bench, sharded

REPO = Path(__file__).resolve().parents[1]
METADATA = {"command", "date", "device", "jax_version", "load_average_1min"}
SCRIPTS = {"benchmarks": cpu_set, "benchmarks.ensemble_throughput": ensemble_throughput,
           "benchmarks.gpu_check": gpu_check, "benchmarks.sharded": sharded, "benchmarks.klom_bench": klom_bench}
DEFAULT_FILES = {"benchmarks.ensemble_throughput": "ensemble_throughput.json", "benchmarks.gpu_check": "gpu_check.json",
                 "benchmarks.sharded": "sharded.json", "benchmarks.klom_bench": "klom.json"}
GPU_CHECK_TINY = ["--model", "mlp", "--members", "3", "--steps", "1", "--batch-size", "4", "--image-size", "16",
                  "--loop-models", "2", "--repeats", "1", "--min-seconds", "0", "--matmul-size", "64",
                  "--train-size", "8", "--epochs", "2"]
GPU_CHECK_CONTENDERS = ["torch_grouped", "torch_loop", "vmap", "shard_map_1_device", "loop", "map"]


def _read(path):
    result = json.loads(path.read_text())
    assert METADATA <= result.keys()
    return result


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory, fashion_small):
    """``python -m benchmarks --tiny``: the CPU set (ensemble throughput + KLoM) at smoke-test size."""
    out = tmp_path_factory.mktemp("bench")
    return out, cpu_set.main(["--tiny", "--output-dir", str(out)])


def test_cpu_set_writes_throughput_json(cpu_results):
    out, returned = cpu_results
    result = _read(out / "ensemble_throughput.json")
    assert result["command"] == " ".join(["python -m benchmarks.ensemble_throughput", *cpu_set.TINY_THROUGHPUT,
                                          "--output", str(out / "ensemble_throughput.json")])
    assert result["matmul_gflops_per_s"]["best"] == max(result["matmul_gflops_per_s"]["by_section"]) > 0
    (res,) = result["results"]
    assert res["architecture"] == "mlp" and res["batch_size"] == 16 and res["flops_per_model_step"] > 0
    for contender in ("vmap", "map", "loop"):
        entry = res[contender]["2"]
        assert entry["images_per_s"] > 0 and entry["gflops_per_s"] > 0 and entry["compile_seconds"] > 0
        assert entry["images_per_s"] == pytest.approx(2 * res["points_per_timed_epoch"] / entry["seconds"])
        assert entry["seconds"] == min(entry["seconds_samples"])
    assert set(res["probes"]) == {"steps", "model_steps"} and all(p["images_per_s"] > 0 for p in res["probes"].values())
    if common.torch_or_none() is not None:
        assert res["torch"]["images_per_s"] > 0 and res["torch"]["models_timed"] == 2
    else:
        assert res["torch"] == {"skipped": common.TORCH_MISSING}
    targets = result["targets"]["mlp_batch16"]
    for layout in ("vmap", "map"):
        ratios = targets[f"{layout}_vs_loop_by_K"]
        assert ratios["2"] == pytest.approx(res[layout]["2"]["images_per_s"] / res["loop"]["2"]["images_per_s"])
        assert targets[f"{layout}_ge_1x_loop_all_K"] is (min(ratios.values()) >= 1.0)
    assert not any(key.endswith(("60pct_matmul_all_K", "3x_torch_all_K")) for key in targets)  # batch 512 / 64 only
    assert returned["ensemble_throughput"]["results"][0]["map"][2]["images_per_s"] == res["map"]["2"]["images_per_s"]


def test_cpu_set_writes_klom_json(cpu_results):
    out, _ = cpu_results
    result = _read(out / "klom.json")
    assert result["shape"] == [20, 50] and result["max_abs_difference"] < 1e-9
    assert result["speedup"] == pytest.approx(result["reference_seconds"] / result["klom_seconds"])
    assert result["klom_seconds"] <= result["klom_seconds_median"]


def test_throughput_skips_torch_with_a_note(tmp_path, fashion_small, monkeypatch):
    monkeypatch.setattr(common, "torch_or_none", lambda: None)
    path = tmp_path / "throughput.json"
    ensemble_throughput.main([*cpu_set.TINY_THROUGHPUT, "--probes", "", "--output", str(path)])
    result = _read(path)
    assert result["torch"] == common.TORCH_MISSING
    assert result["results"][0]["torch"] == {"skipped": common.TORCH_MISSING}


def test_gpu_check_runs_tiny_on_cpu(tmp_path):
    path = tmp_path / "gpu_check.json"
    returned = gpu_check.main([*GPU_CHECK_TINY, "--output", str(path)])
    result = _read(path)
    assert returned["summary"] == result["summary"] and list(result["contenders"]) == GPU_CHECK_CONTENDERS
    assert result["data"].startswith("random") and "throughput only" in result["data"]
    assert result["job"] == {"members": 3, "epochs": 2, "train_size": 8, "steps_per_epoch": 2}
    plan = result["plan"]
    assert plan["bytes_per_member"] > 0 and plan["chunk_used"] == plan["chunk_size"] == 3 and plan["num_chunks"] == 1
    torch_used = common.torch_or_none() is not None
    for name, entry in result["contenders"].items():
        if name.startswith("torch") and not torch_used:
            assert entry == {"skipped": common.TORCH_MISSING}
            continue
        models_per_call = 3 if name in ("vmap", "shard_map_1_device", "torch_grouped") else 2
        assert entry["models_per_call"] == models_per_call and entry["mfu"] == {}  # no CPU peak is known
        assert entry["step_seconds"] == min(entry["seconds_samples"]) > 0  # one step per timed epoch
        assert entry["images_per_s"] == pytest.approx(models_per_call * 4 / entry["step_seconds"])
        assert entry["extrapolated_job_seconds"] == pytest.approx(
            math.ceil(3 / models_per_call) * 2 * 2 * entry["step_seconds"])
    assert result["contenders"]["vmap"]["temp_bytes"] > 0 and result["flops_per_model_step"] > 0
    summary, timed = result["summary"], {n: e for n, e in result["contenders"].items() if "step_seconds" in e}
    fastest = min(timed.values(), key=lambda e: e["extrapolated_job_seconds"])
    assert timed[summary["fastest"]] == fastest
    assert summary["extrapolated_job_minutes"] == pytest.approx(fastest["extrapolated_job_seconds"] / 60)
    assert summary["targets"]["job_le_10_minutes"] is (summary["extrapolated_job_minutes"] <= 10)
    assert summary["targets"]["mfu_ge_35pct"] is None
    if torch_used:
        loop_ratio = timed["torch_loop"]["extrapolated_job_seconds"] / fastest["extrapolated_job_seconds"]
        assert summary["vs_torch_loop"] == pytest.approx(loop_ratio) and summary["vs_torch_loop"] >= 1
        assert summary["targets"]["ge_5x_torch_loop"] is (loop_ratio >= 5)


def test_gpu_check_stops_at_its_time_budget(tmp_path):
    path = tmp_path / "gpu_check.json"
    gpu_check.main([*GPU_CHECK_TINY, "--budget-seconds", "0", "--no-torch", "--output", str(path)])
    result = _read(path)
    assert result["plan"]["chunk_used"] == 3 and result["summary"] is None
    assert all("time budget spent" in entry["skipped"] for entry in result["contenders"].values())
    assert list(result["contenders"]) == GPU_CHECK_CONTENDERS


def test_sharded_shard_map_has_no_collectives_and_splits_the_flops(tmp_path):
    """4 forced host devices (a fresh process): shard_map does 1/4 of the work with no collective; GSPMD does not."""
    path = tmp_path / "sharded.json"
    env = {key: value for key, value in os.environ.items() if key != "JAX_PLATFORMS"}
    # LLVM optimisation off: compiles 2-4x faster; the HLO, its collectives and its cost analysis are the same.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    run = subprocess.run([sys.executable, "-m", "benchmarks.sharded", "--models", "cnn,resnet9", "--timed", "cnn",
                          "--members", "4", "--batch-size", "4", "--points", "4", "--repeats", "1",
                          "--min-seconds", "0", "--output", str(path)], capture_output=True, text=True, timeout=600,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = _read(path)
    assert result["devices"] == 4 and result["device"].startswith("4 forced host devices")
    for arch, res in result["results"].items():
        contenders = res["contenders"]
        shard_map, total = contenders["shard_map"], contenders["one_device"]["flops_per_device"]
        assert set(shard_map["collectives"]) == set(common.COLLECTIVES)
        assert sum(shard_map["collectives"].values()) == 0, (arch, shard_map["collectives"])
        assert shard_map["flops_per_device"] == pytest.approx(total / 4, rel=0.01)
        assert shard_map["flops_ratio"] == pytest.approx(1, rel=0.01)
        assert shard_map["memory_per_device"]["argument_bytes"] > 0
        assert ("images_per_s" in shard_map) is (arch == "cnn")
    gspmd = result["results"]["resnet9"]["contenders"]["gspmd"]
    assert gspmd["collectives"]["all-gather"] > 0 and gspmd["flops_ratio"] > 2  # replicated work: the bug it documents
    assert all(entry["images_per_s"] > 0 for entry in result["results"]["cnn"]["contenders"].values())


def test_sharded_refuses_a_single_device():
    if jax.device_count() > 1:
        pytest.skip("this process has several devices")
    with pytest.raises(ValueError, match="fresh process"):
        sharded.main(["--models", "cnn", "--output", os.devnull])


@pytest.mark.parametrize("name, shape", [("mlp", (28, 28, 1)), ("cnn", (28, 28, 1)), ("resnet9", (16, 16, 3))])
def test_torch_twins_match_the_jax_models(name, shape):
    if common.torch_or_none() is None:
        pytest.skip(common.TORCH_MISSING)
    import torch

    variables = jax.eval_shape(lambda key: models.build(name, 10).init(key, shape), jax.random.key(0))
    twin = common.torch_model(name, in_channels=shape[-1], image_size=shape[0])
    assert sum(p.numel() for p in twin.parameters()) == models.count_params(variables)
    assert twin(torch.zeros(2, shape[2], *shape[:2])).shape == (2, 10)


@pytest.mark.parametrize("name", ["cnn", "resnet9"])
def test_grouped_torch_twin_is_independent_models(name):
    """M grouped models hold M x the parameters, and model 0's loss moves none of model 1's."""
    if common.torch_or_none() is None:
        pytest.skip(common.TORCH_MISSING)
    import torch

    twin = common.torch_model(name, in_channels=3, image_size=16)
    grouped = common.torch_grouped(twin, 2)
    assert sum(p.numel() for p in grouped.parameters()) == 2 * sum(p.numel() for p in twin.parameters())
    out = grouped(torch.randn(4, 6, 16, 16)).reshape(4, 2, 10)
    out[:, 0].square().sum().backward()
    for parameter in grouped.parameters():
        first, second = parameter.grad.chunk(2)  # every leading axis is model-major
        assert torch.count_nonzero(second) == 0 and torch.count_nonzero(first) > 0


@pytest.mark.parametrize("module", list(SCRIPTS))
def test_scripts_have_help_under_their_command_name(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        SCRIPTS[module].main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: python -m {module} [-h]"), out
    assert "__main__" not in out and ("--output-dir" if module == "benchmarks" else "--output") in out


def test_python_dash_m_benchmarks_entry_point():
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: python -m benchmarks [-h]") and "__main__.py" not in run.stdout
    assert "--tiny" in run.stdout and "runs/benchmarks" in run.stdout


# --- command-line contract: outputs and bad inputs ----------------------------------------------


@pytest.mark.parametrize("module", list(SCRIPTS))
def test_default_output_is_outside_the_committed_results(module):
    args = SCRIPTS[module].parser().parse_args([])
    default = Path(args.output_dir if module == "benchmarks" else args.output)
    expected = common.OUTPUT_DIR if module == "benchmarks" else common.OUTPUT_DIR / DEFAULT_FILES[module]
    assert default == expected == Path("runs", "benchmarks", *([] if module == "benchmarks" else [default.name]))
    assert not default.is_absolute()  # under the working directory, whose /runs/ git ignores
    assert "/runs/" in (REPO / ".gitignore").read_text().split()


def test_a_run_with_defaults_leaves_the_committed_results_alone(tmp_path, monkeypatch):
    committed = {path: path.read_bytes() for path in common.RESULTS.glob("*.json")}
    assert (common.RESULTS / "klom.json") in committed
    monkeypatch.chdir(tmp_path)
    klom_bench.main(["--models", "2", "--points", "8", "--repeats", "1"])
    result = _read(tmp_path / "runs" / "benchmarks" / "klom.json")
    assert result["shape"] == [2, 8]
    assert {path: path.read_bytes() for path in common.RESULTS.glob("*.json")} == committed
    # ...and the committed folder is written when it is asked for
    target = tmp_path / "benchmarks" / "results"
    klom_bench.main(["--models", "2", "--points", "8", "--repeats", "1", "--output", str(target / "klom.json")])
    assert _read(target / "klom.json")["shape"] == [2, 8]


def _assert_one_line_error(code, out, err, fragment):
    assert code == 2, (code, out, err)
    assert out == "" and "Traceback" not in err, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(fragment, lines[0]), f"{fragment!r} not in {lines[0]!r}"


BAD_INPUTS = [
    ("benchmarks", ["--output-dir", "{file}"], r"--output-dir .*a_file is a file"),
    ("benchmarks", ["--tiny", "--output-dir", "{file}/sub"], r"output folder .*a_file/sub is not writable"),
    ("benchmarks", ["--output", "{dir}/x.json"], r"unrecognized arguments: --output"),  # not --output-dir abbreviated
    ("benchmarks.klom_bench", ["--models", "1"], r"argument --models: must be at least 2, got 1 \(see python -m "
                                                 r"benchmarks.klom_bench --help\)$"),
    ("benchmarks.klom_bench", ["--points", "many"], r"argument --points: expected a whole number, got 'many'"),
    ("benchmarks.klom_bench", ["--output", "{dir}"], r"--output .* is a folder; give a file path"),
    ("benchmarks.klom_bench", ["--output", "{file}/klom.json"], r"output folder .*a_file is not writable .*--output"),
    ("benchmarks.ensemble_throughput", ["--members", "8,0"], r"argument --members: must be at least 1, got 0"),
    ("benchmarks.ensemble_throughput", ["--models", "mlp,vit"], r"argument --models: unknown name\(s\) 'vit'"),
    ("benchmarks.ensemble_throughput", ["--probes", "mlp:fast"], r"argument --probes: expected arch:probe"),
    ("benchmarks.ensemble_throughput", ["--min-seconds", "-1"], r"argument --min-seconds: must be a finite number"),
    ("benchmarks.ensemble_throughput", ["--output", "{file}/t.json"], r"output folder .* is not writable"),
    ("benchmarks.gpu_check", ["--steps", "0"], r"argument --steps: must be at least 1, got 0"),
    ("benchmarks.gpu_check", ["--budget-seconds", "nan"], r"argument --budget-seconds: must be a finite number >= 0"),
    ("benchmarks.gpu_check", ["--peak-tflops", "0"], r"argument --peak-tflops: must be a positive finite number"),
    ("benchmarks.gpu_check", ["--model", "vgg"], r"argument --model: invalid choice: 'vgg'"),
    ("benchmarks.gpu_check", ["--output", "{dir}"], r"--output .* is a folder"),
    ("benchmarks.sharded", ["--image-size", "8"], r"argument --image-size: must be at least 16, got 8"),
    ("benchmarks.sharded", ["--timed", "vgg"], r"argument --timed: unknown name\(s\) 'vgg'"),
    ("benchmarks.sharded", ["--models", "cnn", "--output", "{dir}/s.json"], r"found 1 device; run `python -m "
                                                                           r"benchmarks.sharded` in a fresh process"),
]


@pytest.mark.parametrize("module, args, fragment", BAD_INPUTS,
                         ids=[f"{m.split('.')[-1]}:{' '.join(a)}" for m, a, _ in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_exit_2(module, args, fragment, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    before = sorted(tmp_path.rglob("*"))
    if "found 1 device" in fragment and jax.device_count() > 1:
        pytest.skip("this process has several devices")
    argv = [arg.format(dir=tmp_path, file=tmp_path / "a_file") for arg in args]
    try:
        code = common.run_cli(SCRIPTS[module].main, argv)
    except SystemExit as exit_:  # argparse rejected a flag
        code = exit_.code
    captured = capsys.readouterr()
    _assert_one_line_error(code, captured.out, captured.err, fragment)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
@pytest.mark.parametrize("module", list(SCRIPTS))
def test_python_dash_m_reports_a_user_error_in_one_line(module, tmp_path, monkeypatch, capsys):
    """Each module's ``__main__`` block (run as ``python -m`` runs it) goes through ``run_cli``:
    an output that is a folder (a file for ``--output-dir``) gives exit 2 and one line."""
    (tmp_path / "a_file").write_text("not a folder")
    args = ["--output-dir", str(tmp_path / "a_file")] if module == "benchmarks" else ["--output", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [module, *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    captured = capsys.readouterr()
    _assert_one_line_error(exit_.value.code, captured.out, captured.err, "is a (file|folder)")


def test_python_dash_m_benchmarks_reports_a_user_error_in_one_line(tmp_path):
    """The same through a real ``python -m benchmarks`` process."""
    (tmp_path / "a_file").write_text("not a folder")
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--output-dir", str(tmp_path / "a_file")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    _assert_one_line_error(run.returncode, run.stdout, run.stderr, "--output-dir .* is a file; give a folder")


def test_known_peaks():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == {"bfloat16": 989.4}
    assert gpu_check.peak_tflops("NVIDIA H200", "float32") == {"tf32": 494.7, "float32": 66.9}
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == {"bfloat16": 756.5}
    assert gpu_check.peak_tflops("cpu", "float32") == {}
