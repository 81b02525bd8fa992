"""HF checkpoints in and out: one table maps HF tensor names to our parameter leaves.

Loading reads tensors one at a time (safetensors memory-maps the files) and writes each into its
slot of a preallocated, donated device array, so the weights never exist twice. Saving writes the
layout transformers and the hub use (`model.layers.*`, `visual.*`, `lm_head.weight`), sharded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from svlm_jax.config import ModelConfig
from svlm_jax.model.params import Model, Params, param_leaves, param_shapes

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory whose files do not describe the model its config.json names."""


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str       # HF name, {i} = layer index
    leaf: str     # our dotted parameter path
    n_in: int     # leading input axes of our matrix (0: stored as is, e.g. norms, biases, embeddings)


# Names in the hub's layout; transformers 5 also writes `model.language_model.` and `model.visual.`.
RULES = (
    Rule("model.embed_tokens.weight", "text.embed_vd", 0),
    Rule("model.norm.weight", "text.final_norm_d", 0),
    Rule("lm_head.weight", "text.lm_head_dv", 1),
    Rule("model.layers.{i}.input_layernorm.weight", "text.layers.attn_norm_ld", 0),
    Rule("model.layers.{i}.self_attn.q_proj.weight", "text.layers.q_w_ldnh", 1),
    Rule("model.layers.{i}.self_attn.q_proj.bias", "text.layers.q_b_lnh", 0),
    Rule("model.layers.{i}.self_attn.k_proj.weight", "text.layers.k_w_ldkh", 1),
    Rule("model.layers.{i}.self_attn.k_proj.bias", "text.layers.k_b_lkh", 0),
    Rule("model.layers.{i}.self_attn.v_proj.weight", "text.layers.v_w_ldkh", 1),
    Rule("model.layers.{i}.self_attn.v_proj.bias", "text.layers.v_b_lkh", 0),
    Rule("model.layers.{i}.self_attn.o_proj.weight", "text.layers.o_w_lnhd", 2),
    Rule("model.layers.{i}.post_attention_layernorm.weight", "text.layers.mlp_norm_ld", 0),
    Rule("model.layers.{i}.mlp.gate_proj.weight", "text.layers.gate_w_ldf", 1),
    Rule("model.layers.{i}.mlp.up_proj.weight", "text.layers.up_w_ldf", 1),
    Rule("model.layers.{i}.mlp.down_proj.weight", "text.layers.down_w_lfd", 1),
    Rule("model.layers.{i}.self_attn.q_norm.weight", "text.layers.q_norm_lh", 0),
    Rule("model.layers.{i}.self_attn.k_norm.weight", "text.layers.k_norm_lh", 0),
    Rule("model.layers.{i}.mlp.gate.weight", "text.layers.router_w_ldx", 1),
    Rule("model.layers.{i}.mlp.experts.gate_up_proj", "text.layers.expert_gate_up_w_lxdg", 0),
    Rule("model.layers.{i}.mlp.experts.down_proj", "text.layers.expert_down_w_lxfd", 0),
    Rule("visual.patch_embed.proj.weight", "vision.patch_w_pc", 1),
    Rule("visual.patch_embed.proj.bias", "vision.patch_b_c", 0),
    Rule("visual.pos_embed.weight", "vision.pos_embed_qc", 0),
    Rule("visual.blocks.{i}.norm1.weight", "vision.blocks.norm1_w_lc", 0),
    Rule("visual.blocks.{i}.norm1.bias", "vision.blocks.norm1_b_lc", 0),
    Rule("visual.blocks.{i}.attn.qkv.weight", "vision.blocks.qkv_w_lc3nh", 1),
    Rule("visual.blocks.{i}.attn.qkv.bias", "vision.blocks.qkv_b_l3nh", 0),
    Rule("visual.blocks.{i}.attn.proj.weight", "vision.blocks.proj_w_lnhc", 2),
    Rule("visual.blocks.{i}.attn.proj.bias", "vision.blocks.proj_b_lc", 0),
    Rule("visual.blocks.{i}.norm2.weight", "vision.blocks.norm2_w_lc", 0),
    Rule("visual.blocks.{i}.norm2.bias", "vision.blocks.norm2_b_lc", 0),
    Rule("visual.blocks.{i}.mlp.gate_proj.weight", "vision.blocks.gate_w_lcf", 1),
    Rule("visual.blocks.{i}.mlp.gate_proj.bias", "vision.blocks.gate_b_lf", 0),
)


