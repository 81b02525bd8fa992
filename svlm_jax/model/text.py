"""The Qwen2 language model as pure functions over `TextParams`.

A decoder layer is split in two so the streaming engine can put its cache between them:
`project_qkv` (norm, q/k/v with bias) and `finish_layer` (output projection, residual, SwiGLU MLP).
Rotary is applied by the caller (the engine caches keys before rotation).
Axes: B batch, T tokens, D hidden, N query heads, K kv heads, H head dim, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas import api as attention_api
from svlm_jax.config import TextConfig
from svlm_jax.model import rope
from svlm_jax.model.params import TextLayers, TextParams
from svlm_jax.model.vision import rms_norm


def project_qkv(cfg: TextConfig, layer: TextLayers, x_btd):
    """Pre-attention norm and projections: q [B,T,N,H], k and v [B,T,K,H], not yet rotated."""
    h = rms_norm(x_btd, layer.attn_norm_ld, cfg.rms_norm_eps)
    q = jnp.einsum("BTD,DNH->BTNH", h, layer.q_w_ldnh) + layer.q_b_lnh
    k = jnp.einsum("BTD,DKH->BTKH", h, layer.k_w_ldkh) + layer.k_b_lkh
    v = jnp.einsum("BTD,DKH->BTKH", h, layer.v_w_ldkh) + layer.v_b_lkh
    return q, k, v


def finish_layer(cfg: TextConfig, layer: TextLayers, x_btd, attn_btnh):
    """Output projection and residual, then the SwiGLU MLP block with its residual."""
    x_btd = x_btd + jnp.einsum("BTNH,NHD->BTD", attn_btnh, layer.o_w_lnhd)
    h = rms_norm(x_btd, layer.mlp_norm_ld, cfg.rms_norm_eps)
    gate = jnp.einsum("BTD,DF->BTF", h, layer.gate_w_ldf)
    up = jnp.einsum("BTD,DF->BTF", h, layer.up_w_ldf)
    return x_btd + jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, layer.down_w_lfd)


def text_angles(cfg: TextConfig, positions_bt3):
    """M-RoPE angles [B, T, H/2] for 3D positions."""
    return rope.mrope_angles(positions_bt3, rope.inv_freq(cfg.head_dim, cfg.rope_theta), cfg.mrope_section)


def decode_hidden(cfg: TextConfig, params: TextParams, x_btd, positions_bt3, segment_bt, order_bt, *,
                  remat: bool = False, attention_backend: str = "auto"):
    """All decoder layers over full sequences (no cache) and the final norm: hidden [B, T, D].

    Attention: causal in `order_bt`, within equal `segment_bt` (0 = padding), by
    `kernels_pallas.causal_attention` on `attention_backend` (differentiable with every backend).
    `remat` rematerialises each layer in the backward pass (training).
    """
    angles_bth2 = text_angles(cfg, positions_bt3)

    def layer_fn(x, layer):
        q, k, v = project_qkv(cfg, layer, x)
        q, k = rope.apply_rotary(q, angles_bth2), rope.apply_rotary(k, angles_bth2)
        o = attention_api.causal_attention(q, k, v, segment_bt, segment_bt, order_bt, order_bt,
                                           backend=attention_backend)
        return finish_layer(cfg, layer, x, o), None

    if remat:
        layer_fn = jax.checkpoint(layer_fn)
    x_btd, _ = jax.lax.scan(layer_fn, x_btd, params.layers)
    return rms_norm(x_btd, params.final_norm_d, cfg.rms_norm_eps)


def logits(params: TextParams, hidden_btd):
    """LM head (tied to the embedding when there is no separate head): [B, T, V] in float32."""
    if params.lm_head_dv is None:
        return jnp.einsum("BTD,VD->BTV", hidden_btd, params.embed_vd, preferred_element_type=jnp.float32)
    return jnp.einsum("BTD,DV->BTV", hidden_btd, params.lm_head_dv, preferred_element_type=jnp.float32)
