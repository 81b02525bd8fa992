"""The Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower as pure functions.

Host side (`vision_layout`, numpy): from the grids, the window permutation, the segment ids of
window and frame attention, the patch coordinates and (Qwen3-VL) the taps that resample the learned
position table to each grid. Device side (`encode_with_deepstack`): patch embedding (+ learned
positions), blocks scanned over the layer axis, the 2x2 merger and the DeepStack mergers; tokens
come back in processor order. Arrays: P patches (rows of the processor), M = P / 4 merged tokens,
S DeepStack levels, n interpolation taps (4, or 0 without a position table).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kernels_pallas import api as attention_api
from svlm_jax.config import VISION_ACTIVATIONS, VisionConfig
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
    pos_index_pn: jax.Array      # rows of the learned position table each patch blends [P, n]
    pos_weight_pn: jax.Array     # their bilinear weights (float32) [P, n]


def grid_list(grid_thw) -> list[tuple[int, int, int]]:
    """Validated list of (t, h, w) grids from an array-like [n, 3]."""
    grids = [tuple(int(x) for x in g) for g in np.asarray(grid_thw).reshape(-1, 3)]
    for g in grids:
        if min(g) <= 0:
            raise ValueError(f"grid_thw {g} must be positive")
    return grids


def num_patches(grid_thw) -> int:
    return sum(t * h * w for t, h, w in grid_list(grid_thw))


def _interpolation_taps(index, size: int, side: int):
    """Bilinear taps [N, 2] and weights [N, 2] (float32) of positions `index` on an axis of `size`
    patches into a table axis of `side` rows, corners aligned (F.interpolate(align_corners=True));
    the same float32 operations as transformers' get_vision_interpolation_indices_and_weights."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0)
    return taps, weights.astype(np.float32)


