"""The device mesh and how parameters, batches and caches are laid out on it.

One code path for one device or many, one process or many: a 2-D mesh ``("data", "model")`` over
every device the JAX runtime sees (all hosts, under ``jax.distributed``).  Batches are split along
``data``.  Parameters are replicated over ``data``; along ``model`` (size ``model_parallelism``,
1 by default) each large matrix is split in Megatron's pattern (:func:`param_partition`), so a
model too large for one device's memory is spread over several.

Under ``jax.distributed`` each process holds only the rows of a batch that belong to its own
devices: :func:`put_batch` builds the global array from them
(``jax.make_array_from_process_local_data``) and :func:`local_rows` reads them back.  Processes
agree on what to run next with :func:`gather` (a small all-gather; no communication at all on a
single process).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
MODEL = "model"


def make_mesh(devices=None, model_parallelism: int = 1) -> Mesh:
    """``(data, model)`` over ``devices`` (default: all), ``model_parallelism`` devices per model
    replica.  Devices that share a replica are neighbours in ``jax.devices()`` order (one host, the
    fastest links)."""
    devices = list(jax.devices() if devices is None else devices)
    if model_parallelism < 1 or len(devices) % model_parallelism:
        raise ValueError(f"model_parallelism {model_parallelism} does not divide the {len(devices)} devices")
    return Mesh(np.array(devices).reshape(len(devices) // model_parallelism, model_parallelism), (DATA, MODEL))


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; the rest replicated."""
    return NamedSharding(mesh, P(DATA))


def data_parallelism(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def local_data_parallelism(mesh: Mesh) -> int:
    """Entries of the ``data`` axis whose devices belong to this process."""
    here = jax.process_index()
    return sum(1 for d in mesh.devices[:, 0] if d.process_index == here)


def local_batch(mesh: Mesh, batch: int) -> int:
    """Rows of a global batch of ``batch`` (a multiple of the data axis) that this process holds."""
    n_data = data_parallelism(mesh)
    if batch % n_data:
        raise ValueError(f"a batch of {batch} rows does not split over {n_data} data-parallel devices")
    return batch // n_data * local_data_parallelism(mesh)


# Megatron-style tensor parallelism: the first matrix of each block splits its output features,
# the second its input features, so each block needs one reduction.  Dense kernels are [in, out].
_SPLIT_OUTPUT = frozenset({"qkv", "q", "kv", "fc1"})  # attention projections in, MLP in
_SPLIT_INPUT = frozenset({"out", "fc2"})  # attention projection out, MLP out


def param_partition(path: tuple[str, ...], shape: tuple[int, ...], n_model: int) -> P:
    """How the parameter at ``path`` (keys in the tree) is laid out along ``model``.

    Attention and MLP matrices (and the biases of the split outputs) are split as above; the token
    embedding and the output projection along the vocabulary; everything small (layer norms,
    convolutions, position embeddings, biases of summed outputs) is replicated.  A dimension that
    ``n_model`` does not divide is not split (XLA would pad it; replication is simpler and the
    matrices in question are tiny).
    """
    if n_model == 1 or not shape:
        return P()
    owner, leaf = (path[-2] if len(path) > 1 else ""), path[-1]
    if path == ("projection",):  # [d, vocab]
        axis = 1
    elif leaf == "embedding" and owner == "embed_tokens":  # [vocab, d]
        axis = 0
    elif owner in _SPLIT_OUTPUT and leaf in ("kernel", "bias"):
        axis = len(shape) - 1
    elif owner in _SPLIT_INPUT and leaf == "kernel":
        axis = 0
    else:
        return P()
    if shape[axis] % n_model:
        return P()
    spec = [None] * len(shape)
    spec[axis] = MODEL
    return P(*spec)


def param_shardings(params, mesh: Mesh):
    """A tree of :class:`NamedSharding` for ``params`` (numpy arrays or shapes) on ``mesh``."""
    n_model = mesh.shape[MODEL]

    def one(path, x):
        keys = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)
        return NamedSharding(mesh, param_partition(keys, tuple(np.shape(x)), n_model))

    return jax.tree_util.tree_map_with_path(one, params)


def put_params(params, mesh: Mesh, dtype):
    """Place the parameter tree on the mesh (:func:`param_shardings`), cast to the compute dtype.

    Every process passes the same full tree (each loads the checkpoint itself); each device
    receives only its part.
    """
    import jax.numpy as jnp

    host_dtype = jnp.dtype(dtype)  # cast on the host (ml_dtypes), so loading compiles nothing

    def put(x, where):
        x = np.asarray(x, host_dtype)
        return jax.make_array_from_callback(x.shape, where, lambda index: x[index])

    return jax.tree_util.tree_map(put, params, param_shardings(params, mesh))


def put_batch(arrays, mesh: Mesh, batch: int):
    """Place this process's rows of a global batch of ``batch`` rows on the mesh, split along
    ``data`` (each array's leading axis holds :func:`local_batch` rows)."""
    sharding = batch_sharded(mesh)
    return [jax.make_array_from_process_local_data(sharding, a, (batch,) + a.shape[1:]) for a in arrays]


def local_rows(array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in global order (the whole array on one process)."""
    shards = {s.index[0].start or 0: s.data for s in array.addressable_shards}  # replicas give the same rows
    parts = jax.device_get([shards[start] for start in sorted(shards)])
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def gather(local) -> np.ndarray:
    """``local`` (a small array of the same shape everywhere) from every process, stacked along a
    new leading axis in process order.  Every process must call it at the same point.  Under
    ``jax.distributed`` this runs a tiny compiled all-gather (compiled once per shape, and counted
    by ``engine.compile_stats``)."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local))


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a collective: all processes call it)."""
    return bool(gather(np.int32(bool(flag))).max())


def constrain_batch(x, mesh: Mesh):
    """Inside a compiled function: keep ``x`` split along the batch axis."""
    return jax.lax.with_sharding_constraint(x, batch_sharded(mesh))


def gather_bytes(data: bytes) -> list[bytes]:
    """``data`` from every process, in process order (a collective: all processes call it)."""
    sizes = gather(np.int64(len(data)))
    buffer = np.zeros(int(sizes.max()), np.uint8)
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
    return [row[:size].tobytes() for row, size in zip(gather(buffer), sizes)]


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """Join a multi-process JAX runtime (``jax.distributed.initialize``) before any device is used.

    With no arguments JAX finds the cluster itself (TPU pods, SLURM, ...).  CPU devices exchange
    data over gloo, so the same call works for a CPU cluster or several processes on one machine.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
