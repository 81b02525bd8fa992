"""Rotary embeddings and the 3D (M-RoPE) position rule of Qwen2-VL / Qwen2.5-VL / Qwen3-VL.

One definition of the position rule, used by `forward`, the streaming cache and training:
  * a text token at position p gets (p, p, p);
  * a vision block of merged grid (T, R, C) starting at s gives token (k, r, c) the position
    (s + floor(k * dt), s + r, s + c), dt = tokens_per_second * second_per_grid_t for videos, 1 for
    images and for Qwen2-VL;
  * text after the block resumes at `s + vision_span(...)` (see `vision_span`).
Qwen3-VL gives a video's time as text ("<t seconds>" before each temporal patch), so each temporal
patch is a block of its own (`frame_grids`: T = 1, where both resume rules agree).
`accumulate_positions` is that rule over a sequence of steps, shared by `rope_positions` (host, any
batch) and the streaming cache (on device, slots in logical order).
Rotary layout is rotate-half: angles for frequency i sit at dims i and i + head_dim/2. M-RoPE:
frequency pairs are split by `mrope_section` into consecutive runs turned by the t, h and w
position (run j by axis j % 3); interleaved (Qwen3-VL), frequency i is turned by h when i % 3 == 1
and i < 3 * mrope_section[1], by w when i % 3 == 2 and i < 3 * mrope_section[2], else by t.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] in float32, as HF computes them."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def mrope_axis(mrope_section: tuple[int, ...], interleaved: bool = False) -> np.ndarray:
    """Axis (0=t, 1=h, 2=w) of each of the sum(mrope_section) frequency pairs [H/2]."""
    if not interleaved:
        return np.concatenate([np.full(n, i % 3, np.int32) for i, n in enumerate(mrope_section)])
    axis = np.zeros(sum(mrope_section), np.int32)
    for dim in (1, 2):
        axis[dim:3 * mrope_section[dim]:3] = dim
    return axis


def mrope_angles(positions_bt3, inv_freq_f, mrope_section, interleaved: bool = False):
    """Rotation angles [B, T, H/2] (float32): frequency i turns by positions[..., axis(i)] * inv_freq[i]."""
    axis_f = jnp.asarray(mrope_axis(mrope_section, interleaved))
    pos_btf = jnp.take(positions_bt3, axis_f, axis=-1).astype(jnp.float32)
    return pos_btf * jnp.asarray(inv_freq_f, jnp.float32)


def apply_rotary(x_btnh, angles_bth2):
    """Rotate-half RoPE of x [B, T, N, H] by angles [B, T, H/2]; computed in float32, returned in x's dtype."""
    return rotate_by_angles(x_btnh, angles_bth2[:, :, None, :])


def rotate_by_angles(x, angles):
    """Rotate-half RoPE of x [..., H] by angles [..., H/2] broadcast against x's other axes;
    computed in float32, returned in x's dtype."""
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# How text resumes after a vision block. "max_hw" is transformers >= 5 (s + max(R, C));
# "qwen" is the original Qwen rule (s + max(floor(dt*(T-1)), R-1, C-1) + 1). They agree when T == 1.
RESUME_RULES = ("max_hw", "qwen")


