"""theory.lambertw against mpmath (ground truth), its own inverse, and finite differences."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from theory.lambertw import INV_E_HI, lambertw


def _mp(z, branch):
    with mpmath.workdps(40):
        return float(mpmath.re(mpmath.lambertw(mpmath.mpf(float(z)), branch)))


def _rel_err(w, z, branch):
    ref = np.array([_mp(v, branch) for v in z])
    return np.abs(np.asarray(w) - ref) / np.abs(ref)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def test_principal_branch_matches_mpmath_to_1e12():
    z = np.concatenate(
        [
            -INV_E_HI + np.logspace(-8, np.log10(0.36), 300),  # |z + 1/e| > 1e-8
            np.linspace(-0.2, 3.5, 200),
            np.logspace(-300, 300, 300),
            -np.logspace(-300, -0.5, 100),
        ]
    )
    z = z[z != 0]
    w = lambertw(jnp.asarray(z), 0)
    assert w.dtype == jnp.float64
    assert np.max(_rel_err(w, z, 0)) < 1e-12


def test_minus_one_branch_matches_mpmath_to_1e12():
    z = np.concatenate([-INV_E_HI + np.logspace(-8, np.log10(0.3678), 300), -np.logspace(-300, -0.45, 200)])
    assert np.max(_rel_err(lambertw(jnp.asarray(z), -1), z, -1)) < 1e-12


@pytest.mark.parametrize("branch", [0, -1])
def test_close_to_branch_point_keeps_full_accuracy(branch):
    # floats between 1 ulp and 1e-8 above -1/e: accuracy limited only by float64
    ulp = np.spacing(INV_E_HI)
    z = np.concatenate([-INV_E_HI + ulp * np.arange(1, 3000, 13), -INV_E_HI + np.logspace(-15, -8, 60)])
    assert np.max(_rel_err(lambertw(jnp.asarray(z), branch), z, branch)) < 2e-15


def test_float_nearest_minus_inv_e_is_the_branch_point():
    z = -INV_E_HI  # lies 1.2e-17 below -1/e (mpmath: real part -1 + 2.3e-17)
    with mpmath.workdps(40):
        assert mpmath.mpf(z) < -1 / mpmath.e
    assert float(lambertw(z, 0)) == -1.0
    assert float(lambertw(z, -1)) == -1.0
    below = np.nextafter(z, -1.0)
    assert np.isnan(float(lambertw(below, 0))) and np.isnan(float(lambertw(below, -1)))


def test_domain_and_special_values():
    w0 = np.asarray(lambertw(jnp.array([-1.0, np.nan, np.inf, 0.0, -0.0]), 0))
    assert np.isnan(w0[0]) and np.isnan(w0[1]) and w0[2] == np.inf and w0[3] == 0.0 and w0[4] == 0.0
    w1 = np.asarray(lambertw(jnp.array([-1.0, 0.5, np.nan, 0.0]), -1))
    assert np.isnan(w1[0]) and np.isnan(w1[1]) and np.isnan(w1[2]) and w1[3] == -np.inf


@pytest.mark.parametrize("branch", [0, -1])
def test_inverse_identity(branch):
    rng = np.random.default_rng(0)
    if branch == 0:
        z = np.concatenate([rng.uniform(-0.3678, 0, 200), np.exp(rng.uniform(-30, 30, 200))])
    else:
        z = -np.exp(rng.uniform(-30, np.log(0.3678), 300))
    w = np.asarray(lambertw(jnp.asarray(z), branch))
    assert np.max(np.abs(w * np.exp(w) - z) / np.abs(z)) < 1e-14


@pytest.mark.parametrize("branch,zs", [(0, [-0.3, -0.1, 0.0, 0.5, 3.0, 1e3]), (-1, [-0.35, -0.2, -0.05, -1e-4])])
def test_gradient_matches_finite_differences(branch, zs):
    g = jax.vmap(jax.grad(lambda z: lambertw(z, branch)))(jnp.asarray(zs))
    for z, gz in zip(zs, np.asarray(g)):
        h = 1e-6 * abs(z) if z != 0 else 1e-6
        fd = (_mp(z + h, branch) - _mp(z - h, branch)) / (2 * h)
        assert abs(gz - fd) <= 1e-7 * max(1.0, abs(fd))
    # at z = 0 the derivative is exactly 1 (the W/(z(1+W)) form would be 0/0)
    assert float(jax.grad(lambda z: lambertw(z, 0))(0.0)) == 1.0


def test_jit_vmap_and_float32():
    f = jax.jit(jax.vmap(lambda z: lambertw(z, 0)))
    np.testing.assert_allclose(np.asarray(f(jnp.array([0.5, 1.0, 2.0]))), [0.3517337112491958, 0.5671432904097838, 0.8526055020137255], rtol=1e-15)
    with jax.enable_x64(False):
        w = lambertw(jnp.array([0.5, -0.2], dtype=jnp.float32))
        assert w.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(w), [0.35173371, -0.25917110], rtol=1e-6)


def test_invalid_branch_raises():
    with pytest.raises(ValueError, match="branch"):
        lambertw(1.0, branch=1)


def test_app_g1_sign_slip():
    # x - a e^{-x} = 0  <=>  x e^x = a  <=>  x = W(a); the paper's W(-a) is wrong
    for a in (0.1, 0.2, 2.0, 50.0):
        x = float(lambertw(a))
        assert abs(x - a * np.exp(-x)) < 1e-14 * max(1, a)
    x = float(lambertw(-0.2))
    assert abs(x - 0.2 * np.exp(-x)) > 0.1
    assert np.isnan(float(lambertw(-2.0)))


def test_import_does_not_enable_x64_globally():
    code = "import jax, theory, theory.report; import jax.numpy as jnp; print(jnp.asarray(1.0).dtype)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "float32"
