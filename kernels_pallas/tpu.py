"""The operations of `api` on TPU with jax's splash attention kernel
(`jax.experimental.pallas.ops.tpu.splash_attention`, forward and backward); semantics in `reference`.

How the ids become splash masks (per stream: the kernel is vmapped over the batch):
  * Segments: splash's SegmentIds (a key is visible where the ids are equal).
  * Causality by index (`causal_attention` without order ids: the order is the index in the row, as in
    training packs): splash's CausalMask, computed inside the kernel; memory linear in the sequence
    and the blocks above the diagonal skipped.
  * Causality by order ids given as data (`causal_attention` with order ids, `cached_prefill_attention`,
    whose cache is in logical, not slot, order): CausalMask compares indices, which equals comparing
    orders only where the order increases with the index inside every segment, a property of the
    data that no static shape tells. So the boolean mask of `reference.attention_mask` goes to splash
    as a dynamic mask instead: exact for any order, blocks without a visible pair skipped at run
    time, Q x K bytes a stream (three copies with the gradient: forward, dq and dkv blocks) where
    XLA's reference holds N x Q x K float32 logits.
  * Rows that see no key: splash averages them (all logits at its finite mask value), or divides by
    zero where every block was skipped; `visible_rows` finds them and they are set to zero, as the
    contract says. Segment 0 queries see segment 0 keys inside splash; their rows are among those.
The MHA kernel takes q [N, Q, H] and k, v [M, K, H] and reads kv head n // G for query head n: the
grouping of `reference` (GQA and MQA alike). Splash has no softmax scale: q is scaled first.
Lengths are padded to a multiple of the block (padding keys are segment 0, padding rows are sliced
off) and the head dim to a multiple of 128 (zeros change no dot product). There is no decode kernel:
`api` serves decode with XLA. Off a TPU the kernels run in Pallas' interpret mode, which is how the
tests run them on CPU. That is `interpret=True`: jax 0.10.2's TPU-semantics interpreter
(`pltpu.InterpretParams`) fails on a vmapped kernel (it pairs the grid, which has gained the batch
axis, with splash's per-axis dimension semantics).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel

from kernels_pallas import reference
from kernels_pallas.common import check_args, pad_to

# TPU vector registers are 128 lanes wide: splash's blocks are multiples of it, and so is the padded
# head dim.
LANES = 128
# Largest query / key block: splash's own default is 128, MaxText's is 512 (not measured here: no TPU).
MAX_BLOCK = 512
DTYPES = (jnp.float32, jnp.bfloat16)

__all__ = ["DTYPES", "cached_prefill_attention", "causal_attention", "segment_attention",
           "visible_rows"]


def causal_attention(q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk, q_order_bq=None, kv_order_bk=None, *,
                     scale=None, block: int = MAX_BLOCK):
    """`api.causal_attention` (no order ids: causal by index); differentiable. `block`: the largest
    query and key block, a multiple of LANES."""
    _, scale = check_args(q_bqnh, k_bkmh, q_order_bq, kv_order_bk, scale)
    return _attention(q_bqnh, _heads_first(k_bkmh), _heads_first(v_bkmh), q_segment_bq, kv_segment_bk, q_order_bq,
                      kv_order_bk, causal=True, scale=scale, block=block, backward=True)


def segment_attention(q_bqnh, k_bkmh, v_bkmh, q_segment_bq, kv_segment_bk, *, scale=None, block: int = MAX_BLOCK):
    """`api.segment_attention`."""
    _, scale = check_args(q_bqnh, k_bkmh, None, None, scale)
    return _attention(q_bqnh, _heads_first(k_bkmh), _heads_first(v_bkmh), q_segment_bq, kv_segment_bk,
                      causal=False, scale=scale, block=block, backward=False)


def cached_prefill_attention(q_bqnh, k_ckh, v_ckh, q_segment_bq, kv_segment_bk, q_order_bq, kv_order_bk, *,
                             scale=None, block: int = MAX_BLOCK):
    """`api.cached_prefill_attention`: the cache [B*M, K, H] is already kv heads first per stream."""
    _, scale = check_args(q_bqnh, k_ckh, q_order_bq, kv_order_bk, scale, cache=True)
    b = q_bqnh.shape[0]
    as_streams = lambda x_ckh: x_ckh.reshape(b, -1, *x_ckh.shape[1:])
    return _attention(q_bqnh, as_streams(k_ckh), as_streams(v_ckh), q_segment_bq, kv_segment_bk, q_order_bq,
                      kv_order_bk, causal=True, scale=scale, block=block, backward=False)


def visible_rows(q_segment_q, kv_segment_k, q_order_q=None, kv_order_k=None):
    """Whether each query sees at least one key by `reference.attention_mask`'s rule [Q], in
    O((Q + K) log K) without the [Q, K] mask: with the keys sorted by (segment, order), the first
    key of a query's segment has that segment's smallest order."""
    kv_order_k = jnp.zeros_like(kv_segment_k) if kv_order_k is None else kv_order_k
    segment_k, order_k = lax.sort((jnp.where(kv_segment_k > 0, kv_segment_k, 0), kv_order_k), num_keys=2)
    first_q = jnp.minimum(jnp.searchsorted(segment_k, q_segment_q), segment_k.shape[0] - 1)
    seen_q = (q_segment_q > 0) & (segment_k[first_q] == q_segment_q)
    return seen_q if q_order_q is None else seen_q & (order_k[first_q] <= q_order_q)


def _heads_first(x_bkmh):
    """Sequences [B, K, M, H] -> [B, M, K, H], splash's layout."""
    return x_bkmh.transpose(0, 2, 1, 3)


