"""The Qwen2-VL / Qwen2.5-VL vision tower as pure functions.

Host side (`vision_layout`, numpy): from the grids, the window permutation, the segment ids of
window and frame attention and the patch coordinates. Device side (`encode`): patch embedding,
blocks scanned over the layer axis, the 2x2 merger; tokens come back in processor order.
Arrays: P patches (rows of the processor), M = P / 4 merged tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kernels_pallas import api as attention_api
from svlm_jax.config import VisionConfig
from svlm_jax.model import rope
from svlm_jax.model.params import VisionParams


@struct.dataclass
class VisionLayout:
    """Per-patch data the tower needs besides pixels; all arrays, so one compilation serves any
    grids with the same total patch count. Patches are in window order (Qwen2.5-VL) throughout."""

    patch_order_p: jax.Array    # window-order patch -> processor-order patch
    merged_restore_m: jax.Array  # processor-order merged token -> window-order merged token
    hw_p2: jax.Array             # (row, col) of each window-order patch
    window_segment_p: jax.Array  # window id + 1
    frame_segment_p: jax.Array   # frame id + 1 (full attention is per temporal slice)


def grid_list(grid_thw) -> list[tuple[int, int, int]]:
    """Validated list of (t, h, w) grids from an array-like [n, 3]."""
    grids = [tuple(int(x) for x in g) for g in np.asarray(grid_thw).reshape(-1, 3)]
    for g in grids:
        if min(g) <= 0:
            raise ValueError(f"grid_thw {g} must be positive")
    return grids


def num_patches(grid_thw) -> int:
    return sum(t * h * w for t, h, w in grid_list(grid_thw))


def vision_layout(cfg: VisionConfig, grid_thw) -> VisionLayout:
    """Window permutation and segment ids for a list of grids, following Qwen's window rule: merged
    tokens of each temporal slice are tiled by windows of `window_merged` squared (cut at the edges),
    windows in row-major order, tokens row-major inside a window."""
    m, unit = cfg.spatial_merge_size, cfg.merge_unit
    merged_order, window_ids, frame_ids, hw = [], [], [], []
    n_merged = n_windows = n_frames = 0
    for t, h, w in grid_list(grid_thw):
        if h % m or w % m:
            raise ValueError(f"grid {(t, h, w)}: h and w must be multiples of spatial_merge_size {m}")
        r, c = h // m, w // m
        index_trc = np.arange(t * r * c).reshape(t, r, c) + n_merged
        if cfg.windowed:
            ws = cfg.window_merged
            win_r, win_c = np.arange(r) // ws, np.arange(c) // ws
            n_win_c = -(-c // ws)
            win_trc = (np.arange(t)[:, None, None] * (-(-r // ws)) * n_win_c
                       + win_r[None, :, None] * n_win_c + win_c[None, None, :])
            order = np.lexsort((index_trc.reshape(-1), win_trc.reshape(-1)))  # by window, then row-major
            merged_order.append(index_trc.reshape(-1)[order])
            window_ids.append(win_trc.reshape(-1)[order] + n_windows)
            n_windows += int(win_trc.max()) + 1
        else:
            merged_order.append(index_trc.reshape(-1))
            window_ids.append(np.arange(t).repeat(r * c) + n_windows)
            n_windows += t
        frame_ids.append(np.arange(t).repeat(r * c) + n_frames)
        n_frames += t
        hw.append(rope.vision_hw_positions((t, h, w), m))
        n_merged += t * r * c
    merged_order_m = np.concatenate(merged_order)
    frame_m = np.concatenate(frame_ids)[merged_order_m]  # frame of each window-order merged token
    patch_order_p = (merged_order_m[:, None] * unit + np.arange(unit)).reshape(-1)
    return VisionLayout(
        patch_order_p=jnp.asarray(patch_order_p, jnp.int32),
        merged_restore_m=jnp.asarray(np.argsort(merged_order_m), jnp.int32),
        hw_p2=jnp.asarray(np.concatenate(hw)[patch_order_p], jnp.int32),
        window_segment_p=jnp.asarray(np.concatenate(window_ids).repeat(unit) + 1, jnp.int32),
        frame_segment_p=jnp.asarray(frame_m.repeat(unit) + 1, jnp.int32),
    )


def rms_norm(x, w, eps):
    """RMSNorm in float32, cast back before the weight (as transformers does)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * y.astype(x.dtype)


