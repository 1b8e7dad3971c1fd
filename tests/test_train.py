"""Pretraining recipe and the ensemble boundary: schedule, optimiser, vmap == single, determinism."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import max_abs_diff

from ascent_jax import batches, models, train
from ascent_jax.ensemble import RunOptions, finished_epochs

TINY = train.TrainConfig(epochs=2, batch_size=128, peak_lr=0.1)


def fit(data, norm, *, config=TINY, seed=0, chunk_size="auto", layout="auto", **kwargs):
    x, y = data[0], data[1]
    kwargs.setdefault("num_members", 1)
    options = RunOptions(seed=seed, chunk_size=chunk_size, layout=layout, progress=False)
    return train.train_ensemble(models.build("mlp", 10, hidden=(32,)), config, x, y, norm, options, **kwargs)


def test_triangular_schedule_is_per_step_linear_interpolation():
    config = train.TrainConfig()  # 24 epochs, peak at epoch 5
    steps = 98
    schedule = train.lr_schedule(config, steps)
    t = np.arange(24 * steps + 1)
    expected = np.interp(t, [0, 5 * steps, 24 * steps], [0, 0.4, 0])
    np.testing.assert_allclose(np.asarray(jax.vmap(schedule)(t)), expected, atol=1e-6)


def test_peak_moves_proportionally_with_epochs():
    config = train.TrainConfig(epochs=48)
    schedule = train.lr_schedule(config, 10)
    values = np.asarray(jax.vmap(schedule)(np.arange(480 + 1)))
    assert values.argmax() == 100 and values[0] == 0 and abs(values[-1]) < 1e-7


def test_cosine_schedule_single_peak_at_same_position():
    schedule = train.lr_schedule(train.TrainConfig(schedule="cosine"), 10)
    values = np.asarray(jax.vmap(schedule)(np.arange(240 + 1)))
    assert values.argmax() == 50 and np.isclose(values.max(), 0.4) and values[-1] < 1e-6
    assert (np.diff(values[:50]) > 0).all() and (np.diff(values[51:]) <= 1e-9).all()


def test_optimizer_matches_torch_sgd_semantics():
    """torch.optim.SGD: buf = m*buf + (g + wd*w); w -= lr*buf (first step buf = g + wd*w)."""
    config = train.TrainConfig(momentum=0.9, weight_decay=0.1, peak_lr=1.0, epochs=1, peak_fraction=0.5)
    optimizer = train.make_optimizer(config, 4)  # lr: 0, 0.5, 1.0, 0.5 at steps 0..3
    w = jnp.array([1.0, -2.0])
    state = optimizer.init(w)
    buf, expected = None, np.array(w)
    for step, lr in enumerate([0.0, 0.5, 1.0]):
        g = jnp.array([0.3, 0.7]) * (step + 1)
        updates, state = optimizer.update(g, state, w)
        w = optax.apply_updates(w, updates)
        d = np.asarray(g) + 0.1 * expected
        buf = d if buf is None else 0.9 * buf + d
        expected = expected - lr * buf
        np.testing.assert_allclose(w, expected, rtol=1e-6)


def test_epoch_batches_visit_every_index_once():
    subset = jnp.arange(10, 110)
    indices, valid = batches.epoch_batches(jax.random.key(0), subset, 32)
    assert indices.shape == (4, 32) and int(valid.sum()) == 100
    np.testing.assert_array_equal(np.sort(np.asarray(indices)[np.asarray(valid)]), np.arange(10, 110))
    small, small_valid = batches.epoch_batches(jax.random.key(0), jnp.arange(10), 64)
    assert small.shape == (1, 10) and bool(small_valid.all())


def test_padded_batch_gives_the_loss_of_its_valid_examples():
    logits = jax.random.normal(jax.random.key(0), (6, 10))
    labels = jnp.arange(6)
    valid = jnp.array([True] * 4 + [False] * 2)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits[:4], labels[:4]).mean()
    np.testing.assert_allclose(train.cross_entropy(logits, labels, valid), expected, rtol=1e-6)


@pytest.fixture(scope="module")
def ensemble4(fashion_small, fashion_norm):
    """A K=4 MLP ensemble, seed 3, 2 epochs of 4 steps."""
    return fit(fashion_small, fashion_norm, num_members=4, seed=3)


def test_vmapped_member_equals_member_trained_alone(ensemble4, fashion_small, fashion_norm):
    """Member i of a K=4 ensemble equals member i trained alone (8 steps, rtol 1e-5)."""
    ensemble = ensemble4
    alone = fit(fashion_small, fashion_norm, num_members=1, first_member=2, seed=3)
    member2 = jax.tree_util.tree_map(lambda leaf: leaf[2:3], ensemble.states)
    chex.assert_trees_all_close(member2, alone.states, rtol=1e-5, atol=1e-6)
    assert max_abs_diff(jax.tree_util.tree_map(lambda leaf: leaf[0], ensemble.states),
                        jax.tree_util.tree_map(lambda leaf: leaf[1], ensemble.states)) > 1e-3


def test_chunking_does_not_change_members(ensemble4, fashion_small, fashion_norm):
    chunked = fit(fashion_small, fashion_norm, num_members=4, chunk_size=3, seed=3)
    chex.assert_trees_all_close(ensemble4.states, chunked.states, rtol=1e-5, atol=1e-6)


def test_map_layout_equals_vmap_layout(ensemble4, fashion_small, fashion_norm):
    """lax.map over members (the CPU-friendly layout) trains the same members as vmap."""
    mapped = fit(fashion_small, fashion_norm, num_members=4, seed=3, layout="map")
    chex.assert_trees_all_close(ensemble4.states, mapped.states, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layout must be auto or one of vmap, map, got 'scan'"):
        fit(fashion_small, fashion_norm, layout="scan")


def test_same_seed_same_result_different_seed_different(ensemble4, fashion_small, fashion_norm):
    again = fit(fashion_small, fashion_norm, num_members=4, seed=3)
    other = fit(fashion_small, fashion_norm, num_members=4, seed=4)
    chex.assert_trees_all_equal(ensemble4.states, again.states)
    np.testing.assert_array_equal(ensemble4.metrics["loss"], again.metrics["loss"])
    assert max_abs_diff(ensemble4.states, other.states) > 1e-3


def test_subset_training_equals_training_on_the_subset(fashion_small, fashion_norm):
    """A member trained on index subset S equals one trained on the data set ``images[S]``."""
    x, y = fashion_small[0], fashion_small[1]
    subset = np.sort(np.random.default_rng(0).choice(len(x), 300, replace=False))
    masked = fit((x, y), fashion_norm, subsets=subset[None])
    direct = fit((x[subset], y[subset]), fashion_norm)
    chex.assert_trees_all_close(masked.states, direct.states, rtol=1e-5, atol=1e-6)


def test_subsets_from_masks_requires_equal_sizes():
    masks = np.zeros((2, 10), bool)
    masks[0, :5] = masks[1, 5:] = True
    np.testing.assert_array_equal(batches.subsets_from_masks(masks), [np.arange(5), np.arange(5, 10)])
    masks[1, 0] = True
    with pytest.raises(ValueError, match="every member must train on the same number of points"):
        batches.subsets_from_masks(masks)


def test_training_learns_and_predict_matches_apply(fashion_small, fashion_norm):
    x, y, x_test, y_test = fashion_small
    config = dataclasses.replace(TINY, epochs=6)
    result = fit(fashion_small, fashion_norm, config=config, num_members=2)
    assert result.metrics["loss"].shape == (6, 2)
    assert (result.metrics["loss"][-1] < 0.7 * result.metrics["loss"][0]).all()
    model = models.build("mlp", 10, hidden=(32,))
    logits = train.predict(model, result.states, x_test, fashion_norm, RunOptions(eval_batch_size=100))
    assert logits.shape == (2, len(x_test), 10)
    member = jax.tree_util.tree_map(lambda leaf: leaf[1], result.states)
    direct, _ = model.apply(member, batches.normalize(jnp.asarray(x_test), *fashion_norm), False)
    np.testing.assert_allclose(logits[1], direct, rtol=1e-5, atol=1e-5)
    assert (logits.argmax(-1) == y_test).mean() > 0.6


def test_divergence_raises_named_error(fashion_small, fashion_norm):
    with pytest.raises(train.DivergedError, match=r"member\(s\) \[0\] reached a non-finite loss in epoch \d; lower the learning rate"):
        fit(fashion_small, fashion_norm, config=dataclasses.replace(TINY, peak_lr=1e6))


def test_checkpoint_resume_and_refusal(tmp_path, fashion_small, fashion_norm):
    full = fit(fashion_small, fashion_norm, num_members=2, checkpoint_dir=tmp_path / "a")
    one_epoch = dataclasses.replace(TINY, epochs=1)
    fit(fashion_small, fashion_norm, num_members=2, checkpoint_dir=tmp_path / "b", config=one_epoch)
    # The epoch-1 checkpoint cannot be resumed by a 2-epoch run: different configuration.
    with pytest.raises(ValueError, match="was written by a different configuration"):
        fit(fashion_small, fashion_norm, num_members=2, checkpoint_dir=tmp_path / "b")
    # A finished checkpoint is reused without training again, and gives identical states.
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["members-0000-0001"]
    assert finished_epochs(tmp_path / "a") == [2]
    again = fit(fashion_small, fashion_norm, num_members=2, checkpoint_dir=tmp_path / "a")
    chex.assert_trees_all_equal(full.states, again.states)


@pytest.mark.parametrize("bad,message", [
    (dict(epochs=0), "epochs must be a positive integer, got 0"),
    (dict(peak_lr=float("nan")), "peak_lr must be a positive finite number, got nan"),
    (dict(peak_lr=-1.0), "peak_lr must be a positive finite number, got -1.0"),
    (dict(schedule="step"), "schedule must be 'triangular' or 'cosine', got 'step'"),
])
def test_config_validation(bad, message):
    with pytest.raises(ValueError) as error:
        train.TrainConfig(**bad)
    assert str(error.value) == message