def _fc_rules(prefix: str, fc1: str, fc2: str, leaves: tuple[str, str, str, str]) -> tuple[Rule, ...]:
    """Weight and bias rules of a two-layer MLP named `prefix.fc1` and `prefix.fc2`."""
    return (Rule(f"{prefix}.{fc1}.weight", leaves[0], 1), Rule(f"{prefix}.{fc1}.bias", leaves[1], 0),
            Rule(f"{prefix}.{fc2}.weight", leaves[2], 1), Rule(f"{prefix}.{fc2}.bias", leaves[3], 0))


_BLOCK_MLP = ("vision.blocks.up_w_lcf", "vision.blocks.up_b_lf", "vision.blocks.down_w_lfc", "vision.blocks.down_b_lc")
_MERGER = ("vision.merger_fc1_w_ee", "vision.merger_fc1_b_e", "vision.merger_fc2_w_ed", "vision.merger_fc2_b_d")
_QWEN2_MERGER = (Rule("visual.merger.ln_q.weight", "vision.merger_norm_w_c", 0),
                 Rule("visual.merger.ln_q.bias", "vision.merger_norm_b_c", 0),
                 *_fc_rules("visual.merger", "mlp.0", "mlp.2", _MERGER))
# The vision MLP and the mergers are named per family.
_FAMILY_RULES = {
    "qwen2_5_vl": (*_fc_rules("visual.blocks.{i}.mlp", "up_proj", "down_proj", _BLOCK_MLP), *_QWEN2_MERGER),
    "qwen2_vl": (*_fc_rules("visual.blocks.{i}.mlp", "fc1", "fc2", _BLOCK_MLP), *_QWEN2_MERGER),
    "qwen3_vl": (*_fc_rules("visual.blocks.{i}.mlp", "linear_fc1", "linear_fc2", _BLOCK_MLP),
                 Rule("visual.merger.norm.weight", "vision.merger_norm_w_c", 0),
                 Rule("visual.merger.norm.bias", "vision.merger_norm_b_c", 0),
                 *_fc_rules("visual.merger", "linear_fc1", "linear_fc2", _MERGER),
                 Rule("visual.deepstack_merger_list.{i}.norm.weight", "vision.deepstack.norm_w_se", 0),
                 Rule("visual.deepstack_merger_list.{i}.norm.bias", "vision.deepstack.norm_b_se", 0),
                 *_fc_rules("visual.deepstack_merger_list.{i}", "linear_fc1", "linear_fc2",
                            ("vision.deepstack.fc1_w_see", "vision.deepstack.fc1_b_se",
                             "vision.deepstack.fc2_w_sed", "vision.deepstack.fc2_b_sd"))),
}
# The experts' stacked matrices, stored as the hub's checkpoints hold them: [X, in, out] (ours).
_EXPERTS = ("text.layers.expert_gate_up_w_lxdg", "text.layers.expert_down_w_lxfd")
# Tensors stored as they are (not flattened like norms and biases): tables of rows, the experts.
_AS_IS = ("text.embed_vd", "vision.pos_embed_qc", *_EXPERTS)
_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))
# Families whose checkpoints (on the hub too) spell names the transformers 5 way: saved so.
_SAVED_WITH_ALIASES = ("qwen3_vl",)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one HF tensor goes: a leaf, a layer index (None if unstacked) and its HF shape."""

    leaf: str
    layer: int | None
    n_in: int
    hf_shape: tuple[int, ...]


def hf_slots(config: ModelConfig) -> dict[str, Slot]:
    """Every HF tensor name the model has, mapped to its slot."""
    shapes = dict(param_leaves(config))
    v = config.vision
    slots = {}
    for rule in RULES + _FAMILY_RULES[config.model_type]:
        if rule.leaf not in shapes:
            continue
        stacked = "{i}" in rule.hf
        shape = shapes[rule.leaf][1:] if stacked else shapes[rule.leaf]
        if rule.leaf == "vision.patch_w_pc":
            hf_shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        elif rule.n_in:
            hf_shape = (math.prod(shape[rule.n_in:]), math.prod(shape[:rule.n_in]))
        elif rule.leaf in _AS_IS:
            hf_shape = shape
        else:
            hf_shape = (math.prod(shape),)
        layers = range(shapes[rule.leaf][0]) if stacked else [None]
        for i in layers:
            slots[rule.hf.format(i=i)] = Slot(rule.leaf, i, rule.n_in, tuple(hf_shape))
    return slots


def canonical_name(name: str) -> str:
    for alias, canonical in _ALIASES:
        if name.startswith(alias):
            return canonical + name[len(alias):]
    return name


def saved_name(name: str, config: ModelConfig) -> str:
    """The name `save_pretrained` writes for the canonical `name` (`lm_head.weight` has no alias)."""
    if config.model_type in _SAVED_WITH_ALIASES:
        for alias, canonical in _ALIASES:
            if name.startswith(canonical):
                return alias + name[len(canonical):]
    return name


def to_ours(tensor: np.ndarray, slot: Slot, shape: tuple[int, ...]) -> np.ndarray:
    """HF layout -> our layout (matrices [out, in...] become [in..., out...])."""
    if slot.n_in:
        tensor = tensor.reshape(tensor.shape[0], -1).T
    return tensor.reshape(shape)


def to_hf(array: np.ndarray, slot: Slot) -> np.ndarray:
    """Our layout -> HF layout (inverse of `to_ours`)."""
    if slot.n_in:
        n_out = slot.hf_shape[0]
        return np.ascontiguousarray(array.reshape(-1, n_out).T).reshape(slot.hf_shape)
    return np.ascontiguousarray(array).reshape(slot.hf_shape)


def transformers_expert_layout(slot: Slot, stored_shape: tuple[int, ...]) -> bool:
    """Whether a tensor of `stored_shape` is `slot`'s experts as transformers 5 holds them and its
    `save_pretrained` writes them, [X, out, in], the hub's [X, in, out] transposed. Told apart by
    shape, as transformers does: a square expert matrix (hidden size = 2F or F) reads as the hub's."""
    if slot.leaf not in _EXPERTS or tuple(stored_shape) == slot.hf_shape:
        return False
    n_experts, n_in, n_out = slot.hf_shape
    return tuple(stored_shape) == (n_experts, n_out, n_in)


