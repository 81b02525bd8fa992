"""jax's splash attention behind `api` (`kernels_pallas.tpu`) against the jnp reference.

No TPU here: every kernel in this file runs in Pallas' interpret mode on CPU (the same cases would run
compiled on a TPU, untried). Blocks are 128 wide (splash's smallest) and lengths are not multiples of
them, so each case pads, runs several query or key blocks, skips blocks, and has rows that see no key.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import api, reference, tpu
from tests.test_kernels import _cached_reference, _close, _normal, _op_case, _prefill_case, _reference

BLOCK = 128  # the smallest block splash takes: several blocks at lengths the interpreter runs quickly


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv(api.ENV_VAR, raising=False)
    monkeypatch.delenv(api.TARGET_ENV_VAR, raising=False)


def _packs(rng, b, t):
    """Segment ids [B, T]: packed documents of random lengths and a padded tail (segment 0)."""
    segment_bt = np.zeros((b, t), np.int32)
    for row in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t - 20), 3, replace=False))
        segment_bt[row, :cuts[-1]] = np.searchsorted(cuts, np.arange(cuts[-1]), side="right") + 1 + 3 * row
    return jnp.asarray(segment_bt)


@pytest.mark.parametrize("n, m, h, dtype, order", [
    (4, 2, 80, jnp.float32, "index"),     # GQA, Qwen2.5-VL's vision head dim 80 padded to 128: CausalMask
    (3, 1, 16, jnp.float32, "random"),    # MQA, order ids with ties and no link to the index: dynamic mask
    (2, 2, 64, jnp.bfloat16, "index"),    # bf16
])
def test_causal_attention_values_and_gradients(n, m, h, dtype, order):
    """Packed documents over 300 tokens (3 blocks): output and dq, dk, dv against jax.grad of the reference."""
    rng = np.random.default_rng(10)
    b, t = 2, 300
    segment_bt = _packs(rng, b, t)
    q_btnh, k_btmh, v_btmh, do_btnh = (_normal(rng, (b, t, heads, h), dtype) for heads in (n, m, m, n))
    if order == "index":  # no order ids: the kernel's causal mask; the reference reads the index as order
        ids, ref_ids = (segment_bt, segment_bt), (segment_bt, segment_bt, *map(reference.index_order, (segment_bt,) * 2))
    else:
        order_bt = jnp.asarray(rng.integers(0, t // 3, (b, t)), jnp.int32)
        ids = ref_ids = (segment_bt, segment_bt, order_bt, order_bt)

    def loss(fn, ids, q, k, v):
        return jnp.sum(fn(q, k, v, *ids).astype(jnp.float32) * do_btnh)

    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(2, 3, 4)), static_argnums=0)
    out, grads = value_and_grads(functools.partial(tpu.causal_attention, block=BLOCK), ids, q_btnh, k_btmh, v_btmh)
    ref_out, ref_grads = value_and_grads(reference.attention, ref_ids, q_btnh, k_btmh, v_btmh)
    _close(out / (b * t * n), ref_out / (b * t * n), dtype)
    for grad, ref_grad in zip(grads, ref_grads):
        scale = max(1.0, float(np.abs(np.asarray(ref_grad, np.float32)).max()))
        _close(np.asarray(grad, np.float32) / scale, np.asarray(ref_grad, np.float32) / scale, dtype)


@pytest.mark.parametrize("t, n, m, h, dtype", [
    (200, 4, 2, 80, jnp.bfloat16),  # GQA, head dim 80
    (140, 3, 3, 16, jnp.float32),
])
def test_segment_attention_matches_reference(t, n, m, h, dtype):
    """Segments in no order, with padding (0) among them and a query segment no key has."""
    rng = np.random.default_rng(11)
    kv_segment_bt = jnp.asarray(rng.integers(0, 6, (2, t)), jnp.int32)
    q_segment_bt = kv_segment_bt.at[0, :7].set(9)
    q_btnh, k_btmh, v_btmh = (_normal(rng, (2, t, heads, h), dtype) for heads in (n, m, m))
    out = jax.jit(functools.partial(tpu.segment_attention, block=BLOCK))(q_btnh, k_btmh, v_btmh, q_segment_bt,
                                                                          kv_segment_bt)
    _close(out, _reference(q_btnh, k_btmh, v_btmh, q_segment_bt, kv_segment_bt), dtype)
    assert not np.any(np.asarray(out[0, :7], np.float32))


@pytest.mark.parametrize("n, m, h, dtype", [
    (4, 2, 16, jnp.float32),
    (7, 1, 128, jnp.bfloat16),  # Qwen2.5-VL-7B's ratio and text head dim
])
def test_cached_prefill_matches_reference(n, m, h, dtype):
    """A chunk of 19 queries against a 250-slot cache (slots in logical, not index, order: empty ones,
    future ones) followed by the chunk itself, causal by order; one query sees no key."""
    cache = 250
    case = _prefill_case(np.random.default_rng(12), b=2, q=19, cache=cache, n=n, m=m, h=h, dtype=dtype)
    # query 0 of stream 0 in a segment of its own whose slot is empty: it sees no key
    case["q_segment_bq"] = case["q_segment_bq"].at[0, 0].set(7)
    case["kv_segment_bk"] = case["kv_segment_bk"].at[0, cache].set(0)
    out = jax.jit(functools.partial(tpu.cached_prefill_attention, block=BLOCK))(**case)
    _close(out, _cached_reference(**case), dtype)
    assert not np.any(np.asarray(out[0, 0], np.float32))


def test_visible_rows_is_the_reference_masks_any():
    rng = np.random.default_rng(13)
    q_segment_bq, kv_segment_bk = (jnp.asarray(rng.integers(-1, 5, (8, x)), jnp.int32) for x in (30, 40))
    q_order_bq, kv_order_bk = (jnp.asarray(rng.integers(0, 50, (8, x)), jnp.int32) for x in (30, 40))
    for orders in ((q_order_bq, kv_order_bk), ()):
        seen_bq = jax.vmap(tpu.visible_rows)(q_segment_bq, kv_segment_bk, *orders)
        expected_bq = jnp.any(reference.attention_mask(q_segment_bq, kv_segment_bk, *orders), axis=-1)
        np.testing.assert_array_equal(seen_bq, expected_bq)
        assert 0 < int(expected_bq.sum()) < expected_bq.size


@pytest.mark.parametrize("op", ["causal_attention", "segment_attention", "cached_prefill_attention"])
def test_api_runs_the_tpu_kernels_when_the_target_says_tpu(op, monkeypatch):
    monkeypatch.setenv(api.TARGET_ENV_VAR, "tpu")
    args, _ = _op_case(op, np.random.default_rng(15))
    expected = (_cached_reference if op in api.CACHED else _reference)(*args)
    _close(jax.jit(functools.partial(getattr(api, op), backend="pallas"))(*args), expected, jnp.float32)


def _shapes(op, dtype=jnp.bfloat16):
    """Abstract (q, k, v) of `op` in its layout."""
    s = jax.ShapeDtypeStruct
    kv = s((2, 50, 64), dtype) if op in api.CACHED else s((1, 50, 2, 64), dtype)
    return s((1, 8, 4, 64), dtype), kv, kv


def test_on_a_tpu_auto_picks_splash_except_for_decode(monkeypatch):
    """Plain Python on static shapes: nothing is compiled, so pretending to be a TPU is enough."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert api.pallas_target() == "tpu"
    for op in ("causal_attention", "segment_attention", "cached_prefill_attention"):
        assert api.resolve_backend(op, "auto", *_shapes(op)) == "pallas"
        assert api.resolve_backend(op, "auto", *_shapes(op, jnp.float16)) == "xla"
    assert api.resolve_backend("cached_decode_attention", "auto", *_shapes("cached_decode_attention")) == "xla"
    with pytest.raises(ValueError, match="backend 'pallas' cannot serve this call: there is no TPU decode kernel"):
        api.resolve_backend("cached_decode_attention", "pallas", *_shapes("cached_decode_attention"))
    monkeypatch.setenv(api.TARGET_ENV_VAR, "gpu")  # the variable wins: the GPU kernels, interpreted
    assert api.resolve_backend("causal_attention", "auto", *_shapes("causal_attention")) == "xla"
    assert api.resolve_backend("causal_attention", "pallas", *_shapes("causal_attention")) == "pallas"


