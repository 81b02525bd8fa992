"""Decode: a few queries per stream against a long cache, flash-decoding style.

The live key range of each stream (`common.live_blocks`: empty cache slots are segment 0) is split
into S parts; grid (batch, kv head, split), each program runs the online softmax of all rows of its
kv head (query x head-in-group, `common.group_rows`: K/V are read once for the G heads, never
repeated) over its part and writes the partial state; `common.merge_partials` combines the splits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import common

# Programs to aim for: about two waves on an H100 (132 SMs), so short caches and big batches
# do not pay for splits they do not need.
TARGET_PROGRAMS = 264


def _kernel(q_ref, q_segment_ref, q_order_ref, lo_ref, hi_ref, *refs_and_outs, splits, block_k, scale):
    """All rows [R, Hp] of one kv head against one split of the live key blocks."""
    key_refs, (m_ref, l_ref, acc_ref) = refs_and_outs[:4], refs_and_outs[4:]
    lo, hi = lo_ref[()], hi_ref[()]
    per_split = lax.div(hi - lo + splits - 1, jnp.int32(splits))  # lax.div: Triton lowers it; ids are >= 0
    start = lo + pl.program_id(2) * per_split
    stop = jnp.minimum(hi, start + per_split)
    q_order_r = None if q_order_ref is None else q_order_ref[...]
    state = common.softmax_init(*q_ref.shape)
    m_r, l_r, acc_rh = common.attend(state, q_ref[...], q_segment_ref[...], q_order_r, key_refs, start, stop,
                                     block_k, scale)
    m_ref[...] = m_r
    l_ref[...] = l_r
    acc_ref[...] = acc_rh


def decode_attention(q_bqnh, k_ckh, v_ckh, q_segment_bq, kv_segment_bk, q_order_bq=None, kv_order_bk=None,
                     *, scale=None, block_k: int = 128,
                     splits: int | None = None, interpret: bool | None = None):
    """`reference.cached_attention` for a few queries [B, Q, N, H] against a cache [B*M, K, H];
    returns [B, Q, N, H].

    `splits` (default: enough programs to fill the GPU) is how many parts the key range is cut into.
    """
    m, scale = common.check_args(q_bqnh, k_ckh, q_order_bq, kv_order_bk, scale, cache=True)
    b, q, n, h = q_bqnh.shape
    rows = max(common.MIN_TILE, pl.next_power_of_2(q * (n // m)))
    block_k = common.tile(k_ckh.shape[1], block_k)
    q_bmrh, q_segment_br, q_order_br = common.prepare_rows(q_bqnh, q_segment_bq, q_order_bq, m, rows)
    keys = common.prepare_keys(k_ckh, v_ckh, kv_segment_bk, kv_order_bk, block_k)
    num_blocks = keys[2].shape[1] // block_k
    splits = splits or max(1, min(num_blocks, pl.cdiv(TARGET_PROGRAMS, b * m)))
    live_b1k = common.live_blocks(q_segment_br, keys[2], q_order_br, keys[3], rows, block_k)
    lo_b, hi_b = (x[:, 0] for x in common.block_bounds(live_b1k, axis=2))

    hp = q_bmrh.shape[-1]
    row_spec = pl.BlockSpec((None, None, rows, hp), lambda b, m, s: (b, m, 0, 0))
    ids_spec = pl.BlockSpec((None, rows), lambda b, m, s: (b, 0))
    bound_spec = pl.BlockSpec((None,), lambda b, m, s: (b,))
    stat_spec = pl.BlockSpec((None, None, None, rows), lambda b, m, s: (b, m, s, 0))
    m_bmsr, l_bmsr, acc_bmsrh = pl.pallas_call(
        functools.partial(_kernel, splits=splits, block_k=block_k, scale=scale),
        grid=(b, m, splits),
        in_specs=[row_spec, ids_spec, None if q_order_br is None else ids_spec, bound_spec, bound_spec,
                  *common.key_specs(keys, kv_head=lambda m, s: m, cache_heads=m)],
        out_specs=[stat_spec, stat_spec,
                   pl.BlockSpec((None, None, None, rows, hp), lambda b, m, s: (b, m, s, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, m, splits, rows), jnp.float32),
                   jax.ShapeDtypeStruct((b, m, splits, rows), jnp.float32),
                   jax.ShapeDtypeStruct((b, m, splits, rows, hp), jnp.float32)],
        name="svlm_decode_attention",
        **common.call_options(common.use_interpret(interpret)),
    )(q_bmrh, q_segment_br, q_order_br, lo_b, hi_b, *keys)
    out_bmrh, _ = common.softmax_finish(common.merge_partials(m_bmsr, l_bmsr, acc_bmsrh, axis=2))
    return common.ungroup_rows(common.unpad_head(out_bmrh.astype(q_bqnh.dtype), h), q, n)
