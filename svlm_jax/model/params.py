"""Parameter pytrees: dataclasses of arrays, per-layer weights stacked on a leading layer axis.

Axis letters: L layers, D text hidden, N query heads, K kv heads, H head dim, F MLP width, V vocab,
C vision channels, P patch values (1176), E merger width (4C). Matrices are stored [in, out].
Fields that a variant lacks are None (Qwen2-VL has no gate, LayerNorm biases only there, tied
embeddings have no separate head).
"""

from __future__ import annotations

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
class VisionParams:
    patch_w_pc: jax.Array
    blocks: VisionBlocks
    merger_norm_w_c: jax.Array
    merger_norm_b_c: jax.Array | None
    merger_fc1_w_ee: jax.Array
    merger_fc1_b_e: jax.Array
    merger_fc2_w_ed: jax.Array
    merger_fc2_b_d: jax.Array


@struct.dataclass
class TextLayers:
    attn_norm_ld: jax.Array
    q_w_ldnh: jax.Array
    q_b_lnh: jax.Array
    k_w_ldkh: jax.Array
    k_b_lkh: jax.Array
    v_w_ldkh: jax.Array
    v_b_lkh: jax.Array
    o_w_lnhd: jax.Array
    mlp_norm_ld: jax.Array
    gate_w_ldf: jax.Array
    up_w_ldf: jax.Array
    down_w_lfd: jax.Array


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
    )
    Lt, D, Nq, K, Ht, Ft, V = (t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim,
                               t.intermediate_size, t.vocab_size)
    text = TextParams(
        embed_vd=(V, D),
        layers=TextLayers(
            attn_norm_ld=(Lt, D), q_w_ldnh=(Lt, D, Nq, Ht), q_b_lnh=(Lt, Nq, Ht),
            k_w_ldkh=(Lt, D, K, Ht), k_b_lkh=(Lt, K, Ht), v_w_ldkh=(Lt, D, K, Ht), v_b_lkh=(Lt, K, Ht),
            o_w_lnhd=(Lt, Nq, Ht, D), mlp_norm_ld=(Lt, D),
            gate_w_ldf=(Lt, D, Ft), up_w_ldf=(Lt, D, Ft), down_w_lfd=(Lt, Ft, D)),
        final_norm_d=(D,), lm_head_dv=None if t.tie_word_embeddings else (D, V),
    )
    return Params(vision=vision, text=text)


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def param_leaves(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(dotted path, shape) of every parameter, e.g. ("text.layers.q_w_ldnh", (L, D, N, H))."""
    flat, _ = jax.tree_util.tree_flatten_with_path(param_shapes(config), is_leaf=_is_shape)
    return [(".".join(k.name for k in path), shape) for path, shape in flat]


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random weights: normal(0, std) matrices, zero biases, unit norm weights. Drawn with numpy
    (seeded from `key`): per-shape jax.random programs would each compile."""
    shapes = param_shapes(config)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())

    def make(path, shape):
        field = path[-1].name
        if "_b_" in field:
            return jnp.zeros(shape, dtype)
        if "norm" in field:
            return jnp.ones(shape, dtype)
        return jnp.asarray(std * rng.standard_normal(shape, np.float32), dtype)

    return jax.tree_util.tree_map_with_path(make, shapes, is_leaf=_is_shape)
