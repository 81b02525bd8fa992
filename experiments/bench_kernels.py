"""Pallas attention kernels vs jax.nn.dot_product_attention (xla, cudnn) at 7B streaming and training shapes.

Each config kind is one `kernels_pallas.api` operation on backend="pallas": decode ->
cached_decode_attention, prefill -> cached_prefill_attention, vision -> segment_attention,
train -> causal_attention.

On an H100:   PYTHONPATH=. python experiments/bench_kernels.py
CPU check:    PYTHONPATH=. python experiments/bench_kernels.py --smoke --out /tmp/bench_kernels.json

Each variant is jitted, its call repeated `reps` times inside one compiled loop (so microsecond
decode calls are not drowned by dispatch), timed over many block_until_ready'd samples; we report
the median per call, the achieved TFLOP/s (useful work: 4 * N * H per visible query-key pair, x3.5
for forward+backward) and GB/s (q, k, v and out read/written once), each also as a
fraction of the card's measured ceilings (a large bf16 matmul, a large copy). Writes
experiments/results/bench_kernels_<device>.json (or --out) with device, jax version, commit,
configs and numbers, and the fastest forward variant of each config ("fastest_forward"). A variant
that fails (out of memory, cuDNN unsupported, ...) records its error.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import write_result
from kernels_pallas import api, reference

REFERENCE_MAX_LOGITS = 2_000_000_000  # dense f32 logits of the reference check: ~3 x 8 GB at most


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark shape. kind: decode | prefill | vision | train. q: new queries (decode,
    prefill) or tokens (vision, train); cache: cache slots of which `fill` hold keys (decode and
    prefill: the streaming cache's layout [B*M, slots, H], keys already rotated); window: vision
    window / train document length (tokens)."""
    name: str
    kind: str
    b: int
    q: int
    n: int
    m: int
    h: int
    cache: int = 0
    fill: int = 0
    window: int = 0


