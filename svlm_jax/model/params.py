"""Parameter pytrees: dataclasses of arrays, per-layer weights stacked on a leading layer axis.

Axis letters in field names document the shapes (`param_shapes`): L layers, D text hidden, N query
heads, K kv heads, H head dim, F MLP width (an expert's, moe_intermediate_size, in a MoE), X experts,
G = 2F (an expert's gate then up columns), V vocab, C vision channels, P patch values (1176, 1536 for
Qwen3-VL), E merger width (4C), Q rows of the learned position table, S DeepStack levels. Matrices are stored
[in, out]. Fields that a variant lacks are None (Qwen2-VL has no gate, LayerNorm biases only in
Qwen2-VL and Qwen3-VL, q/k/v biases only in Qwen2, q/k norms, patch bias, position table and
DeepStack mergers only in Qwen3-VL, tied embeddings have no separate head; a MoE has the router and
experts instead of the dense MLP). The experts are stored as the hub's checkpoints hold them
(gate and up fused, [X, D, 2F]), the layout `jax.lax.ragged_dot` takes.

What each parameter is for training (its logical axes, which train/sharding.py maps to mesh axes,
its initialisation and whether AdamW decays it) is `PARAM_RULES`, keyed by the parameter's dotted
path ("text.layers.q_w_ldnh"): a field's name decides nothing, and a path missing from the table is
an error.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from svlm_jax.config import ModelConfig


@struct.dataclass
class VisionBlocks:
    norm1_w_lc: jax.Array
    norm1_b_lc: jax.Array | None
    qkv_w_lc3nh: jax.Array
    qkv_b_l3nh: jax.Array
    proj_w_lnhc: jax.Array
    proj_b_lc: jax.Array
    norm2_w_lc: jax.Array
    norm2_b_lc: jax.Array | None
    gate_w_lcf: jax.Array | None
    gate_b_lf: jax.Array | None
    up_w_lcf: jax.Array
    up_b_lf: jax.Array
    down_w_lfc: jax.Array
    down_b_lc: jax.Array


@struct.dataclass
class DeepstackMergers:
    """Qwen3-VL's DeepStack mergers, stacked on S: each norms the 2x2-merged features (over E, after
    the merge, unlike the main merger) before the same fc1-GELU-fc2."""

    norm_w_se: jax.Array
    norm_b_se: jax.Array
    fc1_w_see: jax.Array
    fc1_b_se: jax.Array
    fc2_w_sed: jax.Array
    fc2_b_sd: jax.Array


@struct.dataclass
class VisionParams:
    patch_w_pc: jax.Array
    blocks: VisionBlocks
    merger_norm_w_c: jax.Array
    merger_norm_b_c: jax.Array | None
    merger_fc1_w_ee: jax.Array
    merger_fc1_b_e: jax.Array
    merger_fc2_w_ed: jax.Array
    merger_fc2_b_d: jax.Array
    patch_b_c: jax.Array | None = None
    pos_embed_qc: jax.Array | None = None
    deepstack: DeepstackMergers | None = None


@struct.dataclass
class TextLayers:
    attn_norm_ld: jax.Array
    q_w_ldnh: jax.Array
    q_b_lnh: jax.Array | None
    k_w_ldkh: jax.Array
    k_b_lkh: jax.Array | None
    v_w_ldkh: jax.Array
    v_b_lkh: jax.Array | None
    o_w_lnhd: jax.Array
    mlp_norm_ld: jax.Array
    gate_w_ldf: jax.Array | None
    up_w_ldf: jax.Array | None
    down_w_lfd: jax.Array | None
    q_norm_lh: jax.Array | None = None
    k_norm_lh: jax.Array | None = None
    router_w_ldx: jax.Array | None = None
    expert_gate_up_w_lxdg: jax.Array | None = None
    expert_down_w_lxfd: jax.Array | None = None


@struct.dataclass
class TextParams:
    embed_vd: jax.Array
    layers: TextLayers
    final_norm_d: jax.Array
    lm_head_dv: jax.Array | None


@struct.dataclass
class Params:
    vision: VisionParams
    text: TextParams


@struct.dataclass
class Model:
    """A loaded model: static config plus parameter pytree; passes through `jax.jit` as one argument."""

    config: ModelConfig = struct.field(pytree_node=False)
    params: Params


def param_shapes(config: ModelConfig) -> Params:
    """The shape of every parameter (a Params of tuples, None where the variant has no such weight)."""
    v, t = config.vision, config.text
    L, C, N, H, F = v.depth, v.hidden_size, v.num_heads, v.head_dim, v.intermediate_size
    E = C * v.merge_unit
    qwen25 = v.kind == "qwen2_5_vl"
    S = len(v.deepstack_visual_indexes)
    vision = VisionParams(
        patch_w_pc=(v.patch_dim, C),
        blocks=VisionBlocks(
            norm1_w_lc=(L, C), norm1_b_lc=None if qwen25 else (L, C),
            qkv_w_lc3nh=(L, C, 3, N, H), qkv_b_l3nh=(L, 3, N, H),
            proj_w_lnhc=(L, N, H, C), proj_b_lc=(L, C),
            norm2_w_lc=(L, C), norm2_b_lc=None if qwen25 else (L, C),
            gate_w_lcf=(L, C, F) if qwen25 else None, gate_b_lf=(L, F) if qwen25 else None,
            up_w_lcf=(L, C, F), up_b_lf=(L, F), down_w_lfc=(L, F, C), down_b_lc=(L, C)),
        merger_norm_w_c=(C,), merger_norm_b_c=None if qwen25 else (C,),
        merger_fc1_w_ee=(E, E), merger_fc1_b_e=(E,),
        merger_fc2_w_ed=(E, v.out_hidden_size), merger_fc2_b_d=(v.out_hidden_size,),
        patch_b_c=(C,) if v.patch_bias else None,
        pos_embed_qc=(v.num_position_embeddings, C) if v.num_position_embeddings else None,
        deepstack=DeepstackMergers(
            norm_w_se=(S, E), norm_b_se=(S, E), fc1_w_see=(S, E, E), fc1_b_se=(S, E),
            fc2_w_sed=(S, E, v.out_hidden_size), fc2_b_sd=(S, v.out_hidden_size)) if S else None,
    )
    Lt, D, Nq, K, Ht, Ft, V = (t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim,
                               t.intermediate_size, t.vocab_size)
    bias = t.qkv_bias
    X, Fx, dense = t.num_experts, t.moe_intermediate_size, not t.num_experts
    text = TextParams(
        embed_vd=(V, D),
        layers=TextLayers(
            attn_norm_ld=(Lt, D), q_w_ldnh=(Lt, D, Nq, Ht), q_b_lnh=(Lt, Nq, Ht) if bias else None,
            k_w_ldkh=(Lt, D, K, Ht), k_b_lkh=(Lt, K, Ht) if bias else None,
            v_w_ldkh=(Lt, D, K, Ht), v_b_lkh=(Lt, K, Ht) if bias else None,
            o_w_lnhd=(Lt, Nq, Ht, D), mlp_norm_ld=(Lt, D),
            gate_w_ldf=(Lt, D, Ft) if dense else None, up_w_ldf=(Lt, D, Ft) if dense else None,
            down_w_lfd=(Lt, Ft, D) if dense else None,
            q_norm_lh=(Lt, Ht) if t.qk_norm else None, k_norm_lh=(Lt, Ht) if t.qk_norm else None,
            router_w_ldx=None if dense else (Lt, D, X), expert_gate_up_w_lxdg=None if dense else (Lt, X, D, 2 * Fx),
            expert_down_w_lxfd=None if dense else (Lt, X, Fx, D)),
        final_norm_d=(D,), lm_head_dv=None if t.tie_word_embeddings else (D, V),
    )
    return Params(vision=vision, text=text)


@dataclasses.dataclass(frozen=True)
class ParamRule:
    axes: tuple[str, ...]  # logical name of each dimension (train/sharding.py maps them to mesh axes)
    init: str              # "normal" (init_params' std), "zeros" or "ones"
    decayed: bool          # whether AdamW's weight decay applies

    def __post_init__(self):
        if self.init not in ("normal", "zeros", "ones"):
            raise ValueError(f"unknown init {self.init!r}")


def _weight(*axes: str) -> ParamRule:
    """A matrix or embedding: random, weight-decayed."""
    return ParamRule(axes, init="normal", decayed=True)


def _bias(*axes: str) -> ParamRule:
    return ParamRule(axes, init="zeros", decayed=False)


def _norm_weight(*axes: str) -> ParamRule:
    return ParamRule(axes, init="ones", decayed=False)


# Every parameter of every variant. The vision tower has axis names of its own (never "embed",
# "mlp", ...): it is sharded by rules of its own (train/sharding.py replicates it).
PARAM_RULES: dict[str, ParamRule] = {
    "vision.patch_w_pc": _weight("vision_patch", "vision_embed"),
    "vision.blocks.norm1_w_lc": _norm_weight("vision_layers", "vision_embed"),
    "vision.blocks.norm1_b_lc": _bias("vision_layers", "vision_embed"),
    "vision.blocks.qkv_w_lc3nh": _weight("vision_layers", "vision_embed", "vision_qkv", "vision_heads",
                                         "vision_head_dim"),
    "vision.blocks.qkv_b_l3nh": _bias("vision_layers", "vision_qkv", "vision_heads", "vision_head_dim"),
    "vision.blocks.proj_w_lnhc": _weight("vision_layers", "vision_heads", "vision_head_dim", "vision_embed"),
    "vision.blocks.proj_b_lc": _bias("vision_layers", "vision_embed"),
    "vision.blocks.norm2_w_lc": _norm_weight("vision_layers", "vision_embed"),
    "vision.blocks.norm2_b_lc": _bias("vision_layers", "vision_embed"),
    "vision.blocks.gate_w_lcf": _weight("vision_layers", "vision_embed", "vision_mlp"),
    "vision.blocks.gate_b_lf": _bias("vision_layers", "vision_mlp"),
    "vision.blocks.up_w_lcf": _weight("vision_layers", "vision_embed", "vision_mlp"),
    "vision.blocks.up_b_lf": _bias("vision_layers", "vision_mlp"),
    "vision.blocks.down_w_lfc": _weight("vision_layers", "vision_mlp", "vision_embed"),
    "vision.blocks.down_b_lc": _bias("vision_layers", "vision_embed"),
    "vision.merger_norm_w_c": _norm_weight("vision_embed"),
    "vision.merger_norm_b_c": _bias("vision_embed"),
    "vision.merger_fc1_w_ee": _weight("vision_merger", "vision_merger"),
    "vision.merger_fc1_b_e": _bias("vision_merger"),
    "vision.merger_fc2_w_ed": _weight("vision_merger", "vision_out"),
    "vision.merger_fc2_b_d": _bias("vision_out"),
    "vision.patch_b_c": _bias("vision_embed"),
    # Rows of the learned position table: a vision axis like the others (replicated).
    "vision.pos_embed_qc": _weight("vision_patch", "vision_embed"),
    # DeepStack levels stack like blocks.
    "vision.deepstack.norm_w_se": _norm_weight("vision_layers", "vision_merger"),
    "vision.deepstack.norm_b_se": _bias("vision_layers", "vision_merger"),
    "vision.deepstack.fc1_w_see": _weight("vision_layers", "vision_merger", "vision_merger"),
    "vision.deepstack.fc1_b_se": _bias("vision_layers", "vision_merger"),
    "vision.deepstack.fc2_w_sed": _weight("vision_layers", "vision_merger", "vision_out"),
    "vision.deepstack.fc2_b_sd": _bias("vision_layers", "vision_out"),
    "text.embed_vd": _weight("vocab", "embed"),
    "text.layers.attn_norm_ld": _norm_weight("layers", "embed"),
    "text.layers.q_w_ldnh": _weight("layers", "embed", "q_heads", "head_dim"),
    "text.layers.q_b_lnh": _bias("layers", "q_heads", "head_dim"),
    "text.layers.k_w_ldkh": _weight("layers", "embed", "kv_heads", "head_dim"),
    "text.layers.k_b_lkh": _bias("layers", "kv_heads", "head_dim"),
    "text.layers.v_w_ldkh": _weight("layers", "embed", "kv_heads", "head_dim"),
    "text.layers.v_b_lkh": _bias("layers", "kv_heads", "head_dim"),
    "text.layers.o_w_lnhd": _weight("layers", "q_heads", "head_dim", "embed"),
    "text.layers.mlp_norm_ld": _norm_weight("layers", "embed"),
    "text.layers.gate_w_ldf": _weight("layers", "embed", "mlp"),
    "text.layers.up_w_ldf": _weight("layers", "embed", "mlp"),
    "text.layers.down_w_lfd": _weight("layers", "mlp", "embed"),
    # The experts: split like the dense MLP's matrices (D over fsdp, F over tensor); the expert axis
    # has its own rule. The fused [gate | up] columns split in contiguous blocks, so a tensor shard may
    # hold gate columns whose up columns are on another: the partitioner pairs the activations.
    "text.layers.router_w_ldx": _weight("layers", "embed", "experts"),
    "text.layers.expert_gate_up_w_lxdg": _weight("layers", "experts", "embed", "mlp"),
    "text.layers.expert_down_w_lxfd": _weight("layers", "experts", "mlp", "embed"),
    "text.layers.q_norm_lh": _norm_weight("layers", "head_dim"),
    "text.layers.k_norm_lh": _norm_weight("layers", "head_dim"),
    "text.final_norm_d": _norm_weight("embed"),
    "text.lm_head_dv": _weight("embed", "vocab"),
}


def param_rule(path: str) -> ParamRule:
    if path not in PARAM_RULES:
        raise KeyError(f"parameter {path!r} has no entry in PARAM_RULES (svlm_jax/model/params.py)")
    return PARAM_RULES[path]


def dotted_path(key_path) -> str:
    """A parameter's key path inside its tree as a dotted string: "layers.q_w_ldnh"."""
    return ".".join(k.name for k in key_path)


