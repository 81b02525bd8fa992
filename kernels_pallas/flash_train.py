"""Training attention: causal (order ids) flash attention over packed sequences (segment ids), GQA,
forward and backward as Pallas kernels under `jax.custom_vjp`.

Queries are rows (query x head-in-group, `common.group_rows`), so the forward is the prefill kernel
(`prefill.rows_attention`, which also returns the log-sum-exp) and the GQA sum of dK/dV over the G
heads of a kv head falls out of the row layout. Backward (FlashAttention-2): delta = rowsum(dO * O);
one kernel per row block accumulates dQ over its live key blocks, one per key block accumulates
dK, dV over its live row blocks (`common.live_blocks`, both directions), recomputing P from lse.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import common
from kernels_pallas.prefill import rows_attention


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    block_r: int
    block_k: int
    interpret: bool


def _probs_and_dlogits(q_rh, k_kh, v_kh, do_rh, lse_r, delta_r, mask_rk, scale):
    """Recomputed probabilities P [R, K] and dL/dlogits (before scaling) dS = P * (dO V^T - delta)."""
    p_rk = jnp.where(mask_rk, jnp.exp(common.dot_nt(q_rh, k_kh) * scale - lse_r[:, None]), 0.0)
    ds_rk = p_rk * (common.dot_nt(do_rh, v_kh) - delta_r[:, None])
    return p_rk, ds_rk


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, q_segment_ref, q_order_ref, lo_ref, hi_ref,
               k_ref, v_ref, kv_segment_ref, kv_order_ref, dq_ref, *, block_k, scale):
    """dQ of one row block [Rb, Hp], summed over key blocks [lo, hi)."""
    q_rh, do_rh, lse_r, delta_r = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_segment_r = q_segment_ref[...]
    q_order_r = None if q_order_ref is None else q_order_ref[...]

    def body(i, dq_rh):
        slots = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        k_kh = k_ref[slots, :]
        kv_order_k = None if kv_order_ref is None else kv_order_ref[slots]
        mask_rk = common.visible(q_segment_r, kv_segment_ref[slots], q_order_r, kv_order_k)
        _, ds_rk = _probs_and_dlogits(q_rh, k_kh, v_ref[slots, :], do_rh, lse_r, delta_r, mask_rk, scale)
        return dq_rh + common.dot_nn(ds_rk.astype(k_kh.dtype), k_kh)

    dq_rh = lax.fori_loop(lo_ref[()], hi_ref[()], body, jnp.zeros(q_ref.shape, jnp.float32))
    dq_ref[...] = (dq_rh * scale).astype(dq_ref.dtype)


def _dkv_kernel(k_ref, v_ref, kv_segment_ref, kv_order_ref, lo_ref, hi_ref, q_ref, do_ref, lse_ref,
                delta_ref, q_segment_ref, q_order_ref, dk_ref, dv_ref, *, block_r, scale):
    """dK, dV of one key block [Kb, Hp], summed over row blocks [lo, hi) (all G heads of the kv head)."""
    k_kh, v_kh, kv_segment_k = k_ref[...], v_ref[...], kv_segment_ref[...]
    kv_order_k = None if kv_order_ref is None else kv_order_ref[...]

    def body(i, carry):
        dk_kh, dv_kh = carry
        rows = pl.ds(pl.multiple_of(i * block_r, block_r), block_r)
        q_rh, do_rh = q_ref[rows, :], do_ref[rows, :]
        q_order_r = None if q_order_ref is None else q_order_ref[rows]
        mask_rk = common.visible(q_segment_ref[rows], kv_segment_k, q_order_r, kv_order_k)
        p_rk, ds_rk = _probs_and_dlogits(q_rh, k_kh, v_kh, do_rh, lse_ref[rows], delta_ref[rows], mask_rk, scale)
        return (dk_kh + common.dot_tn(ds_rk.astype(q_rh.dtype), q_rh),
                dv_kh + common.dot_tn(p_rk.astype(do_rh.dtype), do_rh))

    zeros = jnp.zeros(k_ref.shape, jnp.float32)
    dk_kh, dv_kh = lax.fori_loop(lo_ref[()], hi_ref[()], body, (zeros, zeros))
    dk_ref[...] = (dk_kh * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_kh.astype(dv_ref.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_rows(config, q_bmrh, k_bkmh, v_bkmh, ids):
    """Rows [B, M, R, Hp] against padded keys [B, K, M, Hp]; ids = (q_segment_br, q_order_br,
    kv_segment_bk, kv_order_bk). Returns out [B, M, R, Hp]."""
    return _flash_rows_fwd(config, q_bmrh, k_bkmh, v_bkmh, ids)[0]


def _flash_rows_fwd(config, q_bmrh, k_bkmh, v_bkmh, ids):
    q_segment_br, q_order_br, kv_segment_bk, kv_order_bk = ids
    out_bmrh, lse_bmr = rows_attention(
        q_bmrh, q_segment_br, q_order_br, (k_bkmh, v_bkmh, kv_segment_bk, kv_order_bk),
        scale=config.scale, block_r=config.block_r, block_k=config.block_k, interpret=config.interpret,
        with_lse=True)
    return out_bmrh, (q_bmrh, k_bkmh, v_bkmh, ids, out_bmrh, lse_bmr)


def _flash_rows_bwd(config, residuals, do_bmrh):
    q_bmrh, k_bkmh, v_bkmh, ids, out_bmrh, lse_bmr = residuals
    q_segment_br, q_order_br, kv_segment_bk, kv_order_bk = ids
    b, m, rows, hp = q_bmrh.shape
    kp = k_bkmh.shape[1]
    block_r, block_k = config.block_r, config.block_k
    delta_bmr = jnp.sum(out_bmrh.astype(jnp.float32) * do_bmrh.astype(jnp.float32), axis=-1)
    live_bik = common.live_blocks(q_segment_br, kv_segment_bk, q_order_br, kv_order_bk, block_r, block_k)
    options = common.call_options(config.interpret)
    scalar_spec = pl.BlockSpec((None, None), lambda b, m, i: (b, i))
    ordered = q_order_br is not None

    row_tile = pl.BlockSpec((None, None, block_r, hp), lambda b, m, i: (b, m, i, 0))
    row_stat_tile = pl.BlockSpec((None, None, block_r), lambda b, m, i: (b, m, i))
    row_ids_tile = pl.BlockSpec((None, block_r), lambda b, m, i: (b, i))
    all_keys = pl.BlockSpec((None, kp, None, hp), lambda b, m, i: (b, 0, m, 0))
    all_key_ids = pl.BlockSpec((None, kp), lambda b, m, i: (b, 0))
    lo_bi, hi_bi = common.block_bounds(live_bik, axis=2)
    dq_bmrh = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=block_k, scale=config.scale),
        grid=(b, m, rows // block_r),
        in_specs=[row_tile, row_tile, row_stat_tile, row_stat_tile, row_ids_tile, row_ids_tile if ordered else None,
                  scalar_spec, scalar_spec, all_keys, all_keys, all_key_ids, all_key_ids if ordered else None],
        out_specs=row_tile,
        out_shape=jax.ShapeDtypeStruct(q_bmrh.shape, q_bmrh.dtype),
        name="svlm_flash_dq",
        **options,
    )(q_bmrh, do_bmrh, lse_bmr, delta_bmr, q_segment_br, q_order_br, lo_bi, hi_bi,
      k_bkmh, v_bkmh, kv_segment_bk, kv_order_bk)

    key_tile = pl.BlockSpec((None, block_k, None, hp), lambda b, m, j: (b, j, m, 0))
    key_ids_tile = pl.BlockSpec((None, block_k), lambda b, m, j: (b, j))
    all_rows = pl.BlockSpec((None, None, rows, hp), lambda b, m, j: (b, m, 0, 0))
    all_row_stats = pl.BlockSpec((None, None, rows), lambda b, m, j: (b, m, 0))
    all_row_ids = pl.BlockSpec((None, rows), lambda b, m, j: (b, 0))
    lo_bj, hi_bj = common.block_bounds(live_bik, axis=1)
    dk_bkmh, dv_bkmh = pl.pallas_call(
        functools.partial(_dkv_kernel, block_r=block_r, scale=config.scale),
        grid=(b, m, kp // block_k),
        in_specs=[key_tile, key_tile, key_ids_tile, key_ids_tile if ordered else None, scalar_spec, scalar_spec,
                  all_rows, all_rows, all_row_stats, all_row_stats, all_row_ids, all_row_ids if ordered else None],
        out_specs=[key_tile, key_tile],
        out_shape=[jax.ShapeDtypeStruct(k_bkmh.shape, k_bkmh.dtype), jax.ShapeDtypeStruct(v_bkmh.shape, v_bkmh.dtype)],
        name="svlm_flash_dkv",
        **options,
    )(k_bkmh, v_bkmh, kv_segment_bk, kv_order_bk, lo_bj, hi_bj,
      q_bmrh, do_bmrh, lse_bmr, delta_bmr, q_segment_br, q_order_br)
    return dq_bmrh, dk_bkmh, dv_bkmh, None


_flash_rows.defvjp(_flash_rows_fwd, _flash_rows_bwd)


def flash_attention(q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk, q_order_bq=None, kv_order_bk=None,
                    *, scale=None, block_r: int = 64, block_k: int = 64, interpret: bool | None = None):
    """Differentiable `reference.attention` (without key rotation); [B, Q, N, H] -> [B, Q, N, H]."""
    m, scale = common.check_args(q_bqnh, k_bkmh, q_order_bq, kv_order_bk, scale)
    b, q, n, h = q_bqnh.shape
    block_r = common.tile(q * (n // m), block_r)
    block_k = common.tile(k_bkmh.shape[1], block_k)
    q_bmrh, q_segment_br, q_order_br = common.prepare_rows(q_bqnh, q_segment_bq, q_order_bq, m, block_r)
    k_p, v_p, kv_segment_p, kv_order_p = common.prepare_keys(k_bkmh, v_bkmh, kv_segment_bk, kv_order_bk, block_k)
    config = _Config(float(scale), block_r, block_k, common.use_interpret(interpret))
    out_bmrh = _flash_rows(config, q_bmrh, k_p, v_p, (q_segment_br, q_order_br, kv_segment_p, kv_order_p))
    return common.ungroup_rows(common.unpad_head(out_bmrh, h), q, n)
