"""A HF checkpoint loaded straight into a device mesh: each process reads from the safetensors
files only the parts of each tensor that its own devices hold, and builds the global arrays with
`jax.make_array_from_callback`. Host memory holds one process's share of the weights (plus the
share of the one leaf being placed), never the whole model, so a model larger than one host
starts on many.

The name table, the layouts and the checks are weights.py's (`hf_slots`, `to_ours`,
`matched_names`); what is here maps a shard's index in our layout to the slices of the HF tensors
it comes from (`safe_open(...).get_slice`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from svlm_jax.config import ModelConfig
from svlm_jax.model.params import Model, Params, map_param_tree, param_leaves
from svlm_jax.weights import (CheckpointError, Slot, _weight_files, hf_slots, matched_names,
                              transformers_expert_layout)


def load_sharded(path, shardings: Params, dtype) -> Model:
    """The checkpoint directory `path` as a Model whose leaves are global arrays with `shardings`
    (a Params of jax.sharding.Sharding, e.g. `train.sharding.tree_shardings` of the parameters),
    in `dtype`. Every process calls it; each reads only what its devices hold."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = ModelConfig.from_file(path)
    slots = hf_slots(config)
    files = _weight_files(path)
    names = matched_names(path, config, slots, files)
    sources: dict[tuple[str, int | None], tuple[Path, str, Slot]] = {
        (slot.leaf, slot.layer): (files[names[name]], names[name], slot) for name, slot in slots.items()}
    shapes = dict(param_leaves(config))
    dtype = jnp.dtype(dtype)

    def leaf_array(leaf: str, sharding) -> jax.Array:
        shape, stacked = shapes[leaf], (leaf, None) not in sources
        cache: dict[tuple, np.ndarray] = {}  # devices holding the same part (replicas) share one read

        def part(index: tuple[slice, ...]) -> np.ndarray:
            box = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
            if box not in cache:
                out = np.empty([b - a for a, b in box], dtype)
                if stacked:
                    for j, layer in enumerate(range(*box[0])):
                        _read_into(out[j], *sources[(leaf, layer)], shape[1:], box[1:])
                else:
                    _read_into(out, *sources[(leaf, None)], shape, box)
                cache[box] = out
            return cache[box]

        return jax.make_array_from_callback(shape, sharding, part)

    params = map_param_tree(leaf_array, shardings)
    return Model(config=config, params=params)


def _flat_span(shape: tuple[int, ...], box: tuple[tuple[int, int], ...]) -> tuple[int, int, np.ndarray | slice]:
    """The box [start, stop) per axis of an array of `shape` seen flat (C order): (first, stop) of
    the contiguous span that holds it, and its elements' offsets in that span, in C order (a
    slice when the box is the whole span: the common case, split on the leading axis only)."""
    flat = np.ravel_multi_index(np.ix_(*(np.arange(a, b) for a, b in box)), shape).reshape(-1)
    first, stop = int(flat[0]), int(flat[-1]) + 1
    return first, stop, slice(None) if len(flat) == stop - first else flat - first


def _read_into(out: np.ndarray, file: Path, name: str, slot: Slot, shape: tuple[int, ...],
               box: tuple[tuple[int, int], ...]) -> None:
    """Write into `out` the box of our (one-layer) array of `shape` from HF tensor `name`, reading
    only the span of the stored tensor that holds it. Layouts as `weights.to_ours`: a matrix
    [in..., out...] is stored [prod(out), prod(in)] (rows: the out axes flat, columns: the in axes
    flat); other tensors are stored as they are or flat."""
    try:
        # One opening per read: the memory map, and the pages it touched, go with it.
        with safe_open(file, framework="np") as f:
            stored = f.get_slice(name)
            stored_shape = tuple(stored.get_shape())
            transposed_experts = transformers_expert_layout(slot, stored_shape)
            if stored_shape != slot.hf_shape and not transposed_experts:
                raise CheckpointError(f"tensor {name} in {file.name} has shape {stored_shape}, expected {slot.hf_shape}")
            if transposed_experts:  # [X, out, in] on disk: read the box's span of it, then turn it
                (x0, x1), (i0, i1), (o0, o1) = box
                part = stored[x0:x1, o0:o1, i0:i1].swapaxes(1, 2)
            elif slot.n_in:
                r0, r1, rows = _flat_span(shape[slot.n_in:], box[slot.n_in:])
                c0, c1, cols = _flat_span(shape[:slot.n_in], box[:slot.n_in])
                if len(stored_shape) == 2:
                    block = stored[r0:r1, c0:c1]
                else:  # the vision patch embedding [C, channels, T, p, p]: its in axes are stored unflattened
                    block = stored[r0:r1].reshape(r1 - r0, -1)[:, c0:c1]
                part = block[rows][:, cols].T
            elif stored_shape == shape:
                part = stored[tuple(slice(a, b) for a, b in box)]
            else:
                a, b, offsets = _flat_span(shape, box)
                part = stored[a:b][offsets]
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is corrupt or truncated: {e}") from None
    out[...] = part.reshape(out.shape)