def full_configs():
    cache, fill = 13_312, 12_800  # a 7B streaming cache, nearly full
    stream = dict(n=28, m=4, h=128, cache=cache, fill=fill)
    return ([Config(f"decode_b{b}", "decode", b=b, q=1, **stream) for b in (1, 16)]
            + [Config(f"prefill_q{q}_b{b}", "prefill", b=b, q=q, **stream) for q in (720, 1000) for b in (1, 4)]
            + [Config(f"vision_t{t}", "vision", b=1, q=t, n=16, m=16, h=80, window=64) for t in (2880, 11520)]
            + [Config(f"train_t{t}", "train", b=1, q=t, n=28, m=4, h=128, window=t // 4) for t in (8192, 16384, 32768)])


def smoke_configs():
    return [Config("decode_smoke", "decode", b=2, q=1, n=4, m=2, h=32, cache=96, fill=80),
            Config("prefill_smoke", "prefill", b=1, q=24, n=4, m=2, h=32, cache=64, fill=50),
            Config("vision_smoke", "vision", b=1, q=96, n=2, m=2, h=80, window=16),
            Config("train_smoke", "train", b=1, q=80, n=4, m=2, h=32, window=30)]


def make_inputs(cfg: Config, dtype, rng):
    """Arrays of one config: q [B, T, N, H], k and v [B, T, M, H] (a cache: [B*M, T, H]), ids."""
    b, q = cfg.b, cfg.q
    if cfg.kind in ("decode", "prefill"):
        k = cfg.cache + q  # the cache, then the new tokens themselves
        kv_segment = np.zeros((b, k), np.int32)
        kv_segment[:, :cfg.fill] = 1
        kv_segment[:, cfg.cache:] = 1
        kv_order = np.broadcast_to(np.concatenate([np.arange(cfg.cache), cfg.fill + np.arange(q)]), (b, k))
        q_segment = np.ones((b, q), np.int32)
        q_order = np.broadcast_to(cfg.fill + np.arange(q), (b, q))
    elif cfg.kind == "vision":
        k = q
        q_segment = kv_segment = np.broadcast_to(np.arange(q) // cfg.window + 1, (b, q)).astype(np.int32)
        q_order = kv_order = None
    else:  # train: packed documents of about `window` tokens, causal
        k = q
        lengths = rng.integers(cfg.window // 2, 3 * cfg.window // 2, q)
        q_segment = kv_segment = np.broadcast_to(np.repeat(np.arange(1, q + 1), lengths)[:q], (b, q)).astype(np.int32)
        q_order = kv_order = np.broadcast_to(np.arange(q), (b, q)).astype(np.int32)
    arrays = dict(
        q=jnp.asarray(rng.standard_normal((b, q, cfg.n, cfg.h)), dtype),
        k=jnp.asarray(rng.standard_normal((b, k, cfg.m, cfg.h)), dtype),
        v=jnp.asarray(rng.standard_normal((b, k, cfg.m, cfg.h)), dtype),
        q_segment=jnp.asarray(q_segment), kv_segment=jnp.asarray(kv_segment),
        q_order=None if q_order is None else jnp.asarray(q_order, jnp.int32),
        kv_order=None if kv_order is None else jnp.asarray(kv_order, jnp.int32))
    if cfg.kind in ("decode", "prefill"):
        as_cache = lambda x_btmh: x_btmh.transpose(0, 2, 1, 3).reshape(b * cfg.m, k, cfg.h)
        arrays.update(k=as_cache(arrays["k"]), v=as_cache(arrays["v"]))
    return arrays


def sequences(x, cfg: Config):
    """k and v as sequences [B, T, M, H] (what jax.nn.dot_product_attention reads): a cache is
    transposed, and the baselines' time includes it, as the engine's would."""
    if cfg.kind in ("decode", "prefill"):
        as_sequences = lambda x_ckh: x_ckh.reshape(cfg.b, cfg.m, *x_ckh.shape[1:]).transpose(0, 2, 1, 3)
        return as_sequences(x["k"]), as_sequences(x["v"])
    return x["k"], x["v"]


def visible_pairs(x) -> int:
    """Number of (batch, query, key) pairs the mask lets through, in query chunks to bound memory."""
    chunk = 512
    q_segment = jnp.pad(x["q_segment"], ((0, 0), (0, -x["q_segment"].shape[1] % chunk)))
    q_order = None if x["q_order"] is None else jnp.pad(x["q_order"], ((0, 0), (0, -x["q_order"].shape[1] % chunk)))

    def count(i):
        sl = lambda a: None if a is None else jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=1)
        return jnp.sum(reference.attention_mask(sl(q_segment), x["kv_segment"], sl(q_order), x["kv_order"]),
                       dtype=jnp.int32)

    per_chunk = jax.jit(lambda: jax.lax.map(count, jnp.arange(q_segment.shape[1] // chunk)))()
    return int(np.sum(np.asarray(per_chunk, np.int64)))


def dpa_mask(x):
    """Dense mask [B, 1, Q, K] for jax.nn.dot_product_attention."""
    return reference.attention_mask(x["q_segment"], x["kv_segment"], x["q_order"], x["kv_order"])[:, None]


def variants(cfg: Config):
    """name -> f(x) for this config; x is the dict of `make_inputs`: "pallas" (this package's
    kernel), "api_xla" (the operation on its XLA backend, the jnp reference), and
    jax.nn.dot_product_attention's "xla" and "cudnn" implementations."""
    ids = lambda x: (x["q_segment"], x["kv_segment"], x["q_order"], x["kv_order"])
    op = {"vision": lambda q, k, v, qs, ks, qo, ko, backend: api.segment_attention(q, k, v, qs, ks, backend=backend),
          "train": api.causal_attention, "decode": api.cached_decode_attention,
          "prefill": api.cached_prefill_attention}[cfg.kind]

    def ours(backend):
        return lambda x: op(x["q"], x["k"], x["v"], *ids(x), backend=backend)

    def dpa(implementation):
        return lambda x: jax.nn.dot_product_attention(x["q"], *sequences(x, cfg), mask=dpa_mask(x),
                                                      implementation=implementation)

    forward = {"pallas": ours("pallas"), "api_xla": ours("xla"), "xla": dpa("xla"), "cudnn": dpa("cudnn")}
    if cfg.kind != "train":
        return forward

    def with_grad(f):
        def loss(q, k, v, x):
            return jnp.sum(f(dict(x, q=q, k=k, v=v)).astype(jnp.float32))
        return lambda x: jax.grad(loss, argnums=(0, 1, 2))(x["q"], x["k"], x["v"], x)

    return forward | {f"{name}_fwd_bwd": with_grad(f) for name, f in forward.items()}


def time_per_call(f, x, reps: int, samples: int) -> float:
    """Median seconds per call of f(x): `reps` dependent calls in one compiled loop per sample."""
    def loop(x):
        def body(_, q):
            out = f(dict(x, q=q))
            first = jax.tree.leaves(out)[0]
            # A tiny data dependency keeps the calls in order and un-hoisted.
            return q + (first.ravel()[0] * 0).astype(q.dtype)
        return jax.lax.fori_loop(0, reps, body, x["q"])

    run = jax.jit(loop)
    jax.block_until_ready(run(x))
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        jax.block_until_ready(run(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / reps


def ceilings(smoke: bool, samples: int) -> dict:
    """Measured peak bf16 matmul TFLOP/s and copy GB/s of this device."""
    n = 256 if smoke else 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    matmul = jax.jit(lambda a: a @ a)
    copy_elems = (1 << 16) if smoke else (1 << 30)
    c = jnp.ones((copy_elems,), jnp.float32)
    copy = jax.jit(lambda c: c + 1)

    def median(f, arg):
        jax.block_until_ready(f(arg))
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            jax.block_until_ready(f(arg))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return {"matmul_bf16_tflops": 2 * n ** 3 / median(matmul, a) / 1e12,
            "copy_gbps": 2 * 4 * copy_elems / median(copy, c) / 1e9}


def bench_config(cfg: Config, dtype, peak: dict, reps: int, samples: int, rng) -> dict:
    x = make_inputs(cfg, dtype, rng)
    pairs = visible_pairs(x)
    itemsize = jnp.dtype(dtype).itemsize
    io_bytes = (2 * x["q"].size + x["k"].size + x["v"].size) * itemsize
    flops_fwd = 4 * pairs * cfg.n * cfg.h
    row = {"config": dataclasses.asdict(cfg), "visible_pairs": pairs, "flops_fwd": flops_fwd, "io_bytes": io_bytes,
           "variants": {}}
    # Check forward variants against the reference where its dense logits fit in memory.
    small = cfg.b * cfg.q * x["kv_segment"].shape[1] * cfg.n <= REFERENCE_MAX_LOGITS
    expected = None
    if small:
        expected = jax.jit(reference.attention)(x["q"], *sequences(x, cfg), x["q_segment"], x["kv_segment"],
                                                x["q_order"], x["kv_order"])
    for name, f in variants(cfg).items():
        grad = name.endswith("_fwd_bwd")
        try:
            seconds = time_per_call(f, x, reps, samples)
        except Exception as err:  # noqa: BLE001 - record why a baseline cannot run here and go on
            row["variants"][name] = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}
            print(f"  {cfg.name:22s} {name:28s} error: {row['variants'][name]['error'][:100]}", flush=True)
            continue
        flops = flops_fwd * (3.5 if grad else 1.0)
        bytes_moved = io_bytes * (3 if grad else 1)  # backward reads q, k, v, dout, out and writes dq, dk, dv
        result = {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "gbps": bytes_moved / seconds / 1e9}
        if expected is not None and not grad:
            # Rows that see no key: the contract says zero, jax.nn.dot_product_attention averages.
            seen = jnp.any(dpa_mask(x)[:, 0], axis=-1)[:, :, None, None]
            error = jnp.abs(jnp.where(seen, jax.jit(f)(x), 0).astype(jnp.float32) - expected.astype(jnp.float32))
            result["max_abs_err_vs_reference"] = float(jnp.max(error))
        result["frac_peak_flops"] = result["tflops"] / peak["matmul_bf16_tflops"]
        result["frac_peak_bandwidth"] = result["gbps"] / peak["copy_gbps"]
        row["variants"][name] = result
        print(f"  {cfg.name:22s} {name:28s} {result['ms']:9.4f} ms {result['tflops']:8.2f} TFLOP/s "
              f"{result['gbps']:8.1f} GB/s  err {result.get('max_abs_err_vs_reference', float('nan')):.3g}", flush=True)
    timed = {name: v["ms"] for name, v in row["variants"].items() if "ms" in v and not name.endswith("_fwd_bwd")}
    row["fastest_forward"] = min(timed, key=timed.get) if timed else None
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check; kernels interpreted)")
    parser.add_argument("--out", type=pathlib.Path, help="JSON path (default experiments/results/bench_kernels_<device>.json)")
    parser.add_argument("--samples", type=int, help="timed samples per variant (default 30; smoke 2)")
    parser.add_argument("--only", default="", help="regex on config names")
    args = parser.parse_args(argv)
    samples = args.samples or (2 if args.smoke else 30)
    dtype = jnp.bfloat16
    peak = ceilings(args.smoke, samples)
    print(f"{jax.devices()[0].device_kind}: matmul {peak['matmul_bf16_tflops']:.1f} TFLOP/s, "
          f"copy {peak['copy_gbps']:.1f} GB/s", flush=True)
    rng = np.random.default_rng(0)
    report = {"dtype": jnp.dtype(dtype).name, "smoke": args.smoke, "samples": samples, "ceilings": peak,
              "results": []}
    for cfg in smoke_configs() if args.smoke else full_configs():
        if re.search(args.only, cfg.name):
            reps = 1 if args.smoke else (50 if cfg.kind == "decode" else 5)
            report["results"].append(bench_config(cfg, dtype, peak, reps, samples, rng))
            # Written after every config, so a run stopped early keeps what it measured.
            out = write_result("bench_kernels", report, args.out)
    print(f"wrote {out}")
    return report

if __name__ == "__main__":
    sys.exit(main() and 0)
