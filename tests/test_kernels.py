"""Pallas attention kernels against the jnp reference: interpreted on CPU, compiled on a GPU
(`PYTHONPATH=. pytest tests/test_kernels.py` on the device machine runs the same cases for real).

Shapes are tiny and deliberately not multiples of the 16-wide tiles used here, so every kernel runs
several key blocks, padded tails, empty cache slots and rows that see no key at all.
"""

import functools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import api, common, decode, flash_train, prefill, reference, vision

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
# Compiled float32 dots on a GPU run on the tensor cores in tf32 (10-bit mantissa), as XLA's do.
TOL = {jnp.float32: 2e-3 if ON_GPU else 1e-5, jnp.bfloat16: 2e-2}
# The jnp semantics every backend is checked against (sequences; a cache is kv heads first).
_reference = jax.jit(reference.attention)
_cached_reference = jax.jit(reference.cached_attention)


def _normal(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _close(actual, expected, dtype):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               atol=TOL[dtype], rtol=TOL[dtype])


def _cache_case(rng, b, q, k, n, m, h, dtype):
    """Queries of one stream (segment 1) against a cache [B*M, K, H] with empty slots (segment 0),
    future slots (order above the queries'), and in the last stream a query of segment 2 that sees
    nothing."""
    kv_segment_bk = np.where(rng.random((b, k)) < 0.25, 0, 1)
    kv_segment_bk[:, -5:] = 0  # an empty tail, as in a cache that is not full yet
    q_segment_bq = np.ones((b, q), np.int32)
    q_segment_bq[-1, -1] = 2
    kv_order_bk = rng.integers(0, k, (b, k))
    q_order_bq = rng.integers(k // 2, k + q, (b, q))
    arrays = dict(q_bqnh=_normal(rng, (b, q, n, h), dtype), k_ckh=_normal(rng, (b * m, k, h), dtype),
                  v_ckh=_normal(rng, (b * m, k, h), dtype), q_segment_bq=jnp.asarray(q_segment_bq, jnp.int32),
                  kv_segment_bk=jnp.asarray(kv_segment_bk, jnp.int32), q_order_bq=jnp.asarray(q_order_bq, jnp.int32),
                  kv_order_bk=jnp.asarray(kv_order_bk, jnp.int32))
    return arrays


@pytest.mark.parametrize("q, n, m, dtype", [
    (1, 4, 4, jnp.float32),     # GQA ratio 1
    (2, 4, 2, jnp.bfloat16),    # ratio 2, bf16
    (2, 7, 1, jnp.float32),     # ratio 7 (rows padded to 16)
])
def test_decode_matches_reference(q, n, m, dtype):
    rng = np.random.default_rng(0)
    case = _cache_case(rng, b=2, q=q, k=53, n=n, m=m, h=16, dtype=dtype)
    out = jax.jit(functools.partial(decode.decode_attention, block_k=16, splits=2, interpret=INTERPRET))(**case)
    _close(out, _cached_reference(**case), dtype)
    assert not np.any(np.asarray(out[-1, -1], np.float32))  # the query that sees nothing


def _prefill_case(rng, *, b, q, cache, n, m, h, dtype):
    """A chunk of q queries against a cache of `cache` slots followed by the chunk's own slots
    (ordered after every cache slot, in the queries' segments): causal by order."""
    case = _cache_case(rng, b=b, q=q, k=cache + q, n=n, m=m, h=h, dtype=dtype)
    chunk_order = cache + np.arange(q)
    case["q_order_bq"] = jnp.asarray(np.broadcast_to(chunk_order, (b, q)), jnp.int32)
    case["kv_order_bk"] = case["kv_order_bk"].at[:, cache:].set(chunk_order)
    case["kv_segment_bk"] = case["kv_segment_bk"].at[:, cache:].set(case["q_segment_bq"])
    return case


@pytest.mark.parametrize("n, m, dtype, h", [
    (7, 1, jnp.float32, 32),    # ratio 7
    (4, 2, jnp.bfloat16, 16),   # ratio 2, bf16
])
def test_prefill_matches_reference(n, m, dtype, h):
    """A chunk of 19 queries against a 40-slot cache followed by the chunk itself, causal by order."""
    case = _prefill_case(np.random.default_rng(1), b=2, q=19, cache=40, n=n, m=m, h=h, dtype=dtype)
    out = jax.jit(functools.partial(prefill.prefill_attention, block_r=16, block_k=16,
                                    interpret=INTERPRET))(**case)
    _close(out, _cached_reference(**case), dtype)


@pytest.mark.parametrize("t, n, m, h, dtype, sort", [
    (45, 2, 2, 80, jnp.bfloat16, True),  # Qwen2.5-VL head_dim 80 (padded inside), windows in order
    (38, 3, 1, 20, jnp.float32, False),  # odd half head dim, GQA, segments in no order
])
def test_vision_matches_reference(t, n, m, h, dtype, sort):
    rng = np.random.default_rng(2)
    segment_bt = rng.integers(0, 5, (2, t))
    segment_bt = np.sort(segment_bt, axis=1) if sort else segment_bt
    segment_bt = jnp.asarray(segment_bt, jnp.int32)
    q_btnh, k_btmh, v_btmh = (_normal(rng, (2, t, heads, h), dtype) for heads in (n, m, m))
    out = jax.jit(functools.partial(vision.vision_attention, block_q=16, block_k=16, interpret=INTERPRET))(
        q_btnh, k_btmh, v_btmh, segment_bt, segment_bt)
    _close(out, _reference(q_btnh, k_btmh, v_btmh, segment_bt, segment_bt), dtype)


@pytest.mark.parametrize("n, m, h, dtype", [
    (2, 2, 16, jnp.float32),
    (7, 1, 16, jnp.float32),
    (4, 2, 32, jnp.bfloat16),
])
def test_flash_train_values_and_gradients(n, m, h, dtype):
    """Packed causal sequences (three segments and a padded tail): output and dq, dk, dv."""
    rng = np.random.default_rng(3)
    b, t = 2, 37
    segment_bt = jnp.asarray(np.repeat([[1] * 12 + [2] * 15 + [3] * 6 + [0] * 4], b, axis=0), jnp.int32)
    order_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q_btnh, k_btmh, v_btmh, do_btnh = (_normal(rng, (b, t, heads, h), dtype) for heads in (n, m, m, n))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, segment_bt, segment_bt, order_bt, order_bt).astype(jnp.float32) * do_btnh)

    kernel = functools.partial(flash_train.flash_attention, block_r=16, block_k=16, interpret=INTERPRET)
    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3)), static_argnums=0)
    out, grads = value_and_grads(kernel, q_btnh, k_btmh, v_btmh)
    ref_out, ref_grads = value_and_grads(reference.attention, q_btnh, k_btmh, v_btmh)
    _close(out / (b * t * n), ref_out / (b * t * n), dtype)
    for grad, ref_grad in zip(grads, ref_grads):
        scale = max(1.0, float(np.abs(np.asarray(ref_grad, np.float32)).max()))
        _close(np.asarray(grad, np.float32) / scale, np.asarray(ref_grad, np.float32) / scale, dtype)


