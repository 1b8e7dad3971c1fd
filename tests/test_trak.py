"""TRAK: exact on a model linear in its parameters, JL projection, ensemble averaging, a planted case; over
subset-trained members as datamodels (LDS), per-class logits, and the equal-compute LDS experiment's CLI."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascent_jax import batches, datamodels, ensemble, models, train, trak
from ascent_jax.cli import run_main
from ascent_jax.models import Model
from ascent_jax.train import Normalization
from experiments import trak_lds

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


# --------------------------------------------------------------------------------------------
# Over members trained on subsets: the Datamodels interface, per-class logits, the LDS experiment


def _softmax_init(key, input_shape):
    size = int(np.prod(input_shape))
    return {"params": {"w": jax.random.normal(key, (size, 3)) * 0.3, "b": jnp.asarray([0.1, -0.2, 0.05])},
            "batch_stats": {}}


def _softmax_apply(variables, x, train, mask=None):
    return x.reshape(x.shape[0], -1) @ variables["params"]["w"] + variables["params"]["b"], variables["batch_stats"]


# Three-class multinomial logistic regression: every logit is linear in the parameters.
SOFTMAX = Model("softmax3", _softmax_init, _softmax_apply)


def _stack(variables):
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *variables)


def _toy_members(model, shape, n, count, seed):
    rng = np.random.default_rng(seed)
    images, labels = _images(rng, n, shape), rng.integers(0, 3 if model is SOFTMAX else 2, n)
    variables = _stack([model.init(jax.random.key(seed + m), shape) for m in range(count)])
    masks = np.zeros((count, n), bool)
    for m in range(count):
        masks[m, rng.permutation(n)[: n // 2]] = True
    return images, labels, variables, masks


def _softmax_closed_form(variables, images, labels, masks, rows, ridge, kernel):
    """Per-class TRAK for SOFTMAX in float64 numpy: grad of logit c is e_c (x) [x, 1], so the class-summed kernel
    is I_C (x) X~^T X~ and score[r, c, i] = q_ic x~_r^T (X~_S^T X~_S + ridge I)^-1 x~_i with q = onehot(y) - p."""
    x = (images.reshape(len(images), -1).astype(np.float64) / 255.0 - 0.5) / 0.25
    xt = np.hstack([x, np.ones((len(x), 1))])
    total, logits = 0.0, []
    for m in range(len(masks)):
        z = x @ np.asarray(variables["params"]["w"][m], np.float64) + np.asarray(variables["params"]["b"][m])
        p = np.exp(z - z.max(1, keepdims=True))
        q = np.eye(3)[labels] - p / p.sum(1, keepdims=True)
        kx = xt[masks[m]] if kernel == "subset" else xt
        inner = xt[rows] @ np.linalg.inv(kx.T @ kx + ridge * np.eye(xt.shape[1])) @ xt.T  # (R, n)
        total = total + inner[:, None, :] * q.T[None]
        logits.append(z[rows])
    matrix = total / len(masks)
    return matrix, np.mean(np.stack(logits) - np.einsum("mn,rcn->mrc", masks, matrix), axis=0)


@pytest.mark.parametrize("proj_dim,ridge,kernel", [
    (None, 0.0, "subset"),  # exact gradients (measured 2e-7)
    (None, 2.0, "all"),     # ridge, TRAK Algorithm 1's kernel over every point (1e-7)
    (30, 0.0, "subset"),    # square Gaussian G (P = 3 x 10): the estimator is invariant to it (8e-7)
])
def test_per_class_logits_match_linear_softmax_closed_form(proj_dim, ridge, kernel):
    shape = (3, 3, 1)
    images, labels, variables, masks = _toy_members(SOFTMAX, shape, 40, 2, seed=3)
    rows = np.array([5, 0, 17, 39])
    matrix, bias = trak.trak_logits(SOFTMAX, variables, images, labels, NORM, masks, rows=rows, proj_dim=proj_dim,
                                    key=jax.random.key(4), ridge=ridge, kernel=kernel, chunk=16)
    want_matrix, want_bias = _softmax_closed_form(variables, images, labels, masks, rows, ridge, kernel)
    assert matrix.shape == (4, 3, 40) and bias.shape == (4, 3)
    assert matrix.dtype == np.float32 and bias.dtype == np.float32
    assert _rel_err(matrix, want_matrix) < 1e-5
    np.testing.assert_allclose(bias, want_bias, rtol=1e-5, atol=1e-5)


def test_two_class_logit_trak_is_the_margin_trak():
    """For LINEAR (logits 0 and s) the class-1 logit is the margin of class-1 targets and minus that of class-0
    ones, and q_i1 = 1[y_i = 1] - p_1 equals the margin's sign_i (1 - p_i): per-class TRAK of logit 1 is the
    signed margin TRAK (averaged as "scores") and logit 0 gets zeros."""
    shape = (3, 3, 1)
    images, labels, variables, masks = _toy_members(LINEAR, shape, 30, 3, seed=5)
    common = dict(proj_dim=None, ridge=0.5, kernel="subset", chunk=16)
    matrix, bias = trak.trak_logits(LINEAR, variables, images, labels, NORM, masks, **common)
    margin = trak.trak_datamodels(LINEAR, variables, images, labels, NORM, masks, average="scores", **common)
    sign = np.where(labels == 1, 1.0, -1.0)
    np.testing.assert_allclose(matrix[:, 1], sign[:, None] * margin.matrix, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bias[:, 1], sign * margin.bias, rtol=1e-5, atol=1e-5)
    assert np.all(matrix[:, 0] == 0)


def test_rows_select_slices_of_the_full_result():
    shape = (4, 4, 1)
    model = models.build("mlp", 3, hidden=(8,))
    images, labels, variables, masks = _toy_members(SOFTMAX, shape, 48, 2, seed=6)
    variables = _stack([model.init(jax.random.key(s), shape) for s in (20, 21)])
    rows = np.array([40, 3, 3, 11])  # any order, repeats allowed
    common = dict(proj_dim=16, key=jax.random.key(8), chunk=20)
    full = trak.trak_datamodels(model, variables, images, labels, NORM, masks, **common)
    some = trak.trak_datamodels(model, variables, images, labels, NORM, masks, rows=rows, **common)
    np.testing.assert_allclose(some.matrix, full.matrix[rows], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(some.bias, full.bias[rows], rtol=1e-6, atol=1e-6)
    assert np.isnan(some.ratio).all() and some.ratio.shape == (4,)
    logits_full = trak.trak_logits(model, variables, images, labels, NORM, masks, **common)
    logits_some = trak.trak_logits(model, variables, images, labels, NORM, masks, rows=rows, **common)
    np.testing.assert_allclose(logits_some[0], logits_full[0][rows], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(logits_some[1], logits_full[1][rows], rtol=1e-6, atol=1e-6)


def test_counts_are_prefixes_and_the_subset_kernel_uses_each_members_rows():
    rng = np.random.default_rng(9)
    features, margins = rng.standard_normal((3, 20, 4)), rng.standard_normal((3, 20))
    masks = np.zeros((3, 20), bool)
    for m in range(3):
        masks[m, rng.permutation(20)[:10]] = True
    both = trak.datamodels_from_features(features, margins, masks, counts=(1, 3), rows=[2, 7])
    alone = trak.datamodels_from_features(features[:1], margins[:1], masks[:1], rows=[2, 7])[0]
    np.testing.assert_allclose(both[0].matrix, alone.matrix, rtol=1e-6)
    a = [f[[2, 7]] @ np.linalg.inv(f[k].T @ f[k]) @ f.T for f, k in zip(features, masks)]
    q = 1 / (1 + np.exp(margins))
    want = np.mean(a, axis=0) * q.mean(axis=0)[None]
    np.testing.assert_allclose(both[1].matrix, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(both[1].bias, np.mean(margins[:, [2, 7]] - masks @ want.T, axis=0), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"counts must lie in \[1, 3\]"):
        trak.datamodels_from_features(features, margins, masks, counts=(4,))
    with pytest.raises(ValueError, match="kernel must be one of"):
        trak.datamodels_from_features(features, margins, masks, kernel="rows")
    with pytest.raises(ValueError, match=r"masks must be boolean \(members, points\) = \(3, 20\)"):
        trak.datamodels_from_features(features, margins, masks[:2])
    with pytest.raises(ValueError, match=r"TRAK kernel \(12 x 12 from 10 training points\) is singular"):
        trak.datamodels_from_features(rng.standard_normal((3, 20, 12)), margins, masks)


def test_trak_datamodels_work_with_lds_close_to_regression_datamodels():
    """Logistic regression (LINEAR, L2, full-batch GD) on 300 random halves of 60 points: TRAK with exact
    gradients on 240 models and regression datamodels fitted on 210 (+30 for lambda) score alike on the 30
    held-out models (measured LDS 0.920 vs 0.933), and TRAK's bias centres its predictions."""
    rng = np.random.default_rng(0)
    n, shape, total = 60, (3, 3, 1), 300
    images = _images(rng, n, shape)
    x = (images.reshape(n, -1) / 255.0 - 0.5) / 0.25
    labels = (x @ rng.standard_normal(9) + rng.normal(0, 2.0, n) > 0).astype(np.int32)
    masks = datamodels.subset_masks(total, n, 0.5, 0)
    sign, inputs = jnp.where(labels == 1, 1.0, -1.0), jnp.asarray(x, jnp.float32)

    def fit(mask):
        def loss(p):
            margin = sign * (inputs @ p["w"] + p["b"])
            return jnp.sum(mask * jax.nn.softplus(-margin)) / mask.sum() + 0.05 * jnp.sum(p["w"] ** 2)

        def step(p, _):
            return jax.tree_util.tree_map(lambda a, g: a - g, p, jax.grad(loss)(p)), None

        return jax.lax.scan(step, {"w": jnp.zeros(9), "b": jnp.float32(0.0)}, None, length=300)[0]

    params = jax.jit(jax.vmap(fit))(jnp.asarray(masks, jnp.float32))
    margins = np.asarray(sign[None] * (params["w"] @ inputs.T + params["b"][:, None]))
    pool = {"params": jax.tree_util.tree_map(lambda a: a[:240], params), "batch_stats": {}}
    estimate = trak.trak_datamodels(LINEAR, pool, images, labels, NORM, masks[:240], proj_dim=None, chunk=60)
    assert isinstance(estimate, datamodels.Datamodels) and estimate.matrix.shape == (n, n)
    regression = datamodels.fit_datamodels(masks[:210], margins[:210], masks[210:240], margins[210:240])
    test = slice(270, 300)
    lds_trak = np.nanmean(datamodels.lds(estimate, masks[test], margins[test]))
    lds_regression = np.nanmean(datamodels.lds(regression, masks[test], margins[test]))
    assert lds_trak > 0.85 and lds_regression > 0.85 and abs(lds_trak - lds_regression) < 0.05
    error = estimate.predict(masks[test]) - margins[test]
    assert abs(error.mean()) < 0.05 * margins[test].std()


