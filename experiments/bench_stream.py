"""Latency per generated token vs video length for every attention scheme (the paper's Fig. 7),
the JAX engine side by side with a PyTorch baseline of the reference's streaming (project issue 3).

    PYTHONPATH=. python experiments/bench_stream.py               # CPU: tiny model, 60 min of video
    PYTHONPATH=. python experiments/bench_stream.py --preset cpu-256 --minutes 2.55 --every 17 \
        --schemes streaming hf_reference                            # CPU head-to-head (see `Preset`)
    PYTHONPATH=. python experiments/bench_stream.py --preset 7b   # GPU: 7B shapes, bf16, 720 vision tokens/s
    PYTHONPATH=. python experiments/bench_stream.py --smoke       # a few rounds of each scheme

One round per second of video: random patch rows of a fixed grid, 16 s vision / 16 text rounds /
512 + 512 text, greedy, exactly `--tokens` tokens generated per round (the session's spec gets
im_end = -1, an id no token has, so decoding never stops early). Schemes: the session's
`streaming`, `full` (until its memory budget of `full_max_s` seconds is spent), `sliding`,
`sliding_overlap`, and `hf_reference` (experiments/hf_streaming_reference.py: transformers'
modules, cache grown by concatenation, eviction by index_select, RoPE re-applied to the whole cache
at every forward). Every scheme runs in its own process (separate memory peaks), on the same random
weights: written once with save_pretrained, loaded by svlm_jax and by transformers. A scheme stops
at the end of the video, at its memory budget, or when its wall-time budget is spent.

Rows are medians over the `--measure` rounds ending at each row's video second (10 s, then every
`--every` s). How the phases are timed is recorded in the JSON ("method").
Writes experiments/results/bench_stream_<device>.json and .png (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

JAX_SCHEMES = ("streaming", "full", "sliding", "sliding_overlap")
SCHEMES = JAX_SCHEMES + ("hf_reference",)


@dataclasses.dataclass(frozen=True)
class Preset:
    model: str          # svlm_jax.config preset
    dtype: str
    grid: tuple[int, int, int]  # one second's patch grid (t, h, w): h * w / 4 vision tokens
    full_max_s: int     # memory budget of the full-attention scheme, seconds of video


PRESETS = {
    "tiny": Preset("tiny", "float32", (1, 8, 8), 240),
    # The CPU head-to-head: 4 layers 256 wide, 64 vision tokens a second. At 17 s the 16 rounds are
    # full and the previous text is empty; from about 70 s on the sink and window are full too.
    "cpu-256": Preset("tiny-256", "float32", (1, 16, 16), 240),
    "7b": Preset("qwen2.5-vl-7b", "bfloat16", (1, 40, 72), 240),  # the paper: full attention OOM after ~230 s
}
WINDOWS = dict(vision_window_s=16, text_rounds=16, text_sink=512, text_window=512)
TOKENIZER_CORPUS = ["Red passes. Blue shoots! Goal for Red! Red 1 Blue 0. Foul by Blue, number 2.",
                    "Time=12.0-13.0s user assistant system previous text You are a helpful assistant.",
                    "Commentate on this match ... Saved by Blue. Wide from Red. Yellow wins the ball."]
METHOD = {
    "rounds": "one round per second of video: random patch rows (a pool of 4), exactly `tokens` "
              "generated tokens per round, greedy",
    "rows": "median over the `measure` rounds ending at video_s; the first rounds (compilation) are never measured",
    "jax_phases": "the session runs unchanged; engine.round_step / replay_round are wrapped for measured rounds: "
                  "before the real (donating) round_step, jitted vision.encode and a jitted _begin_and_prefill "
                  "(hidden states only) run on the same inputs and state. ms_vision = vision; ms_prefill = "
                  "begin+prefill - vision (eviction included); ms_per_token = (round_step - begin+prefill) / tokens "
                  "(first-token sampling and `tokens` fed decode steps)",
    "sliding_overlap": "ms_replay = the round's 15 replay_round calls (re-encoding and re-prefilling the past "
                       "seconds), counted in ms_prefill too",
    "hf_reference": "phases timed inline (cuda synchronised): ms_prefill = eviction + positions + prefill "
                    "forward; ms_per_token = decode loop / tokens",
    "ms_step": "wall time of the whole session.step / reference step, host work included (JAX: less the "
               "probe's own vision and prefill calls)",
    "ms_per_token_amortized": "ms_step / tokens: the round's whole cost per generated token (the paper's "
                              "Fig. 7 quantity as we read it)",
    "peak_bytes": "GPU: jax memory_stats peak_bytes_in_use of the scheme's process (includes the timing probe's "
                  "hidden-state-only prefill) / torch.cuda.max_memory_allocated. CPU: live bytes, not a true "
                  "peak: JAX sum of jax.live_arrays() after the step (weights + cache + small state); torch "
                  "parameter + KV-cache tensor bytes. kv_bytes: the KV cache alone",
}


# ---------------------------------------------------------------- setup (parent process)

def build_checkpoint(preset: Preset, workdir: Path):
    """A tokenizer and random weights whose special ids match it, saved for every worker."""
    import svlm_jax
    from svlm_jax.config import preset as config_preset
    from svlm_jax.config import tiny
    from svlm_jax.model.params import Model
    from svlm_jax.tokenizer import train_tokenizer

    tok = train_tokenizer(TOKENIZER_CORPUS * 10, 400, workdir / "tokenizer")
    sp = tok.special
    base = tiny(vocab_size=tok.vocab_size) if preset.model.startswith("tiny") else config_preset(preset.model)
    if preset.model == "tiny-256":
        base = dataclasses.replace(
            base, vision=dataclasses.replace(base.vision, out_hidden_size=256),
            text=dataclasses.replace(base.text, hidden_size=256, head_dim=None, intermediate_size=1024, num_layers=4,
                                     num_heads=4, num_kv_heads=2, mrope_section=(8, 12, 12)))
    cfg = dataclasses.replace(base, image_token_id=sp.image_pad, video_token_id=sp.video_pad,
                              vision_start_token_id=sp.vision_start, vision_end_token_id=sp.vision_end)
    params = svlm_jax.init_params(cfg, jax.random.key(0), dtype=preset.dtype)
    svlm_jax.save_pretrained(Model(config=cfg, params=params), workdir / "model")


def frame_pool(grid, n=4):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((grid[0] * grid[1] * grid[2], 1176)).astype(np.float32) for _ in range(n)]


def measure_points(video_s: int, every: int) -> list[int]:
    return sorted({min(10, video_s), *range(every, video_s + 1, every)})


# ---------------------------------------------------------------- workers (one process per scheme)

class Probe:
    """Stands in for engine.round_step and engine.replay_round while a session runs: passes every call
    through, and while `measure` is set times the phases of the call (see METHOD["jax_phases"])."""

    def __init__(self, engine, vision):
        self.engine = engine
        self.round_step, self.replay_round = engine.round_step, engine.replay_round
        self.vision = jax.jit(vision.encode, static_argnums=0, static_argnames="attention_backend")
        self.prefill = jax.jit(lambda model, spec, *a: engine._begin_and_prefill(model, spec, *a)[1],
                               static_argnums=1)
        self.measure, self.compiled, self.times = False, False, {}

    def __enter__(self):
        self.engine.round_step, self.engine.replay_round = self.timed_round_step, self.timed_replay_round
        return self

    def __exit__(self, *exc):
        self.engine.round_step, self.engine.replay_round = self.round_step, self.replay_round

    def timed_round_step(self, model, spec, state, inputs, rows, layout, keys, collect_logits=False):
        encode = functools.partial(self.vision, model.config.vision, model.params.vision,
                                   rows.reshape(-1, rows.shape[-1]), layout, attention_backend=spec.attention_backend)
        prefill = functools.partial(self.prefill, model, spec, state, inputs, rows, layout)
        if not self.compiled:  # at round 0, which is never measured
            jax.block_until_ready((encode(), prefill()))
            self.compiled = True
        if self.measure:
            t_vision, t_prefill = _timed(encode), _timed(prefill)
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.round_step(model, spec, state, inputs, rows, layout, keys,
                                                    collect_logits=collect_logits))
        if self.measure:
            self.times.update(vision=t_vision, prefill=t_prefill, round=time.perf_counter() - t0)
        return out

    def timed_replay_round(self, *args):
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.replay_round(*args))
        self.times["replay"] = self.times.get("replay", 0.0) + time.perf_counter() - t0
        return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def run_rounds(step, video_s: int, points: list[int], measure: int, budget_s: float) -> dict:
    """Calls `step(r, measured) -> dict of numbers or None` for rounds r = 0, 1, ...; returns the rows
    (medians of the measured rounds before each point), rounds done and why it stopped."""
    measured = {p - 1 - j: p for p in points for j in range(measure) if p - 1 - j >= 2}
    samples: dict[int, list[dict]] = {}
    start, stopped, rounds = time.perf_counter(), None, 0
    for r in range(video_s):
        if time.perf_counter() - start > budget_s:
            stopped = f"wall-time budget of {budget_s:.0f} s spent"
            break
        try:
            sample = step(r, r in measured)
        except RuntimeError as e:  # CacheFullError (the full scheme's budget) or out of device memory
            stopped = str(e)
            break
        rounds = r + 1
        if sample is not None:
            samples.setdefault(measured[r], []).append(sample)
        if r % 60 == 59:
            print(f"  {rounds} rounds, {time.perf_counter() - start:.0f} s", flush=True)
    rows = [{"video_s": p, **{k: statistics.median(s[k] for s in got) for k in got[0]}}
            for p, got in sorted(samples.items())]
    return {"rows": rows, "rounds_done": rounds, "wall_s": time.perf_counter() - start, "stopped": stopped}


def jax_worker(scheme: str, args, preset: Preset, workdir: Path) -> dict:
    import svlm_jax
    from experiments.common import make_session
    from svlm_jax.model import vision
    from svlm_jax.stream_format import CachePolicy
    from svlm_jax.streaming import SamplingConfig, StreamConfig, engine
    from svlm_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(workdir / "tokenizer")
    model = svlm_jax.load_pretrained(workdir / "model", dtype=preset.dtype)
    config = StreamConfig(policy=CachePolicy(**WINDOWS, max_new_tokens=args.tokens),
                          sampling=SamplingConfig(temperature=0.0, repetition_penalty=1.0))
    session = make_session(model, tok, scheme, config, full_max_s=preset.full_max_s)
    session._ensure_engine(preset.grid)
    session._specs[False] = dataclasses.replace(session._specs[False], im_end=-1)  # never stop before `tokens`
    frames = frame_pool(preset.grid)
    gpu = jax.devices()[0].platform == "gpu"
    probe = Probe(engine, vision)

    def step(r, measured):
        probe.measure, probe.times = measured, {}
        t0 = time.perf_counter()
        session.step((frames[r % len(frames)], preset.grid), float(r), float(r + 1))
        if not measured:
            return None
        t = probe.times
        ms_step = 1e3 * (time.perf_counter() - t0 - t["vision"] - t["prefill"])  # less the probe's own calls
        n = int(session.last_output.n_gen_b[0])
        assert n == args.tokens, f"{n} tokens generated, expected {args.tokens}"
        kv = sum(a.nbytes for a in session._state.k_layers_csh + session._state.v_layers_csh)
        peak = (jax.devices()[0].memory_stats()["peak_bytes_in_use"] if gpu
                else sum(a.nbytes for a in jax.live_arrays()))
        row = {"ms_vision": 1e3 * t["vision"], "ms_prefill": 1e3 * (t["prefill"] - t["vision"] + t.get("replay", 0.0)),
               "ms_per_token": 1e3 * (t["round"] - t["prefill"]) / n, "ms_step": ms_step,
               "ms_per_token_amortized": ms_step / n, "peak_bytes": peak, "kv_bytes": kv}
        if scheme == "sliding_overlap":
            row["ms_replay"] = 1e3 * t["replay"]
        return row

    with probe:
        return run_rounds(step, args.video_s, measure_points(args.video_s, args.every), args.measure, args.budget_s)


def hf_worker(args, preset: Preset, workdir: Path) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from experiments.hf_streaming_reference import HFStreamingReference
    from svlm_jax.tokenizer import Tokenizer

    torch.set_num_threads(args.cpu_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = Tokenizer.from_pretrained(workdir / "tokenizer")
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(workdir / "model", dtype=getattr(torch, preset.dtype))
    hf = hf.to(device).eval()
    ref = HFStreamingReference(hf, tok, preset.grid, rounds=WINDOWS["text_rounds"], text_sink=WINDOWS["text_sink"],
                               text_window=WINDOWS["text_window"], max_new=args.tokens)
    frames = [torch.from_numpy(f) for f in frame_pool(preset.grid)]

    def step(r, measured):
        t0 = time.perf_counter()
        out = ref.step(frames[r % len(frames)], float(r), float(r + 1))
        ms_step = 1e3 * (time.perf_counter() - t0)
        if not measured:
            return None
        n = len(out["tokens"])
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else ref.param_bytes() + ref.kv_bytes()
        return {"ms_vision": out["ms_vision"], "ms_prefill": out["ms_prefill"], "ms_per_token": out["ms_decode"] / n,
                "ms_step": ms_step, "ms_per_token_amortized": ms_step / n, "peak_bytes": peak,
                "kv_bytes": ref.kv_bytes()}

    return run_rounds(step, args.video_s, measure_points(args.video_s, args.every), args.measure, args.budget_s)


# ---------------------------------------------------------------- report

def speedups(schemes: dict) -> list[dict]:
    ours = {r["video_s"]: r for r in schemes["streaming"]["rows"]}
    out = []
    for r in schemes["hf_reference"]["rows"]:
        if r["video_s"] in ours:
            o = ours[r["video_s"]]
            out.append({"video_s": r["video_s"], "per_token": r["ms_per_token"] / o["ms_per_token"],
                        "amortized": r["ms_per_token_amortized"] / o["ms_per_token_amortized"]})
    return out


def plot(result: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "ms_per_token_amortized", "whole round / generated tokens"),
                           (axes[1], "ms_per_token", "decode only, per generated token")):
        for name, s in result["schemes"].items():
            if s.get("rows"):
                ax.plot([r["video_s"] for r in s["rows"]], [r[key] for r in s["rows"]], marker=".", label=name)
        ax.set(xlabel="video seconds", ylabel="ms / token", yscale="log", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    c = result["config"]
    fig.suptitle(f"{c['preset']} on {result['device']}: {c['vision_tokens_per_s']} vision tokens/s, "
                 f"{c['tokens_per_round']} tokens/round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="tiny")
    ap.add_argument("--smoke", action="store_true", help="tiny, 8 s of video per scheme, to /tmp")
    ap.add_argument("--minutes", type=float, default=60.0, help="video length per scheme")
    ap.add_argument("--every", type=int, default=60, help="seconds of video between rows")
    ap.add_argument("--measure", type=int, default=3, help="rounds measured per row (median)")
    ap.add_argument("--tokens", type=int, default=20, help="tokens generated per round")
    ap.add_argument("--budget-s", type=float, default=600.0, help="wall-time budget per scheme")
    ap.add_argument("--cpu-threads", type=int, default=1,
                    help="CPU threads of XLA and torch in every worker (the same for both sides)")
    ap.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", choices=SCHEMES + ("checkpoint",), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.minutes, args.every, args.measure, args.budget_s = "tiny", 8 / 60, 4, 2, 60.0
        args.out = args.out or "/tmp/bench_stream_smoke.json"
    args.video_s = round(args.minutes * 60)
    preset = PRESETS[args.preset]

    if args.worker:
        workdir = Path(args.workdir)
        if args.worker == "checkpoint":
            build_checkpoint(preset, workdir)
            return
        result = (hf_worker(args, preset, workdir) if args.worker == "hf_reference"
                  else jax_worker(args.worker, args, preset, workdir))
        (workdir / f"{args.worker}.json").write_text(json.dumps(result))
        return

    from experiments.common import RESULTS, device_tag, write_result

    # Everything touching the accelerator runs in child processes: each its own memory peak.
    workdir = Path(tempfile.mkdtemp(prefix="bench-stream-"))

    n = args.cpu_threads
    xla_flags = f"--xla_cpu_multi_thread_eigen={str(n > 1).lower()} intra_op_parallelism_threads={n}"
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()}

    def worker(name):
        return subprocess.run([sys.executable, __file__, "--worker", name, "--workdir", str(workdir),
                               "--preset", args.preset, "--minutes", str(args.minutes), "--every", str(args.every),
                               "--measure", str(args.measure), "--tokens", str(args.tokens),
                               "--budget-s", str(args.budget_s), "--cpu-threads", str(n)], env=env)

    worker("checkpoint").check_returncode()
    schemes = {}
    for name in args.schemes:
        print(f"{name}:", flush=True)
        proc = worker(name)
        part = workdir / f"{name}.json"
        schemes[name] = (json.loads(part.read_text()) if proc.returncode == 0
                         else {"rows": [], "error": f"worker exited with {proc.returncode}"})
        print(json.dumps({k: v for k, v in schemes[name].items() if k != "rows"}), flush=True)
    merge = 2  # spatial merge of Qwen2.5-VL
    g = preset.grid
    config = {"preset": args.preset, "model": preset.model, "dtype": preset.dtype, "grid_thw": g,
              "vision_tokens_per_s": g[0] * (g[1] // merge) * (g[2] // merge), "tokens_per_round": args.tokens,
              **WINDOWS, "full_max_s": preset.full_max_s, "video_s": args.video_s, "every_s": args.every,
              "measure_rounds": args.measure, "budget_s_per_scheme": args.budget_s, "cpu_threads": n}
    result = {"config": config, "method": METHOD, "schemes": schemes}
    if schemes.get("streaming", {}).get("rows") and schemes.get("hf_reference", {}).get("rows"):
        result["speedup_streaming_vs_hf_reference"] = speedups(schemes)
    path = write_result("bench_stream", result, args.out or RESULTS / f"bench_stream_{device_tag()}.json")
    plot(json.loads(path.read_text()), path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