def test_target_variable_selects_the_kernels_pallas_runs_and_auto_stays_xla_on_cpu(monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU defaults")
    rng = np.random.default_rng(14)
    b, t = 1, 40
    segment_bt = _packs(rng, b, t)
    q_btnh, k_btmh, v_btmh = (_normal(rng, (b, t, heads, 16), jnp.float32) for heads in (2, 1, 1))
    call = lambda backend: functools.partial(api.causal_attention, q_btnh, k_btmh, v_btmh, segment_bt, segment_bt,
                                             backend=backend)
    splash_in = lambda backend: "splash_mha_fwd" in str(jax.make_jaxpr(call(backend))())  # the kernel's name
    expected = _reference(q_btnh, k_btmh, v_btmh, segment_bt, segment_bt, *map(reference.index_order, (segment_bt,) * 2))
    assert api.pallas_target() == "gpu"
    assert not splash_in("pallas")
    monkeypatch.setenv(api.TARGET_ENV_VAR, "tpu")
    assert api.pallas_target() == "tpu"
    assert splash_in("pallas")
    assert api.resolve_backend("causal_attention", "auto", q_btnh, k_btmh, v_btmh) == "xla"
    for backend in ("auto", "pallas", "xla"):  # no order ids: causal by index on every backend
        _close(jax.jit(call(backend))(), expected, jnp.float32)
    with pytest.raises(ValueError, match="given together"):
        api.causal_attention(q_btnh, k_btmh, v_btmh, segment_bt, segment_bt, None, segment_bt, backend="xla")
    monkeypatch.setenv(api.TARGET_ENV_VAR, "cpu")
    with pytest.raises(ValueError, match=f"{api.TARGET_ENV_VAR}='cpu' is not one of"):
        api.resolve_backend("causal_attention", "auto", q_btnh, k_btmh, v_btmh)
