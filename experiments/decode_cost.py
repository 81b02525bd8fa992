"""What one decode token moves, read off XLA's cost analysis of the compiled step (no GPU needed).

    PYTHONPATH=. python experiments/decode_cost.py                 # Qwen2.5-VL-7B shapes, 1 and 16 streams
    PYTHONPATH=. python experiments/decode_cost.py --smoke         # the tiny model

The engine's one-token step (`engine.decode_token`: embed, every layer with its cache write and
attention, the LM head) is compiled for the CPU on abstract arrays (nothing is allocated) at the
preset's shapes in float32 (the CPU backend upcasts bf16 and would count the conversions), with the
cache of the default policy (16 s of 720-token vision, 16 text rounds, sink 512 + window 512) and
the XLA attention. Its "bytes accessed" is divided by
  - a hand count: every text weight read once (the embedding: one row), every key and value slot
    of the cache read once, the new token's key and value written once;
  - the floor: the text weights + the live cache at steady state (every slot valid but the unused
    answer capacity of each round; `--tokens` generated a round).
A copy of a cache-sized buffer inside the decode loop would show as a `copy` of a [B*K, S + 1, H]
array (one layer's cache) in the compiled loop body (two decode steps in a `fori_loop` over the donated cache): the
count is recorded and must be 0.
Writes experiments/results/decode_cost_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from experiments.bench_stream import TOKENIZER_CORPUS
from experiments.common import write_result
from svlm_jax.config import preset, tiny
from svlm_jax.model.params import Model, param_shapes
from svlm_jax.stream_format import CachePolicy, StreamFormat
from svlm_jax.streaming import engine
from svlm_jax.streaming.cache import CacheLayout, empty_state
from svlm_jax.streaming.sampling import SamplingConfig
from svlm_jax.tokenizer import train_tokenizer

F32 = 4


def abstract_setup(model_name: str, grid, batch: int, tokens: int):
    """Abstract per-layer model, a cache of the default policy, the engine spec, and the cache's
    slot counts (all, and live at steady state)."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(TOKENIZER_CORPUS * 10, 400, Path(tmp))
    cfg = tiny(vocab_size=tok.vocab_size) if model_name == "tiny" else preset(model_name)
    params = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32), param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x))
    model = jax.eval_shape(engine.per_layer, Model(cfg, params))
    policy = CachePolicy(max_new_tokens=tokens)
    fmt = StreamFormat.from_tokenizer(tok)
    layout = CacheLayout.for_stream(fmt, policy, cfg, grid)
    spec = engine.EngineSpec.for_stream(fmt, layout, SamplingConfig(temperature=0.0), grid, pos_mode="contiguous",
                                        attention_backend="xla")
    t = cfg.text
    state = jax.eval_shape(lambda: empty_state(layout, t.num_layers, batch, t.num_kv_heads, t.head_dim, jnp.float32))
    unused_per_round = layout.slots.cap("answer") - tokens
    live_slots = layout.size - layout.rounds * unused_per_round
    return model, spec, state, layout.size, live_slots


def step_args(state, batch: int):
    s = jax.ShapeDtypeStruct
    return (state, s((batch,), jnp.int32), s((batch,), jnp.int32), s((batch, 3), jnp.int32), s((batch,), bool))


def text_weight_bytes(model) -> int:
    """Bytes of the text weights one token reads: layers, final norm, LM head (tied: the embedding),
    one embedding row."""
    p = model.params.text
    layers = sum(math.prod(a.shape) for a in jax.tree.leaves(p.layers)) * F32
    head = p.embed_vd if p.lm_head_dv is None else p.lm_head_dv
    return layers + (p.final_norm_d.size + head.size + p.embed_vd.shape[1]) * F32


def cache_copies(hlo_text: str, cache_shape) -> int:
    """`copy` instructions producing a float32 buffer of one layer's cache shape [B*K, S + 1, H]."""
    shape = "f32[" + ",".join(str(d) for d in cache_shape) + "]"
    return sum(1 for line in hlo_text.splitlines() if re.search(rf"= {re.escape(shape)}\S* copy\(", line))


def measure(model_name: str, grid, batch: int, tokens: int) -> dict:
    model, spec, state, slots, live_slots = abstract_setup(model_name, grid, batch, tokens)
    t = model.config.text
    one = jax.jit(engine.decode_token, static_argnums=1, donate_argnums=2)
    compiled = one.lower(model, spec, *step_args(state, batch)).compile()
    measured = compiled.cost_analysis()["bytes accessed"]
    slot_bytes = t.num_layers * batch * t.num_kv_heads * t.head_dim * F32 * 2  # k and v, every layer
    weights = text_weight_bytes(model)
    hand = weights + slots * slot_bytes + batch * slot_bytes  # read every slot, write the new token

    def two_steps(model, cache, token_b, slot_b, pos_b3, feed_b):
        def body(i, cache):
            return engine.decode_token(model, spec, cache, token_b, slot_b + i, pos_b3 + i, feed_b)[1]
        return jax.lax.fori_loop(0, 2, body, cache)

    loop = jax.jit(two_steps, donate_argnums=1).lower(model, *step_args(state, batch)).compile()
    cache_shape = state.k_layers_csh[0].shape
    return {"model": model_name, "streams": batch, "slots": slots, "live_slots_steady": live_slots,
            "bytes_accessed": measured, "weight_bytes": weights, "kv_bytes_allocated": slots * slot_bytes,
            "kv_bytes_live": live_slots * slot_bytes, "hand_count_bytes": hand,
            "ratio_to_hand_count": measured / hand,
            "ratio_to_floor": measured / (weights + live_slots * slot_bytes),
            "cache_copies_in_decode_loop": cache_copies(loop.as_text(), cache_shape),
            "cache_copies_in_one_step": cache_copies(compiled.as_text(), cache_shape),
            "temp_bytes_one_step": compiled.memory_analysis().temp_size_in_bytes}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-vl-7b")
    ap.add_argument("--grid", default="1,40,72", help="one second's patch grid t,h,w (720 vision tokens)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=20, help="tokens generated a round (live slots at steady state)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.grid, args.streams = "tiny", "1,8,8", [2]
        args.out = args.out or "/tmp/decode_cost_smoke.json"
    grid = tuple(int(v) for v in args.grid.split(","))
    rows = []
    for batch in args.streams:
        rows.append(measure(args.preset, grid, batch, args.tokens))
        print({k: v for k, v in rows[-1].items()}, flush=True)
    config = {"preset": args.preset, "grid_thw": grid, "dtype": "float32", "attention_backend": "xla",
              "policy": dataclasses.asdict(CachePolicy(max_new_tokens=args.tokens))}
    print("wrote", write_result("decode_cost", {"config": config, "rows": rows}, args.out))


if __name__ == "__main__":
    main()