def _op_case(op: str, rng):
    """(positional, keyword) arguments of the operation `op` on a small case."""
    if op in ("cached_prefill_attention", "cached_decode_attention"):
        return tuple(_cache_case(rng, b=2, q=3, k=21, n=4, m=2, h=16, dtype=jnp.float32).values()), {}
    t = 21
    segment_bt = jnp.asarray(np.sort(rng.integers(0, 4, (2, t)), axis=1), jnp.int32)
    q_btnh, k_btmh, v_btmh = (_normal(rng, (2, t, heads, 16), jnp.float32) for heads in (4, 2, 2))
    if op == "segment_attention":
        return (q_btnh, k_btmh, v_btmh, segment_bt, segment_bt), {}
    order_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
    return (q_btnh, k_btmh, v_btmh, segment_bt, segment_bt, order_bt, order_bt), {}


@pytest.mark.parametrize("op", api.OPERATIONS)
def test_operations_match_reference_on_each_backend(op, monkeypatch):
    """Every operation on "auto", "xla" and "pallas" (interpreted off a GPU) agrees with the reference."""
    monkeypatch.delenv(api.ENV_VAR, raising=False)
    args, kwargs = _op_case(op, np.random.default_rng(4))
    expected = (_cached_reference if op in api.CACHED else _reference)(*args, **kwargs)
    for backend in ("auto", "xla", "pallas"):
        out = jax.jit(functools.partial(getattr(api, op), **kwargs, backend=backend))(*args)
        _close(out, expected, jnp.float32)


