"""Killing a training run and rerunning the same command gives bit-identical results."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pandas as pd

from ascent_jax.ensemble import finished_epochs

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
    pretrain = interrupted / "pretrain"
    process = subprocess.Popen(command(interrupted), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if pretrain.exists() and max(finished_epochs(pretrain), default=0) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be interrupted"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = finished_epochs(pretrain)[0]
    assert 2 <= killed_at < 4 and not (interrupted / "pretrain_accuracy.csv").exists()
    run(interrupted)
    assert finished_epochs(pretrain) == [4]
    whole, resumed = (ocp.StandardCheckpointer().restore(root / "pretrain" / "members-0000-0001" / "4" / "state")
                      for root in (tmp_path / "whole", interrupted))
    np.testing.assert_equal(jax_tree_to_numpy(whole), jax_tree_to_numpy(resumed))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole" / "pretrain_accuracy.csv"),
                                  pd.read_csv(interrupted / "pretrain_accuracy.csv"))


def jax_tree_to_numpy(tree):
    """Nested dicts/lists of arrays -> the same of numpy arrays (for exact comparison)."""
    if isinstance(tree, dict):
        return {key: jax_tree_to_numpy(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [jax_tree_to_numpy(value) for value in tree]
    return np.asarray(tree)
