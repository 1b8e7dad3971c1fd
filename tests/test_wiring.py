"""Wiring: every unlearning method reads exactly the points it should, and the study scores the right way round.

The behavioural tests of ``test_unlearn.py`` cannot see a pass that reads the wrong subset
(fine-tuning on the forget set still lowers a loss) and ``test_study.py`` cannot see KLoM's
arguments swapped. Here each registered method runs single epochs of ONE tiny MLP on random
8x8 images (no data files), and its reads are observed two independent ways:

* **read sets by gradient** -- the gradient of a random projection of the weights after one epoch
  with respect to the training images is non-zero exactly on the rows the epoch read (a row
  never gathered gets an exact zero; the gather's transpose is a scatter-add into zeros);
* **poisoning** -- the images of one subset are set to NaN: if the epoch reads them the weights
  become non-finite; if it does not, the weights are bit-identical to the clean run's. Images
  of a read subset changed to other finite values must change the weights (the positive side).

``EXPECTED`` lists, for every registered method, what epoch 0 and epoch 1 read; a method
registered without an entry fails the tests until one is written. GDA and SCRUB run with one
ascent epoch, so epoch 0 holds their forget pass and epoch 1 (>= ``ascent_epochs``) does not.
The directions of the passes (ascent up, descent down, SCRUB's max-pass away from the teacher),
the driver's order of the forget and retain sets, and the study's wiring (``score``'s KLoM
direction, ``Study.positions``, ``split_oracles``) are checked last.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascent_jax import batches, klom, models, train, unlearn
from ascent_jax.ensemble import RunOptions
from ascent_jax.unlearn import scrub
from experiments import study

NUM_TRAIN, NUM_FORGET, SHAPE, NUM_CLASSES = 96, 12, (8, 8, 1), 10
NUM_RETAIN = NUM_TRAIN - NUM_FORGET
RETAIN_MULTIPLE = 2 / 3
SAMPLE = 8  # OM/DMM's retain sample: round(2/3 * 12 forget points), computed here from the definition
_rng = np.random.default_rng(0)
IMAGES = _rng.integers(0, 256, (NUM_TRAIN, *SHAPE)).astype(np.float32)  # float, so NaN can mark a point
LABELS = _rng.integers(0, NUM_CLASSES, NUM_TRAIN).astype(np.int32)
TARGETS = (3 * _rng.standard_normal((NUM_TRAIN, NUM_CLASSES))).astype(np.float32)  # OM/DMM's per-point targets
FORGET = np.sort(_rng.choice(NUM_TRAIN, NUM_FORGET, replace=False)).astype(np.int32)
RETAIN = np.setdiff1d(np.arange(NUM_TRAIN), FORGET).astype(np.int32)
MODEL = models.build("mlp", NUM_CLASSES, hidden=(16,))
NORM = train.Normalization((0.5,), (0.25,))
KEY = jax.random.key(5)
PRETRAINED = jax.device_get(MODEL.init(jax.random.key(1), SHAPE))

FAST_COMPILE = {"xla_backend_optimization_level": 0}
F, R, S = "forget", "retain", "retain sample"  # S: a random sample of the retain set


@dataclasses.dataclass(frozen=True)
class Expectation:
    """What a method's epochs read: ``reads[e]`` for epoch index e = 0, 1; ``why`` says where it comes from;
    ``fresh_sample``: the retain sample of epoch 1 is a new draw (else the same points as epoch 0's)."""

    config: Any
    reads: tuple[frozenset, frozenset]
    why: str
    fresh_sample: bool = False


def _reads(*subsets: str) -> frozenset:
    return frozenset(subsets)


EXPECTED = {
    "do_nothing": Expectation(unlearn.DoNothingConfig(epochs=2), (_reads(), _reads()),
                              "the pretrained model: reads nothing, changes nothing"),
    "ga": Expectation(unlearn.GradientAscentConfig(lr=0.05, epochs=2, batch_size=8), (_reads(F), _reads(F)),
                      "ascent on the forget set; never a retain point"),
    "gda": Expectation(unlearn.GradientDescentAscentConfig(lr=0.05, epochs=2, ascent_epochs=1, forget_batch_size=8,
                                                           retain_batch_size=32),
                       (_reads(F, R), _reads(R)),
                       "ascent on the forget set while epoch < ascent_epochs, then descent on the whole retain set"),
    "finetune": Expectation(unlearn.FineTuneConfig(lr=0.05, epochs=2, batch_size=32), (_reads(R), _reads(R)),
                            "descent on the retain set; never a forget point"),
    "scrub": Expectation(unlearn.ScrubConfig(lr=0.05, epochs=2, ascent_epochs=1, forget_batch_size=8,
                                             retain_batch_size=32),
                         (_reads(F, R), _reads(R)),
                         "max-pass on the forget set while epoch < ascent_epochs, then min-pass on the retain set"),
    "om": Expectation(unlearn.OracleMatchingConfig(lr=0.05, epochs=2, retain_multiple=RETAIN_MULTIPLE, batch_size=8),
                      (_reads(F, S), _reads(F, S)),
                      "matches the targets on the forget set plus a retain sample drawn once (Alg. C.3)"),
    "dmm": Expectation(unlearn.DatamodelMatchingConfig(lr=0.05, epochs=2, retain_multiple=RETAIN_MULTIPLE,
                                                       batch_size=8),
                       (_reads(F, S), _reads(F, S)), "OM towards per-class datamodel targets: the same reads"),
    "dmm_margin": Expectation(unlearn.MarginDatamodelMatchingConfig(lr=0.05, epochs=2, retain_multiple=RETAIN_MULTIPLE,
                                                                    batch_size=8, resample=True),
                              (_reads(F, S), _reads(F, S)),
                              "OM towards margin datamodel targets, here redrawing its retain sample each epoch",
                              fresh_sample=True),
    "retrain": Expectation(unlearn.RetrainConfig(train.TrainConfig(epochs=2, batch_size=32, peak_lr=0.05)),
                           (_reads(R), _reads(R)), "pretraining's recipe from scratch on the retain set only"),
}


def expectation(name: str) -> Expectation:
    if name not in EXPECTED:
        pytest.fail(f"registered method {name!r} has no wiring expectation: add what its epochs read to "
                    "tests/test_wiring.py::EXPECTED")
    return EXPECTED[name]


def test_every_registered_method_has_a_wiring_expectation():
    missing = sorted(set(unlearn.names()) - set(EXPECTED))
    stale = sorted(set(EXPECTED) - set(unlearn.names()))
    assert not missing, f"methods without a wiring expectation in EXPECTED: {missing}"
    assert not stale, f"EXPECTED names methods that are not registered: {stale}"
    for name, entry in EXPECTED.items():
        assert unlearn.get(entry.config).name == name
        assert entry.reads[0] <= {F, R, S} and entry.reads[1] <= {F, R, S}


# --------------------------------------------------------------------------------------------
# One epoch of one model, compiled once per method


class Program:
    """Jitted single epochs of one method from a fixed start: the weights, and their gradient w.r.t. the data."""

    def __init__(self, config):
        method = unlearn.get(config)
        self.config, self.needs_targets = config, method.needs_targets
        init, epoch = unlearn.single_model(config, MODEL, NORM, SHAPE, NUM_FORGET, NUM_RETAIN)
        self.member = unlearn.MemberInput(None if method.from_scratch else PRETRAINED, None)
        self.start = jax.jit(init)(KEY, self.member._replace(targets=TARGETS if self.needs_targets else None))
        shared = (jnp.asarray(LABELS), jnp.asarray(FORGET), jnp.asarray(RETAIN), jnp.asarray(RETAIN))

        def params_after(images, targets, epoch_index, start):
            member = self.member._replace(targets=targets if self.needs_targets else None)
            state, _ = epoch(start, (images, *shared), member, KEY, epoch_index)
            return state.variables["params"]

        leaves, tree = jax.tree_util.tree_flatten(jax.eval_shape(params_after, IMAGES, TARGETS, jnp.int32(0),
                                                                 self.start))
        keys = jax.random.split(jax.random.key(99), len(leaves))
        direction = tree.unflatten([jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])

        def projection(images, targets, epoch_index, start):
            params = params_after(images, targets, epoch_index, start)
            value = sum(jnp.sum(d * p) for d, p in zip(jax.tree_util.tree_leaves(direction),
                                                       jax.tree_util.tree_leaves(params)))
            return value, params

        # One program per method: the weights and their gradient w.r.t. (images, targets) together.
        # LLVM optimisation off compiles ~2x faster on CPU; the program computes the same thing.
        self._run = jax.jit(jax.grad(projection, argnums=(0, 1), has_aux=True), compiler_options=FAST_COMPILE)

    def _call(self, epoch_index, images, targets, start):
        start = self.start if start is None else start
        return self._run(jnp.asarray(images), jnp.asarray(targets), jnp.int32(epoch_index), start)

    def params(self, epoch_index: int, images=IMAGES, targets=TARGETS, start=None):
        """Host weights after epoch ``epoch_index`` run from the method's start (or ``start``)."""
        return jax.device_get(self._call(epoch_index, images, targets, start)[1])

    @functools.cache
    def read(self, epoch_index: int) -> tuple[frozenset, frozenset]:
        """(image rows, target rows) with a non-zero gradient: the points epoch ``epoch_index`` read."""
        (images, targets), _ = self._call(epoch_index, IMAGES, TARGETS, None)

        def rows(gradient):
            gradient = np.asarray(gradient).reshape(NUM_TRAIN, -1)
            assert np.isfinite(gradient).all()
            return frozenset(np.flatnonzero(np.abs(gradient).max(axis=1) > 0).tolist())

        return rows(images), rows(targets)


@functools.cache
def program(name: str) -> Program:
    return Program(expectation(name).config)


def finite(tree) -> bool:
    return all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(tree))


