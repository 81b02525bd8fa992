"""Attention operations, each with an explicit backend; semantics and axes in `reference.attention`.

Operations (ids are int arrays [B, Q] for queries and [B, K] for keys; outputs [B, Q, N, H]; keys and
values [B, K, M, H] for sequences, [B*M, K, H] for a cache, row b * M + m = kv head m of stream b):
  * `causal_attention`: packed causal documents (segment ids, causal by order ids, or by index when
    none are given), as in training. Differentiable with every backend; its Pallas kernels are
    `flash_train` (forward and backward) and splash attention (`tpu`).
  * `segment_attention`: block-diagonal segments only, no causality (vision windows and frames);
    Pallas kernels `vision` and splash attention.
  * `cached_prefill_attention`: a chunk of queries against a cache of (rotated) keys, causal by order
    ids; Pallas kernels `prefill` and splash attention.
  * `cached_decode_attention`: a few queries against that cache, order ids optional; Pallas kernel
    `decode` (flash-decoding: the cache is split over programs); none on a TPU.
Of the Pallas kernels, only those of `causal_attention` have a gradient.

Backends: "xla" (the jnp reference: memory quadratic in sequence), "pallas" (Pallas kernels, see
below), "cudnn" (jax.nn.dot_product_attention on an NVIDIA GPU, bfloat16 / float16, mask built from
the ids), and "auto".
Which Pallas kernels "pallas" runs (`pallas_target`): the environment variable KERNELS_PALLAS_TARGET
("gpu": this package's kernels, lowered with Triton; "tpu": jax's splash attention, `tpu`) > the
platform's (a TPU: "tpu", anything else: "gpu"). They are compiled on their own platform and run in
interpret mode on any other: KERNELS_PALLAS_TARGET=tpu on a CPU runs the TPU kernels interpreted,
which is how the tests check them without a TPU.
Precedence: a `backend` argument other than "auto" > the environment variable KERNELS_PALLAS_BACKEND
(environment variables are read when a call is traced) > "auto". "auto" is "pallas" on the target's own platform (a GPU
or a TPU) when the kernel supports the call's shapes and dtypes (`_pallas_problem`, `_tpu_problem`),
else "xla"; on a CPU it is "xla". The choice is plain Python on static shapes, dtypes and the
platform. A backend that was asked for (argument or environment variable) and cannot serve a call
raises a ValueError; there is no fallback.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from kernels_pallas import decode, flash_train, prefill, reference, tpu, vision

Backend = Literal["auto", "pallas", "xla", "cudnn"]
BACKENDS = get_args(Backend)
ENV_VAR = "KERNELS_PALLAS_BACKEND"
TARGET_ENV_VAR = "KERNELS_PALLAS_TARGET"
TARGETS = ("gpu", "tpu")
OPERATIONS = ("causal_attention", "segment_attention", "cached_prefill_attention", "cached_decode_attention")
PALLAS_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Largest head dim the kernels have run with on a GPU (experiments/bench_kernels.py: 128, and 80
# padded to 128); their tiles hold [block, head dim] float32 accumulators in registers.
PALLAS_MAX_HEAD_DIM = 128
# The decode kernel holds all rows (queries x query heads per kv head) of a kv head in one tile.
DECODE_MAX_ROWS = 128

__all__ = ["BACKENDS", "ENV_VAR", "OPERATIONS", "TARGETS", "TARGET_ENV_VAR", "Backend", "cached_decode_attention",
           "cached_prefill_attention", "causal_attention", "pallas_target", "resolve_backend", "segment_attention"]


def causal_attention(q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk, q_order_bq=None, kv_order_bk=None, *,
                     scale=None, backend: Backend = "auto"):
    """Keys visible within equal segments (> 0) and at order <= the query's; differentiable.

    Without order ids the order is the index in the row (a training pack). The TPU kernel then uses
    splash's causal mask, computed in the kernel; given order ids, it must build a [Q, K] mask (`tpu`)."""
    if (q_order_bq is None) != (kv_order_bk is None):
        raise ValueError("q_order_bq and kv_order_bk must be given together")
    return _dispatch("causal_attention", backend, (flash_train.flash_attention, tpu.causal_attention), q_bqnh,
                     k_bkmh, v_bkmh, (q_segment_bq, kv_segment_bk, q_order_bq, kv_order_bk), scale=scale)


