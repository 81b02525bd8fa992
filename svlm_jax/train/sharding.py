"""Where every training array lives on the device mesh: the one place for the sharding rules.

Mesh axes: "data" (pure data parallelism), "fsdp" (data parallelism whose parameters and
optimizer state are also sharded, ZeRO-3 style) and "tensor" (heads / MLP width / vocab split).
Batches are split over ("data", "fsdp") on their example axis.

Parameters (and the optimizer's moments, which have their structure) are sharded by the logical
axes `params.PARAM_RULES` gives their paths: `ShardingRules` maps a logical axis to a mesh axis. An
axis whose size the mesh axis does not divide stays replicated (e.g. 2 KV heads on 4 tensor shards),
as does a mesh axis already used by an earlier axis of the same leaf. A leaf none of whose axes the
rules map is replicated whole: the vision tower's, frozen by default and small next to the LM.

Multi-host: launch one process per host and call `jax.distributed.initialize()` before anything
touches jax devices (`run.main_train` does when JAX_COORDINATOR_ADDRESS or a cluster environment
is set); the mesh then spans every host's devices, each process feeds its slice of the batch
(`data.make_dataset(process_index=..., process_count=...)`) and `put_batch` assembles the global
arrays from the process-local pieces.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from svlm_jax.model import params

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """The mesh axis of each logical parameter axis (the names `params.PARAM_RULES` uses); None: replicated."""

    layers: str | None = None
    embed: str | None = "fsdp"  # ZeRO-3: every LM matrix is split over the data-parallel shards
    vocab: str | None = "tensor"
    q_heads: str | None = "tensor"
    kv_heads: str | None = "tensor"
    head_dim: str | None = None
    mlp: str | None = "tensor"
    vision_layers: str | None = None
    vision_patch: str | None = None
    vision_embed: str | None = None
    vision_qkv: str | None = None
    vision_heads: str | None = None
    vision_head_dim: str | None = None
    vision_mlp: str | None = None
    vision_merger: str | None = None
    vision_out: str | None = None


RULES = ShardingRules()


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


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules: ShardingRules = RULES) -> PartitionSpec:
    """PartitionSpec of a parameter-shaped leaf from its parameter path (see the module docstring)."""
    axes = params.param_rule(path).axes
    if len(axes) != len(shape):
        raise ValueError(f"parameter {path!r} has shape {shape}, PARAM_RULES gives it the axes {axes}")
    mesh_axes = [getattr(rules, axis) for axis in axes]
    if not any(mesh_axes):  # a leaf the rules never split (the vision tower's) is replicated whole
        return PartitionSpec()
    spec, used = [], set()
    for axis, size in zip(mesh_axes, shape):
        if axis is None or axis in used or size % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec)


def tree_shardings(tree, mesh: Mesh, rules: ShardingRules = RULES):
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs): params, optimizer state, train
    state. Leaves of the parameter trees in it follow `param_spec`; the others (the step, the
    optimizer's counts) are scalars, replicated."""
    def shardings(node):
        if params.is_param_tree(node):
            return params.map_param_tree(
                lambda path, x: NamedSharding(mesh, param_spec(path, tuple(x.shape), mesh, rules)), node)
        return replicated(mesh)

    return jax.tree.map(shardings, tree, is_leaf=params.is_param_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch leaves are [A (accumulation), B (examples), ...]: B over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_batch(batch, mesh: Mesh):
    """This process's host arrays [A, B_local, ...] -> global arrays [A, B, ...] sharded over B."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
