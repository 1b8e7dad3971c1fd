"""``python -m theory``: its command line (fast) and the full run end to end (slow: about 2 minutes on 2 cores)."""

import os
import subprocess
import sys

import pytest

from ascent_jax.cli import run_main
from theory import report


def _run(*args):
    return subprocess.run([sys.executable, "-m", "theory", *args], capture_output=True, text=True, timeout=300)


def _assert_one_line_error(proc, folder):
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(folder) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_read_only_out_dir_is_a_one_line_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("chmod does not stop this user (root) from writing")
        _assert_one_line_error(_run("--out", str(folder / "figs")), folder / "figs")
    finally:
        folder.chmod(0o755)


def test_out_path_under_a_file_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _assert_one_line_error(_run("--out", str(blocker / "figs")), blocker / "figs")


def test_help_and_bad_flags_name_python_m_theory(capsys):
    with pytest.raises(SystemExit) as stop:
        run_main(report.main, ["--help"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m theory ")
    with pytest.raises(SystemExit) as stop:
        run_main(report.main, ["--no-such-flag"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err == "error: unrecognized arguments: --no-such-flag (see python -m theory --help)\n"


@pytest.mark.slow
def test_python_m_theory_regenerates_figures_and_table(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "theory", "--out", str(tmp_path)], capture_output=True, text=True, check=True, timeout=900
    )
    assert "equality rows with |diff| > 1e-08: 0" in out.stdout
    names = {p.name for p in tmp_path.glob("*.png")}
    assert {"fig3_alpha_window.png", "toy_landscape_literal.png", "lemma5_lemma2.png", "corollary1_f3.png"} <= names
    assert all(p.stat().st_size < 300_000 for p in tmp_path.glob("*.png"))
    assert "| F/D | lam D/R_ij |" in (tmp_path / "tightness.md").read_text()
