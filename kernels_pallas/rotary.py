"""Rotary embeddings of Qwen2-VL / Qwen2.5-VL: frequencies, M-RoPE angles, rotate-half application.

Defined here, not in the model, so the attention operations that rotate cached keys (`RotarySpec`)
need nothing outside this package; the model re-exports these from its own rope module.
Rotary layout is rotate-half: angles for frequency i sit at dims i and i + head_dim/2.
M-RoPE: frequency pairs are split by `mrope_section` into consecutive runs turned by the t, h and
w position (run j by axis j % 3).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RotarySpec:
    """Static description of the M-RoPE applied to keys cached before rotation."""
    theta: float
    mrope_section: tuple[int, ...]


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


def rotate_keys(k_bkmh, k_positions_bk3, rope: RotarySpec):
    """Keys [B, K, M, H] rotated by their slot positions [B, K, 3]; returned in k's dtype."""
    inv_freq_f = inv_freq(k_bkmh.shape[-1], rope.theta)
    if sum(rope.mrope_section) != inv_freq_f.shape[0]:
        raise ValueError(f"mrope_section {rope.mrope_section} does not cover head_dim {k_bkmh.shape[-1]} / 2")
    return apply_rotary(k_bkmh, mrope_angles(k_positions_bk3, inv_freq_f, rope.mrope_section))
