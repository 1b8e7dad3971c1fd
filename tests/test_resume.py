"""Killing a training run and rerunning the same command gives bit-identical results."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ascent_jax import checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--pretrain-only", "--ensemble", "2", "--epochs", "4", "--subset-size", "1024", "--batch-size", "128",
        "--no-progress"]


def command(out: Path) -> list[str]:
    return [sys.executable, "-m", "experiments.fashion", *ARGS, "--out", str(out)]


def run(out: Path) -> None:
    subprocess.run(command(out), cwd=ROOT, check=True, capture_output=True)


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    run(tmp_path / "whole")
    interrupted = tmp_path / "interrupted"
    ckpt = interrupted / "pretrain" / "members-0000-0001.npz"
    process = subprocess.Popen(command(interrupted), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if ckpt.exists() and checkpoint.read_meta(ckpt)["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be interrupted"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = checkpoint.read_meta(ckpt)["epoch"]
    assert 2 <= killed_at < 4 and not (interrupted / "pretrain_accuracy.csv").exists()
    run(interrupted)
    whole_ckpt = np.load(tmp_path / "whole" / "pretrain" / "members-0000-0001.npz")
    resumed_ckpt = np.load(ckpt)
    assert sorted(whole_ckpt.files) == sorted(resumed_ckpt.files)
    for name in whole_ckpt.files:
        np.testing.assert_array_equal(whole_ckpt[name], resumed_ckpt[name], err_msg=name)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole" / "pretrain_accuracy.csv"),
                                  pd.read_csv(interrupted / "pretrain_accuracy.csv"))
