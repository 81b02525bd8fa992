"""Rotary embeddings and the 3D (M-RoPE) position rule of Qwen2-VL / Qwen2.5-VL.

One definition of the position rule, used by `forward`, the streaming cache and training:
  * a text token at position p gets (p, p, p);
  * a vision block of merged grid (T, R, C) starting at s gives token (k, r, c) the position
    (s + floor(k * dt), s + r, s + c), dt = tokens_per_second * second_per_grid_t for videos, 1 for
    images and for Qwen2-VL;
  * text after the block resumes at `s + vision_span(...)` (see `vision_span`).
Rotary layout is rotate-half: angles for frequency i sit at dims i and i + head_dim/2.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

# How text resumes after a vision block. "max_hw" is transformers >= 5 (s + max(R, C));
# "qwen" is the original Qwen rule (s + max(floor(dt*(T-1)), R-1, C-1) + 1). They agree when T == 1.
RESUME_RULES = ("max_hw", "qwen")


def inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] in float32, as HF computes them."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def mrope_axis(mrope_section: tuple[int, ...]) -> np.ndarray:
    """Axis (0=t, 1=h, 2=w) of each of the sum(mrope_section) frequency pairs [H/2]."""
    return np.concatenate([np.full(n, i % 3, np.int32) for i, n in enumerate(mrope_section)])


def mrope_angles(positions_bt3, inv_freq_f, mrope_section):
    """Rotation angles [B, T, H/2] (float32): frequency i turns by positions[..., axis(i)] * inv_freq[i]."""
    axis_f = jnp.asarray(mrope_axis(mrope_section))
    pos_btf = jnp.take(positions_bt3, axis_f, axis=-1).astype(jnp.float32)
    return pos_btf * jnp.asarray(inv_freq_f, jnp.float32)


def apply_rotary(x_btnh, angles_bth2):
    """Rotate-half RoPE of x [B, T, N, H] by angles [B, T, H/2]; computed in float32, returned in x's dtype."""
    cos = jnp.cos(angles_bth2)[:, :, None, :]
    sin = jnp.sin(angles_bth2)[:, :, None, :]
    x = x_btnh.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


def vision_hw_positions(grid_thw, spatial_merge: int) -> np.ndarray:
    """(row, col) patch coordinates [T*H*W, 2] in the processor's patch order (2x2 merge blocks)."""
    t, h, w = (int(v) for v in grid_thw)
    m = spatial_merge
    rows = np.arange(h).reshape(h // m, m, 1, 1)
    cols = np.arange(w).reshape(1, 1, w // m, m)
    rows_hw = np.broadcast_to(rows, (h // m, m, w // m, m)).transpose(0, 2, 1, 3).reshape(-1)
    cols_hw = np.broadcast_to(cols, (h // m, m, w // m, m)).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows_hw, cols_hw], axis=-1), (t, 1)).astype(np.int32)


def vision_block_positions(start: int, grid_thw, spatial_merge: int, time_interval: float) -> np.ndarray:
    """3D positions [T*R*C, 3] of the merged tokens of one image/video starting at `start`."""
    t, h, w = (int(v) for v in grid_thw)
    r, c = h // spatial_merge, w // spatial_merge
    tt = np.floor(np.arange(t) * np.float64(time_interval)).astype(np.int64)
    pos = np.stack(np.meshgrid(tt, np.arange(r), np.arange(c), indexing="ij"), axis=-1).reshape(-1, 3)
    return pos + start


def vision_span(grid_thw, spatial_merge: int, time_interval: float, resume_rule: str) -> int:
    """How far text after a vision block starting at s resumes: next text position = s + span."""
    t, h, w = (int(v) for v in grid_thw)
    r, c = h // spatial_merge, w // spatial_merge
    if resume_rule == "max_hw":
        return max(r, c)
    if resume_rule == "qwen":
        return max(math.floor((t - 1) * time_interval), r - 1, c - 1) + 1
    raise ValueError(f"unknown resume rule {resume_rule!r}; expected one of {RESUME_RULES}")


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
        pos = np.zeros((len(ids), 3), np.int64)
        cur, i = 0, 0
        while i < len(ids):
            tok = int(ids[i])
            if tok in grids:
                try:
                    grid = next(grids[tok])
                except StopIteration:
                    kind = "image" if tok == image_token_id else "video"
                    raise ValueError(f"more {kind} placeholder blocks in input_ids than {kind} grids") from None
                dt = 1.0
                if tok == video_token_id:
                    dt = next(intervals, 1.0)
                n = int(np.prod(grid)) // spatial_merge**2
                if i + n > len(ids) or np.any(ids[i:i + n] != tok):
                    raise ValueError(f"vision block at token {idx[i]} of row {b} has fewer than the {n} "
                                     f"placeholder tokens its grid {tuple(grid)} needs")
                pos[i:i + n] = vision_block_positions(cur, grid, spatial_merge, dt)
                cur += vision_span(grid, spatial_merge, dt, resume_rule)
                i += n
            else:
                pos[i] = cur
                cur += 1
                i += 1
        out_bt3[b, idx] = pos
    return out_bt3.astype(np.int32)
