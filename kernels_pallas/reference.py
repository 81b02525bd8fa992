"""Pure-jnp semantics of every attention operation of `api`; each backend is tested against these.

Axes: B batch, Q queries, K keys (slots), N query heads, M kv heads, G = N // M query heads
per kv head, H head dim.

Masking is described by data, never by a dense mask argument, so kernels can skip blocks:
  * a key is visible to a query iff `kv_segment > 0` and `q_segment == kv_segment`;
  * and, when order ids are given, `kv_order <= q_order` (causality in logical order, which
    with M-RoPE is not the rotary position).
Segment 0 marks padding / empty cache slots. A query that sees no key gets a zero output.
Rotary embedding is the caller's: queries and keys arrive rotated.
"""

from __future__ import annotations

import jax.numpy as jnp


def index_order(ids_bx):
    """Order ids equal to the index [B, X]: causality in a row's own order (a training pack)."""
    return jnp.broadcast_to(jnp.arange(ids_bx.shape[1], dtype=jnp.int32), ids_bx.shape)


def attention_mask(q_segment_bq, kv_segment_bk, q_order_bq=None, kv_order_bk=None):
    """Boolean visibility [B, Q, K] from segment ids and optional causal order ids."""
    mask_bqk = (q_segment_bq[:, :, None] == kv_segment_bk[:, None, :]) & (kv_segment_bk[:, None, :] > 0)
    if q_order_bq is not None:
        mask_bqk &= kv_order_bk[:, None, :] <= q_order_bq[:, :, None]
    return mask_bqk


def attention(q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk, q_order_bq=None, kv_order_bk=None,
              *, scale=None):
    """Grouped-query attention with segment/causal masking over sequences (keys [B, K, M, H]);
    softmax in float32. Returns [B, Q, N, H] in the dtype of `q_bqnh`; rows that see no key are zero.
    """
    b, k, m, h = k_bkmh.shape
    as_cache = lambda x_bkmh: x_bkmh.transpose(0, 2, 1, 3).reshape(b * m, k, h)
    return cached_attention(q_bqnh, as_cache(k_bkmh), as_cache(v_bkmh), q_segment_bq, kv_segment_bk, q_order_bq,
                            kv_order_bk, scale=scale)


def cached_attention(q_bqnh, k_ckh, v_ckh, q_segment_bq, kv_segment_bk, q_order_bq=None, kv_order_bk=None,
                     *, scale=None):
    """`attention` against a cache [C = B*M, K, H] (row b * M + m: kv head m of stream b): the
    layout both dots read with one batch axis and no transpose (a few queries against a long cache
    is all memory traffic)."""
    b, q, n, h = q_bqnh.shape
    c, k = k_ckh.shape[:2]
    m = c // b
    if c % b or n % m:
        raise ValueError(f"cache rows ({c}) must be streams ({b}) x kv heads, and query heads ({n}) a multiple of those")
    g = n // m
    scale = h ** -0.5 if scale is None else scale
    # Row r = g * Q + q of cache row (b, m) is query q, head m * G + g.
    q_crh = q_bqnh.reshape(b, q, m, g, h).transpose(0, 2, 3, 1, 4).reshape(c, g * q, h)
    logits_crk = jnp.einsum("CRH,CKH->CRK", q_crh, k_ckh, preferred_element_type=jnp.float32) * scale
    mask_bqk = attention_mask(q_segment_bq, kv_segment_bk, q_order_bq, kv_order_bk)
    mask_crk = jnp.broadcast_to(mask_bqk[:, None, None], (b, m, g, q, k)).reshape(c, g * q, k)
    logits_crk = jnp.where(mask_crk, logits_crk, -jnp.inf)
    row_max = jnp.max(logits_crk, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights_crk = jnp.where(mask_crk, jnp.exp(logits_crk - row_max), 0.0)
    denom_cr1 = jnp.sum(weights_crk, axis=-1, keepdims=True)
    # v first: XLA then contracts the cache's slot axis in place instead of transposing the cache.
    # Normalised after the product: one pass less over the [rows, slots] weights.
    out_crh = jnp.einsum("CKH,CRK->CRH", v_ckh, weights_crk.astype(v_ckh.dtype), preferred_element_type=jnp.float32)
    out_crh = out_crh / jnp.where(denom_cr1 > 0, denom_cr1, 1.0)
    out_bqnh = out_crh.reshape(b, m, g, q, h).transpose(0, 3, 1, 2, 4).reshape(b, q, n, h)
    return out_bqnh.astype(q_bqnh.dtype)
