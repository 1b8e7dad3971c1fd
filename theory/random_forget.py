"""Random forget sets (workshop Lemma 1, App. E; NeurIPS Lemma 1, App. C).

Lemma 1: for a fixed model and a forget set ``F`` drawn uniformly at random,
``P(|Acc_T - Acc_F| >= eps) <= 2 exp(-2 |F| eps^2)`` (Hoeffding).

The check uses real Fashion-MNIST data and a classifier that has never seen
the pool. A multinomial logistic regression (JAX, full-batch gradient
descent) is trained on part of the *train* split. Forget sets are drawn
from the *test* split (the pool).

* ``Acc_T`` is the classifier's accuracy on the whole pool: the pool is the
  population, so ``Acc_T`` is its exact mean.
* Forget sets are drawn without replacement. Hoeffding's bound also holds
  for sampling without replacement (Hoeffding 1963, Thm. 4), and the exact
  law of ``|F| Acc_F`` is then hypergeometric.

Each tail probability is reported three ways: Monte Carlo over explicit
random sets, the exact hypergeometric tail, and the bound.

If the classifier had been trained on the pool, the bound would still hold
for the *pool* accuracy (Hoeffding only needs the model to be fixed before
F is drawn), but the pool accuracy would no longer estimate the population
accuracy. So the pool is kept disjoint from training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

__all__ = ["train_linear_classifier", "forget_set_tails", "hoeffding_bound", "plot_lemma1"]

FORGET_SIZES = (10, 50, 100, 500)


def hoeffding_bound(n_forget, eps):
    """Lemma 1's right-hand side ``2 exp(-2 |F| eps^2)`` (not clipped at 1)."""
    return 2.0 * np.exp(-2.0 * np.asarray(n_forget, float) * np.asarray(eps, float) ** 2)


def _features(images):
    """2x2 average-pooled pixels in [0, 1] (14 x 14 = 196) plus a bias column."""
    n = images.shape[0]
    x = images.reshape(n, 14, 2, 14, 2).astype(np.float32).mean(axis=(2, 4)).reshape(n, -1) / 255.0
    return np.concatenate([x, np.ones((x.shape[0], 1), np.float32)], axis=1)


@jax.jit
def _fit(X, y, lr, l2):
    n_classes = 10
    onehot = jax.nn.one_hot(y, n_classes)

    def loss(W):
        logits = X @ W
        return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), axis=1)) + 0.5 * l2 * jnp.sum(W * W)

    grad = jax.grad(loss)

    def body(_, state):
        W, V = state
        V = 0.9 * V - lr * grad(W)
        return W + V, V

    W0 = jnp.zeros((X.shape[1], n_classes), X.dtype)
    W, _ = jax.lax.fori_loop(0, 300, body, (W0, jnp.zeros_like(W0)))
    return W


def train_linear_classifier(n_train: int = 10_000, data_dir=None, seed: int = 0):
    """Fit multinomial logistic regression on ``n_train`` Fashion-MNIST *train* images.

    Features: 2x2-pooled pixels. 300 full-batch heavy-ball steps. Returns ``(W, predict)``, where
    ``predict(images) -> labels``.
    """
    from ascent_jax.data import load

    images, labels = load("fashion_mnist", "train", data_dir)
    idx = np.random.default_rng(seed).permutation(len(labels))[:n_train]
    W = _fit(jnp.asarray(_features(images[idx])), jnp.asarray(labels[idx]), 0.5, 1e-4).block_until_ready()

    def predict(imgs):
        return np.asarray(jnp.argmax(jnp.asarray(_features(imgs)) @ W, axis=1))

    return W, predict


def forget_set_tails(correct, sizes=FORGET_SIZES, eps_grid=None, n_sets: int = 4000, seed: int = 0):
    """Tail probabilities of ``|Acc_T - Acc_F|`` for random forget sets.

    ``correct`` is the boolean vector "classifier is right" over the pool.
    Returns ``{size: dict(eps, mc, exact, bound)}``:

    * ``mc``: the fraction of ``n_sets`` explicit random sets (drawn
      without replacement) with ``|Acc_T - Acc_F| >= eps``;
    * ``exact``: the hypergeometric tail;
    * ``bound``: ``2 exp(-2|F| eps^2)``.
    """
    correct = np.asarray(correct, bool)
    n_pool, n_correct = correct.size, int(correct.sum())
    acc_t = n_correct / n_pool
    if eps_grid is None:
        eps_grid = np.linspace(0.0, 0.4, 81)
    rng = np.random.default_rng(seed)
    out = {}
    for n in sizes:
        if not 0 < n <= n_pool:
            raise ValueError(f"forget-set size {n} must be in 1..{n_pool}")
        acc_f = np.array([correct[rng.choice(n_pool, n, replace=False)].mean() for _ in range(n_sets)])
        dev = np.abs(acc_f - acc_t)
        mc = np.array([(dev >= e - 1e-12).mean() for e in eps_grid])
        # exact: P(|k/n - acc_t| >= eps) with k ~ Hypergeom(n_pool, n_correct, n)
        k = np.arange(n + 1)
        pmf = stats.hypergeom(n_pool, n_correct, n).pmf(k)
        exact = np.array([pmf[np.abs(k / n - acc_t) >= e - 1e-12].sum() for e in eps_grid])
        out[n] = {"eps": eps_grid, "mc": mc, "exact": exact, "bound": hoeffding_bound(n, eps_grid)}
    return out


def plot_lemma1(tails: dict, acc_t: float, path):
    """One panel per forget-set size: Monte Carlo and exact tails vs the bound (log scale)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.0 * len(tails), 3.0), dpi=80)
    axes = fig.subplots(1, len(tails), sharey=True)
    for ax, (n, t) in zip(np.atleast_1d(axes), tails.items()):
        ax.semilogy(t["eps"], np.minimum(t["bound"], 1.0), "k-", label=r"$2e^{-2|F|\epsilon^2}$")
        ax.semilogy(t["eps"], t["exact"], "C1--", label="exact (hypergeom.)")
        ax.semilogy(t["eps"], np.where(t["mc"] > 0, t["mc"], np.nan), "C0.", ms=3, label="Monte Carlo")
        ax.set_title(f"|F| = {n}", fontsize=9)
        ax.set_xlabel(r"$\epsilon$")
        ax.set_ylim(1e-4, 1.5)
    np.atleast_1d(axes)[0].set_ylabel(r"$P(|Acc_T - Acc_F| \geq \epsilon)$")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(f"Lemma 1 on Fashion-MNIST test pool (linear classifier, Acc_T = {acc_t:.3f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return fig
