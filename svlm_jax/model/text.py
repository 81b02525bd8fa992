"""The Qwen2 / Qwen3 language model as pure functions over `TextParams`.

A decoder layer is split in two so the streaming engine can put its cache between them:
`project_qkv` (norm, q/k/v with bias for Qwen2, per-head q/k RMSNorm for Qwen3) and `finish_layer`
(output projection, residual, SwiGLU MLP or, in Qwen3-VL-MoE, the sparse mixture of SwiGLU experts).
Rotary is applied by the caller (the engine caches keys before rotation). Qwen3-VL's DeepStack adds
vision features to the output of the first layers (`add_deepstack`). Axes: B batch, T tokens, D hidden,
N query heads, K kv heads, H head dim, V vocab, S DeepStack levels, F MLP width, X experts, M tokens
flat (B*T), R routed rows (M * experts per token), G an expert's gate and up columns (2F).
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
    q = jnp.einsum("BTD,DNH->BTNH", h, layer.q_w_ldnh)
    k = jnp.einsum("BTD,DKH->BTKH", h, layer.k_w_ldkh)
    v = jnp.einsum("BTD,DKH->BTKH", h, layer.v_w_ldkh)
    if cfg.qkv_bias:
        q, k, v = q + layer.q_b_lnh, k + layer.k_b_lkh, v + layer.v_b_lkh
    if cfg.qk_norm:
        q, k = rms_norm(q, layer.q_norm_lh, cfg.rms_norm_eps), rms_norm(k, layer.k_norm_lh, cfg.rms_norm_eps)
    return q, k, v


def finish_layer(cfg: TextConfig, layer: TextLayers, x_btd, attn_btnh):
    """Output projection and residual, then the SwiGLU MLP block with its residual."""
    # Heads flattened on both sides: XLA then transposes the small attention output, not o_w.
    b, t, n, h = attn_btnh.shape
    o_w_ed = layer.o_w_lnhd.reshape(n * h, -1)
    x_btd = x_btd + jnp.einsum("BTE,ED->BTD", attn_btnh.reshape(b, t, n * h), o_w_ed)
    h = rms_norm(x_btd, layer.mlp_norm_ld, cfg.rms_norm_eps)
    if cfg.num_experts:
        return x_btd + experts_mlp(cfg, layer, h)
    gate = jnp.einsum("BTD,DF->BTF", h, layer.gate_w_ldf)
    up = jnp.einsum("BTD,DF->BTF", h, layer.up_w_ldf)
    return x_btd + jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, layer.down_w_lfd)


def route(cfg: TextConfig, router_w_dx, x_md):
    """The experts of each token and their weights, as transformers' Qwen3-VL-MoE router: softmax of
    the router logits in float32, the top `num_experts_per_tok`, renormalised to sum to 1 (then in
    the activations' dtype). Returns (expert ids [M, k] int32, weights [M, k])."""
    logits_mx = jnp.einsum("MD,DX->MX", x_md, router_w_dx)
    probs_mx = jax.nn.softmax(logits_mx.astype(jnp.float32), axis=-1)
    top_mk, expert_mk = jax.lax.top_k(probs_mx, cfg.num_experts_per_tok)
    return expert_mk, (top_mk / jnp.sum(top_mk, axis=-1, keepdims=True)).astype(x_md.dtype)


def experts_mlp(cfg: TextConfig, layer: TextLayers, h_btd):
    """The sparse MoE block [B, T, D]: each token through its routed SwiGLU experts, summed with its
    routing weights. The (token, expert) rows are sorted by expert so that each expert's rows are
    contiguous, and `jax.lax.ragged_dot` multiplies each group by its expert's weights only: the
    work is that of the routed rows, not of every expert on every token."""
    b, t, d = h_btd.shape
    k = cfg.num_experts_per_tok
    x_md = h_btd.reshape(b * t, d)
    expert_mk, weight_mk = route(cfg, layer.router_w_ldx, x_md)
    expert_r = expert_mk.reshape(-1)
    order_r = jnp.argsort(expert_r)  # row r of the sorted rows is (token order_r[r] // k, its choice)
    group_sizes_x = jnp.bincount(expert_r, length=cfg.num_experts).astype(jnp.int32)
    gate_up_rg = jax.lax.ragged_dot(x_md[order_r // k], layer.expert_gate_up_w_lxdg, group_sizes_x)
    gate_rf, up_rf = jnp.split(gate_up_rg, 2, axis=-1)
    y_rd = jax.lax.ragged_dot(jax.nn.silu(gate_rf) * up_rf, layer.expert_down_w_lxfd, group_sizes_x)
    y_mkd = jnp.zeros_like(y_rd).at[order_r].set(y_rd, unique_indices=True).reshape(b * t, k, d)
    return jnp.einsum("MKD,MK->MD", y_mkd, weight_mk).reshape(b, t, d)


def text_angles(cfg: TextConfig, positions_bt3):
    """M-RoPE angles [B, T, H/2] for 3D positions."""
    return rope.mrope_angles(positions_bt3, rope.inv_freq(cfg.head_dim, cfg.rope_theta), cfg.mrope_section,
                             cfg.mrope_interleaved)


def add_deepstack(x_btd, deepstack_sbtd, layer_index):
    """The output of layer `layer_index` plus its DeepStack features (level `layer_index` of
    deepstack_sbtd [S, B, T, D], zero away from vision tokens); unchanged past the S levels."""
    n_levels = deepstack_sbtd.shape[0]
    level_btd = deepstack_sbtd[jnp.minimum(layer_index, n_levels - 1)].astype(x_btd.dtype)
    return jnp.where(layer_index < n_levels, x_btd + level_btd, x_btd)


def decode_hidden(cfg: TextConfig, params: TextParams, x_btd, positions_bt3, segment_bt, order_bt, *,
                  deepstack_sbtd=None, remat: bool = False, remat_policy=None, attention_backend: str = "auto"):
    """All decoder layers over full sequences (no cache) and the final norm: hidden [B, T, D].

    Attention: causal in `order_bt` (None: by index in the row), within equal `segment_bt` (0 = padding), by
    `kernels_pallas.causal_attention` on `attention_backend` (differentiable with every backend).
    `deepstack_sbtd` (Qwen3-VL with vision, else None): features added after each of the first S layers.
    `remat` rematerialises each layer in the backward pass (training), keeping what the jax.checkpoint
    `remat_policy` lets it save (None: only the layer's input).
    """
    angles_bth2 = text_angles(cfg, positions_bt3)

    def layer_fn(x, layer_and_index):
        layer, index = layer_and_index
        q, k, v = project_qkv(cfg, layer, x)
        q, k = rope.apply_rotary(q, angles_bth2), rope.apply_rotary(k, angles_bth2)
        o = attention_api.causal_attention(q, k, v, segment_bt, segment_bt, order_bt, order_bt,
                                           backend=attention_backend)
        x = finish_layer(cfg, layer, x, o)
        return (x if deepstack_sbtd is None else add_deepstack(x, deepstack_sbtd, index)), None

    if remat:
        layer_fn = jax.checkpoint(layer_fn, policy=remat_policy)
    x_btd, _ = jax.lax.scan(layer_fn, x_btd, (params.layers, jnp.arange(cfg.num_layers)))
    return rms_norm(x_btd, params.final_norm_d, cfg.rms_norm_eps)


def logits(params: TextParams, hidden_btd):
    """LM head (tied to the embedding when there is no separate head): [B, T, V] in float32."""
    if params.lm_head_dv is None:
        return jnp.einsum("BTD,VD->BTV", hidden_btd, params.embed_vd, preferred_element_type=jnp.float32)
    return jnp.einsum("BTD,DV->BTV", hidden_btd, params.lm_head_dv, preferred_element_type=jnp.float32)
