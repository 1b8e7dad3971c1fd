"""Helpers shared by the benchmark scripts: run metadata, atomic JSON, timing, compiled-program facts, tables, torch.

Every result file records the device, the date, library versions, the exact command and the
1-minute load average (the machines are shared; a load above the core count means the numbers
are pessimistic). PyTorch is optional (``pip install -e ".[bench]"``): :func:`torch_or_none`
returns ``None`` when it is missing and the scripts then skip the PyTorch contender with a note.

Command lines follow the project's contract (:mod:`ascent_jax.cli`): flags are validated by
type, and a bad input -- a flag value, an output path that is a folder or not writable, a
missing data set -- exits with status 2 and one ``error: ...`` line on stderr, before any work.
Results go to ``runs/benchmarks/`` (under the working directory, git-ignored) unless an output
is given; the committed numbers in ``benchmarks/results/`` change only when asked for
explicitly (``--output-dir benchmarks/results``, ``--output benchmarks/results/NAME.json``).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ascent_jax.cli import ArgumentParser, check_writable, int_at_least, run_main
from ascent_jax.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"  # committed results: written only when asked explicitly
OUTPUT_DIR = Path("runs") / "benchmarks"  # the default output folder, relative to the working directory


def parser(module: str, doc: str) -> ArgumentParser:
    """The argument parser of ``python -m module``: one-line errors (exit 2), defaults in ``--help``.

    No abbreviated flags: ``python -m benchmarks --output x.json`` must not pass for ``--output-dir``.
    """
    return ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0], allow_abbrev=False,
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a benchmark's ``main`` as a command: 0 when it finishes; a user error prints one line and gives 2."""
    return run_main(lambda args: (main(args), 0)[1], None if argv is None else list(argv))


def _writable_folder(folder: Path, flag: str) -> None:
    try:
        check_writable(folder)
    except PermissionError:
        raise PermissionError(f"output folder {folder} is not writable (or is a file); pass {flag} a writable "
                              "path") from None


def output_file(path: str | os.PathLike) -> Path:
    """A validated ``--output`` file: not a folder, in a folder that can be created and written."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; give a file path such as {path / 'result.json'}")
    _writable_folder(path.parent, "--output")
    return path


def output_dir(path: str | os.PathLike) -> Path:
    """A validated ``--output-dir``: a folder that can be created and written (not a file)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output-dir {path} is a file; give a folder")
    _writable_folder(path, "--output-dir")
    return path


def int_list(minimum: int = 1) -> Callable[[str], list[int]]:
    """argparse type: comma-separated whole numbers, each >= ``minimum``, at least one."""
    number = int_at_least(minimum)

    def parse(text: str) -> list[int]:
        values = [number(item) for item in text.split(",") if item.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}")
        return values

    return parse


def name_list(choices: Sequence[str], *, allow_empty: bool = False) -> Callable[[str], list[str]]:
    """argparse type: comma-separated names from ``choices`` (``''`` gives ``[]`` when ``allow_empty``)."""

    def parse(text: str) -> list[str]:
        names = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown name(s) {', '.join(map(repr, unknown))}; choose from "
                                             f"{', '.join(choices)}")
        if not names and not allow_empty:
            raise argparse.ArgumentTypeError(f"expected comma-separated names from {', '.join(choices)}")
        return names

    return parse


def device_description() -> str:
    """The default device as ``kind (backend), N cores`` (cores of the host)."""
    return f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} cores"


def load_average() -> float:
    """The 1-minute load average of the host."""
    return os.getloadavg()[0]


