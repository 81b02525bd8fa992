"""Where every training array lives on the device mesh: the one place for the sharding rules.

Mesh axes: "data" (pure data parallelism), "fsdp" (data parallelism whose parameters and
optimizer state are also sharded, ZeRO-3 style) and "tensor" (heads / MLP width / vocab split).
Batches are split over ("data", "fsdp") on their example axis.

Parameters (and everything shaped like them in the optimizer state) are sharded by the axis
letters that end their field names (`q_w_ldnh` -> l d n h, see `model/params.py`): `AXIS_RULES`
maps a letter to a mesh axis. An axis whose size the mesh axis does not divide stays replicated
(e.g. 2 KV heads on 4 tensor shards), as does a mesh axis already used by an earlier letter of the
same leaf. The vision tower is replicated: it is frozen by default and small next to the LM.

Multi-host: launch one process per host and call `jax.distributed.initialize()` before anything
touches jax devices (`run.main_train` does when JAX_COORDINATOR_ADDRESS or a cluster environment
is set); the mesh then spans every host's devices, each process feeds its slice of the batch
(`data.make_dataset(process_index=..., process_count=...)`) and `put_batch` assembles the global
arrays from the process-local pieces.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
AXIS_RULES = {"d": "fsdp", "n": "tensor", "k": "tensor", "f": "tensor", "v": "tensor"}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; -1 for data takes every device the other axes leave."""
    devices = jax.devices() if devices is None else list(devices)
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"{len(devices)} devices do not split into fsdp={fsdp} x tensor={tensor}")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {data * fsdp * tensor} "
                         f"devices, {len(devices)} are there")
    return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), MESH_AXES)


def leaf_spec(path, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of one parameter-like leaf from its key path (see the module docstring)."""
    names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
    if not names or "vision" in names:
        return PartitionSpec()
    letters = names[-1].rsplit("_", 1)[-1]
    if len(letters) != len(shape):
        return PartitionSpec()
    spec, used = [], set()
    for letter, size in zip(letters, shape):
        axis = AXIS_RULES.get(letter)
        if axis is None or axis in used or size % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec)


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs): params, optimizer state, train state."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, leaf_spec(path, tuple(x.shape), mesh)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch leaves are [A (accumulation), B (examples), ...]: B over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_batch(batch, mesh: Mesh):
    """This process's host arrays [A, B_local, ...] -> global arrays [A, B, ...] sharded over B."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
