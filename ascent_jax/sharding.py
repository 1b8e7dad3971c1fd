"""The sharding boundary: place ensemble-stacked pytrees on a device mesh along the member axis.

Everything that carries a leading member axis (states, keys, per-member inputs) is split over
the mesh's ``"members"`` axis; shared inputs (the data set) are replicated by jit. Chunks are
padded to a multiple of the device count by repeating the last member; since a member's
result depends only on its own key, the duplicates are simply dropped afterwards.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "members"


def ensemble_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes) named ``"members"``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def pad_members(members: np.ndarray, mesh: Mesh | None) -> np.ndarray:
    """Repeat the last member so the chunk divides evenly over the mesh's devices."""
    if mesh is None:
        return members
    shards = mesh.shape[AXIS]
    extra = -len(members) % shards
    return np.concatenate([members, np.repeat(members[-1:], extra)])


def place(mesh: Mesh | None, tree: Any) -> Any:
    """Put every leaf of ``tree`` on ``mesh``, split along its leading (member) axis."""
    if mesh is None:
        return tree
    split = NamedSharding(mesh, PartitionSpec(AXIS))
    return jax.tree_util.tree_map(lambda leaf: jax.device_put(leaf, split), tree)
