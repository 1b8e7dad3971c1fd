"""Two real processes on localhost (jax.distributed, gloo CPU collectives, 2 forced devices each),
started with the environment ``srun`` gives its tasks (jax.distributed detects SLURM itself).

The study CLI with ``--distributed`` splits the members over the 4 devices of both processes;
killed (both processes) in the middle of training and rerun, it resumes and ends with the
single-process result; only process 0 writes tables and prints the summary.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pandas as pd
import pytest

from ascent_jax.ensemble import finished_epochs

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ["--pretrain-only", "--ensemble", "3", "--epochs", "4", "--subset-size", "1024", "--batch-size", "128",
            "--no-progress"]
STUDY = ["--ensemble", "4", "--epochs", "1", "--subset-size", "600", "--forget-set", "fallback-random10", "--grid", "quick",
         "--method", "ga", "--method", "om", "--no-progress"]


SLURM_PORTS = 61440  # jax.distributed's SLURM detection: coordinator port 61440 + job id % 4096


def free_slurm_job_id() -> int:
    """A job id whose SLURM coordinator port is free on localhost."""
    for job in np.random.default_rng().permutation(4096):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", SLURM_PORTS + int(job)))
            except OSError:
                continue
            return int(job)
    raise RuntimeError("no free port for the coordinator")


def start(args: list[str], out: Path, logs: Path) -> list[subprocess.Popen]:
    """Both processes of one distributed run of ``python -m experiments.fashion``, launched as ``srun``
    launches tasks: the SLURM variables of one node with two tasks, which ``jax.distributed``'s own
    cluster detection reads (no coordinator address is passed)."""
    job = free_slurm_job_id()
    processes = []
    for rank in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "SLURM_JOB_ID": str(job), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
               "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_NUM_NODES": "1"}
        log = open(logs / f"process{rank}.log", "w")
        processes.append(subprocess.Popen([sys.executable, "-m", "experiments.fashion", *args, "--distributed",
                                           "--out", str(out)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return processes


def wait(processes: list[subprocess.Popen], logs: Path, timeout: float = 400) -> None:
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail("the distributed run timed out")
    codes = [process.returncode for process in processes]
    assert codes == [0, 0], [codes, *((logs / f"process{r}.log").read_text()[-2000:] for r in range(2))]


def single(args: list[str], out: Path) -> None:
    subprocess.run([sys.executable, "-m", "experiments.fashion", *args, "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def final_state(out: Path, epochs: int):
    """The last checkpoint of the single chunk of pretrained members, as numpy."""
    (chunk,) = (out / "pretrain").iterdir()
    path = chunk / str(epochs) / "state"
    checkpointer = ocp.StandardCheckpointer()
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # saved on 4 devices of 2 processes: reshard
    target = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=here),
                                    checkpointer.metadata(path).item_metadata.tree)
    return {key: np.asarray(value) for key, value in _flatten(checkpointer.restore(path, target))}


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}/{key}")
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _flatten(value, f"{prefix}/{index}")
    else:
        yield prefix, tree


def test_two_processes_killed_mid_run_resume_to_the_single_process_result(tmp_path):
    out = tmp_path / "distributed"
    processes = start(PRETRAIN, out, tmp_path)
    deadline = time.time() + 300
    while not (out / "pretrain").exists() or max(finished_epochs(out / "pretrain"), default=0) < 2:
        assert time.time() < deadline and all(p.poll() is None for p in processes), \
            (tmp_path / "process0.log").read_text()[-2000:]
        time.sleep(0.05)
    for process in processes:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    killed_at = finished_epochs(out / "pretrain")[0]
    assert 2 <= killed_at < 4 and not (out / "pretrain_accuracy.csv").exists()
    wait(start(PRETRAIN, out, tmp_path), tmp_path)  # rerun: resumes from the epoch-2 (or -3) checkpoint
    assert finished_epochs(out / "pretrain") == [4]
    single(PRETRAIN, tmp_path / "single")
    pd.testing.assert_frame_equal(pd.read_csv(out / "pretrain_accuracy.csv"),
                                  pd.read_csv(tmp_path / "single" / "pretrain_accuracy.csv"))
    distributed, alone = final_state(out, 4), final_state(tmp_path / "single", 4)
    assert distributed.keys() == alone.keys()
    arrays = [key for key in alone if alone[key].ndim]  # not the empty optimiser states
    assert len(arrays) >= 8
    for key in arrays:  # 3 members (+ 1 padding) on 4 devices of 2 processes vs on 1 device: rounding at most
        assert distributed[key].shape[:1] == (4,) and alone[key].shape[:1] == (3,), key
        np.testing.assert_allclose(distributed[key][:3], alone[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert "pretrained replicas: test accuracy" in (tmp_path / "process0.log").read_text()
    assert "pretrained replicas" not in (tmp_path / "process1.log").read_text()  # only process 0 reports


@pytest.mark.slow  # ~3 minutes: a whole tiny study twice
def test_two_process_study_gives_the_single_process_table(tmp_path):
    out = tmp_path / "distributed"
    wait(start(STUDY, out, tmp_path), tmp_path)
    single(STUDY, tmp_path / "single")
    volatile = ["wall_time_s", "device"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet").drop(columns=volatile),
                                  pd.read_parquet(tmp_path / "single" / "results.parquet").drop(columns=volatile),
                                  check_exact=False, rtol=1e-5)
