"""How a decode step should walk the layers: weight-streaming time per token at 7B shapes.

Decoding one token reads every weight once, so its floor is weight bytes / memory bandwidth: about
5.6 ms for Qwen2.5-VL-7B on an H100 (15 GB at 2.7 TB/s). The engine's decode measured 18.5 ms per
token there (experiments/results/bench_stream_nvidia_h100_80gb_hbm3.json), about three weight
reads: the suspect is the `lax.scan` over stacked layers, whose per-step dynamic slices XLA on GPU
may materialise (a copy of each layer's weights per token) before cuBLAS reads them. This
times 20 tokens (one `fori_loop`, as the engine's decode loop) through the 28 Qwen2.5-VL-7B text
layers (`text.project_qkv` and `text.finish_layer`; attention replaced by the queries themselves,
so only weights move), with the layers walked three ways:
  scan          `lax.scan` over the stacked [L, ...] weights (each step dynamic-slices a layer);
  loop_stacked  a Python loop taking static slices w[i] of the stacked weights;
  loop_split    a Python loop over one array per layer (no slicing at all);
and `scan` again with XLA's dynamic-slice fusion flag (a child process: flags are per process).
    PYTHONPATH=. python experiments/bench_layer_loop.py            # a GPU: 7B shapes, bf16
    PYTHONPATH=. python experiments/bench_layer_loop.py --smoke    # tiny shapes, any backend
Writes experiments/results/bench_layer_loop_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from experiments.common import write_result
from svlm_jax.config import preset, tiny
from svlm_jax.model import text
from svlm_jax.model.params import TextLayers

TOKENS = 20
SLICE_FUSION_FLAG = "--xla_gpu_enable_dynamic_slice_fusion=true"


def random_layers(cfg, dtype) -> TextLayers:
    """Stacked [L, ...] layer weights, drawn on the device (no host copy of 13 GB)."""
    L, D, N, K, H, F = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, \
        cfg.intermediate_size
    shapes = dict(attn_norm_ld=(L, D), q_w_ldnh=(L, D, N, H), q_b_lnh=(L, N, H), k_w_ldkh=(L, D, K, H),
                  k_b_lkh=(L, K, H), v_w_ldkh=(L, D, K, H), v_b_lkh=(L, K, H), o_w_lnhd=(L, N, H, D),
                  mlp_norm_ld=(L, D), gate_w_ldf=(L, D, F), up_w_ldf=(L, D, F), down_w_lfd=(L, F, D))
    keys = jax.random.split(jax.random.key(0), len(shapes))
    draw = jax.jit(lambda key, shape: 0.02 * jax.random.normal(key, shape, dtype), static_argnums=1)
    return TextLayers(**{name: draw(key, shape) for key, (name, shape) in zip(keys, shapes.items())})


def step_fn(cfg, walk: str):
    """x [1, 1, D] -> x after TOKENS passes through every layer."""
    def layer(x, weights):
        q, _, _ = text.project_qkv(cfg, weights, x)
        return text.finish_layer(cfg, weights, x, q)

    def one_token(_, x, layers):
        if walk == "scan":
            return jax.lax.scan(lambda x, w: (layer(x, w), None), x, layers)[0]
        for i in range(cfg.num_layers):
            x = layer(x, layers[i] if walk == "loop_split" else jax.tree.map(lambda w: w[i], layers))
        return x

    return jax.jit(lambda x, layers: jax.lax.fori_loop(0, TOKENS, lambda i, x: one_token(i, x, layers), x))


def time_walk(cfg, walk: str, layers, samples: int) -> float:
    """Median ms per token."""
    x = jnp.ones((1, 1, cfg.hidden_size), layers.q_w_ldnh.dtype)
    if walk == "loop_split":
        layers = [jax.tree.map(lambda w: w[i], layers) for i in range(cfg.num_layers)]
    fn = step_fn(cfg, walk)
    jax.block_until_ready(fn(x, layers))
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        jax.block_until_ready(fn(x, layers))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / TOKENS * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--walks", nargs="+", default=["scan", "loop_stacked", "loop_split", "scan_slice_fusion"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = tiny().text if args.smoke else preset("qwen2.5-vl-7b").text
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    layers = random_layers(cfg, dtype)
    weight_bytes = sum(w.size * w.dtype.itemsize for w in jax.tree.leaves(layers))
    if args.child:  # one walk, under the flags this process was started with
        print(json.dumps(time_walk(cfg, "scan", layers, args.samples)))
        return
    rows = {}
    for walk in args.walks:
        if walk == "scan_slice_fusion":
            if jax.default_backend() != "gpu":
                continue
            env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {SLICE_FUSION_FLAG}"}
            proc = subprocess.run([sys.executable, __file__, "--child", "--samples", str(args.samples)]
                                  + (["--smoke"] if args.smoke else []), env=env, capture_output=True, text=True)
            if proc.returncode:
                rows[walk] = {"error": proc.stderr.strip().splitlines()[-1][:300]}
                continue
            ms = float(proc.stdout.strip().splitlines()[-1])
        else:
            ms = time_walk(cfg, walk, layers, args.samples)
        rows[walk] = {"ms_per_token": ms, "weight_gbps": weight_bytes / ms / 1e6}
        print(f"{walk:18s} {ms:8.3f} ms/token {rows[walk]['weight_gbps']:8.1f} GB/s of weights", flush=True)
    result = {"config": {"model": "tiny" if args.smoke else "qwen2.5-vl-7b", "dtype": jnp.dtype(dtype).name,
                         "layers": cfg.num_layers, "tokens_per_call": TOKENS, "samples": args.samples,
                         "weight_bytes": weight_bytes, "slice_fusion_flag": SLICE_FUSION_FLAG},
              "walks": rows}
    print("wrote", write_result("bench_layer_loop", result, args.out))


if __name__ == "__main__":
    main()
