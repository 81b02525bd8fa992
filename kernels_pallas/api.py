"""One dispatch per attention operation: `impl` is "pallas", "xla" or "cudnn"; None picks by platform.

None means "pallas" on a GPU and "xla" (the jnp reference) elsewhere. "pallas" off a GPU runs the
kernels in interpret mode (how the tests exercise them). Which Pallas kernel serves a call follows
from its arguments:
  * at most DECODE_MAX_QUERIES queries -> `decode` (split over the cache, flash-decoding);
  * keys cached before RoPE (`rope`) -> `prefill` (keys rotated first, in XLA);
  * order ids (causal) -> `flash_train` (the prefill forward, plus a Pallas backward: differentiable);
  * segment ids only -> `vision` (block-diagonal windows / frames).
Only the `flash_train` route has a gradient. On a GPU, each kernel configuration is compiled once
ahead of use; if that fails, the call falls back to the reference with a one-line warning.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from kernels_pallas import decode, flash_train, prefill, reference, vision
from kernels_pallas.reference import RotarySpec

IMPLS = ("pallas", "xla", "cudnn")
DECODE_MAX_QUERIES = 16

__all__ = ["IMPLS", "RotarySpec", "attention", "default_impl", "fallbacks", "pallas_kernel"]

# (kernel name, argument shapes and dtypes, static options) -> whether it compiled on this GPU.
_COMPILES: dict = {}


def default_impl() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def attention(q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk, q_order_bq=None, kv_order_bk=None,
              *, scale=None, impl=None, k_positions_bk3=None, rope: RotarySpec | None = None):
    """Masked grouped-query attention; semantics in `reference.attention`.

    q [B, Q, N, H], k and v [B, K, M, H], segment and order ids [B, Q] / [B, K] (int), optional key
    positions [B, K, 3] with `rope` for keys cached before rotary embedding. Returns [B, Q, N, H].
    """
    impl = default_impl() if impl is None else impl
    args = (q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk, q_order_bq, kv_order_bk)
    if impl == "xla":
        return reference.attention(*args, scale=scale, k_positions_bk3=k_positions_bk3, rope=rope)
    if impl == "cudnn":
        return _cudnn_attention(*args, scale=scale, k_positions_bk3=k_positions_bk3, rope=rope)
    if impl == "pallas":
        return _pallas_attention(*args, scale=scale, k_positions_bk3=k_positions_bk3, rope=rope)
    raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")


def fallbacks() -> list[str]:
    """Names of the Pallas kernels that did not compile here and fell back to the reference."""
    return sorted({key[0] for key, compiled in _COMPILES.items() if not compiled})


def pallas_kernel(num_queries: int, ordered: bool, rotated: bool):
    """(name, function) of the Pallas kernel serving a call; see the module docstring."""
    if num_queries <= DECODE_MAX_QUERIES:
        return "decode", decode.decode_attention
    if rotated:
        return "prefill", prefill.prefill_attention
    if ordered:
        return "flash_train", flash_train.flash_attention
    return "vision", vision.vision_attention


def _pallas_attention(q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk, q_order_bq, kv_order_bk,
                      *, scale, k_positions_bk3, rope):
    name, kernel = pallas_kernel(q_bqnh.shape[1], q_order_bq is not None, rope is not None)
    args = (q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk)
    if q_order_bq is not None:
        args += (q_order_bq, kv_order_bk)

    def run(args, k_positions_bk3):
        rotation = {} if rope is None else dict(k_positions_bk3=k_positions_bk3, rope=rope)
        return kernel(*args, scale=scale, **rotation)

    if jax.default_backend() == "gpu" and not _compiles(name, run, (args, k_positions_bk3), (scale, rope)):
        return reference.attention(q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk, q_order_bq, kv_order_bk,
                                   scale=scale, k_positions_bk3=k_positions_bk3, rope=rope)
    return run(args, k_positions_bk3)


def _compiles(name: str, run, operands, static) -> bool:
    """Compiles `run(*operands)` (and its gradient for the training kernel) once per shapes and
    static options; warns and returns False when the platform cannot, so callers fall back to the
    reference instead of crashing."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), operands)
    key = (name, str(abstract), static)
    if key not in _COMPILES:
        def with_gradient(args, k_positions_bk3):
            out, vjp = jax.vjp(lambda q, k, v: run((q, k, v, *args[3:]), k_positions_bk3), *args[:3])
            return vjp(out)

        to_compile = with_gradient if name == "flash_train" else run
        try:
            jax.jit(to_compile).lower(*abstract).compile()
            _COMPILES[key] = True
        except Exception as err:  # noqa: BLE001 - any lowering/compile failure means: use the reference
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            warnings.warn(f"pallas {name} kernel does not compile here ({first_line[:200]}); using the xla reference",
                          stacklevel=4)
            _COMPILES[key] = False
    return _COMPILES[key]


def _cudnn_attention(q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk, q_order_bq, kv_order_bk,
                     *, scale, k_positions_bk3, rope):
    """jax.nn.dot_product_attention(implementation="cudnn") with the mask built from the ids."""
    if jax.default_backend() != "gpu":
        raise ValueError(f"impl='cudnn' needs an NVIDIA GPU (backend is {jax.default_backend()!r}); "
                         "use impl='xla' or 'pallas'")
    if q_bqnh.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"impl='cudnn' supports bfloat16 and float16 only, not {q_bqnh.dtype}")
    if rope is not None:
        k_bkmh = reference.rotate_keys(k_bkmh, k_positions_bk3, rope)
    mask_bqk = reference.attention_mask(q_segment_bq, kv_segment_bk, q_order_bq, kv_order_bk)
    out_bqnh = jax.nn.dot_product_attention(q_bqnh, k_bkmh, v_bkmh, mask=mask_bqk[:, None], scale=scale,
                                            implementation="cudnn")
    # cuDNN gives rows without a visible key a uniform average; the contract says zeros.
    return jnp.where(jnp.any(mask_bqk, axis=-1)[:, :, None, None], out_bqnh, 0).astype(q_bqnh.dtype)
