"""The device mesh and how parameters, batches and caches are laid out on it.

One code path for one device or many: a 2-D mesh ``("data", "model")`` over every device the
JAX runtime sees (all hosts, under ``jax.distributed``).  Batches are split along ``data``;
parameters are replicated today, and the ``model`` axis (size 1) is where they can be split later.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
MODEL = "model"


def make_mesh(devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices).reshape(len(devices), 1), (DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def data_parallelism(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def put_params(params, mesh: Mesh, dtype):
    """Place the parameter tree on every device, cast to the compute dtype."""
    import jax.numpy as jnp

    sharding = replicated(mesh)
    host_dtype = jnp.dtype(dtype)  # cast on the host (ml_dtypes), so loading compiles nothing
    return jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x, host_dtype), sharding), params)


def put_batch(arrays, mesh: Mesh):
    """Place host arrays (leading axis = batch) on the mesh, split along ``data``."""
    sharding = batch_sharded(mesh)
    return [jax.device_put(a, sharding) for a in arrays]


def constrain_batch(x, mesh: Mesh):
    """Inside a compiled function: keep ``x`` split along the batch axis."""
    return jax.lax.with_sharding_constraint(x, batch_sharded(mesh))
