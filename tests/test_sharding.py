"""Sharding the member axis over (forced) CPU devices changes nothing but placement."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import chex, jax, numpy as np
from ascent_jax import data, ensemble, models, sharding, train
assert jax.device_count() == 4, jax.devices()
x, y = data.load("fashion_mnist", "train")
x, y = x[:256], y[:256]
norm = train.Normalization(data.FASHION_MNIST.mean, data.FASHION_MNIST.std)
model = models.build("mlp", 10, hidden=(16,))
config = train.TrainConfig(epochs=2, batch_size=64, peak_lr=0.1)
mesh = sharding.ensemble_mesh()
seen = []
original = ensemble.run
def spy(*args, on_epoch=None, **kwargs):
    def record(members, epoch, states, metrics):
        leaf = jax.tree_util.tree_leaves(states)[0]
        seen.append((len(leaf.sharding.device_set), leaf.shape[0]))
        on_epoch(members, epoch, states, metrics)
    return original(*args, on_epoch=record, **kwargs)
ensemble.run = spy
plain = train.train_ensemble(model, config, x, y, norm, seed=0, num_members=3, progress=False)
sharded = train.train_ensemble(model, config, x, y, norm, seed=0, num_members=3, mesh=mesh, progress=False)
chex.assert_trees_all_close(plain.states, sharded.states, rtol=1e-5, atol=1e-6)
assert jax.tree_util.tree_leaves(sharded.states)[0].shape[0] == 3
placed = sharding.place(mesh, np.zeros((8, 3)))
assert placed.sharding.spec == jax.sharding.PartitionSpec("members")
assert [s.data.shape for s in placed.addressable_shards] == [(2, 3)] * 4
print("SEEN", seen)
"""


def test_sharded_equals_unsharded_on_four_cpu_devices():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = eval(result.stdout.split("SEEN", 1)[1])
    # Unsharded states live on 1 device; sharded ones span all 4 although 3 members do not divide 4.
    assert set(seen) == {(1, 3), (4, 3)}