def _attention(q_bqnh, k_bmkh, v_bmkh, q_segment_bq, kv_segment_bk, q_order_bq=None, kv_order_bk=None, *,
               causal: bool, scale, block: int, backward: bool):
    """Splash attention with k, v kv heads first [B, M, K, H] (arguments checked by `check_args`):
    visible within equal segments (> 0) and, when `causal`, at order <= the query's (by index without
    order ids). `backward` builds the gradient's block tables too. Returns [B, Q, N, H]."""
    q, h, k = q_bqnh.shape[1], q_bqnh.shape[3], k_bmkh.shape[2]
    if block % LANES:
        raise ValueError(f"block {block} is not a multiple of {LANES}")
    block_q, block_kv = _block(q, block), _block(k, block)
    pad_head = lambda x: pad_to(x, -1, LANES)
    q_bnqh = pad_head(pad_to(q_bqnh * jnp.asarray(scale, q_bqnh.dtype), 1, block_q)).transpose(0, 2, 1, 3)
    k_bmkh, v_bmkh = (pad_head(pad_to(x, 2, block_kv)) for x in (k_bmkh, v_bmkh))
    q_segment_bq, kv_segment_bk, q_order_bq, kv_order_bk = (
        None if ids is None else pad_to(ids.astype(jnp.int32), 1, size)
        for ids, size in ((q_segment_bq, block_q), (kv_segment_bk, block_kv), (q_order_bq, block_q),
                          (kv_order_bk, block_kv)))
    sizes = _block_sizes(block_q, block_kv, backward)
    interpret = jax.default_backend() != "tpu"
    if q_order_bq is None:  # a static mask, computed in the kernel; segments by SegmentIds
        shape = (q_bnqh.shape[2], k_bmkh.shape[2])
        mask = splash.MultiHeadMask([splash.CausalMask(shape) if causal else splash.FullMask(shape)])
        kernel = splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)
        out_bnqh = jax.vmap(lambda q_, k_, v_, qs, ks: kernel(q_, k_, v_, segment_ids=splash.SegmentIds(qs, ks)))(
            q_bnqh, k_bmkh, v_bmkh, q_segment_bq, kv_segment_bk)
        if causal:  # for `visible_rows`
            q_order_bq, kv_order_bk = reference.index_order(q_segment_bq), reference.index_order(kv_segment_bk)
    else:
        def per_stream(q_nqh, k_mkh, v_mkh, q_segment_q, kv_segment_k, q_order_q, kv_order_k):
            mask_1qk = reference.attention_mask(q_segment_q[None], kv_segment_k[None], q_order_q[None],
                                                kv_order_k[None])
            kernel = splash.make_splash_mha_single_device(mask_1qk, block_sizes=sizes, interpret=interpret)
            return _traceable(kernel)(q_nqh, k_mkh, v_mkh)

        out_bnqh = jax.vmap(per_stream)(q_bnqh, k_bmkh, v_bmkh, q_segment_bq, kv_segment_bk, q_order_bq,
                                        kv_order_bk)
    seen_bq = jax.vmap(visible_rows)(q_segment_bq, kv_segment_bk, q_order_bq, kv_order_bk)
    out_bqnh = out_bnqh.transpose(0, 2, 1, 3)[:, :q, :, :h]
    return jnp.where(seen_bq[:, :q, None, None], out_bqnh, 0).astype(q_bqnh.dtype)


def _block(length: int, block: int) -> int:
    """Block side for a sequence of `length`: `block`, or the length rounded up to LANES if shorter."""
    return min(block, -(-length // LANES) * LANES)


def _block_sizes(block_q: int, block_kv: int, backward: bool) -> splash.BlockSizes:
    """Splash's tiles: the same blocks for the forward and, with `backward`, the dq and dkv kernels."""
    grads = dict(block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                 block_kv_dq=block_kv) if backward else {}
    return splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, **grads)


def _traceable(kernel):
    """The kernel of a dynamic (traced) mask, callable under jit: jax 0.10.2's `make_splash_*` turns
    `MaskInfo.is_dynamic_mask`, a Python bool it reads only to name a scope, into an array, which
    `SplashAttentionKernel.__call__` cannot test once traced."""
    flag = lambda info: None if info is None else info._replace(is_dynamic_mask=True)
    return splash_attention_kernel.SplashAttentionKernel(flag(kernel.fwd_mask_info), flag(kernel.dq_mask_info),
                                                         flag(kernel.dkv_mask_info), **kernel.kwargs)
