"""Architectures: closed-form parameter counts, shapes, batch-norm semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascent_jax import models


def jitted(model):
    """``init``/``apply`` compiled once (op-by-op ResNet dispatch is slow on CPU)."""
    return jax.jit(model.init, static_argnums=1), jax.jit(model.apply, static_argnums=2)


def conv_count(k, cin, cout, bias=False):
    return k * k * cin * cout + (cout if bias else 0)


def resnet9_count(classes):
    convs = [(3, 3, 64), (5, 64, 128), (3, 128, 128), (3, 128, 128), (3, 128, 256), (3, 256, 256), (3, 256, 256),
             (3, 256, 128)]
    return sum(conv_count(*c) + 2 * c[2] for c in convs) + 128 * classes


def resnet18_count(classes, stem):
    total = conv_count(7, 3, 64) if stem == "imagenet" else conv_count(3, 3, 64)
    total += 2 * 64
    cin = 64
    for features in (64, 128, 256, 512):
        for block in range(2):
            total += conv_count(3, cin, features) + conv_count(3, features, features) + 4 * features
            if cin != features:
                total += conv_count(1, cin, features) + 2 * features
            cin = features
    return total + 512 * classes + classes


@pytest.mark.parametrize("name,shape,options,expected", [
    ("resnet9", (32, 32, 3), {}, resnet9_count(10)),
    ("resnet18", (32, 32, 3), {}, resnet18_count(10, "imagenet")),
    ("resnet18", (32, 32, 3), {"stem": "cifar"}, resnet18_count(10, "cifar")),
    ("mlp", (28, 28, 1), {}, 784 * 256 + 256 + 256 * 10 + 10),
    ("cnn", (28, 28, 1), {}, conv_count(3, 1, 16, True) + conv_count(3, 16, 32, True) + 7 * 7 * 32 * 128 + 128
     + 128 * 10 + 10),
])
def test_parameter_counts_match_closed_form(name, shape, options, expected):
    model = models.build(name, 10, **options)
    variables = jax.eval_shape(lambda key: model.init(key, shape), jax.random.key(0))
    assert models.count_params(variables) == expected


def test_known_published_counts():
    """torchvision's ResNet-18 has 11,689,512 parameters at 1000 classes; CIFAR-stem/10 classes 11,173,962."""
    assert resnet18_count(1000, "imagenet") == 11_689_512
    assert resnet18_count(10, "cifar") == 11_173_962
    assert resnet9_count(10) == 2_274_880


@pytest.mark.parametrize("name,shape", [("mlp", (28, 28, 1)), ("cnn", (28, 28, 1)), ("resnet9", (16, 16, 3))])
def test_apply_shapes_and_eval_keeps_stats(name, shape):
    init, apply = jitted(models.build(name, 7))
    variables = init(jax.random.key(1), shape)
    x = jax.random.normal(jax.random.key(2), (5, *shape))
    logits, stats = apply(variables, x, False)
    assert logits.shape == (5, 7) and logits.dtype == jnp.float32
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), stats,
                                                         variables["batch_stats"]))


def test_masked_batch_norm_equals_batch_of_valid_examples():
    """Padding examples (mask false) must not change the outputs or the running statistics."""
    init, apply = jitted(models.build("resnet9", 10))
    variables = init(jax.random.key(0), (16, 16, 3))
    x = jax.random.normal(jax.random.key(3), (6, 16, 16, 3))
    mask = jnp.array([True, True, True, True, False, False])
    padded_logits, padded_stats = apply(variables, x, True, mask)
    logits, stats = apply(variables, x[:4], True)
    np.testing.assert_allclose(padded_logits[:4], logits, rtol=2e-4, atol=2e-5)
    for a, b in zip(jax.tree_util.tree_leaves(padded_stats), jax.tree_util.tree_leaves(stats)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_train_mode_updates_batch_stats():
    init, apply = jitted(models.build("resnet9", 10))
    variables = init(jax.random.key(0), (16, 16, 3))
    _, stats = apply(variables, jax.random.normal(jax.random.key(1), (4, 16, 16, 3)), True)
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(stats),
                                                         jax.tree_util.tree_leaves(variables["batch_stats"]))]
    assert min(moved) > 0


