"""Prefill: a chunk of new queries against the cache and, causally via order ids, among themselves.

Queries are laid out as rows (query x head-in-group, `common.group_rows`) so every K/V tile that is
loaded serves the G query heads of its kv head. Grid (batch, kv head, row block); each program runs
the online softmax over its live key blocks only (`common.live_blocks`). Also the forward of
`flash_train` (keys as sequences, [B, K, M, H]; a cache is [B*M, K, H]).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import common


def tile_kernel(q_ref, q_segment_ref, q_order_ref, lo_ref, hi_ref, *refs_and_outs, block_k, scale):
    """One query tile [Rb, Hp] against key blocks [lo, hi) of one kv head; writes out (and lse).

    Refs after hi_ref: the four `common.attend` key refs, then o_ref [Rb, Hp] and optionally lse_ref [Rb].
    """
    key_refs, (o_ref, *lse_ref) = refs_and_outs[:4], refs_and_outs[4:]
    q_order_r = None if q_order_ref is None else q_order_ref[...]
    state = common.softmax_init(*q_ref.shape)
    state = common.attend(state, q_ref[...], q_segment_ref[...], q_order_r, key_refs, lo_ref[()], hi_ref[()],
                          block_k, scale)
    out_rh, lse_r = common.softmax_finish(state)
    o_ref[...] = out_rh.astype(o_ref.dtype)
    if lse_ref:
        lse_ref[0][...] = lse_r


def rows_attention(q_bmrh, q_segment_br, q_order_br, keys, *, scale: float, block_r: int,
                   block_k: int, interpret: bool, with_lse: bool = False, cache: bool = False):
    """Rows [B, M, R, Hp] (R a multiple of block_r) against `common.prepare_keys` output of
    sequences, or with `cache` of a cache [B*M, Kp, Hp].

    Returns out [B, M, R, Hp] in q's dtype, and with `with_lse` also log-sum-exp [B, M, R] (f32).
    """
    b, m, rows, hp = q_bmrh.shape
    live_bik = common.live_blocks(q_segment_br, keys[2], q_order_br, keys[3], block_r, block_k)
    lo_bi, hi_bi = common.block_bounds(live_bik, axis=2)
    row_spec = pl.BlockSpec((None, None, block_r, hp), lambda b, m, i: (b, m, i, 0))
    ids_spec = pl.BlockSpec((None, block_r), lambda b, m, i: (b, i))
    bound_spec = pl.BlockSpec((None, None), lambda b, m, i: (b, i))
    out_shape = [jax.ShapeDtypeStruct(q_bmrh.shape, q_bmrh.dtype)]
    out_specs = [row_spec]
    if with_lse:
        out_shape.append(jax.ShapeDtypeStruct((b, m, rows), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, block_r), lambda b, m, i: (b, m, i)))
    results = pl.pallas_call(
        functools.partial(tile_kernel, block_k=block_k, scale=scale),
        grid=(b, m, rows // block_r),
        in_specs=[row_spec, ids_spec, None if q_order_br is None else ids_spec, bound_spec, bound_spec,
                  *common.key_specs(keys, kv_head=lambda m, i: m, cache_heads=m if cache else None)],
        out_specs=out_specs,
        out_shape=out_shape,
        name="svlm_prefill_attention",
        **common.call_options(interpret),
    )(q_bmrh, q_segment_br, q_order_br, lo_bi, hi_bi, *keys)
    return tuple(results) if with_lse else results[0]


def prefill_attention(q_bqnh, k_ckh, v_ckh, q_segment_bq, kv_segment_bk, q_order_bq=None, kv_order_bk=None,
                      *, scale=None, block_r: int = 64, block_k: int = 64,
                      interpret: bool | None = None):
    """`reference.cached_attention` for a chunk of queries [B, Q, N, H] against a cache [B*M, K, H];
    returns [B, Q, N, H]."""
    m, scale = common.check_args(q_bqnh, k_ckh, q_order_bq, kv_order_bk, scale, cache=True)
    b, q, n, h = q_bqnh.shape
    block_r = common.tile(q * (n // m), block_r)
    block_k = common.tile(k_ckh.shape[1], block_k)
    q_bmrh, q_segment_br, q_order_br = common.prepare_rows(q_bqnh, q_segment_bq, q_order_bq, m, block_r)
    keys = common.prepare_keys(k_ckh, v_ckh, kv_segment_bk, kv_order_bk, block_k)
    out_bmrh = rows_attention(q_bmrh, q_segment_br, q_order_br, keys, scale=scale, block_r=block_r,
                              block_k=block_k, interpret=common.use_interpret(interpret), cache=True)
    return common.ungroup_rows(common.unpad_head(out_bmrh, h), q, n)
