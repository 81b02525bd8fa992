"""Pieces shared by the Pallas attention kernels: padding and layouts (host side, jnp), live-block
bounds, and the in-kernel online-softmax loop (key loading, masking).

Axes as in `reference`, plus R rows (query x head-in-group pairs, see `group_rows`), Hp padded
head dim, X any length being blocked.

Kernels are written in the portable Pallas subset (BlockSpecs, `pl.ds` ref slices, jnp math) and
lowered with Triton on GPU. Triton needs power-of-two tile shapes, at least 16 on each side of a
dot, and cannot gather: hence the padding here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton


# Finite "minus infinity" for masked logits: exp(NEG_INF - m) underflows to 0 and
# NEG_INF - NEG_INF stays 0, so rows that have seen no key yet never produce NaNs.
NEG_INF = -1e30
# Smallest tile side of a Triton dot.
MIN_TILE = 16


def use_interpret(interpret: bool | None) -> bool:
    """None means: compile for the GPU when there is one, interpret elsewhere."""
    return jax.default_backend() != "gpu" if interpret is None else interpret


def call_options(interpret: bool, num_warps: int = 4, num_stages: int = 2) -> dict:
    """Keyword arguments of `pl.pallas_call`: interpret mode, or the Triton lowering on GPU.

    Triton is chosen explicitly because the portable subset used here is what it lowers; the
    Mosaic GPU lowering (jax's default for `pallas_call` without params) wants its own dialect.
    """
    if interpret:
        return dict(interpret=True)
    return dict(compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages))


def tile(n: int, block: int) -> int:
    """Tile side for a length n: `block`, shrunk to a power of two >= MIN_TILE for short lengths."""
    return min(block, max(MIN_TILE, pl.next_power_of_2(n)))


def pad_to(x, axis: int, multiple: int):
    """Zero-pads `axis` of x at the end up to a multiple of `multiple`."""
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def pad_head(x_h):
    """Zero-pads the head dim (last axis) to a power of two >= MIN_TILE; zeros change no dot product."""
    return pad_to(x_h, -1, max(MIN_TILE, pl.next_power_of_2(x_h.shape[-1])))


def unpad_head(x_hp, h: int):
    """Inverse of `pad_head`."""
    return x_hp[..., :h]


def group_rows(q_bqnh, m: int, row_multiple: int):
    """Queries [B, Q, N, H] -> rows [B, M, R, H], row r = q * G + g holding query q, head m * G + g,
    so one kv head's K/V tile serves all its G query heads. R is padded to `row_multiple`."""
    b, q, n, h = q_bqnh.shape
    q_bmrh = q_bqnh.reshape(b, q, m, n // m, h).transpose(0, 2, 1, 3, 4).reshape(b, m, q * (n // m), h)
    return pad_to(q_bmrh, 2, row_multiple)


def ungroup_rows(o_bmrh, q: int, n: int):
    """Inverse of `group_rows`: rows [B, M, R, H] -> [B, Q, N, H]."""
    b, m, _, h = o_bmrh.shape
    o_bmqgh = o_bmrh[:, :, :q * (n // m)].reshape(b, m, q, n // m, h)
    return o_bmqgh.transpose(0, 2, 1, 3, 4).reshape(b, q, n, h)


def row_ids(ids_bq, g: int, rows: int):
    """Per-query ids [B, Q] -> per-row ids [B, R] (each repeated G times; padding rows get 0)."""
    return pad_to(jnp.repeat(ids_bq, g, axis=1), 1, rows)


def block_summary(segment_bx, order_bx, block: int):
    """Per block of `block` entries [B, X/block]: min and max segment and min and max order over
    the entries that take part (segment > 0). Blocks without any get (BIG, 0, BIG, -BIG)."""
    big = jnp.iinfo(jnp.int32).max
    b, x = segment_bx.shape
    seg_bnk = segment_bx.reshape(b, x // block, block)
    valid_bnk = seg_bnk > 0
    order_bnk = jnp.zeros_like(seg_bnk) if order_bx is None else order_bx.reshape(b, x // block, block)
    return (jnp.min(jnp.where(valid_bnk, seg_bnk, big), -1), jnp.max(jnp.where(valid_bnk, seg_bnk, 0), -1),
            jnp.min(jnp.where(valid_bnk, order_bnk, big), -1), jnp.max(jnp.where(valid_bnk, order_bnk, -big), -1))


def live_blocks(q_segment_bx, kv_segment_by, q_order_bx, kv_order_by, block_q: int, block_k: int):
    """Which (query block, key block) pairs may hold a visible pair [B, X/block_q, Y/block_k].

    Conservative (equal segments need overlapping ranges, causality needs min kv order <= max q
    order), so masking inside the kernel stays the source of truth; tight when ids are sorted, as
    for windows, packed sequences, causal chunks and a cache whose empty slots are segment 0.
    """
    q_smin, q_smax, _, q_omax = block_summary(q_segment_bx, q_order_bx, block_q)
    k_smin, k_smax, k_omin, _ = block_summary(kv_segment_by, kv_order_by, block_k)
    live = (q_smin[:, :, None] <= k_smax[:, None, :]) & (k_smin[:, None, :] <= q_smax[:, :, None])
    if q_order_bx is not None:
        live &= k_omin[:, None, :] <= q_omax[:, :, None]
    return live


def block_bounds(live_bxy, axis: int):
    """First live block and one past the last along `axis` (int32; 0, 0 where none is live).

    The kernels loop over [lo, hi) only, skipping empty cache tails, future causal blocks and
    other windows without data-dependent control flow inside the loop.
    """
    n = live_bxy.shape[axis]
    any_live = jnp.any(live_bxy, axis=axis)
    lo = jnp.argmax(live_bxy, axis=axis)
    hi = n - jnp.argmax(jnp.flip(live_bxy, axis=axis), axis=axis)
    return jnp.where(any_live, lo, 0).astype(jnp.int32), jnp.where(any_live, hi, 0).astype(jnp.int32)


def dot_nt(a_xh, b_yh):
    """a @ b.T in float32 [X, Y]."""
    return lax.dot_general(a_xh, b_yh, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a_xy, b_yh):
    """a @ b in float32 [X, H]."""
    return lax.dot_general(a_xy, b_yh, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a_yx, b_yh):
    """a.T @ b in float32 [X, H]."""
    return lax.dot_general(a_yx, b_yh, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def visible(q_segment_r, kv_segment_k, q_order_r, kv_order_k):
    """In-kernel visibility [R, K]; the same rule as `reference.attention_mask`."""
    mask_rk = (q_segment_r[:, None] == kv_segment_k[None, :]) & (kv_segment_k[None, :] > 0)
    if q_order_r is not None:
        mask_rk &= kv_order_k[None, :] <= q_order_r[:, None]
    return mask_rk


def logits(q_rh, k_kh, scale: float):
    """Scaled q.k in float32 [R, K]."""
    return dot_nt(q_rh, k_kh) * scale


def softmax_init(rows: int, head_dim: int):
    """Empty online-softmax state: running max m [R], normaliser l [R], accumulator acc [R, H]."""
    return (jnp.full((rows,), NEG_INF, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))


def softmax_update(state, logits_rk, mask_rk, v_kh):
    """Folds one key tile into the online-softmax state; masked keys get exactly zero weight."""
    m_prev, l_prev, acc_prev = state
    logits_rk = jnp.where(mask_rk, logits_rk, NEG_INF)
    m_next = jnp.maximum(m_prev, jnp.max(logits_rk, axis=-1))
    p_rk = jnp.where(mask_rk, jnp.exp(logits_rk - m_next[:, None]), 0.0)
    correction = jnp.exp(m_prev - m_next)
    l_next = correction * l_prev + jnp.sum(p_rk, axis=-1)
    acc_next = correction[:, None] * acc_prev + dot_nn(p_rk.astype(v_kh.dtype), v_kh)
    return m_next, l_next, acc_next


def softmax_finish(state):
    """Normalised output [..., R, H] (zero for rows that saw no key) and log-sum-exp [..., R] (0 there)."""
    m, l, acc = state
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return out, lse


def merge_partials(m_sr, l_sr, acc_srh, axis: int = 0):
    """Combines online-softmax states computed over disjoint key ranges (split axis `axis`)."""
    m_r = jnp.max(m_sr, axis=axis, keepdims=True)
    weight_sr = jnp.exp(m_sr - m_r)
    l_r = jnp.sum(weight_sr * l_sr, axis=axis)
    acc_rh = jnp.sum(weight_sr[..., None] * acc_srh, axis=axis)
    return jnp.squeeze(m_r, axis), l_r, acc_rh


def attend(state, q_rh, q_segment_r, q_order_r, refs, lo, hi, block_k: int, scale: float):
    """Runs the online softmax of the query tile over key blocks [lo, hi).

    refs: (k_ref [K, Hp], v_ref [K, Hp], kv_segment_ref [K], kv_order_ref [K] or None).
    """
    k_ref, v_ref, kv_segment_ref, kv_order_ref = refs

    def body(i, state):
        slots = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        kv_order_k = None if kv_order_ref is None else kv_order_ref[slots]
        mask_rk = visible(q_segment_r, kv_segment_ref[slots], q_order_r, kv_order_k)
        return softmax_update(state, logits(q_rh, k_ref[slots, :], scale), mask_rk, v_ref[slots, :])

    return lax.fori_loop(lo, hi, body, state)


def prepare_keys(k, v, kv_segment_bk, kv_order_bk, block_k: int):
    """Pads keys to a multiple of block_k slots (segment 0: invisible) and the head dim. k and v are
    sequences [B, K, M, H] or a cache [B*M, K, H] (`key_specs` says which); the slot axis is 1 in
    both. Returns the `refs` operands of `attend`: (k, v, segment, order or None)."""
    k = pad_head(pad_to(k, 1, block_k))
    v = pad_head(pad_to(v, 1, block_k))
    kv_segment_bk = pad_to(kv_segment_bk.astype(jnp.int32), 1, block_k)
    kv_order_bk = None if kv_order_bk is None else pad_to(kv_order_bk.astype(jnp.int32), 1, block_k)
    return k, v, kv_segment_bk, kv_order_bk


def key_specs(keys, kv_head, *, cache_heads: int | None = None):
    """BlockSpecs for `prepare_keys` outputs: the whole key range [Kp, Hp] of one (batch, kv head)
    per program; `kv_head(*grid_idx)` says which kv head a program reads. With `cache_heads` = M
    the keys are a cache [B*M, Kp, Hp] (row b * M + m), else sequences [B, Kp, M, Hp]."""
    _, _, kv_segment_bk, kv_order_bk = keys
    kp, hp = kv_segment_bk.shape[1], keys[0].shape[-1]
    if cache_heads:
        kv_spec = pl.BlockSpec((None, kp, hp), lambda b, *idx: (b * cache_heads + kv_head(*idx), 0, 0))
    else:
        kv_spec = pl.BlockSpec((None, kp, None, hp), lambda b, *idx: (b, 0, kv_head(*idx), 0))
    ids_spec = pl.BlockSpec((None, kp), lambda b, *idx: (b, 0))
    return kv_spec, kv_spec, ids_spec, None if kv_order_bk is None else ids_spec


def prepare_rows(q_bqnh, q_segment_bq, q_order_bq, m: int, block_r: int):
    """Queries as padded rows (`group_rows`, `pad_head`) with per-row segment and order ids."""
    g = q_bqnh.shape[2] // m
    q_bmrh = pad_head(group_rows(q_bqnh, m, block_r))
    rows = q_bmrh.shape[2]
    q_segment_br = row_ids(q_segment_bq.astype(jnp.int32), g, rows)
    q_order_br = None if q_order_bq is None else row_ids(q_order_bq.astype(jnp.int32), g, rows)
    return q_bmrh, q_segment_br, q_order_br


def check_args(q_bqnh, k, q_order_bq, kv_order_bk, scale, *, cache: bool = False):
    """Validates the shared arguments (k sequences [B, K, M, H], or with `cache` [B*M, K, H]);
    returns (kv heads M, softmax scale)."""
    n, h = q_bqnh.shape[2:]
    m = k.shape[0] // q_bqnh.shape[0] if cache else k.shape[2]
    if n % m:
        raise ValueError(f"query heads ({n}) must be a multiple of kv heads ({m})")
    if (q_order_bq is None) != (kv_order_bk is None):
        raise ValueError("q_order_bq and kv_order_bk must be given together")
    return m, (h ** -0.5 if scale is None else scale)
