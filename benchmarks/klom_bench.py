"""Time :func:`ascent_jax.klom.klom` against the straightforward per-point reference.

Run ``python -m benchmarks.klom_bench`` (``--points``/``--models`` to resize); writes
``runs/benchmarks/klom.json`` (``--output``; the committed ``benchmarks/results/klom.json`` only
when given explicitly). :func:`reference_klom` is the one slow, independent
numpy/scipy implementation of KLoM; ``tests/test_klom.py`` checks the library against it.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C at any moment is one line
    from ascent_jax.cli import quiet_interrupts

    quiet_interrupts()

import datetime
import json
import sys
import time

import jax
import numpy as np
import scipy.stats

from ascent_jax.cli import int_at_least, positive_int
from ascent_jax.klom import klom
from benchmarks import common

OUTPUT = common.OUTPUT_DIR / "klom.json"


def _reference_point(oracle, unlearned, bins, eps, clip):
    """Definition 3 for one point: inclusive edges, NaN as -clip, scipy's entropy."""
    oracle = np.where(np.isnan(oracle), -clip, np.clip(oracle, -clip, clip))
    unlearned = np.where(np.isnan(unlearned), -clip, np.clip(unlearned, -clip, clip))
    lo = min(oracle.min(), unlearned.min())
    hi = max(oracle.max(), unlearned.max())
    if lo == hi:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)

    def probabilities(x):
        index = np.minimum(np.searchsorted(edges, x, side="right") - 1, bins - 1)
        return np.bincount(index, minlength=bins) / len(x)

    p, q = probabilities(oracle), probabilities(unlearned)
    q = np.where((p > 0) & (q < eps), eps, q)
    return scipy.stats.entropy(p, q)


def _reference_point_easydub(oracle, unlearned, bins, eps, clip):
    """EasyDUB's ``binned_kl_divergence(p=unlearned, q=oracle)``, restated step by step."""
    p_x = np.clip(unlearned, -clip, clip)
    q_x = np.clip(oracle, -clip, clip)
    start = min(p_x.min(), q_x.min())
    end = max(p_x.max(), q_x.max())
    if start >= end:
        end = start + 1.0
    edges = np.linspace(start, end, bins + 1)

    def probabilities(x):
        index = np.digitize(x, edges)
        counts = np.array([np.count_nonzero(index == b) for b in range(1, bins + 1)])
        total = counts.sum()
        return counts / total if total > 0 else np.zeros(bins)

    p, q = probabilities(p_x), probabilities(q_x)
    q = np.where(p > 0, np.maximum(q, eps), q)
    has_mass = p > 0
    return float(np.sum(p[has_mass] * np.log(p[has_mass] / q[has_mass])))


def reference_klom(oracle_margins, unlearned_margins, *, bins=20, eps=1e-5, clip=100.0, compat=None):
    """Slow per-point KLoM (a Python loop over points), the ground truth for tests and timing.

    Same contract as :func:`ascent_jax.klom.klom`; float64 unless ``compat="easydub"`` and
    both inputs are float32 (numpy then keeps float32 edges, as the public code does).
    """
    oracle, unlearned = np.asarray(oracle_margins), np.asarray(unlearned_margins)
    if compat == "easydub":
        point = _reference_point_easydub
        if not (oracle.dtype == np.float32 and unlearned.dtype == np.float32):
            oracle, unlearned = oracle.astype(np.float64), unlearned.astype(np.float64)
    else:
        point = _reference_point
        oracle, unlearned = oracle.astype(np.float64), unlearned.astype(np.float64)
    return np.array(
        [point(oracle[:, j], unlearned[:, j], bins, eps, clip) for j in range(oracle.shape[1])],
        dtype=np.float64,
    )


def _benchmark_margins(n_models: int, n_points: int, seed: int):
    """Gaussian oracle margins and unlearned margins with shifts, ties, blow-ups and NaN."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(0.0, 5.0, size=n_points)
    oracle = centre + rng.normal(0.0, 1.0, size=(n_models, n_points))
    shift = rng.choice([0.0, 0.5, 3.0], size=n_points)
    unlearned = centre + shift + rng.normal(0.0, 1.5, size=(n_models, n_points))
    unlearned[:, ::97] = 250.0  # blown-up models: every margin at the clip
    unlearned[0, ::89] = np.nan
    oracle[:, ::101] = np.round(oracle[:, ::101])  # ties
    return oracle, unlearned


def parser():
    parser = common.parser("benchmarks.klom_bench", __doc__)
    parser.add_argument("--models", type=int_at_least(2), default=100, help="models per ensemble (at least 2)")
    parser.add_argument("--points", type=positive_int, default=60_000, help="points (columns) of the margins")
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed runs of klom")
    parser.add_argument("--output", default=str(OUTPUT), help="result file")
    return parser


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    args.output = common.output_file(args.output)

    oracle, unlearned = _benchmark_margins(args.models, args.points, seed=0)

    start = time.perf_counter()
    first = klom(oracle, unlearned)
    first_call = time.perf_counter() - start
    wall, cpu = [], []
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fast = klom(oracle, unlearned)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)

    start, start_cpu = time.perf_counter(), time.process_time()
    slow = reference_klom(oracle, unlearned)
    reference_wall, reference_cpu = time.perf_counter() - start, time.process_time() - start_cpu

    max_error = float(np.max(np.abs(fast - slow)))
    if max_error > 1e-9 or not np.array_equal(first, fast):
        raise SystemExit(f"klom disagrees with the reference: max |error| = {max_error:.3g}")
    result = {
        "benchmark": "ascent_jax.klom.klom vs the per-point numpy/scipy reference_klom",
        "command": " ".join(["python -m benchmarks.klom_bench", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": common.device_description(),
        "load_average_1min": common.load_average(),
        "jax_version": jax.__version__,
        "numpy_version": np.__version__,
        "shape": [args.models, args.points],
        "klom_seconds": min(wall),
        "klom_seconds_median": float(np.median(wall)),
        "klom_cpu_seconds_median": float(np.median(cpu)),
        "klom_first_call_seconds_including_compile": first_call,
        "reference_seconds": reference_wall,
        "reference_cpu_seconds": reference_cpu,
        "speedup": reference_wall / min(wall),
        "speedup_median": reference_wall / float(np.median(wall)),
        "max_abs_difference": max_error,
    }
    common.write_json(args.output, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