def hub_layout(tensor: np.ndarray, slot: Slot) -> np.ndarray:
    """A tensor as `slot` expects it: experts in transformers' layout transposed to the hub's."""
    return np.swapaxes(tensor, 1, 2) if transformers_expert_layout(slot, tensor.shape) else tensor


def _leaf_get(params: Params, leaf: str):
    node = params
    for part in leaf.split("."):
        node = getattr(node, part)
    return node


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> file that holds it, from the index or the single-file checkpoint."""
    index = path / SAFE_INDEX
    if index.is_file():
        try:
            raw = json.loads(index.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) and f and Path(f).name == f for f in weight_map.values()):
            raise CheckpointError(f"{index} is not a valid safetensors index: expected an object with a "
                                  f"\"weight_map\" object of tensor name -> file name in {path}")
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{index} names {f.name}, which is missing")
        return files
    single = path / SAFE_SINGLE
    if not single.is_file():
        raise CheckpointError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in {path}")
    try:
        with safe_open(single, framework="np") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{single} is corrupt or truncated: {e}") from None


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack, index, value):
    return jax.lax.dynamic_update_index_in_dim(stack, value.astype(stack.dtype), index, 0)


def matched_names(path: Path, config: ModelConfig, slots: dict[str, Slot], files: dict[str, Path]) -> dict[str, str]:
    """Canonical name -> the name stored in the files, for every tensor the checkpoint holds;
    CheckpointError when they are not exactly the model's `slots`."""
    names = {canonical_name(n): n for n in files}
    missing = [n for n in slots if n not in names]
    if config.text.tie_word_embeddings:
        names.pop("lm_head.weight", None)  # some tied checkpoints still carry a copy of the embedding
    unexpected = [names[n] for n in names if n not in slots]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match its config ({config.model_type}): "
                              + (f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}; " if missing else "")
                              + (f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}" if unexpected else ""))
    return names