def test_bfloat16_compute_keeps_float32_params():
    init, apply = jitted(models.build("resnet9", 10, dtype="bfloat16"))
    variables = init(jax.random.key(0), (16, 16, 3))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    logits, _ = apply(variables, jnp.ones((2, 16, 16, 3)), True)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_resnet9_head_is_bias_free_and_scaled_by_0_2():
    init, apply = jitted(models.build("resnet9", 10))
    variables = init(jax.random.key(0), (16, 16, 3))
    head = variables["params"]["Dense_0"]
    assert head["kernel"].shape == (128, 10) and "bias" not in head
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    doubled = {**variables, "params": {**variables["params"], "Dense_0": {"kernel": 2 * head["kernel"]}}}
    np.testing.assert_allclose(apply(doubled, x, False)[0], 2 * apply(variables, x, False)[0], rtol=1e-5)


def test_max_pool_matches_flax():
    import flax.linen as nn

    from ascent_jax.models.layers import max_pool_2x2

    x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))


@pytest.mark.parametrize("bad,message", [
    (dict(name="vgg"), "unknown model 'vgg'; choose one of resnet9, resnet18, cnn, mlp, mlp128"),
    (dict(name="mlp", num_classes=1), "num_classes must be at least 2, got 1"),
    (dict(name="mlp", dtype="float16"), "dtype must be 'float32' or 'bfloat16', got 'float16'"),
])
def test_build_rejects_bad_arguments(bad, message):
    args = {"num_classes": 10, **bad}
    with pytest.raises(ValueError) as error:
        models.build(args.pop("name"), **args)
    assert str(error.value) == message


def reference_conv_relu_pool(x, kernel, bias):
    """lax.conv ('same', stride 1) + bias -> ReLU -> nn.max_pool 2x2."""
    import flax.linen as nn

    pad = kernel.shape[0] // 2
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(pad, pad)] * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    return nn.max_pool(nn.relu(y), (2, 2), strides=(2, 2))


def assert_close(actual, expected, tol=1e-5):
    """Equal up to float32 rounding: |a - e| <= tol * (|e| + max |e|)."""
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("batch, size, channels, features, kernel", [
    (35, 28, 1, 16, 3),   # the small CNN's first layer: two CPU chunks plus a remainder
    (35, 14, 16, 32, 3),  # its second layer
    (3, 14, 16, 32, 3),   # one chunk
    (5, 7, 4, 8, 5),      # odd size (last row/column dropped by the pool), 5x5 kernel
])
def test_patch_conv_pool_equals_lax_conv_and_max_pool(batch, size, channels, features, kernel):
    """The small CNN's conv -> ReLU -> pool layer: nn.Conv + nn.relu + nn.max_pool in value and gradients."""
    from ascent_jax.models.layers import PatchConvPool

    layer = PatchConvPool(features, kernel)
    keys = jax.random.split(jax.random.key(batch + channels), 3)
    x = jax.random.normal(keys[0], (batch, size, size, channels))
    params = layer.init(keys[1], x)["params"]
    fan_in = kernel * kernel * channels
    assert params["kernel"].shape == (kernel, kernel, channels, features) and params["bias"].shape == (features,)
    assert np.abs(params["kernel"]).max() <= fan_in ** -0.5 and np.abs(params["bias"]).max() <= fan_in ** -0.5

    def ours(x, kernel, bias):
        return layer.apply({"params": {"kernel": kernel, "bias": bias}}, x)

    out, ours_vjp = jax.vjp(jax.jit(ours), x, params["kernel"], params["bias"])
    expected, reference_vjp = jax.vjp(reference_conv_relu_pool, x, params["kernel"], params["bias"])
    assert out.shape == expected.shape == (batch, size // 2, size // 2, features)
    assert_close(out, expected)
    cotangent = jax.random.normal(keys[2], out.shape)
    for got, want in zip(ours_vjp(cotangent), reference_vjp(cotangent)):  # input, kernel, bias
        assert_close(got, want)


def test_cnn_equals_lax_reference():
    """The whole small CNN (chunked on CPU) computes the nn.Conv/nn.max_pool network: outputs and gradients."""
    model = models.build("cnn", 10)
    variables = model.init(jax.random.key(0), (28, 28, 1))
    x = jax.random.normal(jax.random.key(1), (40, 28, 28, 1))

    def reference(params, x):
        for name in ("Conv_0", "Conv_1"):
            x = reference_conv_relu_pool(x, params[name]["kernel"], params[name]["bias"])
        x = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
        return x @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]

    def ours(params, x):
        return model.apply({"params": params, "batch_stats": {}}, x, True)[0]

    def loss(fn):
        return lambda params: jnp.mean(jax.nn.log_softmax(fn(params, x))[:, 3])

    assert_close(jax.jit(ours)(variables["params"], x), reference(variables["params"], x))
    got, want = jax.jit(jax.grad(loss(ours)))(variables["params"]), jax.grad(loss(reference))(variables["params"])
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert_close(a, b)
