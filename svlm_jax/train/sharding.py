"""Where every training array lives on the device mesh: the one place for the sharding rules.

Mesh axes: "data" (pure data parallelism), "fsdp" (data parallelism whose parameters and
optimizer state are also sharded, ZeRO-3 style) and "tensor" (heads / MLP width / vocab split).
Batches are split over ("data", "fsdp") on their example axis.

Parameters (and the optimizer's moments, which have their structure) are sharded by the logical
axes `params.PARAM_RULES` gives their paths: `ShardingRules` maps a logical axis to a mesh axis. An
axis whose size the mesh axis does not divide stays replicated (e.g. 2 KV heads on 4 tensor shards),
as does a mesh axis already used by an earlier axis of the same leaf. A leaf none of whose axes the
rules map is replicated whole: the vision tower's, frozen by default and small next to the LM.

Inside the step, `constrain` pins activations to the batch layout and `constrain_gathered` a
parameter to the layout it is used in (its "embed" axis gathered, as ZeRO-3 does before a use), so
the partitioner never has to rematerialize a tensor to change its layout.

Several processes (`svlm_jax.distributed`): the mesh spans every process's devices, each process
feeds the rows of the batch its devices hold (`batch_part`) and `put_batch` assembles the global
arrays from the process-local pieces.
"""

from __future__ import annotations

import dataclasses
import functools

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
    # A MoE's expert axis: replicated (each device runs every expert on its own tokens, no dispatch
    # between devices); the experts' matrices are still split over fsdp (D) and tensor (F).
    experts: str | None = None
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


def batch_part(mesh: Mesh) -> tuple[int, int]:
    """(index, count): this process's devices hold the index-th of `count` equal, contiguous parts of
    a batch's examples (count 1 when the batch axes stay inside one process)."""
    shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    local = {index[1].indices(shards)[:2] for index in
             batch_sharding(mesh).addressable_devices_indices_map((1, shards)).values()}
    first, stop = min(a for a, _ in local), max(b for _, b in local)
    if len(local) != stop - first or shards % (stop - first):
        raise ValueError(f"the devices of process {jax.process_index()} hold batch shards {sorted(local)} of "
                         f"{shards}: not one contiguous equal part (order the mesh's devices by process)")
    return first // (stop - first), shards // (stop - first)


def put_batch(batch, mesh: Mesh):
    """This process's host arrays [A, B_local, ...] (its `batch_part`) -> global arrays [A, B, ...]
    sharded over B."""
    sharding = batch_sharding(mesh)
    _, count = batch_part(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0], x.shape[1] * count, *x.shape[2:]))

    return jax.tree.map(put, batch)


def on_mesh(mesh: Mesh, fn):
    """`fn` traced with `mesh` as the context mesh, so `constrain` and `constrain_gathered` apply in it."""
    abstract = mesh.abstract_mesh

    @functools.wraps(fn)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(abstract):
            return fn(*args)

    return traced


def constrain(x, *spec):
    """`x` laid out as PartitionSpec(*spec) on the context mesh (`on_mesh`); unchanged without one."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def constrain_gathered(path: str, x, rules: ShardingRules = RULES):
    """Parameter `path` as it is used: its "embed" axis gathered, its other axes as `rules` shard them
    (unchanged without a context mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = param_spec(path, tuple(x.shape), mesh, dataclasses.replace(rules, embed=None))
    return jax.lax.with_sharding_constraint(x, spec)
