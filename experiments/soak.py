"""A simulated day of streaming: 86,400 rounds (one per second of video) through one session.

    PYTHONPATH=. python experiments/soak.py                 # 24 h of rounds, the tiny random model
    PYTHONPATH=. python experiments/soak.py --hours 0.05    # a few minutes

A tiny random checkpoint (written with save_pretrained and loaded back), a small cache (8 s of
vision, 8 text rounds, sink 32 + window 64, up to 12 tokens a round) so that every eviction path
runs thousands of times, sampled decoding (temperature 0.9) so commentary lengths vary, random patch
rows each second. Every simulated hour it records: host resident memory (VmRSS), bytes of live jax
arrays, how many programs `round_step` has compiled, whether any cached key or value is NaN or
infinite, the largest position in the cache, and the median and 95th percentile of the round's wall
time and the median of its CPU time (the process's, all threads: what other jobs on a shared machine
disturb least). Pass criteria (written into the JSON): memory flat after the first hour, one compiled
program, no NaN, positions bounded, the last hour's median CPU time a round within 5% of the first
hour's (wall time is recorded beside it).
Writes experiments/results/soak_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

import svlm_jax
from experiments.bench_stream import TOKENIZER_CORPUS
from experiments.common import write_result
from svlm_jax.config import tiny
from svlm_jax.model.params import Model
from svlm_jax.stream_format import CachePolicy
from svlm_jax.streaming import SamplingConfig, StreamConfig, StreamingSession, engine
from svlm_jax.tokenizer import train_tokenizer

GRID = (1, 8, 8)  # 16 vision tokens a second
POLICY = CachePolicy(vision_window_s=8, text_rounds=8, text_sink=32, text_window=64, max_new_tokens=12)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return -1


def cache_health(session: StreamingSession) -> tuple[bool, int]:
    """(every cached key and value finite, largest position of a valid slot)."""
    st = session._state
    finite = all(bool(jnp.all(jnp.isfinite(a))) for a in st.k_layers_csh + st.v_layers_csh)
    top = int(jnp.max(jnp.where(st.valid_bs[:, :, None], st.pos_bs3, 0)))
    return finite, top


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=24.0, help="simulated hours (3600 rounds each)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rounds = round(args.hours * 3600)
    hour = min(3600, rounds)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(TOKENIZER_CORPUS * 10, 400, Path(tmp) / "tokenizer")
        sp = tok.special
        cfg = dataclasses.replace(tiny(vocab_size=tok.vocab_size), image_token_id=sp.image_pad,
                                  video_token_id=sp.video_pad, vision_start_token_id=sp.vision_start,
                                  vision_end_token_id=sp.vision_end)
        svlm_jax.save_pretrained(Model(cfg, svlm_jax.init_params(cfg, jax.random.key(0))), Path(tmp) / "model")
        model = svlm_jax.load_pretrained(Path(tmp) / "model", dtype="float32")
    config = StreamConfig(policy=POLICY, sampling=SamplingConfig(temperature=0.9, repetition_penalty=1.05), seed=1)
    session = StreamingSession(model, tok, config)
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal((GRID[0] * GRID[1] * GRID[2], 1176)).astype(np.float32) for _ in range(16)]
    hours, latencies, cpu_times, words = [], [], [], 0
    start = time.perf_counter()
    for r in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        text = session.step((pool[r % len(pool)], GRID), float(r), float(r + 1))
        latencies.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        words += len(text.split())
        if (r + 1) % hour == 0 or r + 1 == rounds:
            finite, top = cache_health(session)
            first_round = 1 if not hours else 0  # the compilation
            ms = sorted(1e3 * x for x in latencies[first_round:])
            hours.append({"rounds": r + 1, "rss_bytes": rss_bytes(),
                          "live_array_bytes": sum(a.nbytes for a in jax.live_arrays()),
                          "round_step_programs": engine.round_step._cache_size(), "cache_finite": finite,
                          "max_position": top, "ms_median": statistics.median(ms),
                          "ms_p95": ms[int(0.95 * (len(ms) - 1))],
                          "cpu_ms_median": 1e3 * statistics.median(cpu_times[first_round:]),
                          "wall_s": time.perf_counter() - start})
            latencies, cpu_times = [], []
            print(hours[-1], flush=True)
    first, last = hours[0], hours[-1]
    bound = session.layout.size * session.layout.vision_span
    checks = {
        "memory_flat": all(h["live_array_bytes"] == hours[0]["live_array_bytes"] for h in hours)
        and max(h["rss_bytes"] for h in hours[1:] or hours) <= 1.05 * (hours[1] if len(hours) > 1 else first)["rss_bytes"],
        "one_program": all(h["round_step_programs"] == 1 for h in hours),
        "no_nan": all(h["cache_finite"] for h in hours),
        "positions_bounded": all(h["max_position"] < bound for h in hours),
        "cpu_time_last_hour_within_5pct": abs(last["cpu_ms_median"] / first["cpu_ms_median"] - 1) <= 0.05,
    }
    result = {"config": {"rounds": rounds, "grid_thw": GRID, "policy": dataclasses.asdict(POLICY),
                         "model": "tiny (random)", "sampling": dataclasses.asdict(config.sampling)},
              "hours": hours, "words": words, "checks": checks}
    print(checks)
    print("wrote", write_result("soak", result, args.out))


if __name__ == "__main__":
    main()
