"""The nine forget sets of "Ascent Fails to Forget" App. M, computed from our own datamodels.

Sets 1-3 are random (10 / 100 / 500 points); sets 4-9 follow the top principal components
of the train x train datamodel matrix: the 10 and 100 points with the highest projection on
PC1, 250 highest + 250 lowest on PC1, and the same three for PC2. All sizes and PCs are
parameters (:func:`default_recipes`). Indices are always stored as int64 ``.npy`` files of
indices into the full train split, with a ``forget_sets.json`` manifest (provenance, class
histograms). User-supplied index files (``.npy`` / ``.txt`` / ``.json``) are validated by
:func:`load_index_file` -- e.g. the officially published CIFAR-10 sets (``--import``).

    python -m ascent_jax.forget_sets --dataset fashion_mnist --models 2000 --out runs/forget_sets

trains the datamodel ensemble (chunked, checkpointed, resumable), fits the datamodels (a
chunk of targets at a time, each saved, so a killed fit resumes too), writes the sets and
``report.md`` (LDS, PC variance explained, class histograms) with ``pc_images.png``, the
most extreme images of each PC. With ``--logits`` the same training run also records every
model's class logits (``logits.npy``, float16); ``--fit-classes`` then fits per-class datamodels
("Attribute-to-Delete" Eq. 2: one datamodel per class logit) for every forget-set point and a
random pool of study points (``class_datamodels.npz``), resumable a chunk of targets at a time.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: Ctrl-C at any moment is one line
    from ascent_jax.cli import quiet_interrupts

    quiet_interrupts()

import argparse
import dataclasses
import io
import json
import math
import os
import pickle
import pickletools
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ascent_jax import data, datamodels, ensemble, files, models, train
from ascent_jax.cli import (
    ArgumentParser,
    add_engine_arguments,
    check_writable,
    float_where,
    non_negative_int,
    positive_float,
    positive_int,
    read_run_file,
    run_main,
    run_options,
    prng_seed,
)

MANIFEST = "forget_sets.json"
CLASS_DATAMODELS = "class_datamodels.npz"
# The class-datamodel pool is drawn by default_rng([seed, CLASS_POOL_STREAM]); random set r uses [seed, r].
CLASS_POOL_STREAM = 1_000_000
DEFAULT_CLASS_POOL = 1000
# Below this mean LDS the datamodels barely predict anything and PC-aligned sets are ~random.
LDS_WARNING = 0.1


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One forget set: ``kind`` "random" (``size`` points drawn by ``seed``), "top" (``size``
    highest projections on PC ``pc``) or "top_bottom" (``size`` highest + ``size`` lowest)."""

    name: str
    kind: str
    size: int
    pc: int = 0

    def __post_init__(self):
        if self.kind not in ("random", "top", "top_bottom"):
            raise ValueError(f"unknown forget-set kind {self.kind!r}")
        if self.size <= 0:
            raise ValueError(f"forget set {self.name}: size must be positive, got {self.size}")
        if self.kind != "random" and self.pc <= 0:
            raise ValueError(f"forget set {self.name}: PC number must be >= 1, got {self.pc}")

    @property
    def total(self) -> int:
        return 2 * self.size if self.kind == "top_bottom" else self.size


def default_recipes(random_sizes=(10, 100, 500), top_sizes=(10, 100), split_size=250, pcs=(1, 2)) -> list[Recipe]:
    """App. M's nine sets in the paper's order (defaults), numbered ``set1`` .. ``set9``."""
    recipes = [("random", size, 0) for size in random_sizes]
    for pc in pcs:
        recipes += [("top", size, pc) for size in top_sizes] + [("top_bottom", split_size, pc)]
    named = []
    for number, (kind, size, pc) in enumerate(recipes, 1):
        label = {"random": f"random{size}", "top": f"pc{pc}-top{size}",
                 "top_bottom": f"pc{pc}-top{size}-bottom{size}"}[kind]
        named.append(Recipe(f"set{number}-{label}", kind, size, pc))
    return named