def identical(a, b) -> bool:
    return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
            and all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))))


def largest_change(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def poisoned(array: np.ndarray, rows, value=np.nan) -> np.ndarray:
    out = np.array(array, copy=True)
    out[np.asarray(sorted(rows), dtype=np.int64)] = value
    return out


# --------------------------------------------------------------------------------------------
# What each method reads


@pytest.mark.parametrize("name", unlearn.names())
def test_each_epoch_reads_exactly_the_expected_points(name):
    """The gradient w.r.t. the training images is non-zero on exactly the expected rows, in each epoch."""
    forget, retain = set(FORGET.tolist()), set(RETAIN.tolist())
    samples = []
    for epoch_index, expected in enumerate(expectation(name).reads):
        read, read_targets = program(name).read(epoch_index)
        where = f"{name}, epoch index {epoch_index} (expected to read: {sorted(expected) or 'nothing'})"
        if F in expected:
            assert forget <= read, f"{where}: forget points not read: {sorted(forget - read)}"
        else:
            assert not read & forget, f"{where}: read forget points {sorted(read & forget)}"
        if R in expected:
            assert retain <= read, f"{where}: retain points not read: {sorted(retain - read)}"
        elif S in expected:
            sample = read & retain
            assert len(sample) == SAMPLE, f"{where}: read {len(sample)} retain points, expected a sample of {SAMPLE}"
            samples.append(sample)
        else:
            assert not read & retain, f"{where}: read retain points {sorted(read & retain)}"
        if program(name).needs_targets:  # each point's own target, and only the points matched
            assert read_targets == read, f"{where}: target rows {sorted(read_targets ^ read)} disagree with images"
        else:
            assert not read_targets
    if samples and expectation(name).fresh_sample:
        assert samples[0] != samples[1], f"{name}: the same retain sample in both epochs (it must be fresh)"
    elif samples:
        assert samples[0] == samples[1], f"{name}: another retain sample in epoch 1 (it must be drawn once)"


@pytest.mark.parametrize("name", unlearn.names())
def test_poisoning_a_subset_changes_the_weights_exactly_when_it_is_read(name):
    """NaN images of a subset an epoch must not read leave it bit-identical; NaN where it reads spreads."""
    prog = program(name)
    for epoch_index, expected in enumerate(expectation(name).reads):
        clean = prog.params(epoch_index)
        assert finite(clean)
        where = f"{name}, epoch index {epoch_index}"
        for subset, rows, reads in ((F, FORGET, F in expected), (R, RETAIN, bool({R, S} & expected))):
            result = prog.params(epoch_index, images=poisoned(IMAGES, rows))
            if reads:
                assert not finite(result), f"{where}: NaN {subset} images did not reach the weights"
                # the positive side with finite values: other images there give other weights
                assert not identical(prog.params(epoch_index, images=poisoned(IMAGES, rows, 255.0)), clean), \
                    f"{where}: changing the {subset} images did not change the weights"
            else:
                assert identical(result, clean), f"{where}: the {subset} images (NaN) changed the weights"
        if S in expected:  # the retain points outside this epoch's sample are never touched
            unread = set(RETAIN.tolist()) - prog.read(epoch_index)[0]
            assert identical(prog.params(epoch_index, images=poisoned(IMAGES, unread)), clean), where
        if not expected:
            assert identical(clean, PRETRAINED["params"]), f"{where}: changed the pretrained weights"


@pytest.mark.parametrize("name", [n for n in unlearn.names() if unlearn.get(n).needs_targets])
def test_targets_are_read_for_the_matched_points_and_each_point_gets_its_own(name):
    """NaN targets on the forget set (always matched) or the retain set spread; on the points an epoch
    does not match they change nothing. Targets equal to the start model's own logits leave it (almost)
    where it is; the same targets given to other points (rows rolled by one) move it."""
    prog = program(name)
    for epoch_index in (0, 1):
        clean = prog.params(epoch_index)
        assert not finite(prog.params(epoch_index, targets=poisoned(TARGETS, FORGET)))
        assert not finite(prog.params(epoch_index, targets=poisoned(TARGETS, RETAIN)))
        unread = set(range(NUM_TRAIN)) - prog.read(epoch_index)[1]
        assert len(unread) == NUM_RETAIN - SAMPLE
        assert identical(prog.params(epoch_index, targets=poisoned(TARGETS, unread)), clean)
    # plain SGD: a step is proportional to the gradient (Adam rescales float noise to full-size steps)
    sgd = Program(dataclasses.replace(prog.config, optimizer=unlearn.PLAIN_SGD))
    own = np.asarray(_eval_logits(PRETRAINED["params"], jnp.asarray(IMAGES)))
    stays = largest_change(sgd.params(0, targets=own), PRETRAINED["params"])
    moves = largest_change(sgd.params(0, targets=np.roll(own, 1, axis=0)), PRETRAINED["params"])
    assert stays < 1e-5 and moves > 1e-3, (stays, moves)


# --------------------------------------------------------------------------------------------
# Which way the passes go


@jax.jit
def _eval_logits(params, images):
    x = batches.normalize(images, NORM.mean, NORM.std)
    return MODEL.apply({"params": params, "batch_stats": PRETRAINED["batch_stats"]}, x, False)[0]


def _logits(params, rows):
    return _eval_logits(params, jnp.asarray(IMAGES[rows]))


def _cross_entropy(params, rows):
    return float(train.cross_entropy(_logits(params, rows), jnp.asarray(LABELS[rows]), jnp.ones(len(rows), bool)))


def _teacher_kl(params, rows):
    valid = jnp.ones(len(rows), bool)
    return float(scrub.distillation_kl(_logits(params, rows), _logits(PRETRAINED["params"], rows), valid, 4.0))


def _matching_error(params, rows):
    return float(jnp.mean((_logits(params, rows) - TARGETS[rows]) ** 2))


SCRUB_MAX_PASS_ONLY = unlearn.ScrubConfig(lr=0.05, epochs=1, ascent_epochs=1, forget_batch_size=8, retain_batch_size=32,
                                          ce_weight=0.0, kl_weight=0.0)  # the min-pass objective is 0: no step


def test_each_pass_moves_the_way_it_should():
    """GA raises the forget loss, fine-tuning lowers the retain loss, OM approaches its targets and
    SCRUB's max-pass moves a student away from its teacher on the forget set."""
    before, after = PRETRAINED["params"], program("ga").params(0)
    assert _cross_entropy(after, FORGET) > _cross_entropy(before, FORGET) + 1e-3
    after = program("finetune").params(0)
    assert _cross_entropy(after, RETAIN) < _cross_entropy(before, RETAIN) - 1e-3
    after = program("om").params(0)
    assert _matching_error(after, FORGET) < _matching_error(before, FORGET) - 1e-3
    # SCRUB: a student a little away from the teacher (at the teacher the KL's gradient is 0)
    prog = Program(SCRUB_MAX_PASS_ONLY)
    noise = jax.tree_util.tree_map(lambda leaf: 0.05 * np.random.default_rng(2).standard_normal(leaf.shape),
                                   PRETRAINED["params"])
    student = jax.tree_util.tree_map(lambda p, n: (p + n).astype(p.dtype), PRETRAINED["params"], noise)
    start = prog.start._replace(variables={**prog.start.variables, "params": student})
    after = prog.params(0, start=start)
    assert _teacher_kl(after, FORGET) > _teacher_kl(student, FORGET) + 1e-4
    assert identical(prog.params(0, images=poisoned(IMAGES, RETAIN, 255.0), start=start), after)  # min-pass inert


# --------------------------------------------------------------------------------------------
# The driver


def test_the_driver_hands_the_forget_and_retain_sets_over_in_order():
    """Through ``unlearn.unlearn`` (ensemble engine, 2 replicas): NaN forget images leave fine-tuning
    finite and bit-identical, NaN retain images make every replica diverge."""
    stacked = jax.tree_util.tree_map(lambda leaf: np.stack([leaf, leaf * 0.5]), PRETRAINED)
    config = dataclasses.replace(EXPECTED["finetune"].config, epochs=1)

    def run(images):
        return unlearn.unlearn(config, MODEL, stacked, images, LABELS, NORM, FORGET, RunOptions(seed=3, progress=False),
                               keep_variables=True)

    clean, untouched, spoiled = run(IMAGES), run(poisoned(IMAGES, FORGET)), run(poisoned(IMAGES, RETAIN))
    assert not clean.diverged.any() and not untouched.diverged.any()
    assert identical(untouched.variables[1]["params"], clean.variables[1]["params"])
    assert spoiled.diverged.all()


# --------------------------------------------------------------------------------------------
# The study's wiring: scoring direction, positions, oracle halves


def definition_klom(oracle: np.ndarray, unlearned: np.ndarray, bins: int = 20, eps: float = 1e-5) -> float:
    """Definition 3 for one point, written out: KL(H(oracle) || H(unlearned)), joint-range bins, eps floor."""
    lo, hi = min(oracle.min(), unlearned.min()), max(oracle.max(), unlearned.max())
    hi = lo + 1 if lo == hi else hi
    p = np.histogram(oracle, bins, (lo, hi))[0] / len(oracle)
    q = np.histogram(unlearned, bins, (lo, hi))[0] / len(unlearned)
    q = np.where((p > 0) & (q < eps), eps, q)
    q = q / q.sum()
    mass = p > 0
    return float(np.sum(p[mass] * np.log(p[mass] / q[mass])))


def planted_study_case():
    """12 points (4 forget, 4 retain, 4 val); 4 oracles all at m_j, 8 unlearned models, c of them at m_j
    and the rest at m_j + 10. KLoM(oracle || unlearned) = log(n / c) exactly; the reverse is 0.9 or more
    larger (the unlearned mass at m_j + 10 meets the eps floor)."""
    hits_a = np.array([1, 1, 2, 4, 3, 2, 1, 4, 1, 2, 3, 4])  # unlearned models 0..3 at the oracle's value
    hits_b = np.array([1, 2, 3, 1, 3, 2, 4, 3, 3, 1, 4, 2])  # unlearned models 4..7
    centre = np.linspace(-3, 5, 12)
    oracle = np.broadcast_to(centre, (4, 12)).astype(np.float64)
    unlearned = np.empty((8, 12))
    for j in range(12):
        unlearned[:4, j] = centre[j] + 10 * (np.arange(4) >= hits_a[j])
        unlearned[4:, j] = centre[j] + 10 * (np.arange(4) >= hits_b[j])
    positions = {"forget": np.arange(0, 4), "retain": np.arange(4, 8), "val": np.arange(8, 12)}
    return oracle, unlearned, hits_a, hits_b, positions


def test_score_measures_kl_of_oracle_against_unlearned_not_the_reverse():
    oracle, unlearned, hits_a, hits_b, positions = planted_study_case()
    correct = np.zeros((8, 12), bool)
    correct[:, positions["forget"]] = True
    correct[:2, positions["val"]] = True  # replicas 0-1 (half A) right on val, half B wrong
    expected = np.log(8 / (hits_a + hits_b))
    expected_a, expected_b = np.log(4 / hits_a), np.log(4 / hits_b)
    for j in range(12):  # the closed form is Definition 3, and the case is far from symmetric
        assert definition_klom(oracle[:, j], unlearned[:, j]) == pytest.approx(expected[j], abs=1e-12)
        assert definition_klom(oracle[:, j], unlearned[:4, j]) == pytest.approx(expected_a[j], abs=1e-12)
        assert definition_klom(unlearned[:, j], oracle[:, j]) > expected[j] + 0.5
    np.testing.assert_allclose(klom.klom(oracle, unlearned), expected, atol=1e-12)

    row = study.score(oracle, unlearned, correct, positions)
    for split, where in positions.items():
        assert row[f"klom_p95_{split}"] == pytest.approx(np.percentile(expected[where], 95), abs=1e-12), split
        assert row[f"klom_mean_{split}"] == pytest.approx(np.mean(expected[where]), abs=1e-12), split
    forget = positions["forget"]
    assert row["klom_p95_forget_a"] == pytest.approx(np.percentile(expected_a[forget], 95), abs=1e-12)
    assert row["klom_p95_forget_b"] == pytest.approx(np.percentile(expected_b[forget], 95), abs=1e-12)
    assert (row["acc_forget"], row["acc_retain"], row["acc_val"]) == (1.0, 0.0, 0.25)
    assert (row["acc_val_a"], row["acc_val_b"]) == (0.5, 0.0)
    gap = 10 * (8 - hits_a - hits_b) / 8  # mean unlearned margin minus the oracles'
    assert row["margin_mae_forget"] == pytest.approx(np.mean(gap[forget]))
    assert row["margin_mae_retain"] == pytest.approx(np.mean(gap[positions["retain"]]))


def test_study_positions_put_each_forget_point_where_the_study_subset_has_it():
    subset = np.array([3, 8, 10, 11, 20, 31, 40])  # full-split indices of the study's points, sorted
    forget = np.array([31, 8])
    fake = types.SimpleNamespace(setup=types.SimpleNamespace(subset=subset, test_labels=np.zeros(3, np.int32)),
                                 num_train=len(subset))
    positions = study.Study.positions(fake, forget)
    assert sorted(subset[positions["forget"]].tolist()) == [8, 31]
    assert positions["retain"].tolist() == [0, 2, 3, 4, 6]
    assert positions["val"].tolist() == [7, 8, 9]


def test_split_oracles_gives_disjoint_halves_in_order():
    oracles = {"params": {"w": np.arange(6.0)[:, None] * np.ones((6, 2))}, "batch_stats": {}}
    head, tail = unlearn.split_oracles(oracles, 3)
    assert head["params"]["w"][:, 0].tolist() == [0, 1, 2] and tail["params"]["w"][:, 0].tolist() == [3, 4, 5]
    head, tail = unlearn.split_oracles(oracles, 2)
    assert head["params"]["w"][:, 0].tolist() == [0, 1] and tail["params"]["w"][:, 0].tolist() == [2, 3, 4, 5]