def metadata(module: str, argv: Sequence[str] | None, torch=None) -> dict:
    """Command, date, device, load average and versions (``torch``: the module, if used) for a result file."""
    return {
        "command": " ".join([f"python -m {module}", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_description(),
        "load_average_1min_start": load_average(),
        "jax_version": jax.__version__,
        "numpy_version": np.__version__,
        "torch_version": torch.__version__ if torch is not None else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") if torch is not None else None,
    }


def write_json(path: str | os.PathLike, result: dict) -> None:
    """Write ``result`` as indented JSON, atomically (temp file + rename), readable by all."""
    text = json.dumps(result, indent=2, default=_jsonable) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))
    os.chmod(path, 0o644)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` (which must block until its work is done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure(run: Callable[[], Any], repeats: int, min_seconds: float) -> list[float]:
    """Seconds of timed calls of ``run``: after one warm-up call, until ``repeats`` calls or ``min_seconds``.

    A warm-up call that itself takes ``min_seconds`` or more is the only sample (programs are
    compiled ahead of time, so it holds no compilation).
    """
    first = timed(run, 1)
    if first[0] >= min_seconds:
        return first
    samples: list[float] = []
    while len(samples) < max(1, repeats) and sum(samples) < min_seconds:
        samples += timed(run, 1)
    return samples


def interleaved(runners: dict, repeats: int, min_seconds: float) -> dict[Any, list[float]]:
    """Time several contenders round-robin; each runner returns the seconds of one run.

    One warm-up round, then rounds over the contenders that still have fewer than ``repeats``
    samples and less than ``min_seconds`` timed. A warm-up run of ``min_seconds`` or more is
    that contender's only sample. Returns every contender's samples.
    """
    samples: dict[Any, list[float]] = {}
    for name, run in runners.items():
        first = run()
        samples[name] = [first] if first >= min_seconds else []

    def pending(name):
        return not samples[name] or (len(samples[name]) < repeats and sum(samples[name]) < min_seconds)

    while active := [name for name in runners if pending(name)]:
        for name in active:
            samples[name].append(runners[name]())
    return samples


def repeat_until(run: Callable[[], float], repeats: int, min_seconds: float) -> list[float]:
    """Call ``run`` (which returns the seconds it measured) until ``repeats`` calls or ``min_seconds`` in all."""
    seconds = [run()]
    while len(seconds) < repeats and sum(seconds) < min_seconds:
        seconds.append(run())
    return seconds


class Stepper:
    """Runs a compiled epoch ``(state, *args, epoch_index) -> (state, metrics)`` once per state, then blocks.

    One state is the vmapped ensemble; several are the per-model loop. States are donated and
    replaced; every call advances the epoch index (a new shuffle).
    """

    def __init__(self, compiled, states: list, args: list[tuple]):
        self.compiled, self.states, self.args, self.epochs = compiled, states, args, itertools.count()

    def __call__(self) -> None:
        index = jnp.int32(next(self.epochs))
        for i, args in enumerate(self.args):
            self.states[i], metrics = self.compiled(self.states[i], *args, index)
        jax.block_until_ready((self.states, metrics))


def compile_timed(jitted, *args) -> tuple[Any, float]:
    """Compile ``jitted`` ahead of time for ``args``; returns the executable and the seconds it took."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def matmul_timer(size: int, dtype: Any = jnp.float32) -> Callable[[], float]:
    """A callable that times one jitted ``size x size`` ``jnp.dot`` on the default device (seconds)."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((size, size), np.float32), dtype) for _ in range(2))
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return lambda: timed(lambda: dot(a, b).block_until_ready(), 1)[0]


def matmul_gflops(size: int = 2048, dtype: Any = jnp.float32, repeats: int = 5) -> float:
    """The device's dense matmul rate in GFLOP/s: the best of ``repeats`` timed matmuls."""
    run = matmul_timer(size, dtype)
    return 2 * size**3 / min(run() for _ in range(repeats)) / 1e9


def cost_flops(compiled: Any) -> float:
    """FLOPs of one execution of a compiled XLA program (per device when partitioned), from XLA's cost analysis.

    XLA counts the body of a while loop (``lax.scan``, ``lax.map``) once, whatever its trip count.
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_COLLECTIVE = re.compile(rf"\s({'|'.join(COLLECTIVES)})(?:-start)?\(")


def collective_counts(compiled: Any) -> dict[str, int]:
    """Cross-device collectives in a compiled program's HLO, by kind (``x(`` and async ``x-start(`` ops)."""
    found = [match.group(1) for match in _COLLECTIVE.finditer(compiled.as_text())]
    return {name: found.count(name) for name in COLLECTIVES}


def memory(compiled: Any) -> dict:
    """XLA's memory analysis of a compiled program in bytes (per device when partitioned)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    return {"argument_bytes": analysis.argument_size_in_bytes, "output_bytes": analysis.output_size_in_bytes,
            "temp_bytes": analysis.temp_size_in_bytes, "alias_bytes": analysis.alias_size_in_bytes}


def member_keys(seed: int, members: Any) -> jax.Array:
    """The engine's PRNG key of each member, ``fold_in(key(seed), i)``, stacked (for programs outside the engine)."""
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.asarray(members, jnp.uint32))


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` are ``(key, header, format)``; missing values print as ``-``."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(key) is None else format(row[key], fmt)) for key, _, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    left = [fmt == "s" for _, _, fmt in columns]
    lines = ["  ".join(cell.ljust(width) if is_text else cell.rjust(width) for cell, width, is_text in zip(line, widths, left))
             for line in cells]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def torch_or_none():
    """The ``torch`` module, or ``None`` when the ``bench`` extra is not installed.

    Sets ``OMP_WAIT_POLICY=PASSIVE`` unless already set, before the first import: with OpenMP's
    default spin-waiting, PyTorch on this shared 2-core machine ran 15-30x slower whenever other
    processes held the cores (measured: MLP batch 64, 740 vs 25,000 images/s).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        return None
    return torch


TORCH_MISSING = "torch is not installed (pip install -e '.[bench]'); the PyTorch contender was skipped"


def torch_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
    """The PyTorch twin of ``ascent_jax.models.build(name)`` (same layers and widths, NCHW)."""
    from torch import nn

    def conv_bn(c_in, c_out, kernel=3, stride=1, padding=None):
        padding = kernel // 2 if padding is None else padding
        return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    class Residual(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

        def forward(self, x):
            return x + self.body(x)

    class Scale(nn.Module):
        def forward(self, x):
            return x * 0.2

    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(image_size**2 * in_channels, 256), nn.ReLU(),
                             nn.Linear(256, num_classes))
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (image_size // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, num_classes))
    if name == "resnet9":
        return nn.Sequential(
            conv_bn(in_channels, 64), conv_bn(64, 128, 5, 2, 2), Residual(128), conv_bn(128, 256),
            nn.MaxPool2d(2), Residual(256), conv_bn(256, 128, padding=0),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(128, num_classes, bias=False), Scale())
    raise ValueError(f"no PyTorch twin for {name!r}")


def torch_grouped(module, groups: int):
    """``groups`` independent copies of a twin as ONE network, stacked along channels.

    Every convolution becomes a ``groups``-way grouped convolution, every batch norm one over
    ``groups`` x C channels and every linear layer a batched one, so model ``m`` owns channel
    block ``m`` throughout and never sees another model's activations: the way the public
    unlearning benchmark retrains its oracles. Input ``(B, groups*C, H, W)``, output
    ``(B, groups * classes)``; each block is initialised as its single twin is.
    """
    import copy

    import torch
    from torch import nn

    class GroupedLinear(nn.Module):
        def __init__(self, linear: nn.Linear):
            super().__init__()
            fan_in, fan_out = linear.in_features, linear.out_features
            bound = fan_in**-0.5  # nn.Linear's default initialisation
            self.weight = nn.Parameter(torch.empty(groups, fan_in, fan_out).uniform_(-bound, bound))
            bias = torch.empty(groups, fan_out).uniform_(-bound, bound)
            self.bias = None if linear.bias is None else nn.Parameter(bias)

        def forward(self, x):
            y = torch.einsum("bgi,gio->bgo", x.reshape(x.shape[0], groups, -1), self.weight)
            return (y if self.bias is None else y + self.bias).reshape(x.shape[0], -1)

    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(module.in_channels * groups, module.out_channels * groups, module.kernel_size, module.stride,
                         module.padding, bias=module.bias is not None, groups=groups)
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(module.num_features * groups)
    if isinstance(module, nn.Linear):
        return GroupedLinear(module)
    grouped = copy.deepcopy(module)
    for name, child in module.named_children():
        setattr(grouped, name, torch_grouped(child, groups))
    return grouped


def torch_train_models(name: str, images: np.ndarray, labels: np.ndarray, *, models: int, epochs: int,
                       batch_size: int, mean: Sequence[float], std: Sequence[float], peak_lr: float = 0.4,
                       device: str = "cpu", bf16: bool = False, seed: int = 0, grouped: bool = False) -> float:
    """Train ``models`` PyTorch models for ``epochs`` epochs; returns wall seconds.

    The plain per-model loop (one model after another), or with ``grouped`` all of them at once
    as one :func:`torch_grouped` network, each model with its own shuffle: uint8 NHWC data on
    ``device``, per-step normalisation, SGD (momentum 0.9, weight decay 5e-4) with the
    triangular learning rate, ``bf16`` autocast on CUDA, ``channels_last`` for convolutions.
    Model construction is not timed.
    """
    import torch

    torch.manual_seed(seed)
    x_all = torch.as_tensor(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)
    y_all = torch.as_tensor(labels, dtype=torch.long).to(device)
    channels = images.shape[-1]
    mean_t, std_t = (torch.tensor(v, device=device).view(1, 1, -1, 1, 1) for v in (mean, std))
    groups = models if grouped else 1
    steps = -(-len(images) // batch_size)
    total = epochs * steps
    warmup = max(1, round(5 / 24 * total))
    layout = torch.channels_last if name != "mlp" else torch.contiguous_format
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True

    def loss_of(net, index):
        """Summed per-model mean cross-entropy of a batch; ``index`` is ``(groups, b)``."""
        x = (x_all[index].float() / 255.0 - mean_t) / std_t  # (groups, b, C, H, W)
        x = x.transpose(0, 1).reshape(index.shape[1], groups * channels, *x.shape[-2:]).contiguous(memory_format=layout)
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16 and device.startswith("cuda")):
            logits = net(x).float().reshape(index.shape[1], groups, -1)
        return groups * torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), y_all[index].T)

    def train(net, epochs, steps_per_epoch):
        optimizer = torch.optim.SGD(net.parameters(), lr=peak_lr, momentum=0.9, weight_decay=5e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: t / warmup if t < warmup else max(0.0, (total - t) / max(1, total - warmup)))
        for _ in range(epochs):
            order = torch.stack([torch.randperm(len(images), device=device) for _ in range(groups)])
            for step in range(steps_per_epoch):
                loss = loss_of(net, order[:, step * batch_size:(step + 1) * batch_size])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()

    def new_net():
        twin = torch_model(name, in_channels=channels, image_size=images.shape[1])
        return (torch_grouped(twin, groups) if grouped else twin).to(device, memory_format=layout)

    train(new_net(), 1, min(steps, 2))  # warm-up (allocator, cuDNN autotuning), not timed
    elapsed = 0.0
    for _ in range(1 if grouped else models):
        net = new_net()
        _synchronize(torch, device)
        start = time.perf_counter()
        train(net, epochs, steps)
        _synchronize(torch, device)
        elapsed += time.perf_counter() - start
    return elapsed


def _synchronize(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
