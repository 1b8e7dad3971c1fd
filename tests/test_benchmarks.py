"""The benchmark scripts run end to end at tiny sizes on CPU and write complete JSON (no timing checks)."""

import json
import subprocess
import sys

import jax
import pytest

from ascent_jax import models
from benchmarks import __main__ as cpu_set
from benchmarks import common, ensemble_throughput, klom_bench, resnet9_gpu

METADATA = {"command", "date", "device", "jax_version", "load_average_1min"}
RESNET9_TINY = ["--members", "2", "--chunks", "2", "--steps", "1", "--batch-size", "4", "--image-size", "16",
                "--loop-models", "1", "--repeats", "1", "--min-seconds", "0", "--matmul-size", "64",
                "--train-size", "8", "--epochs", "1", "--no-torch"]


def _read(path):
    result = json.loads(path.read_text())
    assert METADATA <= result.keys()
    return result


def _check_torch(entry, torch_used):
    if torch_used:
        assert entry["images_per_s"] > 0
    else:
        assert "skipped" in entry


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory, fashion_small):
    """``python -m benchmarks --tiny``: the CPU set (ensemble throughput + KLoM) at smoke-test size."""
    out = tmp_path_factory.mktemp("bench")
    return out, cpu_set.main(["--tiny", "--output-dir", str(out)])


def test_cpu_set_writes_throughput_json(cpu_results):
    out, returned = cpu_results
    result = _read(out / "ensemble_throughput.json")
    assert result["load_average_1min_start"] >= 0 and result["matmul_gflops_per_s"]["best"] > 0
    assert result["load_average_1min"] >= 0
    (res,) = result["results"]
    assert res["architecture"] == "mlp" and res["batch_size"] == 16 and res["flops_per_model_step"] > 0
    for contender in ("vmap", "map", "loop"):
        entry = res[contender]["2"]
        assert entry["images_per_s"] > 0 and entry["gflops_per_s"] > 0 and entry["matmul_fraction"] > 0
        assert entry["compile_seconds"] > 0
    assert set(res["probes"]) == {"steps", "model_steps"} and all(p["images_per_s"] > 0 for p in res["probes"].values())
    _check_torch(res["torch"], common.torch_or_none() is not None)
    assert {"vmap_vs_loop_by_K", "map_vs_loop_by_K"} <= result["targets"]["mlp_batch16"].keys()
    assert returned["ensemble_throughput"]["results"][0]["map"][2]["images_per_s"] == res["map"]["2"]["images_per_s"]


def test_cpu_set_writes_klom_json(cpu_results):
    out, _ = cpu_results
    result = _read(out / "klom.json")
    assert result["shape"] == [20, 50] and result["speedup"] > 0 and result["max_abs_difference"] < 1e-9


def test_throughput_skips_torch_with_a_note(tmp_path, fashion_small, monkeypatch):
    monkeypatch.setattr(common, "torch_or_none", lambda: None)
    path = tmp_path / "throughput.json"
    ensemble_throughput.main([*cpu_set.TINY_THROUGHPUT, "--probes", "", "--output", str(path)])
    result = _read(path)
    assert result["torch"] == common.TORCH_MISSING
    assert result["results"][0]["torch"] == {"skipped": common.TORCH_MISSING}


def test_resnet9_gpu_runs_tiny_on_cpu(tmp_path):
    path = tmp_path / "resnet9.json"
    returned = resnet9_gpu.main([*RESNET9_TINY, "--output", str(path)])
    result = _read(path)
    assert result["data"].startswith("random") and "throughput only" in result["data"]
    chunk = result["chunks"]["2"]
    for field in ("step_seconds", "images_per_s", "tflops_per_s", "extrapolated_job_seconds", "temp_bytes"):
        assert chunk[field] > 0
    assert result["loop"]["step_seconds"] > 0 and result["flops_per_model_step"] > 0
    assert result["torch"] == {"skipped": "skipped (--no-torch)"}
    assert result["best_chunk"] == 2 and returned["summary"]["targets"]["job_le_10_minutes"] in (True, False)


@pytest.mark.parametrize("name, shape", [("mlp", (28, 28, 1)), ("cnn", (28, 28, 1)), ("resnet9", (16, 16, 3))])
def test_torch_twins_match_the_jax_models(name, shape):
    if common.torch_or_none() is None:
        pytest.skip(common.TORCH_MISSING)
    import torch

    variables = jax.eval_shape(lambda key: models.build(name, 10).init(key, shape), jax.random.key(0))
    twin = common.torch_model(name, in_channels=shape[-1])
    assert sum(p.numel() for p in twin.parameters()) == models.count_params(variables)
    assert twin(torch.zeros(2, shape[2], *shape[:2])).shape == (2, 10)


@pytest.mark.parametrize("script", [ensemble_throughput, resnet9_gpu, klom_bench, cpu_set])
def test_scripts_have_help(script, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.main(["--help"])
    assert exit_.value.code == 0 and "usage" in capsys.readouterr().out


def test_python_dash_m_benchmarks_entry_point():
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "--tiny" in run.stdout, run.stderr


def test_known_peaks():
    assert resnet9_gpu.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert resnet9_gpu.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert resnet9_gpu.bf16_peak_tflops("cpu") is None