def build_sets(recipes: list[Recipe], subset: np.ndarray, scores: np.ndarray | None, seed: int) -> dict[str, np.ndarray]:
    """Forget sets as sorted int64 indices into the full split.

    ``subset`` (sorted full-split indices of the study points) is what sets are drawn from;
    ``scores[:, k-1]`` the PC-``k`` projection of each study point (needed by PC recipes).
    Random set ``r`` uses ``np.random.default_rng([seed, r])``; PC ties break by position.
    """
    subset = np.asarray(subset, np.int64)
    sets = {}
    for number, recipe in enumerate(recipes):
        if recipe.total > len(subset):
            raise ValueError(f"forget set {recipe.name} needs {recipe.total} points, the study subset has {len(subset)}")
        if recipe.kind == "random":
            chosen = np.random.default_rng([seed, number]).choice(len(subset), recipe.size, replace=False)
        else:
            if scores is None or recipe.pc > scores.shape[1]:
                raise ValueError(f"forget set {recipe.name} needs PC {recipe.pc}; only "
                                 f"{0 if scores is None else scores.shape[1]} computed")
            order = np.argsort(-scores[:, recipe.pc - 1], kind="stable")
            chosen = order[: recipe.size]
            if recipe.kind == "top_bottom":
                chosen = np.concatenate([chosen, order[-recipe.size:]])
        sets[recipe.name] = np.sort(subset[chosen])
    return sets


_SHOWN_CHARS = 40  # a shown value longer than this is cut
_INDEX_FORMATS = ("a 1-D integer array saved with numpy.save (.npy), whole numbers in a .txt file "
                  "or a .json list of them")


def _shown(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"{'-' if value < 0 else ''}<a {math.floor(math.log10(abs(value))) + 1}-digit number>"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _fail(path, what: str, values) -> None:
    shown = ", ".join(_shown(v) for v in list(values)[:5])
    more = f" (and {len(values) - 5} more)" if len(values) > 5 else ""
    raise ValueError(f"forget set file {path}: {what}: [{shown}]{more}")


def _int_token(text: str) -> int:
    """A whole number written in decimal; one too long for ``int`` (over 4300 digits) keeps its sign and size."""
    try:
        return int(text)
    except ValueError:
        digits = text.strip().lstrip("+-")
        if not digits.isdigit() or not digits.isascii():
            raise
        significant = len(digits.lstrip("0"))
        return 0 if not significant else (-1 if text.strip().startswith("-") else 1) * 10 ** (significant - 1)


def _looks_like_pickle(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) is a pickle, judged from its opcodes without unpickling."""
    if len(head) >= 2 and head[0] == pickle.PROTO and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
        return True
    try:
        for _ in pickletools.genops(io.BytesIO(head)):
            pass
    except Exception:  # noqa: BLE001 -- any parse error: not a (complete) pickle
        return False
    return True


def _read_npy(path: Path) -> list:
    """The items of a 1-D ``.npy`` array, its header checked first: no pickles, no sizes beyond the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
        if not head:
            raise ValueError(f"forget set file {path}: the file is empty (0 bytes); expected {_INDEX_FORMATS}")
        if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            raise ValueError(f"forget set file {path}: not a .npy array file but a zip archive (an .npz?); save one "
                             "1-D integer array with numpy.save(file, indices), or write the indices as .txt or .json")
        if not head.startswith(b"\x93NUMPY"):
            if _looks_like_pickle(head):
                raise ValueError(f"forget set file {path}: holds a Python pickle, and pickles are not accepted; save "
                                 "the indices with numpy.save(file, indices) (an integer array, no pickling) or write "
                                 "them as .txt or .json")
            raise ValueError(f"forget set file {path}: not a valid index array (no .npy header); expected "
                             f"{_INDEX_FORMATS}")
        handle.seek(0)
        try:
            version = np.lib.format.read_magic(handle)
            if version not in ((1, 0), (2, 0), (3, 0)):
                raise ValueError(f"unknown .npy format version {version[0]}.{version[1]}")
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(handle)
        except (ValueError, EOFError) as error:
            raise ValueError(f"forget set file {path}: not a valid .npy file ({error}); save the indices again with "
                             "numpy.save(file, indices)") from None
        data_bytes = size - handle.tell()
    if dtype.hasobject:
        raise ValueError(f"forget set file {path}: holds an array of Python objects, which would need unpickling, "
                         "and such arrays are not accepted; save the indices as an integer array with "
                         "numpy.save(file, indices) or write them as .txt or .json")
    if dtype.itemsize == 0:
        raise ValueError(f"forget set file {path}: holds items of type {dtype}, which have no data; expected "
                         f"{_INDEX_FORMATS}")
    needed = math.prod(shape) * dtype.itemsize
    if data_bytes < needed:
        raise ValueError(f"forget set file {path}: truncated .npy file: its header declares shape {shape} of "
                         f"{dtype} ({needed} bytes) but {data_bytes} bytes follow it; save it again")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as error:
        raise ValueError(f"forget set file {path}: not a valid .npy file ({error}); save the indices again with "
                         "numpy.save(file, indices)") from None
    if array.ndim != 1:
        raise ValueError(f"forget set file {path}: expected a 1-D array, got shape {array.shape}")
    return array.tolist()


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is no problem
    except UnicodeDecodeError as error:
        raise ValueError(f"forget set file {path}: not a UTF-8 text file (byte 0x{raw[error.start]:02x} at offset "
                         f"{error.start}); expected {_INDEX_FORMATS}") from None


def _read_values(path: Path) -> list:
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".txt", ".json"):
        raise ValueError(f"forget set file {path}: unsupported format {suffix!r}; use .npy, .txt or .json")
    try:
        if suffix == ".npy":
            return _read_npy(path)
        text = _read_text(path)
    except OSError as error:
        raise ValueError(f"forget set file {path}: cannot read it: {error.strerror or error}") from None
    if suffix == ".txt":
        return text.replace(",", " ").split()
    try:
        values = json.loads(text, parse_int=_int_token)
    except json.JSONDecodeError as error:
        raise ValueError(f"forget set file {path}: cannot read it: {error}") from None
    except RecursionError:
        raise ValueError(f"forget set file {path}: cannot read it: JSON nested too deeply; expected a list of "
                         "indices") from None
    if isinstance(values, dict) and "indices" in values:
        values = values["indices"]
    if not isinstance(values, list):
        raise ValueError(f"forget set file {path}: expected a JSON list of indices "
                         f"(or an object with an 'indices' list), got {type(values).__name__}")
    return values


