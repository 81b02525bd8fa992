"""One dispatch per attention operation: `impl` is "pallas", "xla" or "cudnn"; None picks by platform."""

from __future__ import annotations

from kernels_pallas import reference


def attention(q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk, q_order_bq=None, kv_order_bk=None,
              *, scale=None, impl=None):
    """Masked grouped-query attention; semantics in `reference.attention`."""
    if impl not in (None, "xla"):
        raise ValueError(f"attention impl {impl!r} is not available; use 'xla'")
    return reference.attention(q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk, q_order_bq,
                               kv_order_bk, scale=scale)