def position_taps(grid_thw, spatial_merge: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [P, 4] of a side x side learned position table that each patch (processor order) blends,
    and their weights [P, 4]: the table resampled bilinearly to the grid's h x w (Qwen3-VL)."""
    t, h, w = (int(v) for v in grid_thw)
    rows_cols = rope.vision_hw_positions((1, h, w), spatial_merge)
    h_taps, h_weights = _interpolation_taps(rows_cols[:, 0], h, side)
    w_taps, w_weights = _interpolation_taps(rows_cols[:, 1], w, side)
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weight = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return np.tile(index, (t, 1)), np.tile(weight, (t, 1))


def vision_layout(cfg: VisionConfig, grid_thw) -> VisionLayout:
    """Window permutation and segment ids for a list of grids, following Qwen's window rule: merged
    tokens of each temporal slice are tiled by windows of `window_merged` squared (cut at the edges),
    windows in row-major order, tokens row-major inside a window."""
    m, unit = cfg.spatial_merge_size, cfg.merge_unit
    merged_order, window_ids, frame_ids, hw, taps = [], [], [], [], []
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
        if cfg.num_position_embeddings:
            taps.append(position_taps((t, h, w), m, cfg.position_grid_side))
        n_merged += t * r * c
    merged_order_m = np.concatenate(merged_order)
    frame_m = np.concatenate(frame_ids)[merged_order_m]  # frame of each window-order merged token
    patch_order_p = (merged_order_m[:, None] * unit + np.arange(unit)).reshape(-1)
    n_patches = len(patch_order_p)
    pos_index = np.concatenate([i for i, _ in taps]) if taps else np.zeros((n_patches, 0), np.int32)
    pos_weight = np.concatenate([w for _, w in taps]) if taps else np.zeros((n_patches, 0), np.float32)
    return VisionLayout(
        patch_order_p=jnp.asarray(patch_order_p, jnp.int32),
        merged_restore_m=jnp.asarray(np.argsort(merged_order_m), jnp.int32),
        hw_p2=jnp.asarray(np.concatenate(hw)[patch_order_p], jnp.int32),
        window_segment_p=jnp.asarray(np.concatenate(window_ids).repeat(unit) + 1, jnp.int32),
        frame_segment_p=jnp.asarray(frame_m.repeat(unit) + 1, jnp.int32),
        pos_index_pn=jnp.asarray(pos_index[patch_order_p], jnp.int32),
        pos_weight_pn=jnp.asarray(pos_weight[patch_order_p], jnp.float32),
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


# The vision MLP's activations, by HF's names (config.VISION_ACTIVATIONS).
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}
assert tuple(ACTIVATIONS) == VISION_ACTIVATIONS


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
    activation = ACTIVATIONS[cfg.hidden_act]
    if blk.gate_w_lcf is None:  # Qwen2-VL, Qwen3-VL: fc1 -> activation -> fc2
        act = activation(up)
    else:  # Qwen2.5-VL: SwiGLU with biases
        act = activation(jnp.einsum("PC,CF->PF", h, blk.gate_w_lcf) + blk.gate_b_lf) * up
    return x_pc + jnp.einsum("PF,FC->PC", act, blk.down_w_lfc) + blk.down_b_lc


def _merge(cfg: VisionConfig, x_pc, norm_w, norm_b, fc1_w_ee, fc1_b_e, fc2_w_ed, fc2_b_d, *, norm_merged: bool):
    """2x2 merger: norm (per patch, or of the merged vector when `norm_merged`), fc1, GELU, fc2:
    [P, C] -> [P/4, D]."""
    merged_width = cfg.merge_unit * cfg.hidden_size
    if norm_merged:
        h_me = _norm(x_pc.reshape(-1, merged_width), norm_w, norm_b, cfg.norm_eps)
    else:
        h_me = _norm(x_pc, norm_w, norm_b, cfg.norm_eps).reshape(-1, merged_width)
    h_me = jax.nn.gelu(h_me @ fc1_w_ee + fc1_b_e, approximate=False)
    return h_me @ fc2_w_ed + fc2_b_d


def encode_with_deepstack(cfg: VisionConfig, params: VisionParams, rows_pv, layout: VisionLayout, *,
                          attention_backend: str = "auto"):
    """Patch rows [P, patch_dim] (processor order) -> (merged vision tokens [P/4, out_hidden], their
    DeepStack features [S, P/4, out_hidden] or None without DeepStack), both in processor order.

    Window and frame attention: `kernels_pallas.segment_attention` on `attention_backend`."""
    dtype = params.patch_w_pc.dtype
    x_pc = rows_pv.astype(dtype)[layout.patch_order_p] @ params.patch_w_pc
    if params.patch_b_c is not None:
        x_pc = x_pc + params.patch_b_c
    if params.pos_embed_qc is not None:  # blended in float32, as transformers does
        pos_pc = jnp.sum(params.pos_embed_qc[layout.pos_index_pn].astype(jnp.float32)
                         * layout.pos_weight_pn[:, :, None], axis=1)
        x_pc = x_pc + pos_pc.astype(dtype)
    angles_1p_h2 = vision_angles(cfg, layout.hw_p2)[None]
    is_full_l = jnp.asarray(cfg.full_attention_layers())
    # DeepStack levels go in block order (level s feeds LM layer s); the merger of the block at
    # deepstack_visual_indexes[k] is merger k, whatever the order of that list (as in transformers).
    deep = sorted(cfg.deepstack_visual_indexes)
    merger_s = np.asarray([cfg.deepstack_visual_indexes.index(i) for i in deep], np.int32)
    # Level of each block's output in the DeepStack buffer; blocks that feed none rewrite level 0 unchanged.
    level_l = jnp.asarray([deep.index(i) if i in deep else 0 for i in range(cfg.depth)], jnp.int32)
    feeds_l = jnp.asarray([i in deep for i in range(cfg.depth)])

    def step(carry, blk_and_flags):
        x, taken_spc = carry
        blk, is_full, level, feeds = blk_and_flags
        x = _block(cfg, x, blk, is_full, layout, angles_1p_h2, attention_backend)
        if deep:
            kept = jnp.where(feeds, x, taken_spc[level])
            taken_spc = jax.lax.dynamic_update_index_in_dim(taken_spc, kept, level, 0)
        return (x, taken_spc), None

    taken_spc = jnp.zeros((len(deep),) + x_pc.shape, dtype) if deep else None
    (x_pc, taken_spc), _ = jax.lax.scan(step, (x_pc, taken_spc), (params.blocks, is_full_l, level_l, feeds_l))
    p = params
    merged_md = _merge(cfg, x_pc, p.merger_norm_w_c, p.merger_norm_b_c, p.merger_fc1_w_ee, p.merger_fc1_b_e,
                       p.merger_fc2_w_ed, p.merger_fc2_b_d, norm_merged=False)
    if not deep:
        return merged_md[layout.merged_restore_m], None
    ds = jax.tree.map(lambda a: a[merger_s], p.deepstack)
    deep_smd = jax.vmap(functools.partial(_merge, cfg, norm_merged=True))(
        taken_spc, ds.norm_w_se, ds.norm_b_se, ds.fc1_w_see, ds.fc1_b_se, ds.fc2_w_sed, ds.fc2_b_sd)
    return merged_md[layout.merged_restore_m], deep_smd[:, layout.merged_restore_m]


def encode(cfg: VisionConfig, params: VisionParams, rows_pv, layout: VisionLayout, *,
           attention_backend: str = "auto"):
    """Patch rows [P, patch_dim] (processor order) -> merged vision tokens [P/4, out_hidden] (processor
    order), for a tower without DeepStack (a Qwen3-VL tower is refused: its LM needs the features of
    `encode_with_deepstack` too)."""
    if cfg.deepstack_visual_indexes:
        raise ValueError("this vision tower feeds DeepStack features to the LM: use encode_with_deepstack")
    return encode_with_deepstack(cfg, params, rows_pv, layout, attention_backend=attention_backend)[0]

