"""Shared fixtures: a small slice of real Fashion-MNIST and tiny training configs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helper modules (cifar_fixtures)

from ascent_jax import data  # noqa: E402


@pytest.fixture(scope="session")
def fashion_small():
    """The first 512 train and 256 test images of real Fashion-MNIST."""
    try:
        x_train, y_train = data.load("fashion_mnist", "train")
        x_test, y_test = data.load("fashion_mnist", "test")
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return x_train[:512], y_train[:512], x_test[:256], y_test[:256]


@pytest.fixture(scope="session")
def fashion_norm():
    from ascent_jax.train import Normalization

    return Normalization(data.FASHION_MNIST.mean, data.FASHION_MNIST.std)


def max_abs_diff(a, b) -> float:
    import jax

    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