def segment_attention(q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk, *, scale=None,
                      backend: Backend = "auto"):
    """Keys visible within equal segments (> 0), no causality."""
    return _dispatch("segment_attention", backend, (vision.vision_attention, tpu.segment_attention), q_bqnh,
                     k_bkmh, v_bkmh, (q_segment_bq, kv_segment_bk), scale=scale)


def cached_prefill_attention(q_bqnh, k_ckh, v_ckh, q_segment_bq, kv_segment_bk, q_order_bq, kv_order_bk, *,
                             scale=None, backend: Backend = "auto"):
    """A chunk of queries against a cache [B*M, K, H] (keys rotated by the caller); visible within
    equal segments (> 0) and at order <= the query's."""
    return _dispatch("cached_prefill_attention", backend, (prefill.prefill_attention, tpu.cached_prefill_attention),
                     q_bqnh, k_ckh, v_ckh, (q_segment_bq, kv_segment_bk, q_order_bq, kv_order_bk), scale=scale)


def cached_decode_attention(q_bqnh, k_ckh, v_ckh, q_segment_bq, kv_segment_bk, q_order_bq=None,
                            kv_order_bk=None, *, scale=None, backend: Backend = "auto"):
    """`cached_prefill_attention` for a few queries (at most DECODE_MAX_ROWS rows for "pallas");
    without order ids every key of the query's segment is visible."""
    return _dispatch("cached_decode_attention", backend, (decode.decode_attention, None), q_bqnh, k_ckh, v_ckh,
                     (q_segment_bq, kv_segment_bk, q_order_bq, kv_order_bk), scale=scale)


CACHED = ("cached_prefill_attention", "cached_decode_attention")  # keys and values [B*M, K, H]


def resolve_backend(op: str, backend: Backend, q_bqnh, k, v) -> str:
    """The backend ("pallas", "xla" or "cudnn") that serves `op` on arrays of these shapes and dtypes
    (k, v in the operation's layout; precedence in the module docstring); raises ValueError when
    the requested one cannot."""
    if op not in OPERATIONS:
        raise ValueError(f"unknown attention operation {op!r}; expected one of {OPERATIONS}")
    requested, source = _requested(backend)
    target = pallas_target()
    pallas = (_tpu_problem if target == "tpu" else _pallas_problem)(op, q_bqnh, k, v)
    if requested == "auto":
        return "pallas" if jax.default_backend() == target and pallas is None else "xla"
    problem = {"xla": None, "pallas": pallas, "cudnn": _cudnn_problem(q_bqnh, k, v)}[requested]
    if problem is not None:
        raise ValueError(f"{op}: backend {requested!r}{source} cannot serve this call: {problem}; "
                         "use backend='xla' (the jnp reference) or 'auto'")
    return requested


def pallas_target() -> str:
    """Which Pallas kernels "pallas" runs, "gpu" or "tpu" (precedence in the module docstring)."""
    env = os.environ.get(TARGET_ENV_VAR, "")
    if env and env not in TARGETS:
        raise ValueError(f"{TARGET_ENV_VAR}={env!r} is not one of {TARGETS}")
    return env or ("tpu" if jax.default_backend() == "tpu" else "gpu")


def _dtype_problem(q_bqnh, k, v, supported) -> str | None:
    """Why a kernel for the dtypes `supported` cannot take these arrays, or None when it can."""
    dtypes = (q_bqnh.dtype, k.dtype, v.dtype)
    if len(set(dtypes)) > 1:
        return f"q, k and v have different dtypes {tuple(str(d) for d in dtypes)}"
    if q_bqnh.dtype not in supported:
        names = [jnp.dtype(d).name for d in supported]
        return f"dtype {q_bqnh.dtype} is not {', '.join(names[:-1])} or {names[-1]}"
    return None


def _tpu_problem(op: str, q_bqnh, k, v) -> str | None:
    """Why splash attention (`tpu`) does not serve `op` on these arrays, or None when it does."""
    if op == "cached_decode_attention":
        return "there is no TPU decode kernel (XLA serves decode on a TPU)"
    return _dtype_problem(q_bqnh, k, v, tpu.DTYPES)


