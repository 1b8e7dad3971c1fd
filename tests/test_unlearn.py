"""Unlearning methods on a tiny MLP: purity, vmap == single replica, each method's defining property.

Every method runs once per session in a "standard" run (3 replicas, 256 Fashion-MNIST training
images, 20 forget points, every epoch snapshotted); the tests share those runs and their
compiled programs, so the whole file stays well under a minute on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascent_jax import batches, ensemble, klom, models, train, unlearn
from ascent_jax.ensemble import RunOptions
from ascent_jax.models import Model, layers
from ascent_jax.unlearn import base, grids, matching, scrub

K, SEED, NUM_TRAIN, NUM_TEST = 3, 7, 256, 64
PRETRAIN = train.TrainConfig(epochs=3, batch_size=64, peak_lr=0.1)
CONFIGS = {
    "do_nothing": unlearn.DoNothingConfig(),
    "ga": unlearn.GradientAscentConfig(lr=1e-2, epochs=3),
    "gda": unlearn.GradientDescentAscentConfig(lr=1e-2, epochs=3, ascent_epochs=2),
    "finetune": unlearn.FineTuneConfig(lr=1e-2, epochs=3),
    "scrub": unlearn.ScrubConfig(lr=1e-2, epochs=3, ascent_epochs=2),
    # matching under plain SGD with the class-mean loss and per-replica targets (the defining properties below)
    "om": unlearn.OracleMatchingConfig(lr=5e-2, epochs=3, retain_multiple=1.2, batch_size=64, target="per_replica",
                                       loss="mean", optimizer=unlearn.PLAIN_SGD),
    "dmm": unlearn.DatamodelMatchingConfig(lr=1e-2, epochs=3, retain_multiple=1.2, batch_size=64),
    "dmm_margin": unlearn.MarginDatamodelMatchingConfig(lr=1e-2, epochs=3, retain_multiple=1.2, batch_size=64),
    "retrain": unlearn.RetrainConfig(PRETRAIN),
}


@dataclasses.dataclass(frozen=True)
class Setup:
    model: Model
    norm: train.Normalization
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    forget: np.ndarray
    retain: np.ndarray
    pretrained: dict
    targets: np.ndarray

    def inputs(self, name):
        return {"targets": self.targets} if base.get(name).needs_targets else {}


@pytest.fixture(scope="module")
def setup(fashion_small, fashion_norm):
    """3 MLPs pretrained on 236 of the 256 points (forget set included, 20 other points left out).

    236 is also the retain-set size, so pretraining and the retraining check share one compiled
    program. OM's toy targets: replica i's target logits say "label + i + 1" (5 on that class).
    """
    x, y, x_test, y_test = (a[:n] for a, n in zip(fashion_small, (NUM_TRAIN, NUM_TRAIN, NUM_TEST, NUM_TEST)))
    forget = np.sort(np.random.default_rng(0).choice(NUM_TRAIN, 20, replace=False)).astype(np.int32)
    retain = batches.retain_indices(NUM_TRAIN, forget)
    subset = np.sort(np.concatenate([forget, retain[20:]]))
    model = models.build("mlp", 10, hidden=(32,))
    pretrained = train.train_ensemble(model, PRETRAIN, x, y, fashion_norm, RunOptions(progress=False), num_members=K,
                                      subsets=np.broadcast_to(subset, (K, len(subset)))).states
    targets = 5.0 * np.stack([np.eye(10, dtype=np.float32)[(y + i + 1) % 10] for i in range(K)])
    return Setup(model, fashion_norm, x, y, x_test, y_test, forget, retain, pretrained, targets)


@pytest.fixture(scope="module")
def standard(setup):
    """``standard(name)``: the session's run of ``CONFIGS[name]`` (computed once)."""
    return functools.cache(lambda name: run(setup, CONFIGS[name], **setup.inputs(name)))


def run(setup, config, *, pretrained=None, chunk_size="auto", **inputs):
    inputs.setdefault("snapshot_epochs", range(1, config.epochs + 1))
    return unlearn.unlearn(config, setup.model, setup.pretrained if pretrained is None else pretrained,
                           setup.x, setup.y, setup.norm, setup.forget,
                           RunOptions(seed=SEED, progress=False, chunk_size=chunk_size), test_images=setup.x_test,
                           test_labels=setup.y_test, keep_variables=True, **inputs)


