"""`svlm demo`: the bundled tiny StreamingVLM commentates a synthetic match, second by second.

The model in assets/demo_model/ was trained by `python -m experiments.train_demo` on synthetic
matches of the seeds below 1000 (experiments/results/demo_training.json says which); the demo's
default seed was never seen in training. Each second its
commentary is printed beside the ground truth with a running accuracy (the synth scorer), and the
match is written as an mp4 (yuv420p, which browsers and players decode) with the commentary as WebVTT
subtitles beside it. `svlm stream` on that mp4 with the bundled model gives the same commentary: both
stream with the model's stream_config.json.
"""

from __future__ import annotations

import dataclasses
import itertools
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

from svlm_jax import interrupts
from svlm_jax.media.subtitles import VttWriter
from svlm_jax.model.params import Model
from svlm_jax.stream_defaults import StreamDefaults
from svlm_jax.stream_format import CachePolicy
from svlm_jax.streaming import StreamConfig, StreamingSession
from svlm_jax.synth import (LONG_MEMORY_S, Match, MatchConfig, RenderConfig, StreamSecond, match_intro,
                            memory_ages, score_commentary, stream_seconds, summarize_scores)
from svlm_jax.synth.dataset import PLAYABLE_PIXEL_FORMAT, opening_frame, write_video
from svlm_jax.tokenizer import Tokenizer
from svlm_jax.weights import load_pretrained

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "demo_model"
DEMO_SEED = 1000  # a match never used in training (train_demo refuses to train on it)
VISION_TOKENS_PER_SECOND = 16  # a 112x112 frame pair: 8x8 patches of 14 px, merged 2x2
# How the bundled model streams: its stream_config.json (train_demo writes it on export;
# tests/test_demo.py checks the bundled file is this). The cache policy of the model's training chunks
# (16 s rounds, sink 64 + window 192 tokens), with 8 s of vision instead of the chunks' 16: the
# bundled model names the same events in its first 10 minutes either way, but with 16 s it starts
# naming the wrong side after 15-20 minutes of a match (events over 1200-3600 s: seeds 1000, 1001,
# 1003, 1004, 2001, 2002 in experiments/README.md). Frames as rendered and trained on (112x112), and
# the previous text every training stream starts from, the match's intro: here the demo match's (a
# stream of another match needs its own, `match_stream`). Sampling is the checkpoint's
# generation defaults: greedy without a generation_config.json, so a seed always gives the same commentary.
FRAME_PIXELS = RenderConfig().height * RenderConfig().width
STREAM_DEFAULTS = StreamDefaults(
    policy=CachePolicy(vision_window_s=8, text_rounds=16, text_sink=64, text_window=192, max_new_tokens=20),
    min_pixels=FRAME_PIXELS, max_pixels=FRAME_PIXELS, previous_text=match_intro(Match(MatchConfig(DEMO_SEED)).teams))
STREAM = STREAM_DEFAULTS.stream_config()


def load_model(model_dir: Path = DEMO_MODEL_DIR) -> tuple[Model, Tokenizer]:
    return load_pretrained(model_dir, dtype="float32"), Tokenizer.from_pretrained(model_dir)


def match_stream(seed: int, config: StreamConfig = STREAM) -> StreamConfig:
    """`config` for streaming match `seed` from its kickoff: its previous text is the match's intro,
    as in every training stream (the text sink keeps it)."""
    return dataclasses.replace(config, previous_text=match_intro(Match(MatchConfig(seed)).teams))


def commentate(model: Model, tokenizer: Tokenizer, seed: int, seconds: int,
               defaults: StreamDefaults = STREAM_DEFAULTS) -> Iterator[tuple[StreamSecond, str]]:
    """The first `seconds` of match `seed`, each with the model's commentary, streamed as they come."""
    session = StreamingSession(model, tokenizer, match_stream(seed, defaults.stream_config()),
                               preprocess=defaults.preprocess(tokenizer))
    for item in itertools.islice(stream_seconds(MatchConfig(seed), RenderConfig()), seconds):
        yield item, session.step(item.frames, float(item.second), float(item.second + 1))


def run(seed: int, seconds: int, out_dir: Path, model_dir: Path = DEMO_MODEL_DIR) -> dict:
    """Commentate `seconds` of match `seed`, printing each second; write the match as mp4 + VTT into
    `out_dir`; return the accuracy summary with the real-time factor."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(model_dir)
    defaults = StreamDefaults.from_dir(model_dir)
    render = RenderConfig()
    video, subtitles = out_dir / f"match_{seed}.mp4", out_dir / f"match_{seed}.vtt"
    texts, truths, step_times, correct = [], [], [], 0
    print("compiling the model (the first second waits for it)", flush=True)
    print(f"{'time':>6}  {'model':<40} {'ground truth':<40}    accuracy")

    def frames():
        """Runs the model second by second while the encoder consumes the frames (nothing is held).
        A second's time runs from the previous output to this one: rendering, model and encoding."""
        nonlocal correct
        last = time.perf_counter()
        for item, text in commentate(model, tokenizer, seed, seconds, defaults):
            now = time.perf_counter()
            step_times.append(now - last)
            last = now
            texts.append(text)
            truths.append(item.truth)
            vtt.write(item.second, item.second + 1, text)
            right = score_commentary([text], [item.truth])[0].correct
            correct += right
            print(f"{item.second // 60:3d}:{item.second % 60:02d}  {text or '.':<40} {item.truth.text or '.':<40} "
                  f"{'ok' if right else '--'} {correct / len(texts):6.1%}", flush=True)
            yield from item.frames
            interrupts.check()  # a Ctrl-C that XLA's callbacks dropped ends the run here

    with VttWriter(subtitles) as vtt:
        write_video(video, itertools.chain([opening_frame(MatchConfig(seed), 0, render)], frames()), render.fps,
                    render.height, render.width, pix_fmt=PLAYABLE_PIXEL_FORMAT)
    summary = summarize_scores(score_commentary(texts, truths), memory_ages(truths), LONG_MEMORY_S)
    # The first second includes compilation; the steady state is what live video needs.
    steady = step_times[1:] or step_times
    summary["real_time_factor"] = sum(steady) / len(steady)
    summary["first_second_s"] = step_times[0]

    def rate(key: str) -> str:
        return "-" if summary[key] is None else f"{summary[key]:.1%}"

    print(f"accuracy {rate('accuracy')} over {len(texts)} s (events {rate('event_accuracy')}, silence "
          f"{rate('silence_accuracy')}, scores {rate('score_accuracy')} of {summary['score_seconds']} s, "
          f"those older than {LONG_MEMORY_S} s {rate('memory_accuracy')} of "
          f"{summary['memory_seconds']} s)")
    print(f"real-time factor {summary['real_time_factor']:.3f}: seconds of work (rendering, model, encoding) per "
          f"second of video after the first, which compiled in {step_times[0]:.1f} s; below 1 keeps up with live video")
    print(f"wrote {video} and {subtitles}")
    intro = match_stream(seed, defaults.stream_config()).previous_text
    print(f"the same commentary from the video: svlm stream --model {shlex.quote(str(model_dir))} "
          f"--video {shlex.quote(str(video))}"
          + ("" if intro == defaults.previous_text else f" --previous-text {shlex.quote(intro)}"))
    return summary
