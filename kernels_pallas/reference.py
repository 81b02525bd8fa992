"""Pure-jnp semantics of every attention operation of `api`; each backend is tested against these.

Axes: B batch, Q queries, K keys (slots), N query heads, M kv heads, G = N // M query heads
per kv head, H head dim.

Masking is described by data, never by a dense mask argument, so kernels can skip blocks:
  * a key is visible to a query iff `kv_segment > 0` and `q_segment == kv_segment`;
  * and, when order ids are given, `kv_order <= q_order` (causality in logical order, which
    with M-RoPE is not the rotary position).
Segment 0 marks padding / empty cache slots. A query that sees no key gets a zero output.

Keys may be cached before rotary embedding: given `k_positions_bk3` (M-RoPE positions t, h, w of
each key slot) and a `rotary.RotarySpec`, keys are rotated by their slot positions before the dot
product (`rotary.rotate_keys`).
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels_pallas.rotary import RotarySpec, rotate_keys


def attention_mask(q_segment_bq, kv_segment_bk, q_order_bq=None, kv_order_bk=None):
    """Boolean visibility [B, Q, K] from segment ids and optional causal order ids."""
    mask_bqk = (q_segment_bq[:, :, None] == kv_segment_bk[:, None, :]) & (kv_segment_bk[:, None, :] > 0)
    if q_order_bq is not None:
        mask_bqk &= kv_order_bk[:, None, :] <= q_order_bq[:, :, None]
    return mask_bqk


def attention(q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk, q_order_bq=None, kv_order_bk=None,
              *, scale=None, k_positions_bk3=None, rope: RotarySpec | None = None):
    """Grouped-query attention with segment/causal masking; softmax in float32.

    Returns [B, Q, N, H] in the dtype of `q_bqnh`; rows that see no key are zero. With
    `k_positions_bk3` and `rope`, keys are rotated by their positions first (`rotate_keys`).
    """
    if (k_positions_bk3 is None) != (rope is None):
        raise ValueError("k_positions_bk3 and rope must be given together")
    if rope is not None:
        k_bkmh = rotate_keys(k_bkmh, k_positions_bk3, rope)
    b, q, n, h = q_bqnh.shape
    m = k_bkmh.shape[2]
    if n % m:
        raise ValueError(f"query heads ({n}) must be a multiple of kv heads ({m})")
    scale = h ** -0.5 if scale is None else scale
    q_bqmgh = q_bqnh.reshape(b, q, m, n // m, h)
    logits_bmgqk = jnp.einsum("BQMGH,BKMH->BMGQK", q_bqmgh, k_bkmh,
                              preferred_element_type=jnp.float32) * scale
    mask_bqk = attention_mask(q_segment_bq, kv_segment_bk, q_order_bq, kv_order_bk)
    mask_b11qk = mask_bqk[:, None, None]
    logits_bmgqk = jnp.where(mask_b11qk, logits_bmgqk, -jnp.inf)
    row_max = jnp.max(logits_bmgqk, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask_b11qk, jnp.exp(logits_bmgqk - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs_bmgqk = weights / jnp.where(denom > 0, denom, 1.0)
    out_bqmgh = jnp.einsum("BMGQK,BKMH->BQMGH", probs_bmgqk.astype(v_bkmh.dtype), v_bkmh,
                           preferred_element_type=jnp.float32)
    return out_bqmgh.reshape(b, q, n, h).astype(q_bqnh.dtype)