# The parameter trees training holds, with the path of their root: all parameters, or the part the
# optimizer trains (the LM alone when the vision tower is frozen), whose moments have its structure.
PARAM_TREE_ROOTS = {Params: "", TextParams: "text.", VisionParams: "vision."}


def is_param_tree(x) -> bool:
    return type(x) in PARAM_TREE_ROOTS


def map_param_tree(fn, tree):
    """fn(parameter path, leaf) on every leaf of a parameter tree (a Params or its text or vision part)."""
    root = PARAM_TREE_ROOTS[type(tree)]
    return jax.tree_util.tree_map_with_path(lambda path, x: fn(root + dotted_path(path), x), tree)


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def param_leaves(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(dotted path, shape) of every parameter, e.g. ("text.layers.q_w_ldnh", (L, D, N, H))."""
    flat, _ = jax.tree_util.tree_flatten_with_path(param_shapes(config), is_leaf=_is_shape)
    return [(dotted_path(path), shape) for path, shape in flat]


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random weights, each as PARAM_RULES says: normal(0, std), zeros or ones. Drawn with numpy
    (seeded from `key`, in leaf order): per-shape jax.random programs would each compile."""
    shapes = param_shapes(config)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())

    def make(path, shape):
        init = param_rule(dotted_path(path)).init
        if init == "normal":
            return jnp.asarray(std * rng.standard_normal(shape, np.float32), dtype)
        return (jnp.zeros if init == "zeros" else jnp.ones)(shape, dtype)

    return jax.tree_util.tree_map_with_path(make, shapes, is_leaf=_is_shape)
