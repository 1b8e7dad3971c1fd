"""Mutation check of the wiring tests: hand-written wiring bugs must each make ``tests/test_wiring.py`` fail.

Each mutant is one exact textual replacement in one source file, applied to a fresh COPY of the
repository (``ascent_jax/``, ``experiments/``, ``tests/``, ``benchmarks/``, ``theory/``,
``pyproject.toml``) under pytest's ``tmp_path``; the checkout itself is never modified. The
replaced text must occur exactly once in the current source, so a mutant that no longer matches
the code fails loudly instead of silently testing nothing. The copy's tests run in a subprocess
(``python -m pytest -x -q``, ``PYTHONPATH`` and the working directory pointing at the copy, no
bytecode written); a mutant is killed when they fail. The unmutated copy must pass first.

Slow (one test-file run per mutant, minutes on 2 CPU cores): ``python -m pytest -m slow
tests/test_mutants.py -s`` prints the kill table. A persistent JAX compilation cache shared by
the runs (under ``tmp_path``) lets the programs a mutant does not touch compile once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
COPIED = ("ascent_jax", "experiments", "tests", "benchmarks", "theory", "pyproject.toml")
IGNORED = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.egg-info", "results")
WIRING = ("tests/test_wiring.py",)


class Mutant(NamedTuple):
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...] = WIRING


MUTANTS = (
    Mutant("score: KLoM(unlearned, oracle) for the per-split values", "experiments/study.py",
           "values = klom.klom(oracle, unlearned)", "values = klom.klom(unlearned, oracle)"),
    Mutant("score: KLoM(unlearned, oracle) for the halves A/B", "experiments/study.py",
           'forget = klom.klom(oracle[:, positions["forget"]], unlearned[rows][:, positions["forget"]])',
           'forget = klom.klom(unlearned[rows][:, positions["forget"]], oracle[:, positions["forget"]])'),
    Mutant("descent_pass (fine-tune, GDA) reads the forget set", "ascent_jax/unlearn/base.py",
           "return run_pass(state, data, data.retain, stream_key(key, RETAIN_STREAM",
           "return run_pass(state, data, data.forget, stream_key(key, RETAIN_STREAM"),
    Mutant("ascent_pass (GA, GDA) reads the retain set", "ascent_jax/unlearn/base.py",
           "state, loss = run_pass(state, data, data.forget, stream_key(key, FORGET_STREAM",
           "state, loss = run_pass(state, data, data.retain, stream_key(key, FORGET_STREAM"),
    Mutant("OM/DMM match the forget set only (no retain sample)", "ascent_jax/unlearn/matching.py",
           "subset = jnp.concatenate([data.forget, sample])", "subset = data.forget"),
    Mutant("SCRUB's max-pass sign flipped (towards the teacher)", "ascent_jax/unlearn/scrub.py",
           "return -distillation_kl(logits, teacher_logits(batch), batch.valid, cfg.temperature)",
           "return distillation_kl(logits, teacher_logits(batch), batch.valid, cfg.temperature)"),
    Mutant("SCRUB's min-pass reads the forget set", "ascent_jax/unlearn/scrub.py",
           "base.run_pass(state, data, data.retain, base.stream_key(key, base.RETAIN_STREAM",
           "base.run_pass(state, data, data.forget, base.stream_key(key, base.RETAIN_STREAM"),
    Mutant("retrain on all points (forget set included)", "ascent_jax/unlearn/reference.py",
           "return epoch(state, (data.images, data.labels), data.retain, key, epoch_index)",
           "return epoch(state, (data.images, data.labels), train.jnp.arange(data.images.shape[0], "
           "dtype=data.retain.dtype), key, epoch_index)"),
    Mutant("split_oracles returns the evaluation half twice", "ascent_jax/unlearn/matching.py",
           "tail = jax.tree_util.tree_map(lambda leaf: leaf[num_eval:], variables)",
           "tail = jax.tree_util.tree_map(lambda leaf: leaf[:num_eval], variables)"),
    Mutant("Study.positions swaps the forget and retain positions", "experiments/study.py",
           'return {"forget": forget_pos, "retain": retain_pos,',
           'return {"forget": retain_pos, "retain": forget_pos,'),
)


def make_copy(root: Path) -> Path:
    """A fresh copy of the repository's code and tests at ``root`` (replacing what was there)."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=IGNORED)
        elif source.exists():
            shutil.copy2(source, root / name)
    return root


def environment(copy: Path, cache: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.update(PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def run_tests(copy: Path, cache: Path, tests: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=copy,
                          env=environment(copy, cache), capture_output=True, text=True, timeout=900)


def first_failure(output: str) -> str:
    found = re.search(r"^(FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return found.group(2) if found else (output.strip().splitlines() or ["(no output)"])[-1]


def test_mutants_match_the_current_source():
    """Every replacement still finds its text exactly once (cheap; runs in the default suite)."""
    for mutant in MUTANTS:
        count = (REPO / mutant.path).read_text().count(mutant.old)
        assert count == 1, f"mutant {mutant.name!r}: {mutant.old!r} occurs {count} times in {mutant.path}"
        assert mutant.new != mutant.old


@pytest.mark.slow
def test_every_wiring_mutant_is_killed(tmp_path):
    cache = tmp_path / "jax-cache"
    root = tmp_path / "repo"  # one path for every copy, so the compilation cache's keys stay comparable
    copy = make_copy(root)
    where = subprocess.run([sys.executable, "-c", "import ascent_jax, experiments; print(ascent_jax.__file__); "
                            "print(experiments.__file__)"], cwd=copy, env=environment(copy, cache),
                           capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr
    assert all(Path(line).resolve().is_relative_to(copy.resolve()) for line in where.stdout.split()), where.stdout
    started = time.perf_counter()
    baseline = run_tests(copy, cache, WIRING)
    assert baseline.returncode == 0, f"the unmutated copy fails its tests:\n{baseline.stdout[-3000:]}"
    rows = [("(none: baseline)", "passed", f"{time.perf_counter() - started:.0f} s", "")]

    survivors = []
    for mutant in MUTANTS:
        copy = make_copy(root)
        target = copy / mutant.path
        source = target.read_text()
        assert source.count(mutant.old) == 1, f"mutant {mutant.name!r}: replacement text not found exactly once"
        target.write_text(source.replace(mutant.old, mutant.new))
        started = time.perf_counter()
        result = run_tests(copy, cache, mutant.tests)
        seconds = time.perf_counter() - started
        killed = result.returncode != 0
        if not killed:
            survivors.append(mutant.name)
        rows.append((mutant.name, "killed" if killed else "SURVIVED", f"{seconds:.0f} s",
                     first_failure(result.stdout) if killed else ""))
    killed = len(MUTANTS) - len(survivors)
    width = max(len(row[0]) for row in rows)
    table = "\n".join(f"{name:<{width}}  {status:<8}  {seconds:>5}  {by}" for name, status, seconds, by in rows)
    print(f"\n{table}\nkill rate: {killed}/{len(MUTANTS)} = {killed / len(MUTANTS):.0%}")
    assert not survivors, f"mutants survived the wiring tests: {survivors}\n{table}"