def _as_int(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return _int_token(value)
        except ValueError:
            return None
    return None


def load_index_file(path: str | os.PathLike, num_points: int) -> np.ndarray:
    """Read and validate a forget-set index file (``.npy``, ``.txt`` whitespace/comma
    separated, ``.json`` list): returns sorted int64 indices into a split of ``num_points``.

    Raises ``FileNotFoundError`` for a missing file and a one-line ``ValueError`` naming the
    file for anything else: a folder, an unreadable, empty, pickled or malformed file, and
    non-integer, negative, out-of-range or duplicate indices (with the offending values).
    """
    path = Path(path)
    try:
        exists, is_file, is_dir = path.exists(), path.is_file(), path.is_dir()
    except OSError as error:  # e.g. a name too long for the file system
        raise ValueError(f"forget set file {path}: cannot access it: {error.strerror or error}") from None
    if not exists:
        raise FileNotFoundError(f"forget set file {path} does not exist")
    if is_dir:
        raise ValueError(f"forget set file {path} is a directory, but a file is expected; pass the index file "
                         "(.npy, .txt or .json) itself")
    if not is_file:
        raise ValueError(f"forget set file {path} is not a regular file; pass an index file (.npy, .txt or .json)")
    values = _read_values(path)
    if not values:
        raise ValueError(f"forget set file {path}: contains no indices")
    converted = [_as_int(v) for v in values]
    bad = [v for v, c in zip(values, converted) if c is None]
    if bad:
        _fail(path, "non-integer values", bad)
    if any(c < 0 for c in converted):
        _fail(path, "negative indices", [c for c in converted if c < 0])
    if any(c >= num_points for c in converted):
        _fail(path, f"indices out of range [0, {num_points})", [c for c in converted if c >= num_points])
    indices = np.asarray(converted, np.int64)
    unique, counts = np.unique(indices, return_counts=True)
    if (counts > 1).any():
        _fail(path, "duplicate indices", unique[counts > 1].tolist())
    return unique


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The validated ``forget_sets.json`` manifest of a folder of forget sets (what this CLI writes to ``--out``).

    Returns None when ``directory`` or its manifest does not exist (no datamodel sets there). Raises a one-line
    ``ValueError`` when ``directory`` is a file, or when the manifest cannot be read or is not an object with a
    ``provenance`` object and a ``sets`` object mapping each set name to an entry with a ``file`` name (of an
    index file in ``directory``). The sets themselves are read by :func:`load_index_file`.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    fix = ("write the folder again with python -m ascent_jax.forget_sets (or its --import), or pass another folder of "
           "forget sets")
    try:
        blocker = next((p for p in (directory, *directory.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            what = ("is a file, not a folder of forget sets" if blocker == directory
                    else f"is not a folder of forget sets: {blocker} is a file")
            raise ValueError(f"{directory} {what}; pass the folder that holds {MANIFEST} and the sets' .npy files "
                             "(the --out of python -m ascent_jax.forget_sets)")
        if not path.exists():
            return None
        if not path.is_file():
            raise ValueError(f"forget-sets manifest {path} is not a file; {fix}")
        manifest = json.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as error:
        raise ValueError(f"forget-sets manifest {path}: cannot read it: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ValueError(f"forget-sets manifest {path} is not a JSON text file; {fix}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"forget-sets manifest {path} is not valid JSON ({error}); {fix}") from None
    except RecursionError:
        raise ValueError(f"forget-sets manifest {path} is not valid JSON (nested too deeply); {fix}") from None

    def wrong(what: str) -> ValueError:
        return ValueError(f"forget-sets manifest {path}: {what}; {fix}")

    def kind(value) -> str:
        return {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)

    if not isinstance(manifest, dict):
        raise wrong(f"expected a JSON object with 'provenance' and 'sets', got {kind(manifest)}")
    for key in ("provenance", "sets"):
        if key not in manifest:
            raise wrong(f"has no {key!r} entry")
        if not isinstance(manifest[key], dict):
            raise wrong(f"{key!r} must be an object, got {kind(manifest[key])}")
    for name, entry in manifest["sets"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not entry["file"]:
            raise wrong(f"set {name!r} must be an object with a 'file' name, got {json.dumps(entry)[:_SHOWN_CHARS]}")
    return manifest


def class_histogram(indices: np.ndarray, labels: np.ndarray, num_classes: int) -> list[int]:
    """Number of points of each class in a forget set (``labels`` of the full split)."""
    return np.bincount(np.asarray(labels)[indices], minlength=num_classes).tolist()


def write_sets(out: Path, sets: dict[str, np.ndarray], labels: np.ndarray, num_classes: int, provenance: dict,
               recipes: dict[str, dict] | None = None) -> dict:
    """Write ``NAME.npy`` (int64 full-split indices) per set and the ``forget_sets.json`` manifest."""
    entries = {}
    for name, indices in sets.items():
        indices = np.asarray(indices, np.int64)
        files.atomic_write(out / f"{name}.npy", lambda handle, a=indices: np.save(handle, a))
        entries[name] = {"file": f"{name}.npy", "size": len(indices), "recipe": (recipes or {}).get(name),
                         "class_histogram": class_histogram(indices, labels, num_classes)}
    manifest = {"provenance": provenance, "sets": entries}
    files.atomic_write(out / MANIFEST, lambda handle: handle.write(json.dumps(manifest, indent=2).encode()))
    return manifest


def class_rows(sets: dict[str, np.ndarray], subset: np.ndarray, pool: int, seed: int) -> np.ndarray:
    """Rows of the per-class datamodels: sorted positions in ``subset`` of every point of ``sets`` and of
    ``pool`` study points drawn uniformly (without replacement) by ``default_rng([seed, CLASS_POOL_STREAM])``.

    The pool is drawn from the whole subset, so it is a plain random sample of study points (it may
    overlap the sets; the union is taken).
    """
    if not 0 <= pool <= len(subset):
        raise ValueError(f"class-datamodel pool of {pool} points does not fit the study subset of {len(subset)}")
    drawn = np.random.default_rng([seed, CLASS_POOL_STREAM]).choice(len(subset), pool, replace=False)
    members = [datamodels.positions_in_subset(subset, indices) for indices in sets.values()]
    return np.unique(np.concatenate([drawn, *members]).astype(np.int64))


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return values


_fraction = float_where(lambda value: 0 < value < 1, "lie strictly between 0 and 1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m ascent_jax.forget_sets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(data.DATASETS), default="fashion_mnist")
    parser.add_argument("--import", dest="imports", nargs="+", metavar="FILE", default=None,
                        help="validate published forget-set index files (.npy/.txt/.json) against the train split "
                             "and copy them into --out with a manifest; trains nothing")
    parser.add_argument("--models", type=positive_int, default=2000, help="datamodel ensemble size M (default 2000)")
    parser.add_argument("--alpha", type=_fraction, default=0.5, help="fraction of the study subset each model "
                        "trains on (default 0.5)")
    parser.add_argument("--subset-size", type=positive_int, default=10_000,
                        help="class-balanced study subset n, drawn by --seed (default 10000; 0 < n <= train size)")
    parser.add_argument("--model", choices=["mlp", "cnn", "resnet9"], default="mlp", help="architecture (default mlp)")
    parser.add_argument("--epochs", type=positive_int, default=10, help="training epochs per model (default 10)")
    parser.add_argument("--lr", type=positive_float, default=0.4, help="peak learning rate (default 0.4)")
    parser.add_argument("--batch-size", type=positive_int, default=512, help="batch size (default 512)")
    parser.add_argument("--holdout", type=_fraction, default=0.1,
                        help="fraction of models held out twice: once to choose lambda, once for the LDS (default 0.1)")
    parser.add_argument("--fista-steps", type=positive_int, default=50,
                        help="FISTA iterations per lambda, warm-started along the lambda path (default 50)")
    parser.add_argument("--random-sizes", type=_int_list, default=(10, 100, 500), help="random set sizes (default 10,100,500)")
    parser.add_argument("--top-sizes", type=_int_list, default=(10, 100), help="top-of-PC set sizes (default 10,100)")
    parser.add_argument("--split-size", type=positive_int, default=250, help="top and bottom count of the "
                        "top+bottom sets (default 250)")
    parser.add_argument("--pcs", type=_int_list, default=(1, 2), help="PCs to build sets on (default 1,2)")
    parser.add_argument("--seed", type=prng_seed, default=0, help="seed of the subset, masks, models and random sets")
    parser.add_argument("--data-dir", default=None, help="folder with the data set files")
    parser.add_argument("--out", default="runs/forget_sets", help="output directory (default runs/forget_sets)")
    group = parser.add_argument_group("class logits and per-class datamodels")
    group.add_argument("--logits", action="store_true",
                       help="also record every model's eval-mode class logits (logits.npy in --out, float16, "
                            "(models, n, classes)) in the same training run; the margins and sets are unchanged, but "
                            "the models are trained again if an earlier run in --out did not record logits")
    group.add_argument("--fit-classes", action="store_true",
                       help="after the sets are written, fit per-class datamodels (one per class logit) for every "
                            f"forget-set point and the --class-pool points into --out/{CLASS_DATAMODELS}, a chunk of "
                            "targets at a time (resumable); needs --logits")
    group.add_argument("--class-pool", type=non_negative_int, default=None, metavar="P",
                       help=f"random study points added to the rows of --fit-classes (default {DEFAULT_CLASS_POOL}), "
                            f"drawn by numpy.random.default_rng([SEED, {CLASS_POOL_STREAM}])")
    group.add_argument("--class-sets", type=_names, default=None, metavar="NAMES",
                       help="comma-separated forget sets whose points are rows of --fit-classes (default: all); "
                            "fewer rows fit faster")
    add_engine_arguments(parser, chunk_default=100)
    return parser.parse_args(argv)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated forget-set names, got {text!r}")
    return names


def _import_sets(args, out: Path) -> int:
    info = data.get_info(args.dataset)
    _, labels = data.load(args.dataset, "train", args.data_dir)
    if (out / "run.json").exists():
        raise ValueError(f"{out} holds computed forget sets ({out / 'run.json'}); import into another --out")
    names = [Path(f).stem for f in args.imports]
    clashes = [f for f in args.imports if names.count(Path(f).stem) > 1]
    if clashes:
        raise ValueError(f"imported files must have distinct names (a set is named after its file): "
                         f"{', '.join(map(str, clashes))}")
    sets = {Path(f).stem: load_index_file(f, len(labels)) for f in args.imports}
    provenance = {"dataset": args.dataset, "source": "imported", "files": [str(Path(f).resolve()) for f in args.imports]}
    manifest = write_sets(out, sets, labels, info.num_classes, provenance)
    for name, entry in manifest["sets"].items():
        print(f"{name}: {entry['size']} indices, classes {entry['class_histogram']}")
    print(f"wrote {len(sets)} sets and {out / MANIFEST}")
    return 0


def _plot_pc_images(path: Path, images: np.ndarray, labels: np.ndarray, class_names, scores: np.ndarray,
                    pcs: list[int], per_row: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(pc, end) for pc in pcs for end in ("top", "bottom")]
    fig, axes = plt.subplots(len(rows), per_row, figsize=(per_row * 1.2, len(rows) * 1.45), squeeze=False)
    for axis_row, (pc, end) in zip(axes, rows):
        order = np.argsort(-scores[:, pc - 1], kind="stable")
        chosen = order[:per_row] if end == "top" else order[::-1][:per_row]
        for axis, position in zip(axis_row, chosen):
            image = images[position]
            axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
            axis.set_title(f"{class_names[labels[position]]}\n{scores[position, pc - 1]:.2g}", fontsize=6)
        for axis in axis_row:
            axis.axis("off")
        axis_row[0].text(-0.3, 0.5, f"PC{pc} {end}", transform=axis_row[0].transAxes, ha="right", va="center",
                         fontsize=8)
    fig.subplots_adjust(left=0.08, right=0.99, top=0.93, bottom=0.01, hspace=0.6, wspace=0.1)
    files.atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    check_writable(out)
    if args.imports:
        if args.logits or args.fit_classes:
            raise ValueError("--import copies index files and trains nothing, so --logits and --fit-classes do not "
                             "apply; drop them (or drop --import)")
        return _import_sets(args, out)
    _check_class_flags(args)
    options = run_options(args, args.seed)  # first: a distributed run is joined before JAX starts
    info = data.get_info(args.dataset)
    images_all, labels_all = data.load(args.dataset, "train", args.data_dir)
    recipes = default_recipes(args.random_sizes, args.top_sizes, args.split_size, args.pcs)
    subset = datamodels.study_subset(labels_all, args.subset_size, args.seed)
    n = len(subset)
    biggest = max(r.total for r in recipes)
    if biggest > n:
        raise ValueError(f"the largest forget set has {biggest} points but --subset-size is {n}")
    class_sets = _chosen_class_sets(args, recipes, n)
    held = max(3, round(args.holdout * args.models))
    fit_models = args.models - 2 * held
    if fit_models < 2:
        raise ValueError(f"--models {args.models} leaves {fit_models} models to fit after holding out 2 x {held}; "
                         "use at least 8 models")
    images, labels = images_all[subset], labels_all[subset]
    norm = train.Normalization(info.mean, info.std)
    model = models.build(args.model, info.num_classes)
    config = train.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, peak_lr=args.lr)
    masks = datamodels.subset_masks(args.models, n, args.alpha, args.seed)
    provenance = {"dataset": args.dataset, "model": args.model, "models": args.models, "alpha": args.alpha,
                  "seed": args.seed, "subset_size": n, "subset_digest": ensemble.digest(subset),
                  "train": dataclasses.asdict(config), "holdout_models": held, "fista_steps": args.fista_steps,
                  "lambda_ratios": list(datamodels.DEFAULT_RATIOS)}
    run_tag = ensemble.fingerprint({k: provenance[k] for k in ("dataset", "model", "models", "alpha", "seed",
                                                                "subset_size", "subset_digest", "train")})
    tag_file = out / "run.json"
    if tag_file.exists() and read_run_file(tag_file).get("fingerprint") != run_tag:
        raise ValueError(f"{out} holds a run with other settings ({tag_file}); use another --out or delete it")
    files.atomic_write(tag_file, lambda h: h.write(json.dumps({"fingerprint": run_tag, **provenance},
                                                                  indent=2).encode()))
    files.atomic_write(out / "study_subset.npy", lambda h: np.save(h, subset))
    print(f"{args.dataset}: study subset of {n} class-balanced train points (seed {args.seed}); "
          f"{args.models} x {args.model} on {round(args.alpha * n)}-point subsets (alpha {args.alpha}), "
          f"{args.epochs} epochs, {args.chunk_size} at a time; fit on {fit_models}, lambda chosen on {held}, "
          f"LDS on {held} held-out models; run dir {out}", flush=True)
    outputs = datamodels.train_outputs(model, config, images, labels, norm, masks, options, out_dir=out / "margins",
                                       logits=args.logits)
    margins = outputs.margins
    if args.logits:
        files.atomic_write(out / "logits.npy", lambda h: np.save(h, outputs.logits))
    started = time.time()
    fit, val, test = slice(0, fit_models), slice(fit_models, fit_models + held), slice(fit_models + held, None)
    dm = datamodels.fit_datamodels(masks[fit], margins[fit], masks[val], margins[val], steps=args.fista_steps,
                                   checkpoint_dir=out / "fit", log=lambda m: print(m, flush=True))
    scores_lds = datamodels.lds(dm, masks[test], margins[test])
    mean_lds = float(np.nanmean(scores_lds)) if np.isfinite(scores_lds).any() else float("nan")
    print(f"datamodels fitted in {time.time() - started:.0f} s; LDS {mean_lds:.3f} on {held} held-out models", flush=True)
    pcs = max(args.pcs)
    components = datamodels.principal_components(dm.matrix, pcs, seed=args.seed)
    files.atomic_write(out / "datamodels.npz", lambda h: np.savez(
        h, matrix=dm.matrix, bias=dm.bias, ratio=dm.ratio, lds=scores_lds, scores=components.scores,
        explained=components.explained, subset=subset))
    sets = build_sets(recipes, subset, components.scores, args.seed)
    provenance["lds"] = mean_lds
    provenance["pc_variance_explained"] = components.explained.tolist()
    manifest = write_sets(out, sets, labels_all, info.num_classes, provenance,
                          {r.name: dataclasses.asdict(r) for r in recipes})
    _plot_pc_images(out / "pc_images.png", images, labels, info.class_names, components.scores, list(args.pcs))
    class_lines = _fit_classes(args, out, masks, outputs.logits, (fit, val, test), {k: sets[k] for k in class_sets},
                               subset, provenance, info.class_names) if args.fit_classes else []
    report = _report(args, manifest, mean_lds, scores_lds, held, components.explained, info.class_names, class_lines)
    files.atomic_write(out / "report.md", lambda h: h.write(report.encode()))
    if ensemble.is_writer():  # last: a run killed before this point resumes every fit from its saved chunks
        shutil.rmtree(out / "fit", ignore_errors=True)  # the fit's chunks, now all in datamodels.npz
        shutil.rmtree(out / "fit-classes", ignore_errors=True)  # and those in class_datamodels.npz
    print(report)
    return 0


def _check_class_flags(args) -> None:
    """The per-class flags fit together (before anything is loaded or trained)."""
    if args.fit_classes and not args.logits:
        raise ValueError("--fit-classes fits datamodels of the class logits, which only a run with --logits records; "
                         "add --logits")
    for flag, value in (("--class-pool", args.class_pool), ("--class-sets", args.class_sets)):
        if value is not None and not args.fit_classes:
            raise ValueError(f"{flag} chooses the rows of the per-class datamodels; add --fit-classes or drop {flag}")


def _class_pool(args) -> int:
    return DEFAULT_CLASS_POOL if args.class_pool is None else args.class_pool


def _chosen_class_sets(args, recipes: list[Recipe], n: int) -> tuple[str, ...]:
    """The forget sets whose points are rows of ``--fit-classes`` (checked against the recipes)."""
    names = [r.name for r in recipes]
    if not args.fit_classes:
        return ()
    chosen = tuple(names) if args.class_sets is None else args.class_sets
    unknown = [name for name in chosen if name not in names]
    if unknown:
        raise ValueError(f"--class-sets names unknown forget sets {', '.join(unknown)}; choose from {', '.join(names)}")
    if _class_pool(args) > n:
        raise ValueError(f"--class-pool {_class_pool(args)} exceeds the study subset of {n} points; pass at most {n}")
    return tuple(dict.fromkeys(chosen))


def _fit_classes(args, out: Path, masks, logits, splits, sets, subset, provenance, class_names) -> list[str]:
    """Fit, score and save the per-class datamodels of the points of ``sets`` and the pool; the report's lines."""
    fit, val, test = splits
    started = time.time()
    rows = class_rows(sets, subset, _class_pool(args), args.seed)
    provenance = {**provenance, "logits_dtype": "float16", "class_sets": list(sets), "class_pool": _class_pool(args),
                  "class_pool_seed": [args.seed, CLASS_POOL_STREAM]}
    print(f"per-class datamodels: {len(rows)} rows ({len(rows) * logits.shape[-1]} targets = rows x "
          f"{logits.shape[-1]} classes) from {len(sets)} forget sets and the random pool", flush=True)
    cdm = datamodels.fit_class_datamodels(masks[fit], logits[fit], masks[val], logits[val], rows,
                                          steps=args.fista_steps, checkpoint_dir=out / "fit-classes",
                                          log=lambda m: print(m, flush=True))
    scores = datamodels.class_lds(cdm, masks[test], logits[test])
    lines = _class_lds_lines(scores, rows, sets, subset, class_names, len(masks[test]))
    provenance = {**provenance, "class_lds": float(np.nanmean(scores)) if np.isfinite(scores).any() else None}
    datamodels.save_class_datamodels(out / CLASS_DATAMODELS, cdm, subset, provenance, lds=scores)
    print(f"per-class datamodels fitted in {time.time() - started:.0f} s; {lines[2].replace('**', '')}", flush=True)
    return lines


def _class_lds_lines(scores, rows, sets, subset, class_names, held) -> list[str]:
    """Markdown: per-class LDS, averaged over all rows, the forget-set rows, each set and the pool."""

    def mean(values) -> str:
        return f"{np.nanmean(values):.3f}" if np.isfinite(values).any() else "nan"

    in_sets = np.zeros(len(rows), bool)
    groups = []
    for name, indices in sets.items():
        chosen = np.isin(rows, datamodels.positions_in_subset(subset, indices))
        in_sets |= chosen
        groups.append((name, chosen))
    groups = [("all rows", np.ones(len(rows), bool)), ("forget-set rows", in_sets), *groups,
              ("pool rows not in a set", ~in_sets)]
    lines = ["## Per-class datamodels", "",
             f"**Per-class LDS** (Spearman per row and class logit, {held} held-out models): mean {mean(scores)} over "
             f"{len(rows)} rows; forget-set rows {mean(scores[in_sets])}.", "",
             "| rows | count | mean | " + " | ".join(class_names) + " |", "|---|---|---|" + "---|" * len(class_names)]
    for name, chosen in groups:
        per_class = [mean(scores[chosen, c]) for c in range(scores.shape[1])]
        lines.append(f"| {name} | {chosen.sum()} | {mean(scores[chosen])} | " + " | ".join(per_class) + " |")
    return lines + [""]


def _report(args, manifest, mean_lds, scores_lds, held, explained, class_names, class_lines=()) -> str:
    lines = [f"# Forget sets: {args.dataset}, {args.models} x {args.model}, alpha {args.alpha}, seed {args.seed}", "",
             f"Study subset: {args.subset_size} class-balanced train points; indices below are into the full train split.",
             "", f"**LDS** (mean Spearman over {np.isfinite(scores_lds).sum()} targets, {held} held-out models): {mean_lds:.3f}"]
    if not mean_lds >= LDS_WARNING:
        lines += ["", f"**Warning: LDS {mean_lds:.3f} is near zero: the datamodels do not predict held-out models, so "
                  "the PC-aligned forget sets are effectively random sets. Train more models (--models) before using "
                  "them as structured sets.**"]
    lines += ["", "PC variance explained: " + ", ".join(f"PC{k + 1} {v:.1%}" for k, v in enumerate(explained)), "",
              "| set | size | " + " | ".join(class_names) + " |", "|---|---|" + "---|" * len(class_names)]
    for name, entry in manifest["sets"].items():
        lines.append(f"| {name} | {entry['size']} | " + " | ".join(map(str, entry["class_histogram"])) + " |")
    lines += ["", "![PC images](pc_images.png)", "", *class_lines]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_main(main))