def vision_hw_positions(grid_thw, spatial_merge: int) -> np.ndarray:
    """(row, col) patch coordinates [T*H*W, 2] in the processor's patch order (2x2 merge blocks)."""
    t, h, w = (int(v) for v in grid_thw)
    m = spatial_merge
    rows = np.arange(h).reshape(h // m, m, 1, 1)
    cols = np.arange(w).reshape(1, 1, w // m, m)
    rows_hw = np.broadcast_to(rows, (h // m, m, w // m, m)).transpose(0, 2, 1, 3).reshape(-1)
    cols_hw = np.broadcast_to(cols, (h // m, m, w // m, m)).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows_hw, cols_hw], axis=-1), (t, 1)).astype(np.int32)


def frame_grids(grid_thw) -> np.ndarray:
    """Videos [n, 3] as blocks of one temporal patch each [sum T, 3], in order (Qwen3-VL)."""
    grids = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    frames = np.repeat(grids, grids[:, 0], axis=0)
    frames[:, 0] = 1
    return frames


def vision_block_offsets(grid_thw, spatial_merge: int, time_interval: float) -> np.ndarray:
    """3D offsets [T*R*C, 3] of the merged tokens of one image/video from the block's start position."""
    t, h, w = (int(v) for v in grid_thw)
    r, c = h // spatial_merge, w // spatial_merge
    tt = np.floor(np.arange(t) * np.float64(time_interval)).astype(np.int64)
    pos = np.stack(np.meshgrid(tt, np.arange(r), np.arange(c), indexing="ij"), axis=-1).reshape(-1, 3)
    return pos


def vision_span(grid_thw, spatial_merge: int, time_interval: float, resume_rule: str) -> int:
    """How far text after a vision block starting at s resumes: next text position = s + span."""
    t, h, w = (int(v) for v in grid_thw)
    r, c = h // spatial_merge, w // spatial_merge
    if resume_rule == "max_hw":
        return max(r, c)
    if resume_rule == "qwen":
        return max(math.floor((t - 1) * time_interval), r - 1, c - 1) + 1
    raise ValueError(f"unknown resume rule {resume_rule!r}; expected one of {RESUME_RULES}")


def accumulate_positions(step_t, offsets_t3, xp=np):
    """Positions [T, 3] of a sequence whose token t advances the counter by step_t [T] (text: 1; a
    vision block: 0 except its last token, which steps by the block's span) and sits at offsets_t3
    [T, 3] from the counter before it (text: 0; vision: its (time, row, col) in the block).
    `xp` is numpy or jax.numpy."""
    start_t = xp.cumsum(step_t) - step_t  # exclusive: a vision block's tokens all see its start
    return start_t[:, None] + offsets_t3


def rope_positions(input_ids_bt, *, image_token_id: int, video_token_id: int, spatial_merge: int,
                   image_grid_thw=None, video_grid_thw=None, video_time_intervals=None,
                   attention_mask_bt=None, resume_rule: str = "max_hw") -> np.ndarray:
    """3D positions [B, T, 3] (int32) for a batch mixing text, images and videos (host-side, numpy).

    Grids are consumed in order of appearance across the batch, as transformers does. Padding
    (attention_mask == 0) is skipped and gets position 0. `video_time_intervals[i]` is dt of video i.
    """
    ids_bt = np.asarray(input_ids_bt)
    mask_bt = np.ones_like(ids_bt, bool) if attention_mask_bt is None else np.asarray(attention_mask_bt).astype(bool)
    grids = {image_token_id: iter([] if image_grid_thw is None else np.asarray(image_grid_thw).tolist()),
             video_token_id: iter([] if video_grid_thw is None else np.asarray(video_grid_thw).tolist())}
    intervals = iter([] if video_time_intervals is None else list(np.asarray(video_time_intervals, np.float64)))
    out_bt3 = np.zeros(ids_bt.shape + (3,), np.int64)
    for b in range(ids_bt.shape[0]):
        idx = np.flatnonzero(mask_bt[b])
        ids = ids_bt[b, idx]
        step = np.ones(len(ids), np.int64)
        offsets = np.zeros((len(ids), 3), np.int64)
        i = 0
        while i < len(ids):
            tok = int(ids[i])
            if tok not in grids:
                i += 1
                continue
            try:
                grid = next(grids[tok])
            except StopIteration:
                kind = "image" if tok == image_token_id else "video"
                raise ValueError(f"more {kind} placeholder blocks in input_ids than {kind} grids") from None
            dt = next(intervals, 1.0) if tok == video_token_id else 1.0
            n = int(np.prod(grid)) // spatial_merge**2
            if i + n > len(ids) or np.any(ids[i:i + n] != tok):
                raise ValueError(f"vision block at token {idx[i]} of row {b} has fewer than the {n} "
                                 f"placeholder tokens its grid {tuple(grid)} needs")
            offsets[i:i + n] = vision_block_offsets(grid, spatial_merge, dt)
            step[i:i + n] = 0
            step[i + n - 1] = vision_span(grid, spatial_merge, dt, resume_rule)
            i += n
        pos = accumulate_positions(step, offsets)
        out_bt3[b, idx] = pos
    return out_bt3.astype(np.int32)
