"""Training throughput: tokens/s, memory per device and (on GPUs) MFU of the SFT step.

Batches are synthetic chunks shaped like overlapped-chunk SFT (per second: a text turn and one
video grid), padded by `data.pad_chunks`, so no video decoding is timed. Besides the timing it
records the compiled step's memory analysis (XLA's own accounting: arguments, outputs, temporaries)
and the largest float32 buffer of its HLO with the vocabulary as last axis, which shows whether the
[T, vocab] logits ever exist whole (they should not: the loss is chunked, `--loss-chunk`).
Examples:
  python -m experiments.bench_train                                   # tiny model, CPU
  python -m experiments.bench_train --preset qwen2.5-vl-3b --tokens 8192 --seconds 24 \\
      --grid 20 36 --param-dtype bfloat16 --compile-only              # CPU: memory analysis only
  for policy in full dots; do                                         # one H100 / H200
    python -m experiments.bench_train --preset qwen2.5-vl-3b --tokens 8192 --seconds 24 \\
        --grid 20 36 --param-dtype bfloat16 --remat-policy $policy \\
        --out experiments/results/bench_train_gpu_remat_$policy.json
  done
Writes experiments/results/bench_train_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import math
import re
import resource
import time

import jax
import numpy as np

import functools

from experiments.common import write_result
from svlm_jax import init_params
from svlm_jax.config import preset
from svlm_jax.model.vlm import positions_for
from svlm_jax.train import data, sharding, step
from svlm_jax.train.checkpoint import abstract_params

PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}  # dense bf16 per device


def synthetic_chunk(cfg, rng, seconds: int, grid_hw: tuple[int, int], text_per_second: int) -> data.Chunk:
    h, w = grid_hw
    n_vision = h * w // cfg.vision.spatial_merge_size ** 2
    vocab = min(cfg.text.vocab_size, cfg.image_token_id, cfg.vision_start_token_id) - 1
    ids, labels = [], []
    for _ in range(seconds):
        text = rng.integers(0, vocab, text_per_second).tolist()
        ids += text[:text_per_second // 2] + [cfg.video_token_id] * n_vision + text[text_per_second // 2:]
        labels += [data.IGNORE] * (text_per_second // 2 + n_vision) + text[text_per_second // 2:]
    ids_t = np.asarray(ids, np.int32)
    grids = np.asarray([(1, h, w)] * seconds, np.int32)
    positions = positions_for(cfg, ids_t[None], video_grid_thw=grids, second_per_grid_ts=[1.0] * seconds)[0]
    rows = rng.standard_normal((seconds * h * w, cfg.vision.patch_dim)).astype(np.float32)
    return data.Chunk(ids_t, np.asarray(labels, np.int32), positions, rows, grids)


def flops_per_token(cfg, tokens: int, freeze_vision: bool) -> float:
    """Model FLOPs per trained token: 6 x LM matmul parameters (2 forward + 4 backward) plus causal
    attention (6 x 2 x L x T x H x N / 2, halved for causality); the frozen vision tower's forward
    is left out (it is small next to the LM and MFU conventionally counts trained weights)."""
    t = cfg.text
    per_layer = t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim \
        + t.num_heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    matmul = t.num_layers * per_layer + t.hidden_size * t.vocab_size
    attention = 6 * t.num_layers * tokens * t.num_heads * t.head_dim  # 2 * 2 matmuls * T/2 * 3 (fwd+bwd)
    return 6 * matmul + attention


def compiled_memory(compiled, n_tokens: int, vocab: int) -> dict:
    """XLA's memory analysis of a compiled step (bytes per device) and the float32 buffers of its
    HLO whose last axis is the vocabulary: the largest one's token count, against the step's
    `n_tokens` (equal: the full logits exist)."""
    m = compiled.memory_analysis()
    shapes = {tuple(int(d) for d in dims.split(",")) for dims in
              re.findall(rf"f32\[((?:\d+,)*{vocab})\]", compiled.as_text())}
    rows = max((math.prod(s[:-1]) for s in shapes), default=0)
    return {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
            "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
            "peak_bytes": m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes,
            "largest_f32_vocab_buffer_tokens": rows, "step_tokens": n_tokens, "full_logits_buffer": rows >= n_tokens}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokens", type=int, default=1024, help="bucket token capacity")
    ap.add_argument("--seconds", type=int, default=24)
    ap.add_argument("--grid", type=int, nargs=2, default=(8, 8), help="patch grid per second (112x112 -> 8 8)")
    ap.add_argument("--text-per-second", type=int, default=24)
    ap.add_argument("--batch", type=int, default=1, help="chunks per micro-batch (global)")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--param-dtype", default="float32")
    ap.add_argument("--compute-dtype", default="bfloat16")
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--remat-policy", choices=tuple(step.REMAT_POLICIES), default=step.StepSpec.remat_policy)
    ap.add_argument("--loss-chunk", type=int, default=step.StepSpec.loss_chunk, help="tokens per row of logits at once")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile the step for abstract inputs and report its memory analysis (no weights, no run)")
    ap.add_argument("--data", type=int, default=-1)
    ap.add_argument("--fsdp", type=int, default=1)
    ap.add_argument("--tensor", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cfg = preset(args.preset)
    rng = np.random.default_rng(0)
    chunks = [synthetic_chunk(cfg, rng, args.seconds, tuple(args.grid), args.text_per_second)
              for _ in range(args.batch * args.accum)]
    n_tokens = max(len(c.ids_t) for c in chunks)
    if n_tokens > args.tokens:
        raise SystemExit(f"a chunk has {n_tokens} tokens: raise --tokens")
    bucket = data.Bucket(args.tokens, args.seconds * args.grid[0] * args.grid[1])
    micro = [data.pad_chunks(chunks[a * args.batch:(a + 1) * args.batch], bucket, 0, args.seconds)
             for a in range(args.accum)]
    host = step.host_batch(cfg, {k: np.stack([m[k] for m in micro]) for k in micro[0]})

    mesh = sharding.make_mesh(args.data, args.fsdp, args.tensor)
    spec = step.StepSpec(cfg, step.OptimConfig(lr=1e-5, warmup_steps=1, total_steps=args.steps + 1),
                         args.compute_dtype, freeze_vision=True, remat=not args.no_remat,
                         remat_policy=args.remat_policy, loss_chunk=args.loss_chunk)
    abstract = abstract_params(cfg, args.param_dtype)
    shardings = step.state_shardings(spec, abstract, mesh)
    t0 = time.perf_counter()
    compiled = step.compile_step(spec, mesh, shardings).lower(jax.eval_shape(functools.partial(step.init_state, spec), abstract), host).compile()
    analysis = {"compile_s": time.perf_counter() - t0, **compiled_memory(compiled, n_tokens=args.tokens * args.batch,
                                                                        vocab=cfg.text.vocab_size)}
    print(analysis)
    if args.compile_only:
        result = {"config": vars(args), "devices": len(jax.devices()), "mesh": dict(mesh.shape), **analysis}
        print("wrote", write_result("bench_train_compiled", result, args.out))
        return
    params = init_params(cfg, jax.random.key(0), jax.numpy.dtype(args.param_dtype))
    state = step.sharded_state(spec, params, mesh)
    del params
    batch = sharding.put_batch(host, mesh)
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    real_tokens = int(host.segment_abt.sum())
    devices = jax.devices()
    stats = [d.memory_stats() or {} for d in devices]
    kind = devices[0].device_kind.lower()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    flops = flops_per_token(cfg, n_tokens, True) * real_tokens / step_s
    result = {
        "config": vars(args), "devices": len(devices), "mesh": dict(mesh.shape), "compiled": analysis,
        "padded_tokens_per_step": int(host.segment_abt.size), "tokens_per_step": real_tokens,
        "compile_plus_first_step_s": compile_s, "step_s": step_s, "tokens_per_s": real_tokens / step_s,
        "peak_bytes_per_device": [s.get("peak_bytes_in_use") for s in stats],
        "host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "model_tflops_per_s": flops / 1e12,
        "mfu": None if peak is None else flops / (peak * 1e12 * len(devices)),
        "loss": float(metrics["loss"]),
    }
    print({k: v for k, v in result.items() if k != "config"})
    print("wrote", write_result("bench_train", result, args.out))
    assert math.isfinite(result["loss"])


if __name__ == "__main__":
    main()
