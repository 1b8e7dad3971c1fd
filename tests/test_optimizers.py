"""Optimisers as declared data, OM's conventions and the grids a method declares.

* ``Optimizer.build`` follows PyTorch: coupled weight decay, SGD momentum without dampening,
  Adam's defaults -- checked against the update rules written out by hand.
* The driver sets epoch e's rate to ``lr * epoch_decay ** e``; SCRUB's step decay multiplies it.
* OM's ``loss="sum"`` at rate lr is ``loss="mean"`` at rate C*lr under plain SGD (C classes);
  ``target="mean"`` equals matching every replica to the mean target by hand; ``target_rows``
  keeps matching on the rows with targets, and the other rows are never read.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from ascent_jax import models, unlearn
from ascent_jax.ensemble import RunOptions
from ascent_jax.unlearn import base, grids, matching

K, NUM_TRAIN, NUM_CLASSES = 2, 96, 10
FORGET = np.arange(0, 96, 8).astype(np.int32)  # 12 points


@pytest.fixture(scope="module")
def tiny(fashion_small, fashion_norm):
    """A 2-replica MLP with random weights on 96 Fashion-MNIST images, and per-replica targets."""
    images, labels = fashion_small[0][:NUM_TRAIN], fashion_small[1][:NUM_TRAIN]
    model = models.build("mlp", NUM_CLASSES, hidden=(16,))
    keys = jax.random.split(jax.random.key(0), K)
    pretrained = jax.device_get(jax.vmap(lambda key: model.init(key, (28, 28, 1)))(keys))
    targets = 3 * np.random.default_rng(1).standard_normal((K, NUM_TRAIN, NUM_CLASSES)).astype(np.float32)
    return model, fashion_norm, images, labels, pretrained, targets


def run(tiny, config, **inputs):
    model, norm, images, labels, pretrained, targets = tiny
    inputs.setdefault("targets", targets if unlearn.get(config).needs_targets else None)
    return unlearn.unlearn(config, model, pretrained, images, labels, norm, FORGET,
                           RunOptions(seed=3, progress=False), keep_variables=True, **inputs)


def _quadratic_grads(params):
    return jax.tree_util.tree_map(lambda p: 2 * p - 1, params)  # gradient of sum (p^2 - p)


def test_sgd_with_momentum_and_weight_decay_is_pytorchs_rule():
    spec = unlearn.Optimizer("sgd", momentum=0.9, weight_decay=5e-4)
    lr, params = 0.1, {"w": np.array([0.3, -1.2, 2.0], np.float32)}
    tx = spec.build(lr)
    state, p = tx.init(params), params
    buf, expected = np.zeros(3), params["w"].astype(np.float64)
    for _ in range(3):
        updates, state = tx.update(_quadratic_grads(p), state, p)
        p = jax.tree_util.tree_map(lambda a, u: a + u, p, updates)
        g = 2 * expected - 1 + 5e-4 * expected  # torch.optim.SGD: d_p = grad + wd * p
        buf = 0.9 * buf + g  # buf = momentum * buf + d_p (dampening 0; first step buf = d_p)
        expected = expected - lr * buf
    np.testing.assert_allclose(p["w"], expected, rtol=1e-5)


def test_adam_with_weight_decay_is_pytorchs_rule():
    spec = unlearn.Optimizer("adam", weight_decay=1e-2)
    lr, params = 1e-2, {"w": np.array([0.3, -1.2, 2.0], np.float32)}
    tx = spec.build(lr)
    state, p = tx.init(params), params
    m, v, expected = np.zeros(3), np.zeros(3), params["w"].astype(np.float64)
    for step in range(1, 4):
        updates, state = tx.update(_quadratic_grads(p), state, p)
        p = jax.tree_util.tree_map(lambda a, u: a + u, p, updates)
        g = 2 * expected - 1 + 1e-2 * expected  # torch.optim.Adam: coupled L2
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        expected = expected - lr * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
    np.testing.assert_allclose(p["w"], expected, rtol=1e-5)


def test_describe_names_what_differs_from_plain_sgd():
    assert unlearn.PLAIN_SGD.describe() == "sgd"
    assert unlearn.Optimizer("sgd", 0.9, 5e-4).describe() == "sgd, momentum 0.9, wd 0.0005"
    assert matching.AUTHORS_OPTIMIZER.describe() == "adam, decay 0.95/epoch"


@dataclasses.dataclass(frozen=True)
class _RateProbe(unlearn.MethodConfig):
    lr: float
    epochs: int
    optimizer: unlearn.Optimizer = unlearn.Optimizer("adam", epoch_decay=0.5)


def _report_rate(state, data, key, epoch_index, cfg):
    """Reports the learning rate the driver set."""
    return state, {"rate": unlearn.learning_rate(state)}


def test_the_driver_sets_each_epochs_rate_from_the_optimizers_decay(tiny, monkeypatch):
    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))
    unlearn.register("rate_probe", _RateProbe, _report_rate)
    result = run(tiny, _RateProbe(lr=0.3, epochs=4))
    np.testing.assert_allclose(result.metrics["rate"], 0.3 * 0.5 ** np.arange(4)[:, None] * np.ones((1, K)), rtol=1e-6)
    # SCRUB multiplies its step decay (x0.1 after epoch 1 here) into the optimiser's per-epoch rate
    config = unlearn.ScrubConfig(lr=0.2, epochs=3, ascent_epochs=1, lr_decay_after=(1,),
                                 optimizer=unlearn.Optimizer("sgd", momentum=0.9, epoch_decay=0.5))
    rates = run(tiny, config).metrics["lr"][:, 0]
    np.testing.assert_allclose(rates, [0.2, 0.2 * 0.5 * 0.1, 0.2 * 0.25 * 0.1], rtol=1e-6)


def test_summed_loss_at_rate_lr_is_the_class_mean_loss_at_rate_c_times_lr(tiny):
    common = dict(epochs=2, retain_multiple=1.0, batch_size=16, target="per_replica", optimizer=unlearn.PLAIN_SGD)
    summed = run(tiny, unlearn.OracleMatchingConfig(lr=1e-3, loss="sum", **common))
    averaged = run(tiny, unlearn.OracleMatchingConfig(lr=NUM_CLASSES * 1e-3, loss="mean", **common))
    np.testing.assert_allclose(summed.margins[2], averaged.margins[2], rtol=1e-4, atol=1e-4)
    smaller = run(tiny, unlearn.OracleMatchingConfig(lr=1e-3, loss="mean", **common))
    assert np.abs(smaller.margins[2] - summed.margins[2]).max() > 1e-3  # the factor C is real


def test_mean_target_matches_every_replica_to_the_mean_of_the_targets(tiny):
    targets = tiny[-1]
    config = unlearn.OracleMatchingConfig(lr=1e-2, epochs=2)
    assert config.target == "mean"
    mean = run(tiny, config)
    by_hand = run(tiny, dataclasses.replace(config, target="per_replica"),
                  targets=np.broadcast_to(targets.mean(axis=0), targets.shape))
    np.testing.assert_allclose(mean.margins[2], by_hand.margins[2], rtol=1e-5, atol=1e-5)
    own = run(tiny, dataclasses.replace(config, target="per_replica"))
    assert np.abs(own.margins[2] - mean.margins[2]).max() > 1e-2
    np.testing.assert_array_equal(matching.prepare_targets(dataclasses.replace(config, target="per_replica"), targets),
                                  targets)


def test_target_rows_keep_matching_where_targets_exist_and_never_read_the_rest(tiny):
    model, norm, images, labels, pretrained, targets = tiny
    retain = np.setdiff1d(np.arange(NUM_TRAIN), FORGET)
    pool = retain[::3]  # 28 retain points have targets
    rows = np.concatenate([FORGET, pool])
    config = unlearn.OracleMatchingConfig(lr=1e-2, epochs=2, retain_multiple=2.0, batch_size=16)
    unknown = np.setdiff1d(np.arange(NUM_TRAIN), rows)
    nan_elsewhere = targets.copy()
    nan_elsewhere[:, unknown] = np.nan
    first = run(tiny, config, targets=nan_elsewhere, target_rows=rows)
    assert not first.diverged.any()  # NaN targets outside the rows are never read...
    other_values = targets.copy()
    other_values[:, unknown] = 1e6
    second = run(tiny, config, targets=other_values, target_rows=rows)
    np.testing.assert_array_equal(first.margins[2], second.margins[2])  # ...whatever they are
    # ...and neither are the images of retain points without targets: the sample comes from the pool
    poisoned = images.astype(np.float32)
    poisoned[np.setdiff1d(retain, pool)] = np.nan
    third = unlearn.unlearn(config, model, pretrained, poisoned, labels, norm, FORGET, RunOptions(seed=3, progress=False),
                            targets=targets, target_rows=rows)
    assert not third.diverged.any()
    with pytest.raises(ValueError, match="target_rows must contain every forget index"):
        run(tiny, config, target_rows=pool)
    with pytest.raises(ValueError, match="target_rows hold no retain point"):
        run(tiny, config, target_rows=FORGET)
    with pytest.raises(ValueError, match="takes no targets"):
        run(tiny, unlearn.GradientAscentConfig(lr=1e-3, epochs=1), target_rows=rows)


def test_a_method_declares_its_grids_and_the_presets_read_them(monkeypatch):
    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))
    unlearn.register("rate_probe", _RateProbe, _report_rate, grids={"quick": {"lr": (1e-3, 1e-2), "epochs": (1, 2)}})
    assert grids.presets()["quick"]["rate_probe"] == {"lr": (1e-3, 1e-2), "epochs": (1, 2)}
    assert len(grids.expand("rate_probe", "quick")) == 4
    assert "rate_probe" not in grids.presets()["paper"]

    @dataclasses.dataclass(frozen=True)
    class Other(unlearn.MethodConfig):
        lr: float
        epochs: int

    with pytest.raises(ValueError, match="grid 'quick' of method 'other' must map fields of Other to non-empty tuples "
                                         "of values; it names momentum"):
        unlearn.register("other", Other, _report_rate, grids={"quick": {"lr": (1e-3,), "momentum": (0.9,)}})
    with pytest.raises(ValueError, match="must map fields of Other to non-empty tuples"):
        unlearn.register("other", Other, _report_rate, grids={"quick": {"lr": [1e-3]}})


def test_the_benchmark_preset_runs_every_method_under_plain_sgd_and_the_paper_preset_under_the_authors():
    for method in grids.presets()["benchmark"]:
        assert {c.optimizer for c in grids.expand(method, "benchmark")} == {unlearn.PLAIN_SGD}, method
        default = unlearn.get(method).config.__dataclass_fields__["optimizer"].default
        assert {c.optimizer for c in grids.expand(method, "paper")} == {default}, method
    assert unlearn.GradientAscentConfig(lr=1e-3, epochs=1).optimizer == unlearn.Optimizer("sgd", momentum=0.9)
    assert unlearn.ScrubConfig(lr=1e-3, epochs=1, ascent_epochs=1).optimizer == unlearn.Optimizer(
        "sgd", momentum=0.9, weight_decay=5e-4)
    om = unlearn.OracleMatchingConfig(lr=5e-4, epochs=1)
    assert (om.optimizer, om.batch_size, om.retain_multiple, om.target, om.loss, om.resample) == (
        unlearn.Optimizer("adam", epoch_decay=0.95), 512, 3.0, "mean", "sum", False)