def take(tree, rows):
    return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[rows], tree)


def eval_cross_entropy(setup, variables, indices):
    logits = train.predict(setup.model, variables, setup.x[indices], setup.norm)
    labels = jnp.asarray(setup.y[indices])
    return np.asarray(jax.vmap(lambda z: train.cross_entropy(z, labels, jnp.ones(len(labels), bool)))(logits))


# --------------------------------------------------------------------------------------------
# Configs and registry


@pytest.mark.parametrize("make, message", [
    (lambda: unlearn.GradientAscentConfig(lr=float("nan"), epochs=1), "lr must be a positive finite"),
    (lambda: unlearn.GradientAscentConfig(lr=-1e-3, epochs=1), "lr must be a positive finite"),
    (lambda: unlearn.GradientAscentConfig(lr=float("inf"), epochs=1), "lr must be a positive finite"),
    (lambda: unlearn.GradientAscentConfig(lr=1e-3, epochs=0), "epochs must be a positive integer"),
    (lambda: unlearn.GradientAscentConfig(lr=1e-3, epochs=True), "epochs must be a positive integer"),
    (lambda: unlearn.FineTuneConfig(lr=1e-3, epochs=2, batch_size=0), "batch_size must be a positive integer"),
    (lambda: unlearn.GradientDescentAscentConfig(lr=1e-3, epochs=5, ascent_epochs=-1), "ascent_epochs must be"),
    (lambda: unlearn.ScrubConfig(lr=1e-3, epochs=5, ascent_epochs=2, temperature=0.0), "temperature"),
    (lambda: unlearn.ScrubConfig(lr=1e-3, epochs=5, ascent_epochs=2, lr_decay_after=[3]), "lr_decay_after"),
    (lambda: unlearn.OracleMatchingConfig(lr=1e-3, epochs=2, retain_multiple=0.0), "retain_multiple must be a pos"),
    (lambda: unlearn.OracleMatchingConfig(lr=1e-3, epochs=2, target="oracle"), "target must be one of mean, per_re"),
    (lambda: unlearn.OracleMatchingConfig(lr=1e-3, epochs=2, loss="l1"), "loss must be one of sum, mean"),
    (lambda: unlearn.OracleMatchingConfig(lr=1e-3, epochs=2, resample=1), "resample must be True or False"),
    (lambda: unlearn.OracleMatchingConfig(lr=1e-3, epochs=2, optimizer="adam"), "optimizer must be an ascent_jax"),
    (lambda: unlearn.Optimizer("rmsprop"), "optimizer rule must be one of sgd, adam, got 'rmsprop'"),
    (lambda: unlearn.Optimizer("adam", momentum=0.9), "momentum applies to sgd only"),
    (lambda: unlearn.Optimizer(momentum=1.0), r"momentum must lie in \[0, 1\)"),
    (lambda: unlearn.Optimizer(epoch_decay=0.0), r"epoch_decay must lie in \(0, 1\]"),
    (lambda: unlearn.Optimizer(weight_decay=-1e-4), "weight_decay must be a non-negative finite"),
    (lambda: unlearn.RetrainConfig(train={"epochs": 3}), "must be a TrainConfig"),
])
def test_configs_reject_bad_hyperparameters(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_registry_finds_every_method_by_name_and_config():
    assert set(unlearn.names()) == set(CONFIGS)
    for name, config in CONFIGS.items():
        assert unlearn.get(config).name == name and unlearn.get(name).config is type(config)
    assert unlearn.make("ga", lr=1e-3, epochs=2) == unlearn.GradientAscentConfig(lr=1e-3, epochs=2)
    with pytest.raises(ValueError, match="already registered"):
        unlearn.register("ga", unlearn.GradientAscentConfig, lambda *args: args)
    with pytest.raises(ValueError, match="unknown unlearning method"):
        unlearn.get("gradient_ascent")
    with pytest.raises(ValueError, match="not the config of a registered"):
        unlearn.get(PRETRAIN)


def test_driver_rejects_bad_inputs(setup):
    ga, om = CONFIGS["ga"], CONFIGS["om"]
    call = functools.partial(unlearn.unlearn, model=setup.model, images=setup.x, labels=setup.y, norm=setup.norm,
                             options=RunOptions(progress=False))
    with pytest.raises(ValueError, match="duplicates"):
        call(ga, pretrained=setup.pretrained, forget=np.array([1, 1]))
    with pytest.raises(ValueError, match="must lie in"):
        call(ga, pretrained=setup.pretrained, forget=np.array([NUM_TRAIN]))
    with pytest.raises(ValueError, match="snapshot epochs"):
        call(ga, pretrained=setup.pretrained, forget=setup.forget, snapshot_epochs=[4])
    with pytest.raises(ValueError, match="needs targets"):
        call(om, pretrained=setup.pretrained, forget=setup.forget)
    with pytest.raises(ValueError, match="targets must have shape"):
        call(om, pretrained=setup.pretrained, forget=setup.forget, targets=setup.targets[:2])
    with pytest.raises(ValueError, match="takes no targets"):
        call(ga, pretrained=setup.pretrained, forget=setup.forget, targets=setup.targets)
    with pytest.raises(ValueError, match="pass their stacked variables"):
        call(ga, pretrained=None, forget=setup.forget)


# --------------------------------------------------------------------------------------------
# Purity, determinism, vmap == single replica


def test_gradient_step_is_pure_and_deterministic(setup):
    variables = take(setup.pretrained, 0)
    optimizer = unlearn.PLAIN_SGD.build(0.1)
    state = train.TrainState(variables, optimizer.init(variables["params"]))
    before = jax.tree_util.tree_map(np.array, state)
    batch = batches.Batch(batches.normalize(jnp.asarray(setup.x[:8]), *setup.norm), jnp.asarray(setup.y[:8]),
                          jnp.ones(8, bool))

    @jax.jit
    def step(state, batch):
        return unlearn.gradient_step(state, batch, lambda z: train.cross_entropy(z, batch.y, batch.valid), setup.model,
                                     optimizer)

    first, second = step(state, batch), step(state, batch)
    chex.assert_trees_all_equal(first, second)
    chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, state), before)

    @jax.jit
    def by_hand(variables):
        def loss(params):
            logits = setup.model.apply({**variables, "params": params}, batch.x, True)[0]
            return train.cross_entropy(logits, batch.y, batch.valid)

        grads = jax.grad(loss)(variables["params"])
        return jax.tree_util.tree_map(lambda w, g: w - 0.1 * g, variables["params"], grads)

    chex.assert_trees_all_close(first[0].variables["params"], by_hand(variables), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_method_is_deterministic_and_leaves_its_inputs_untouched(setup, standard, name):
    pretrained = jax.tree_util.tree_map(np.copy, setup.pretrained)
    again = run(setup, CONFIGS[name], pretrained=pretrained, **setup.inputs(name))
    first = standard(name)
    for epoch, margins in first.margins.items():
        np.testing.assert_array_equal(again.margins[epoch], margins)
    chex.assert_trees_all_equal(again.variables, first.variables)
    chex.assert_trees_all_equal(pretrained, setup.pretrained)
    assert not first.diverged.any() and (first.diverged_epoch == -1).all()
    assert first.margins[CONFIGS[name].epochs].shape == (K, NUM_TRAIN + NUM_TEST)


@pytest.mark.parametrize("name", ["om", pytest.param("ga", marks=pytest.mark.slow),
                                  pytest.param("scrub", marks=pytest.mark.slow)])
def test_vmapped_replicas_equal_replicas_run_alone(setup, standard, name):
    """K=3 replicas vmapped together == each replica alone (chunks of 1) == replica 2 run by itself."""
    together = standard(name)
    alone = run(setup, CONFIGS[name], chunk_size=1, **setup.inputs(name))
    only_two = run(setup, CONFIGS[name], pretrained=take(setup.pretrained, slice(2, 3)), first_member=2,
                   **({"targets": setup.targets[2:3]} if name == "om" else {}))
    for epoch in together.margins:
        np.testing.assert_allclose(alone.margins[epoch], together.margins[epoch], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(only_two.margins[epoch][0], together.margins[epoch][2], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(take(only_two.variables[3], 0), take(together.variables[3], 2), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# What each method does


def test_do_nothing_returns_the_pretrained_margins_on_train_then_test(setup, standard):
    images = np.concatenate([setup.x, setup.x_test])
    labels = np.concatenate([setup.y, setup.y_test])
    expected = klom.margins(train.predict(setup.model, setup.pretrained, images, setup.norm), labels)
    np.testing.assert_allclose(standard("do_nothing").margins[1], expected, rtol=1e-5, atol=1e-5)


def test_gradient_ascent_increases_the_forget_loss(setup, standard):
    result = standard("ga")
    assert (np.diff(result.metrics["forget_loss"], axis=0) > 0).all()
    before = eval_cross_entropy(setup, setup.pretrained, setup.forget)
    after = eval_cross_entropy(setup, result.variables[3], setup.forget)
    assert (after > before + 0.05).all(), (before, after)


def test_gda_without_ascent_is_fine_tuning(setup, standard):
    gda = run(setup, unlearn.GradientDescentAscentConfig(lr=1e-2, epochs=3, ascent_epochs=0))
    finetune = standard("finetune")
    for epoch in finetune.margins:
        np.testing.assert_allclose(gda.margins[epoch], finetune.margins[epoch], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(gda.metrics["forget_loss"], 0.0)
    # ...and with ascent it is not: the forget loss goes up in the ascent epochs.
    with_ascent = standard("gda")
    assert (with_ascent.metrics["forget_loss"][:2] > 0).all() and (with_ascent.metrics["forget_loss"][2] == 0).all()
    assert np.abs(with_ascent.margins[3] - finetune.margins[3])[:, setup.forget].max() > 1e-3


def test_scrub_moves_the_student_and_never_the_teacher(setup, standard):
    result = standard("scrub")
    student = result.variables[3]["params"]
    moved = max(float(np.abs(a - b).max()) for a, b in
                zip(jax.tree_util.tree_leaves(student), jax.tree_util.tree_leaves(setup.pretrained["params"])))
    assert moved > 1e-3
    pretrained_margins = klom.margins(train.predict(setup.model, setup.pretrained, setup.x, setup.norm), setup.y)
    assert np.abs(result.margins[3][:, setup.forget] - np.asarray(pretrained_margins)[:, setup.forget]).max() > 1e-2
    # The teacher is the unchanged pretrained model: in epoch 1 the student starts equal to it (KL = 0
    # and zero gradient), by epoch 2 it has moved away and the max-pass measures a positive KL.
    np.testing.assert_allclose(result.metrics["forget_kl"][0], 0.0, atol=1e-6)
    assert (result.metrics["forget_kl"][1] > 1e-4).all()


def test_scrub_learning_rate_decays_after_epochs_3_5_9():
    config = unlearn.ScrubConfig(lr=0.5, epochs=12, ascent_epochs=3)
    rates = np.asarray(jax.vmap(lambda e: scrub.scrub_learning_rate(config, e))(jnp.arange(12)))
    factors = [1, 1, 1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001]
    np.testing.assert_allclose(rates, 0.5 * np.array(factors), rtol=1e-6)


def test_scrub_reports_the_learning_rate_it_used(standard):
    np.testing.assert_allclose(standard("scrub").metrics["lr"], CONFIGS["scrub"].lr, rtol=1e-6)


def test_oracle_matching_moves_each_replica_to_its_own_target(setup, standard):
    result = standard("om")

    def distances(variables, points):
        logits = train.predict(setup.model, variables, setup.x[points], setup.norm)  # (K, n, C)
        return np.mean((logits[:, None] - setup.targets[None, :, points]) ** 2, axis=(2, 3))  # replica x target

    for points in (setup.forget, np.arange(NUM_TRAIN)):
        before, after = distances(setup.pretrained, points), distances(result.variables[3], points)
        own_before, own_after = np.diag(before), np.diag(after)
        others_after = np.where(np.eye(K, dtype=bool), np.inf, after).min(axis=1)
        assert (own_after < 0.3 * own_before).all(), (own_before, own_after)
        assert (own_after < 0.9 * others_after).all(), after  # replica i matched target i, not another
    assert (np.diff(result.metrics["matching_loss"], axis=0) < 0).all()


def test_retraining_equals_training_on_the_retain_set(setup, standard):
    result = standard("retrain")
    expected = train.train_ensemble(setup.model, PRETRAIN, setup.x, setup.y, setup.norm,
                                    RunOptions(seed=unlearn.derived_seed(SEED, "retrain"), progress=False),
                                    num_members=K, subsets=np.broadcast_to(setup.retain, (K, len(setup.retain))))
    chex.assert_trees_all_close(result.variables[3], expected.states, rtol=1e-5, atol=1e-6)
    assert unlearn.derived_seed(SEED, "retrain") != SEED
    # Partial retraining: the snapshot after k epochs is the model after k epochs of the same schedule.
    assert np.abs(result.margins[1] - result.margins[3]).max() > 0.1
    assert result.metrics["loss"].shape == (PRETRAIN.epochs, K) and np.isfinite(result.metrics["loss"]).all()


# --------------------------------------------------------------------------------------------
# Snapshots, checkpoints, divergence, batch norm


def test_snapshots_are_the_margins_of_the_model_at_that_epoch(setup, standard):
    result = standard("ga")
    images = np.concatenate([setup.x, setup.x_test])
    labels = np.concatenate([setup.y, setup.y_test])
    for epoch, variables in result.variables.items():
        expected = klom.margins(train.predict(setup.model, variables, images, setup.norm), labels)
        np.testing.assert_allclose(result.margins[epoch], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # one more compilation; the property holds by construction (epochs only sets the loop length)
def test_a_shorter_run_equals_the_snapshot_of_a_longer_one(setup, standard):
    shorter = run(setup, dataclasses.replace(CONFIGS["ga"], epochs=1))
    np.testing.assert_allclose(shorter.margins[1], standard("ga").margins[1], rtol=1e-5, atol=1e-6)


def test_interrupted_run_resumes_with_its_earlier_snapshots(setup, standard, tmp_path, monkeypatch):
    epochs_saved = []
    real_run = ensemble.run

    def crash_after_epoch_2(*args, on_epoch, **kwargs):
        def then_crash(members, epoch, states, metrics):
            on_epoch(members, epoch, states, metrics)  # the snapshot is taken and saved
            epochs_saved.append(epoch)
            if epoch == 2:
                raise KeyboardInterrupt("simulated crash after epoch 2")
        return real_run(*args, on_epoch=then_crash, **kwargs)

    monkeypatch.setattr(ensemble, "run", crash_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(setup, CONFIGS["ga"], checkpoint_dir=tmp_path)
    monkeypatch.undo()
    assert ensemble.finished_epochs(tmp_path) == [1]  # epoch 2's snapshot was saved, its checkpoint not
    resumed = run(setup, CONFIGS["ga"], checkpoint_dir=tmp_path)
    finished = run(setup, CONFIGS["ga"], checkpoint_dir=tmp_path)  # everything read back from disk
    expected = standard("ga")
    assert epochs_saved == [1, 2]
    for result in (resumed, finished):
        for epoch in expected.margins:
            np.testing.assert_allclose(result.margins[epoch], expected.margins[epoch], rtol=1e-6)
        chex.assert_trees_all_close(result.variables, expected.variables, rtol=1e-6)
        np.testing.assert_array_equal(result.metrics["forget_loss"], expected.metrics["forget_loss"])


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # the runner's progress bar averages NaN losses
def test_divergence_is_data_and_never_stops_a_grid(setup, standard):
    exploding = unlearn.GradientAscentConfig(lr=1e30, epochs=2)
    configs = [dataclasses.replace(exploding, epochs=1), exploding, CONFIGS["ga"]]
    results = grids.sweep(configs, setup.model, setup.pretrained, setup.x, setup.y, setup.norm, setup.forget,
                          RunOptions(seed=SEED, progress=False))
    assert [r.config for r in results] == configs
    blown = results[1]
    assert blown.diverged.all() and (blown.diverged_epoch >= 1).all()
    assert not np.isfinite(blown.margins).all()
    assert blown.margins.shape == (K, NUM_TRAIN)
    assert not results[2].diverged.any()
    np.testing.assert_allclose(results[2].margins, standard("ga").margins[3][:, :NUM_TRAIN], rtol=1e-6)
    table = grids.table(results)
    assert table["diverged_fraction"].tolist() == [float(results[0].diverged.mean()), 1.0, 0.0]


class _BatchNormMLP(nn.Module):
    """Dense -> batch norm -> ReLU -> Dense, with the masked batch statistics of the real models."""

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        x = layers.dense(16, 784, dtype=jnp.float32)(x.reshape(x.shape[0], -1))
        x = layers.batch_norm(train, jnp.float32)(x, mask=layers.example_mask(mask, x) if train else None)
        return layers.dense(10, 16, dtype=jnp.float32)(nn.relu(x))


def _batch_norm_model() -> Model:
    module = _BatchNormMLP()

    def init(key, input_shape):
        variables = module.init(key, jnp.zeros((1, *input_shape)), train=False)
        return {"params": variables["params"], "batch_stats": variables["batch_stats"]}

    def apply(variables, x, train, mask=None):
        if not train:
            return module.apply(variables, x, train=False), variables["batch_stats"]
        logits, updates = module.apply(variables, x, train=True, mask=mask, mutable=["batch_stats"])
        return logits, updates["batch_stats"]

    return Model("bn_mlp", init, apply)


@pytest.mark.slow  # its own model: ~10-20 s of compilation on two shared CPU cores
def test_batch_norm_train_mode_for_updates_eval_mode_for_margins_and_teacher(setup):
    model = _batch_norm_model()
    keys = jax.random.split(jax.random.key(1), 2)
    pretrained = jax.device_get(jax.jit(jax.vmap(lambda k: model.init(k, (28, 28, 1))))(keys))
    teacher = jax.tree_util.tree_map(np.copy, pretrained)
    config = unlearn.ScrubConfig(lr=1e-2, epochs=2, ascent_epochs=1)
    result = unlearn.unlearn(config, model, pretrained, setup.x, setup.y, setup.norm, setup.forget,
                             RunOptions(progress=False), keep_variables=True)
    student = result.variables[2]
    chex.assert_trees_all_equal(pretrained, teacher)
    # Running averages moved: updates ran in train mode (the initial mean is 0, the data's is not).
    assert np.abs(student["batch_stats"]["BatchNorm_0"]["mean"]).max() > 1e-3
    # Margins are eval mode (running averages), not batch statistics.
    expected = klom.margins(train.predict(model, student, setup.x, setup.norm), setup.y)
    np.testing.assert_allclose(result.margins[2], expected, rtol=1e-5, atol=1e-5)
    # In train mode the student differs from the eval-mode teacher from the first step, so the
    # first max-pass already sees a positive KL (unlike the batch-norm-free MLP).
    assert (result.metrics["forget_kl"][0] > 1e-4).all()


def test_datamodel_targets_have_exactly_the_predicted_margins():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 5)).astype(np.float32) * 4
    labels = rng.integers(0, 5, 7)
    predicted = rng.normal(size=(3, 7)).astype(np.float32) * 3
    targets = unlearn.datamodel_targets(logits, labels, predicted)
    np.testing.assert_allclose(klom.margins(targets, labels), predicted, rtol=1e-5, atol=1e-5)
    others = np.arange(5) != labels[:, None]
    np.testing.assert_array_equal(targets[:, others], logits[:, others])  # only the true class moves
    with pytest.raises(ValueError, match="need logits"):
        unlearn.datamodel_targets(logits, labels, predicted[:, :3])


@pytest.mark.parametrize("name, expected", [
    ("do_nothing", 0.0),
    ("ga", 3 * 10 / (24 * 90)),  # 3 ascent epochs over 10 forget points / 24 retraining epochs over 90
    ("gda", (2 * 10 + 3 * 90) / (24 * 90)),
    ("finetune", 3 * 90 / (24 * 90)),
    ("scrub", (2 * 10 + 3 * 90) / (24 * 90)),
    ("om", 3 * (10 + 12) / (24 * 90)),  # a retain sample of round(1.2 x 10)
    ("retrain", PRETRAIN.epochs * 90 / (24 * 90)),
])
def test_relative_cost_counts_example_gradients(name, expected):
    assert unlearn.relative_cost(CONFIGS[name], 10, 90, 24) == pytest.approx(expected)


def test_target_sources_are_declared_at_registration():
    assert {name: unlearn.get(name).targets for name in unlearn.names() if unlearn.get(name).needs_targets} == {
        "om": "oracles", "dmm": "class_datamodels", "dmm_margin": "datamodels"}

    @dataclasses.dataclass(frozen=True)
    class Matching(unlearn.MethodConfig):
        lr: float
        epochs: int

    with pytest.raises(ValueError, match=r"targets of method 'matching' must be one of oracles, datamodels, "
                                         r"class_datamodels or None, got 'teacher'"):
        unlearn.register("matching", Matching, lambda state, data, key, epoch_index, cfg: (state, {}), targets="teacher")
    assert "matching" not in unlearn.names()