def test_backend_precedence_argument_then_environment_then_auto(monkeypatch):
    q, k, v = _op_case("causal_attention", np.random.default_rng(6))[0][:3]
    resolve = lambda backend: api.resolve_backend("causal_attention", backend, q, k, v)
    monkeypatch.delenv(api.ENV_VAR, raising=False)
    assert resolve("auto") == ("pallas" if ON_GPU else "xla")
    monkeypatch.setenv(api.ENV_VAR, "pallas")
    assert resolve("auto") == "pallas"
    assert resolve("xla") == "xla"
    monkeypatch.setenv(api.ENV_VAR, "auto")
    assert resolve("auto") == ("pallas" if ON_GPU else "xla")
    monkeypatch.setenv(api.ENV_VAR, "triton")
    with pytest.raises(ValueError, match=f"{api.ENV_VAR}='triton' is not one of"):
        resolve("auto")
    if not ON_GPU:
        monkeypatch.setenv(api.ENV_VAR, "cudnn")
        with pytest.raises(ValueError, match=f"backend 'cudnn' \\(from {api.ENV_VAR}\\) cannot serve"):
            resolve("auto")


def test_auto_on_a_gpu_picks_pallas_only_where_the_kernel_supports_the_call(monkeypatch):
    """Plain Python on static shapes: nothing is compiled, so pretending to be a GPU is enough."""
    monkeypatch.delenv(api.ENV_VAR, raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    s = jax.ShapeDtypeStruct
    arrays = lambda q, n, m, h, dtype=jnp.bfloat16: (s((1, q, n, h), dtype), s((1, 50, m, h), dtype),
                                                     s((1, 50, m, h), dtype))
    cache = lambda q, n, m, h, dtype=jnp.bfloat16: (s((1, q, n, h), dtype), s((m, 50, h), dtype),
                                                    s((m, 50, h), dtype))
    assert api.resolve_backend("cached_decode_attention", "auto", *cache(16, 28, 4, 128)) == "pallas"
    assert api.resolve_backend("cached_decode_attention", "auto", *cache(19, 28, 4, 128)) == "xla"  # 133 rows
    assert api.resolve_backend("cached_prefill_attention", "auto", *cache(19, 28, 4, 128)) == "pallas"
    assert api.resolve_backend("segment_attention", "auto", *arrays(64, 16, 16, 80)) == "pallas"
    assert api.resolve_backend("causal_attention", "auto", *arrays(64, 4, 2, 256)) == "xla"
    assert api.resolve_backend("causal_attention", "auto", *arrays(64, 4, 2, 64, jnp.int32)) == "xla"


def test_explicit_backend_that_cannot_serve_a_call_raises():
    rng = np.random.default_rng(7)
    args = tuple(_cache_case(rng, b=1, q=40, k=21, n=8, m=2, h=16, dtype=jnp.float32).values())
    decode = functools.partial(api.cached_decode_attention, *args)
    # float32 cannot go to cuDNN, and on a CPU there is no cuDNN at all.
    with pytest.raises(ValueError, match="cached_decode_attention: backend 'cudnn' cannot serve this call: "
                                         ".*(NVIDIA GPU|bfloat16).*; use backend='xla'"):
        decode(backend="cudnn")
    with pytest.raises(ValueError, match="cached_decode_attention: backend 'pallas' .* 160 rows exceed"):
        decode(backend="pallas")
    with pytest.raises(ValueError, match="segment_attention: backend 'pallas' .* different dtypes"):
        api.segment_attention(args[0], args[1].astype(jnp.bfloat16), args[2], args[3], args[3], backend="pallas")
    with pytest.raises(ValueError, match="'triton' is not one of"):
        decode(backend="triton")


def test_kernels_pallas_imports_nothing_from_svlm_jax():
    """Every module of the package imports with svlm_jax made unimportable."""
    code = ("import importlib, pkgutil, sys\n"
            "sys.modules['svlm_jax'] = None  # any import of it now raises ImportError\n"
            "import kernels_pallas\n"
            "for module in pkgutil.iter_modules(kernels_pallas.__path__):\n"
            "    importlib.import_module(f'kernels_pallas.{module.name}')\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])


def test_cached_reference_is_the_sequence_reference_on_the_transposed_cache():
    """The two layouts of the jnp semantics agree, and agree with a float64 numpy softmax."""
    rng = np.random.default_rng()
    case = _cache_case(rng, b=2, q=3, k=30, n=6, m=2, h=16, dtype=jnp.float32)
    out = _cached_reference(**case)
    as_sequences = lambda x_ckh: x_ckh.reshape(2, -1, *x_ckh.shape[1:]).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_reference(
        case["q_bqnh"], as_sequences(case["k_ckh"]), as_sequences(case["v_ckh"]), *list(case.values())[3:])),
        atol=1e-6)
    q, k, v = (np.asarray(case[name], np.float64) for name in ("q_bqnh", "k_ckh", "v_ckh"))
    k, v = k.reshape(2, -1, *k.shape[1:]), v.reshape(2, -1, *v.shape[1:])
    mask = np.asarray(reference.attention_mask(case["q_segment_bq"], case["kv_segment_bk"], case["q_order_bq"],
                                               case["kv_order_bk"]))
    g = q.shape[2] // k.shape[1]
    for b in range(2):
        for i in range(3):
            for head in range(6):
                if not mask[b, i].any():
                    assert not np.any(np.asarray(out)[b, i, head])
                    continue
                logits = k[b, head // g] @ q[b, i, head] / 4.0
                weights = np.where(mask[b, i], np.exp(logits - logits[mask[b, i]].max()), 0)
                expected = weights @ v[b, head // g] / weights.sum()
                np.testing.assert_allclose(np.asarray(out)[b, i, head], expected, atol=1e-5)


def test_head_padding_round_trip():
    x = jnp.arange(2 * 80, dtype=jnp.float32).reshape(2, 80)
    padded = common.pad_head(x)
    assert padded.shape == (2, 128)
    np.testing.assert_array_equal(common.unpad_head(padded, 80), x)
    np.testing.assert_array_equal(padded[:, :80], x)
    assert not np.any(padded[:, 80:])


def test_live_blocks_never_drop_a_visible_pair():
    """The block skipping is conservative for arbitrary (unsorted) ids."""
    rng = np.random.default_rng(5)
    q_segment, kv_segment = (jnp.asarray(rng.integers(0, 4, (3, 64)), jnp.int32) for _ in range(2))
    q_order, kv_order = (jnp.asarray(rng.integers(0, 50, (3, 64)), jnp.int32) for _ in range(2))
    mask_bqk = reference.attention_mask(q_segment, kv_segment, q_order, kv_order)
    needed = np.asarray(mask_bqk).reshape(3, 4, 16, 4, 16).any(axis=(2, 4))
    live = np.asarray(common.live_blocks(q_segment, kv_segment, q_order, kv_order, 16, 16))
    assert np.all(live | ~needed)
    lo, hi = common.block_bounds(jnp.asarray(live), axis=2)
    for b, i in zip(*np.nonzero(needed.any(axis=2))):
        cols = np.nonzero(needed[b, i])[0]
        assert lo[b, i] <= cols.min() and cols.max() < hi[b, i]


def test_kernels_lower_for_gpu_with_triton():
    """Every kernel (and the training backward) lowers to Triton for CUDA from this machine: guards
    the portable subset (no gather, no concatenate, power-of-two tiles). Compiling to PTX and running
    needs a GPU; experiments/bench_kernels.py checks values there."""
    s = jax.ShapeDtypeStruct
    b, q, k, n, m, h = 1, 40, 200, 28, 4, 128
    ids = lambda length: s((b, length), jnp.int32)
    def cached(kernel, queries):
        return (functools.partial(kernel, interpret=False),
                (s((b, queries, n, h), jnp.bfloat16), s((b * m, k, h), jnp.bfloat16), s((b * m, k, h), jnp.bfloat16),
                 ids(queries), ids(k), ids(queries), ids(k)))

    def train(qq, kk, vv, seg, order):
        f = lambda *a: flash_train.flash_attention(*a, seg, seg, order, order, interpret=False)
        out, vjp = jax.vjp(f, qq, kk, vv)
        return vjp(out)

    cases = [cached(decode.decode_attention, 2), cached(prefill.prefill_attention, q),
             (functools.partial(vision.vision_attention, interpret=False),
              (s((b, 100, 16, 80), jnp.bfloat16),) * 3 + (ids(100),) * 2),
             (train, (s((b, q, n, h), jnp.bfloat16), s((b, q, m, h), jnp.bfloat16), s((b, q, m, h), jnp.bfloat16),
                      ids(q), ids(q)))]
    for fn, args in cases:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "xla.gpu.triton" in text