def load_pretrained(path, dtype="bfloat16") -> Model:
    """Load a HF Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense or MoE) checkpoint directory into a `Model`
    (params in `dtype`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = ModelConfig.from_file(path)
    dtype = jnp.dtype(dtype)
    slots = hf_slots(config)
    files = _weight_files(path)
    names = matched_names(path, config, slots, files)
    shapes = dict(param_leaves(config))
    leaves: dict[str, jax.Array] = {}
    for name, slot in slots.items():
        file = files[names[name]]
        try:
            # One tensor per opening: the memory map, and the pages it touched, go with it.
            with safe_open(file, framework="np") as f:
                tensor = hub_layout(f.get_tensor(names[name]), slot)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is corrupt or truncated: {e}") from None
        if tuple(tensor.shape) != slot.hf_shape:
            raise CheckpointError(f"tensor {names[name]} in {file.name} has shape {tuple(tensor.shape)}, "
                                  f"expected {slot.hf_shape}")
        shape = shapes[slot.leaf] if slot.layer is None else shapes[slot.leaf][1:]
        value = jnp.asarray(to_ours(tensor, slot, shape), dtype)
        del tensor
        if slot.layer is None:
            leaves[slot.leaf] = value
        else:
            if slot.leaf not in leaves:
                leaves[slot.leaf] = jnp.zeros(shapes[slot.leaf], dtype)
            leaves[slot.leaf] = _set_layer(leaves[slot.leaf], slot.layer, value)
        del value
    params = jax.tree_util.tree_map_with_path(
        lambda p, _: leaves[".".join(k.name for k in p)], param_shapes(config),
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x))
    return Model(config=config, params=params)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B\s*", size.upper())
    if not m:
        raise ValueError(f"cannot read size {size!r}; use e.g. '5GB', '200MB' or a byte count")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def check_output_dir(path) -> Path:
    """Make sure `path` is (or can be created as) a writable directory; CheckpointError naming it if not.
    Cheap: call it before slow work whose result goes there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot write a checkpoint to {path}: it is an existing file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a parent is a file
        raise CheckpointError(f"cannot create the checkpoint directory {path}: a part of the path is a file") from None
    except OSError as e:
        raise CheckpointError(f"cannot create the checkpoint directory {path}: {e.strerror or e}") from None
    probe = path / f".svlm-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot write to the checkpoint directory {path}: {e.strerror or e}") from None
    return path


def save_pretrained(model: Model, path, *, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and safetensors (sharded above `max_shard_size`, with an index) that
    transformers' Qwen2(.5)-VL / Qwen3-VL `from_pretrained` loads without missing or unexpected keys.

    Each file is written under a temporary name and renamed once all are written, config.json last;
    if writing fails (read-only or full file system) the partial files are removed, files already in
    `path` are left as they were, and CheckpointError names the file."""
    limit = _parse_size(max_shard_size)
    path = check_output_dir(path)
    slots = hf_slots(model.config)
    dtype = jnp.dtype(model.params.text.embed_vd.dtype)
    config = {**model.config.to_dict(), "dtype": str(dtype)}
    shards: list[list[str]] = [[]]
    size = 0
    for name, slot in slots.items():
        nbytes = math.prod(slot.hf_shape) * dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    written: list[tuple[Path, Path]] = []  # (temporary, final)

    def partial(fname: str) -> tuple[Path, Path]:
        pair = (path / f".{fname}.partial", path / fname)
        written.append(pair)
        return pair

    try:
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = SAFE_SINGLE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in shard:
                slot = slots[name]
                leaf = _leaf_get(model.params, slot.leaf)
                array = np.asarray(leaf if slot.layer is None else leaf[slot.layer])
                tensors[saved_name(name, model.config)] = to_hf(array, slot)
                weight_map[saved_name(name, model.config)] = fname
            save_file(tensors, str(partial(fname)[0]), metadata={"format": "pt"})
            del tensors
        if len(shards) > 1:
            total = sum(math.prod(s.hf_shape) * dtype.itemsize for s in slots.values())
            partial(SAFE_INDEX)[0].write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        partial("config.json")[0].write_text(json.dumps(config, indent=2))
        for tmp, final in written:
            os.replace(tmp, final)
    except (OSError, SafetensorError) as e:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        failed = written[-1][1] if written else path
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"cannot write {failed}: {reason}") from None