def test_train_features_keep_each_engine_members_features(tmp_path):
    """The engine's finalize keeps what trak_features gives for the trained variables; a rerun reads it back."""
    shape, n = (4, 4, 1), 40
    rng = np.random.default_rng(10)
    images, labels = _images(rng, n, shape), rng.integers(0, 3, n)
    model = models.build("mlp", 3, hidden=(8,))
    config = train.TrainConfig(epochs=1, batch_size=10)
    options = ensemble.RunOptions(seed=3, chunk_size=3, progress=False)
    masks = datamodels.subset_masks(3, n, 0.5, 1)
    args = (model, config, images, labels, NORM, masks, options)
    common = dict(proj_dim=6, key=jax.random.key(11), first_member=4, chunk=16)
    features, margins = trak.train_features(*args, out_dir=tmp_path, **common)
    assert features.shape == (3, n, 6) and margins.shape == (3, n)
    trained = train.train_ensemble(model, config, images, labels, NORM, options, num_members=3, first_member=4,
                                   subsets=batches.subsets_from_masks(masks)).states
    for m, member in enumerate(trak.members(model, trained, shape)):
        want = trak.trak_features(model, member, images, labels, NORM, proj_dim=6, key=jax.random.key(11))
        np.testing.assert_allclose(features[m], want[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(margins[m], want[1], rtol=1e-5, atol=1e-5)
    again = trak.train_features(*args, out_dir=tmp_path, **common)
    np.testing.assert_array_equal(again[0], features)
    (folder,) = tmp_path.iterdir()  # named after the projection, holding only the chunks' outputs
    assert folder.name.startswith("features-") and all(p.name.endswith(".outputs") for p in folder.iterdir())


@pytest.fixture
def synthetic_train_split(monkeypatch):
    """A 200-image, 10-class stand-in for the Fashion-MNIST train split (so the CLI runs in seconds)."""
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10, dtype=np.int32), 20)
    images = (rng.integers(0, 60, (200, 28, 28, 1)) + 19 * labels[:, None, None, None]).astype(np.uint8)
    monkeypatch.setattr(trak_lds.data, "load", lambda name, split, data_dir=None: (images, labels))


