"""Vision tower attention: block-diagonal (window / per-frame) attention via segment ids, no causality.

Works in the tower's own layout [B, T, N, H] (no regrouping): grid (batch, head, query block), the
kv head of a program is head // G. Each query block only visits the key blocks whose segment range
meets its own (`common.live_blocks`), so 64-token windows cost O(T) rather than O(T^2). Head dims
that are not a power of two (80 in Qwen2.5-VL) are zero-padded inside (`common.pad_head`).
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl

from kernels_pallas import common
from kernels_pallas.prefill import tile_kernel


def vision_attention(q_btnh, k_btmh, v_btmh, q_segment_bt, kv_segment_bt, *, scale=None, block_q: int = 64,
                     block_k: int = 64, interpret: bool | None = None):
    """`reference.attention` without order ids; [B, T, N, H] queries, [B, S, M, H] keys -> [B, T, N, H]."""
    m, scale = common.check_args(q_btnh, k_btmh, None, None, scale)
    b, t, n, h = q_btnh.shape
    g = n // m
    block_q = common.tile(t, block_q)
    block_k = common.tile(k_btmh.shape[1], block_k)
    q_btnh_p = common.pad_head(common.pad_to(q_btnh, 1, block_q))
    q_segment_bt = common.pad_to(q_segment_bt.astype(jax.numpy.int32), 1, block_q)
    keys = common.prepare_keys(k_btmh, v_btmh, kv_segment_bt, None, block_k)
    lo_bi, hi_bi = common.block_bounds(
        common.live_blocks(q_segment_bt, keys[2], None, None, block_q, block_k), axis=2)

    tp, hp = q_btnh_p.shape[1], q_btnh_p.shape[3]
    q_spec = pl.BlockSpec((None, block_q, None, hp), lambda b, n, i: (b, i, n, 0))
    bound_spec = pl.BlockSpec((None, None), lambda b, n, i: (b, i))
    out_btnh = pl.pallas_call(
        functools.partial(tile_kernel, block_k=block_k, scale=scale),
        grid=(b, n, tp // block_q),
        in_specs=[q_spec, pl.BlockSpec((None, block_q), lambda b, n, i: (b, i)), None, bound_spec, bound_spec,
                  *common.key_specs(keys, kv_head=lambda n, i: n // g)],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_btnh_p.shape, q_btnh_p.dtype),
        name="svlm_vision_attention",
        **common.call_options(common.use_interpret(interpret)),
    )(q_btnh_p, q_segment_bt, None, lo_bi, hi_bi, *keys)
    return common.unpad_head(out_btnh[:, :t], h)
