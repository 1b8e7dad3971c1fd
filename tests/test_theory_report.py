"""``python -m theory`` end to end (slow: about 2 minutes on 2 cores)."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_python_m_theory_regenerates_figures_and_table(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "theory", "--out", str(tmp_path)], capture_output=True, text=True, check=True, timeout=900
    )
    assert "equality rows with |diff| > 1e-08: 0" in out.stdout
    names = {p.name for p in tmp_path.glob("*.png")}
    assert {"fig3_alpha_window.png", "toy_landscape_literal.png", "lemma5_lemma2.png", "corollary1_f3.png"} <= names
    assert all(p.stat().st_size < 300_000 for p in tmp_path.glob("*.png"))