def layer_norm(x, w, b, eps):
    x32 = x.astype(jnp.float32)
    mu = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
    y = (x32 - mu) * jax.lax.rsqrt(var + eps)
    return (y * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def _norm(x, w, b, eps):
    return rms_norm(x, w, eps) if b is None else layer_norm(x, w, b, eps)


def vision_angles(cfg: VisionConfig, hw_p2):
    """2D rotary angles [P, head_dim/2]: first half from the row, second half from the column."""
    freqs = jnp.asarray(rope.inv_freq(cfg.head_dim // 2, cfg.rope_theta))
    hw = hw_p2.astype(jnp.float32)
    return jnp.concatenate([hw[:, :1] * freqs, hw[:, 1:] * freqs], axis=-1)


def _block(cfg: VisionConfig, x_pc, blk, is_full, layout: VisionLayout, angles_1p_h2, attention_backend: str):
    segment_p = jnp.where(is_full, layout.frame_segment_p, layout.window_segment_p)[None]
    h = _norm(x_pc, blk.norm1_w_lc, blk.norm1_b_lc, cfg.norm_eps)
    qkv = jnp.einsum("PC,CTNH->TPNH", h, blk.qkv_w_lc3nh) + blk.qkv_b_l3nh[:, None]
    q, k, v = (rope.apply_rotary(qkv[0][None], angles_1p_h2), rope.apply_rotary(qkv[1][None], angles_1p_h2),
               qkv[2][None])
    o = attention_api.segment_attention(q, k, v, segment_p, segment_p, backend=attention_backend)[0]
    x_pc = x_pc + jnp.einsum("PNH,NHC->PC", o, blk.proj_w_lnhc) + blk.proj_b_lc
    h = _norm(x_pc, blk.norm2_w_lc, blk.norm2_b_lc, cfg.norm_eps)
    up = jnp.einsum("PC,CF->PF", h, blk.up_w_lcf) + blk.up_b_lf
    if blk.gate_w_lcf is None:  # Qwen2-VL: fc1 -> QuickGELU -> fc2
        act = up * jax.nn.sigmoid(1.702 * up)
    else:  # Qwen2.5-VL: SwiGLU with biases
        act = jax.nn.silu(jnp.einsum("PC,CF->PF", h, blk.gate_w_lcf) + blk.gate_b_lf) * up
    return x_pc + jnp.einsum("PF,FC->PC", act, blk.down_w_lfc) + blk.down_b_lc


def encode(cfg: VisionConfig, params: VisionParams, rows_pv, layout: VisionLayout, *,
           attention_backend: str = "auto"):
    """Patch rows [P, 1176] (processor order) -> merged vision tokens [P/4, out_hidden] (processor order).

    Window and frame attention: `kernels_pallas.segment_attention` on `attention_backend`."""
    dtype = params.patch_w_pc.dtype
    x_pc = rows_pv.astype(dtype)[layout.patch_order_p] @ params.patch_w_pc
    angles_1p_h2 = vision_angles(cfg, layout.hw_p2)[None]
    is_full_l = jnp.asarray(cfg.full_attention_layers())

    def step(x, blk_and_flag):
        blk, is_full = blk_and_flag
        return _block(cfg, x, blk, is_full, layout, angles_1p_h2, attention_backend), None

    x_pc, _ = jax.lax.scan(step, x_pc, (params.blocks, is_full_l))
    h = _norm(x_pc, params.merger_norm_w_c, params.merger_norm_b_c, cfg.norm_eps)
    h_me = h.reshape(-1, cfg.merge_unit * cfg.hidden_size)
    h_me = jax.nn.gelu(h_me @ params.merger_fc1_w_ee + params.merger_fc1_b_e, approximate=False)
    merged_md = h_me @ params.merger_fc2_w_ed + params.merger_fc2_b_d
    return merged_md[layout.merged_restore_m]

