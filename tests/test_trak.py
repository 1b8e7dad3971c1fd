"""TRAK: exact on a model linear in its parameters, JL projection, ensemble averaging, a planted case."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascent_jax import models, trak
from ascent_jax.models import Model
from ascent_jax.train import Normalization

NORM = Normalization((0.5,), (0.25,))


def _linear_init(key, input_shape):
    size = int(np.prod(input_shape))
    return {"params": {"w": jax.random.normal(key, (size,)) * 0.3, "b": jnp.float32(0.1)}, "batch_stats": {}}


def _linear_apply(variables, x, train, mask=None):
    s = x.reshape(x.shape[0], -1) @ variables["params"]["w"] + variables["params"]["b"]
    return jnp.stack([jnp.zeros_like(s), s], axis=-1), variables["batch_stats"]


# Two-class model whose logits are (0, w.x + b): the margin is +-(w.x + b), linear in the parameters.
LINEAR = Model("linear", _linear_init, _linear_apply)


def _images(rng, n, shape):
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


def _closed_form(variables, images, labels, target_images, target_labels, ridge, hessian):
    """TRAK for LINEAR straight from the features, in float64 numpy (no JAX, no library code)."""
    w = np.asarray(variables["params"]["w"], np.float64)
    b = float(variables["params"]["b"])

    def feats(imgs, ys):
        x = (imgs.reshape(len(imgs), -1).astype(np.float64) / 255.0 - 0.5) / 0.25
        sign = np.where(ys == 1, 1.0, -1.0)[:, None]
        return sign * np.hstack([x, np.ones((len(x), 1))]), sign[:, 0] * (x @ w + b)  # d margin/d (w, b); margin

    phi, margin = feats(images, labels)
    phi_t, _ = feats(target_images, target_labels)
    p = 1.0 / (1.0 + np.exp(-margin))
    r = p * (1 - p) if hessian else np.ones_like(p)
    kernel = (phi * r[:, None]).T @ phi + ridge * np.eye(phi.shape[1])
    return phi_t @ np.linalg.inv(kernel) @ phi.T * (1 - p)[None, :]


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("proj_dim,ridge,hessian,tol", [
    (None, 0.0, False, 1e-6),   # exact gradients (measured 9e-8)
    (None, 3.0, False, 1e-6),   # ridge (1e-7)
    (None, 0.0, True, 1e-6),    # Newton kernel Phi^T R Phi: the one-step Newton influence (1.3e-7)
    (10, 0.0, False, 1e-5),     # square Gaussian G: Phi G (G^T Phi^T Phi G)^-1 G^T Phi^T is invariant (9e-7)
    (10, 0.0, True, 1e-5),      # (8e-7)
])
def test_linear_model_matches_closed_form(proj_dim, ridge, hessian, tol):
    rng = np.random.default_rng(0)
    shape = (3, 3, 1)  # 9 weights + 1 bias = 10 parameters
    images, labels = _images(rng, 40, shape), rng.integers(0, 2, 40)
    target_images, target_labels = _images(rng, 7, shape), rng.integers(0, 2, 7)
    variables = LINEAR.init(jax.random.key(1), shape)
    got = trak.trak_scores(LINEAR, variables, images, labels, NORM, target_images, target_labels, proj_dim=proj_dim,
                           key=jax.random.key(2), ridge=ridge, hessian_weights=hessian, chunk=16)
    want = _closed_form(variables, images, labels, target_images, target_labels, ridge, hessian)
    assert got.shape == (7, 40)
    assert _rel_err(got, want) < tol


def test_projection_preserves_inner_products_and_is_seeded():
    size, k = 1500, 512
    vectors = np.random.default_rng(0).standard_normal((16, size)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact = vectors @ vectors.T
    bound = 5 * np.sqrt(2 / k)  # 5 sd of <Ga, Gb> - <a, b> for unit vectors (sd <= sqrt(2/k)); measured 0.12-0.14
    for projection in trak.PROJECTIONS:
        projected = np.asarray(trak.project(vectors, jax.random.key(0), k, projection=projection, block=700))
        assert np.max(np.abs(projected @ projected.T - exact)) < bound
        again = np.asarray(trak.project(vectors, jax.random.key(0), k, projection=projection, block=700))
        other = np.asarray(trak.project(vectors, jax.random.key(1), k, projection=projection, block=700))
        np.testing.assert_array_equal(projected, again)
        assert np.max(np.abs(projected - other)) > 0.1
    # the blocked projection is one fixed matrix (rows of blocks beyond P are never used)
    g = trak.projection_matrix(jax.random.key(3), 50, 8, block=16)
    np.testing.assert_allclose(np.asarray(trak.project(vectors[:, :50], jax.random.key(3), 8, block=16)),
                               vectors[:, :50] @ g, rtol=1e-5, atol=1e-5)
    entries = trak.projection_matrix(jax.random.key(4), 400, 64, projection="rademacher", block=128)
    np.testing.assert_allclose(np.abs(entries), 1 / 8, rtol=1e-6)


def test_stacked_members_average_single_members():
    rng = np.random.default_rng(1)
    shape = (4, 4, 1)
    model = models.build("mlp", 3, hidden=(8,))
    images, labels = _images(rng, 60, shape), rng.integers(0, 3, 60)
    target_images, target_labels = _images(rng, 5, shape), rng.integers(0, 3, 5)
    singles = [model.init(jax.random.key(s), shape) for s in (10, 11)]
    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *singles)
    common = dict(proj_dim=32, key=jax.random.key(5), ridge=0.01, chunk=25)
    args = (images, labels, NORM, target_images, target_labels)

    alone = [trak.trak_scores(model, v, *args, average="scores", **common) for v in singles]
    both = trak.trak_scores(model, stacked, *args, average="scores", **common)
    np.testing.assert_allclose(both, (alone[0] + alone[1]) / 2, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(alone[0] - alone[1])) > 1e-3 * np.max(np.abs(alone[0]))  # members really differ

    # TRAK's estimator: mean of the kernel terms times mean of Q, from per-member features
    terms = []
    for v in singles:
        phi, out = trak.trak_features(model, v, images, labels, NORM, proj_dim=32, key=jax.random.key(5), chunk=25)
        phi_t, _ = trak.trak_features(model, v, target_images, target_labels, NORM, proj_dim=32,
                                      key=jax.random.key(5), chunk=25)
        q = 1 / (1 + np.exp(out.astype(np.float64)))
        terms.append((phi_t @ np.linalg.inv(phi.T.astype(np.float64) @ phi + 0.01 * np.eye(32)) @ phi.T, q))
    want = (terms[0][0] + terms[1][0]) / 2 * ((terms[0][1] + terms[1][1]) / 2)[None, :]
    paper = trak.trak_scores(model, stacked, *args, average="paper", **common)
    assert _rel_err(paper, want) < 1e-4


def test_planted_duplicate_is_its_own_top_attribution():
    """A target that duplicates train point i gets its largest score at i (briefly trained tiny MLP on a
    noisy task, so Q = 1 - p stays spread over [0.1, 0.9]; across data seeds 2..4 the self score beats the
    runner-up by a factor >= 1.66)."""
    rng = np.random.default_rng(2)
    shape, n, classes = (6, 6, 1), 150, 3
    labels = rng.integers(0, classes, n)
    centres = rng.integers(100, 156, (classes, *shape))
    images = np.clip(centres[labels] + rng.normal(0, 80, (n, *shape)), 0, 255).astype(np.uint8)
    model = models.build("mlp", classes, hidden=(16,))
    variables = model.init(jax.random.key(0), shape)
    x = (jnp.asarray(images, jnp.float32) / 255.0 - 0.5) / 0.25

    @jax.jit
    def step(params):
        def loss(params):
            logits, _ = model.apply({"params": params, "batch_stats": {}}, x, False)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], 1))
        return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, jax.grad(loss)(params))

    params = variables["params"]
    for _ in range(50):
        params = step(params)
    variables = {"params": params, "batch_stats": {}}
    planted = np.arange(0, n, 10)
    scores = trak.trak_scores(model, variables, images, labels, NORM, images[planted], labels[planted],
                              proj_dim=100, key=jax.random.key(7), chunk=64)
    assert scores.shape == (len(planted), n)
    assert np.all(np.argmax(scores, axis=1) == planted)
    top2 = np.sort(scores, axis=1)[:, -2:]
    assert np.all(top2[:, 1] > 1.3 * top2[:, 0])


def test_bad_inputs():
    model = models.build("mlp", 3, hidden=(8,))
    shape = (4, 4, 1)
    variables = model.init(jax.random.key(0), shape)
    images = np.zeros((5, *shape), np.uint8)
    with pytest.raises(ValueError, match="average"):
        trak.trak_scores(model, variables, images, np.zeros(5, int), NORM, images, np.zeros(5, int), average="x")
    with pytest.raises(ValueError, match="neither"):
        trak.members(model, jax.tree_util.tree_map(lambda a: a[..., :1], variables), shape)
    with pytest.raises(ValueError, match="singular"):
        trak.kernel_scores(np.zeros((5, 8)), np.zeros(5), np.zeros((2, 8)))
