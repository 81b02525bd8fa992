"""Streaming on a device mesh: streams over "data", heads and MLP width over "tensor".

The mesh is `train.sharding.make_mesh`'s (its "fsdp" axis 1) and the weights follow the same
`ShardingRules` with the embedding axis replicated (`STREAM_RULES`: nothing is gathered per token).
The cache's rows (stream, kv head) [B*K, S + 1, H] are stream-major, so splitting them over
("data", "tensor") gives each device its streams' share of their kv heads; where the tensor axis
does not divide the kv heads they are split over "data" alone (the heads replicated). Every other
per-stream array is split over "data". XLA's partitioner does the rest inside the one compiled
step, so the output is the one device's, token for token (up to the order of float sums).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from svlm_jax.model.params import Model
from svlm_jax.streaming.cache import CACHE_ROWS, CacheState
from svlm_jax.train.sharding import ShardingRules, make_mesh, param_spec

STREAM_RULES = ShardingRules(embed=None)


def stream_mesh(data: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A mesh of data x tensor devices for streaming (default: the first data x tensor devices)."""
    devices = jax.devices() if devices is None else list(devices)
    if data * tensor > len(devices):
        raise ValueError(f"mesh data={data} x tensor={tensor} needs {data * tensor} devices, {len(devices)} are there")
    return make_mesh(data=data, fsdp=1, tensor=tensor, devices=devices[:data * tensor])


def _param_path(key_path) -> str:
    """"text.layers.q_w_ldnh" for a leaf of the per-layer model (the layer's tuple index dropped)."""
    return ".".join(k.name for k in key_path if hasattr(k, "name"))


def shard_model(model: Model, mesh: Mesh) -> Model:
    """The model's weights placed on `mesh` by `STREAM_RULES`."""
    def place(key_path, x):
        spec = param_spec(_param_path(key_path), tuple(x.shape), mesh, STREAM_RULES)
        return jax.device_put(x, NamedSharding(mesh, spec))

    return model.replace(params=jax.tree_util.tree_map_with_path(place, model.params))


def check_batch(mesh: Mesh, batch: int) -> None:
    if batch % mesh.shape["data"]:
        raise ValueError(f"{batch} streams do not split over data={mesh.shape['data']} devices")


def state_shardings(state: CacheState, mesh: Mesh, n_kv: int) -> CacheState:
    """NamedShardings of every field of the cache state (see the module docstring), written as the
    step's outputs come back (axes of size 1 left out, every dimension named), so that the next
    round sees the shardings the step was compiled for."""
    def split(x, *axes):  # full rank: jit writes output specs out in full, P() would differ from it
        kept = tuple(a for a in axes if mesh.shape[a] > 1)
        return NamedSharding(mesh, PartitionSpec(kept or None, *[None] * (x.ndim - 1)))

    rows = ("data", "tensor") if n_kv % mesh.shape["tensor"] == 0 else ("data",)
    fields = {f.name: jax.tree.map(lambda x: split(x, "data"), getattr(state, f.name)) for f in dataclasses.fields(state)}
    for name in CACHE_ROWS:
        fields[name] = tuple(split(x, *rows) for x in getattr(state, name))
    return CacheState(**fields)


def place_state(state: CacheState, mesh: Mesh, n_kv: int) -> CacheState:
    return jax.device_put(state, state_shardings(state, mesh, n_kv))


def per_device_bytes(model_config, dtype_bytes: int, cache_bytes: int, data: int, tensor: int) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) one device of a data x tensor mesh holds (no device needed)."""
    from jax.sharding import AbstractMesh

    from svlm_jax.model.params import param_leaves

    mesh = AbstractMesh((data, 1, tensor), ("data", "fsdp", "tensor"))
    weights = 0
    for path, shape in param_leaves(model_config):
        spec = param_spec(path, shape, mesh, STREAM_RULES)
        split = math.prod(mesh.shape[axis] for axis in spec if axis is not None)
        weights += math.prod(shape) // split * dtype_bytes
    rows_split = data * tensor if model_config.text.num_kv_heads % tensor == 0 else data
    return weights, cache_bytes // rows_split