@pytest.mark.parametrize("flags, message", [
    (["--models", "300"], "--budgets up to 400 plus --holdout 100 need --models >= 500, got 300"),
    (["--budgets", "2,10", "--models", "200"], "--budgets must be at least 3 models (fit on 2, choose lambda on 1), "
                                               "got 2"),
    (["--budgets", "5,10", "--alpha", "0.1", "--models", "200", "--epochs", "1"],
     "--budgets 5 buys no TRAK model at equal compute (5 x 100 example-gradients < one TRAK model's 1100); use "
     "larger budgets"),
    (["--proj-dims", "64,600"], "--proj-dims 600 exceeds the 500 points each model trains on, so TRAK's kernel "
                                "over them would be singular; use dims of at most 500"),
    (["--alpha", "0.001", "--subset-size", "100"], "--alpha 0.001 of --subset-size 100 gives 0-point subsets; need "
                                                   "between 1 and 99"),
])
def test_lds_cli_rejects_inconsistent_flags_before_any_work(tmp_path, capsys, flags, message):
    assert run_main(trak_lds.main, [*flags, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--budgets", "10,x"], "argument --budgets: expected comma-separated whole numbers, got '10,x'"),
    (["--holdout", "2"], "argument --holdout: must be at least 3, got 2"),
    (["--alpha", "1"], "argument --alpha: must lie strictly between 0 and 1, got 1"),
])
def test_lds_cli_rejects_bad_values(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        trak_lds.main(flags)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {message} (see python -m experiments.trak_lds --help)\n"


def test_lds_cli_end_to_end_tiny_writes_its_outputs_and_resumes(tmp_path, synthetic_train_split, capsys):
    out = tmp_path / "run"
    args = ["--subset-size", "60", "--models", "15", "--holdout", "6", "--budgets", "6,9", "--proj-dims", "4,8",
            "--epochs", "1", "--batch-size", "16", "--chunk-size", "3", "--fista-steps", "10", "--no-progress",
            "--out", str(out)]  # every training chunk holds 3 models: one compiled program serves both stages
    assert run_main(trak_lds.main, args) == 0
    printed = capsys.readouterr().out
    assert "regression m = 6, 9 vs TRAK k = 2, 3 (30 vs 90 example-gradients per model)" in printed
    assert "TRAK features: 3 members x 60 points x 8 dims" in printed
    with open(out / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["variant"], r["budget_models"], r["models"]) for r in table] == [
        ("regression", "6", "6"), ("regression", "9", "9"), ("trak-d4", "6", "2"), ("trak-d4", "9", "3"),
        ("trak-d8", "6", "2"), ("trak-d8", "9", "3"), ("trak-d8-all-rows", "6", "2"), ("trak-d8-all-rows", "9", "3"),
        ("trak-d8-scores-avg", "6", "2"), ("trak-d8-scores-avg", "9", "3")]
    assert [int(r["example_gradients"]) for r in table[:4]] == [180, 270, 180, 270]
    assert all(-1 <= float(r["lds_mean"]) <= 1 and int(r["targets_scored"]) > 0 for r in table)
    report = (out / "report.md").read_text()
    assert "n = 60, M = 15 x mlp" in report and "CPU cores" in report and "lds_vs_compute.png" in report
    assert (out / "lds_vs_compute.png").stat().st_size > 1000
    before = (out / "results.csv").read_text()
    assert run_main(trak_lds.main, args) == 0  # resumes: every model and estimate is read back
    assert (out / "results.csv").read_text() == before
    assert run_main(trak_lds.main, [*args[:3], "18", *args[4:]]) == 2
    assert "holds a run with other settings" in capsys.readouterr().err
