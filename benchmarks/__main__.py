"""Run the CPU benchmark set and print one summary table: ``python -m benchmarks``.

Runs :mod:`benchmarks.ensemble_throughput` and :mod:`benchmarks.klom_bench` with their default
sizes (a few minutes on a 2-core CPU), writing ``ensemble_throughput.json`` and ``klom.json``
into ``--output-dir`` (default ``runs/benchmarks``; the committed ``benchmarks/results/`` only
when given explicitly). ``--tiny`` runs both at smoke-test sizes (seconds; the tests use it).
Not part of this set: :mod:`benchmarks.sharded` (needs a fresh process with 4 forced host
devices: ``python -m benchmarks.sharded``) and :mod:`benchmarks.gpu_check` (for one GPU).
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C at any moment is one line
    from ascent_jax.cli import quiet_interrupts

    quiet_interrupts()

import sys
import time

from benchmarks import common, ensemble_throughput, klom_bench

TINY_THROUGHPUT = ["--models", "mlp", "--members", "2", "--batch-sizes", "16", "--points", "32", "--repeats", "1",
                   "--min-seconds", "0", "--matmul-size", "64", "--probes", "mlp:steps,mlp:model_steps",
                   "--probe-members", "2"]
TINY_KLOM = ["--models", "20", "--points", "50", "--repeats", "1"]


def parser():
    parser = common.parser("benchmarks", __doc__)
    parser.add_argument("--output-dir", default=str(common.OUTPUT_DIR),
                        help="folder for ensemble_throughput.json and klom.json (benchmarks/results refreshes the "
                             "committed numbers)")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds, numbers meaningless)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch contender")
    return parser


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    args.output_dir = common.output_dir(args.output_dir)

    start = time.perf_counter()
    throughput_args = (TINY_THROUGHPUT if args.tiny else []) + (["--no-torch"] if args.no_torch else [])
    throughput = ensemble_throughput.main(
        [*throughput_args, "--output", str(args.output_dir / "ensemble_throughput.json")])
    klom = klom_bench.main([*(TINY_KLOM if args.tiny else []), "--output", str(args.output_dir / "klom.json")])
    elapsed = time.perf_counter() - start

    rows = list(_summary_rows(throughput))
    rows.append({"benchmark": "klom", "figure": f"speed-up over the per-point reference ({klom['shape'][0]} x "
                 f"{klom['shape'][1]})", "value": f"{klom['speedup']:.0f}x ({klom['klom_seconds']:.3f} s)"})
    print()
    print(common.table(rows, [("benchmark", "benchmark", "s"), ("figure", "figure", "s"), ("value", "value", "s")]))
    print(f"CPU set done in {elapsed:.0f} s on {common.device_description()}, load average {common.load_average():.2f}")
    return {"ensemble_throughput": throughput, "klom": klom, "seconds": elapsed}


def _summary_rows(throughput: dict):
    """Per architecture and batch size: the ratios the issue's targets are about."""
    for res in throughput["results"]:
        name, ks = f"{res['architecture']} batch {res['batch_size']}", list(res["loop"])
        loop, torch = res["loop"], res["torch"].get("images_per_s")
        where = f"K = {', '.join(map(str, ks))}"
        for layout in ensemble_throughput.LAYOUTS:
            runs = res[layout]
            yield {"benchmark": name, "figure": f"{layout} / jitted loop at {where}",
                   "value": ", ".join(f"{runs[k]['images_per_s'] / loop[k]['images_per_s']:.2f}x" for k in ks)}
            if torch:
                yield {"benchmark": name, "figure": f"{layout} / PyTorch loop at {where}",
                       "value": ", ".join(f"{runs[k]['images_per_s'] / torch:.2f}x" for k in ks)}
            yield {"benchmark": name, "figure": f"{layout} % of the {res['matmul_gflops_per_s']:.0f} GFLOP/s matmul "
                   f"rate at {where}", "value": ", ".join(f"{100 * runs[k]['matmul_fraction']:.0f}%" for k in ks)}
        for probe_name, probe in res["probes"].items():
            figure = f"probe '{probe_name}' (K = {probe['members']}) / jitted loop" + (" / PyTorch loop" if torch else "")
            value = f"{probe['vs_loop_same_K']:.2f}x" + (f" / {probe['vs_torch']:.2f}x" if torch else "")
            yield {"benchmark": name, "figure": figure, "value": value}


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
