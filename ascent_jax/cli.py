"""Command-line plumbing shared by the library and experiment CLIs: validated argument types and one-line user errors (exit 2)."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what is wrong> (see PROG --help)``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)  # sizes, epochs
non_negative_int = int_at_least(0)


def prng_seed(text: str) -> int:
    """argparse type: a seed in [0, 2**32) -- JAX keys hold 32 bits, so larger seeds would wrap onto smaller ones."""
    value = non_negative_int(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be below 2**32 = {2**32} (JAX's PRNG keys hold 32 bits), got {value}")
    return value


def float_where(accept: Callable[[float], bool], requirement: str) -> Callable[[str], float]:
    """argparse type: a finite number for which ``accept`` holds; else "must <requirement>, got <text>"."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"must {requirement}, got {text}")
        return value

    return parse


positive_float = float_where(lambda value: value > 0, "be a positive finite number")  # rates, GiB
non_negative_float = float_where(lambda value: value >= 0, "be a finite number >= 0")  # durations


def chunk_size(text: str) -> int | str:
    """argparse type: ``auto`` or a whole number >= 1."""
    return "auto" if text == "auto" else positive_int(text)


def add_engine_arguments(parser: argparse.ArgumentParser, *, chunk_default: int | str = "auto") -> None:
    """The flags of :class:`ascent_jax.ensemble.RunOptions`, shared by every CLI that trains."""
    group = parser.add_argument_group("ensemble engine")
    group.add_argument("--chunk-size", type=chunk_size, default=chunk_default,
                       help=f"members trained at once, or 'auto' to fit device memory (default {chunk_default})")
    group.add_argument("--layout", choices=["auto", "vmap", "map"], default="auto",
                       help="how members are batched per device (auto: lax.map on CPU, vmap elsewhere)")
    group.add_argument("--memory-limit", type=positive_float, default=None, metavar="GIB",
                       help="device memory in GiB that --chunk-size auto plans for (default: what the device reports; "
                            "GPUs: XLA_PYTHON_CLIENT_MEM_FRACTION of it, 0.75 unless set; CPU: half the RAM)")
    group.add_argument("--checkpoint-every", type=positive_int, default=1,
                       help="epochs between checkpoints of training members (default 1; the last is always saved)")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process run (jax.distributed; SLURM is detected, else set "
                            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); members are split over "
                            "every process's devices and only process 0 writes tables, reports and plots")
    group.add_argument("--reproducible", action="store_true",
                       help="GPU reproducibility mode: full-precision matmuls (no TF32) and deterministic ops")
    group.add_argument("--no-progress", action="store_true", help="disable progress bars")


def run_options(args: argparse.Namespace, seed: int):
    """The run options of parsed engine flags (joins the distributed run first when asked)."""
    from ascent_jax import ensemble  # the engine imports jax; keep `--help` of every CLI fast

    if args.reproducible:
        ensemble.set_reproducible()
    if args.distributed:
        ensemble.initialize_distributed()
    return ensemble.RunOptions(seed=seed, chunk_size=args.chunk_size, layout=args.layout, mesh=ensemble.default_mesh(),
                               progress=not args.no_progress, checkpoint_every=args.checkpoint_every,
                               memory_limit=None if args.memory_limit is None else int(args.memory_limit * 2**30))


def check_writable(out: Path, argument: str = "--out") -> None:
    """Fail before any work if the output directory ``out`` (given as ``argument``) cannot be created or written."""
    existing = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PermissionError(f"output directory {out} is not writable (or is a file); pass {argument} as a writable "
                              "folder")


def read_run_file(path: Path) -> dict:
    """The JSON run file a CLI left in its output directory; a clear error if it is not one."""
    try:
        held = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        held = None
    if not isinstance(held, dict):
        raise ValueError(f"{path} is not a run file of this program; use another --out or delete {path.parent}")
    return held


INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def _disk_full(error: BaseException) -> OSError | None:
    """The "no space left" ``OSError`` in ``error``'s chain of causes, if there is one."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def _exit_interrupted(*_) -> NoReturn:
    print("interrupted; rerun the same command to resume", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(INTERRUPTED)


def quiet_interrupts() -> None:
    """Make Ctrl-C print one line and end the process with status 130, from this call on.

    CLIs call it first, before their slow imports (jax, matplotlib), so an interrupt at any
    moment gives the same line. The process ends at once (``os._exit``): letting the
    interpreter shut down while XLA's compiler threads or orbax's writer threads still run
    crashes it (SIGSEGV). Every stage resumes from its last checkpoint and half-written
    checkpoints are discarded on the rerun, so nothing finished is lost.
    """
    signal.signal(signal.SIGINT, _exit_interrupted)


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; user errors (bad files, bad values) and a full disk print one line and return 2.

    Ctrl-C ends the process as :func:`quiet_interrupts` does (status 130, one line).
    """
    try:
        return main(argv)
    except KeyboardInterrupt:
        _exit_interrupted()
    except Exception as error:
        full = _disk_full(error)
        if full is not None:
            where = Path(full.filename).parent if full.filename else "the output folder"
            print(f"error: no space left on the device of {where}; free some space and rerun the same command "
                  "to resume", file=sys.stderr)
            return 2
        if isinstance(error, (ValueError, FileNotFoundError, PermissionError)):
            print(f"error: {error}", file=sys.stderr)
            return 2
        raise