def _pallas_problem(op: str, q_bqnh, k, v) -> str | None:
    """Why the (GPU) Pallas kernel of `op` does not support these arrays, or None when it does."""
    if (problem := _dtype_problem(q_bqnh, k, v, PALLAS_DTYPES)) is not None:
        return problem
    if q_bqnh.shape[-1] > PALLAS_MAX_HEAD_DIM:
        return f"head dim {q_bqnh.shape[-1]} is above {PALLAS_MAX_HEAD_DIM}"
    if op == "cached_decode_attention":
        q, g = q_bqnh.shape[1], q_bqnh.shape[2] * q_bqnh.shape[0] // k.shape[0]
        if q * g > DECODE_MAX_ROWS:
            return (f"{q} queries x {g} query heads per kv head = {q * g} rows exceed the decode kernel's "
                    f"{DECODE_MAX_ROWS} (cached_prefill_attention serves query chunks)")
    return None


def _requested(backend: str) -> tuple[str, str]:
    """(backend asked for, where it came from for messages) after the environment override of "auto"."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    env = os.environ.get(ENV_VAR, "")
    if backend != "auto" or env in ("", "auto"):
        return backend, ""
    if env not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={env!r} is not one of {BACKENDS}")
    return env, f" (from {ENV_VAR})"


def _cudnn_problem(q_bqnh, k, v) -> str | None:
    """Why jax.nn.dot_product_attention(implementation="cudnn") cannot serve these arrays, or None."""
    if jax.default_backend() != "gpu":
        return f"cuDNN needs an NVIDIA GPU (the platform is {jax.default_backend()!r})"
    dtypes = (q_bqnh.dtype, k.dtype, v.dtype)
    if any(d not in (jnp.bfloat16, jnp.float16) for d in dtypes):
        return f"cuDNN supports bfloat16 and float16 only, not {tuple(str(d) for d in dtypes)}"
    return None


def _dispatch(op: str, backend: Backend, kernels, q_bqnh, k, v, ids, *, scale):
    """Runs `op` on the backend `resolve_backend` picks; kernels are its (GPU, TPU) Pallas kernels,
    ids the segment (and order) ids."""
    chosen = resolve_backend(op, backend, q_bqnh, k, v)
    gpu_kernel, tpu_kernel = kernels
    if chosen == "pallas" and pallas_target() == "tpu":
        return tpu_kernel(q_bqnh, k, v, *ids, scale=scale)
    if op == "causal_attention" and ids[2] is None:  # causal by index: order ids for the kernels that read them
        ids = (*ids[:2], *map(reference.index_order, ids[:2]))
    if chosen == "pallas":
        return gpu_kernel(q_bqnh, k, v, *ids, scale=scale)
    if op in CACHED:
        if chosen == "cudnn":  # cuDNN reads sequences [B, K, M, H]: the cache is transposed for it
            b = q_bqnh.shape[0]
            as_sequences = lambda x_ckh: x_ckh.reshape(b, -1, *x_ckh.shape[1:]).transpose(0, 2, 1, 3)
            return _cudnn_attention(q_bqnh, as_sequences(k), as_sequences(v), *ids, scale=scale)
        return reference.cached_attention(q_bqnh, k, v, *ids, scale=scale)
    if chosen == "cudnn":
        return _cudnn_attention(q_bqnh, k, v, *ids, scale=scale)
    return reference.attention(q_bqnh, k, v, *ids, scale=scale)


def _cudnn_attention(q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk, q_order_bq=None, kv_order_bk=None,
                     *, scale):
    """jax.nn.dot_product_attention(implementation="cudnn") with the mask built from the ids."""
    mask_bqk = reference.attention_mask(q_segment_bq, kv_segment_bk, q_order_bq, kv_order_bk)
    out_bqnh = jax.nn.dot_product_attention(q_bqnh, k_bkmh, v_bkmh, mask=mask_bqk[:, None], scale=scale,
                                            implementation="cudnn")
    # cuDNN gives rows without a visible key a uniform average; the contract says zeros.
    return jnp.where(jnp.any(mask_bqk, axis=-1)[:, :, None, None], out_bqnh, 0).astype(q_bqnh.dtype)
