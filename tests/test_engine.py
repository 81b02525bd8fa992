"""The streaming engine against `forward` over the whole sequence (while nothing is evicted)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import svlm_jax
from svlm_jax.stream_format import CachePolicy, round_query, round_user_text
from svlm_jax.streaming import BaselineSession, CacheFullError, SamplingConfig, StreamConfig, StreamingSession
from tests.conftest import end_prone

GREEDY = SamplingConfig(temperature=0.0, repetition_penalty=1.0)
GRID = (1, 4, 6)


def random_second(rng):
    return rng.standard_normal((int(np.prod(GRID)), 1176)).astype(np.float32), np.array(GRID)


# Without previous text, round 0 carries the query (stream_format.round_query); a question joins
# round 2's user turn (stream_format.round_user_text) and gets the longer answer cap.
@pytest.mark.parametrize("pos_mode, previous_text, question", [("contiguous", "Red 1 Blue 0.", None),
                                                               ("native", "", None),
                                                               ("contiguous", "", "Who is winning now?")])
def test_logits_equal_forward_before_eviction(stream_model, stream_tokenizer, rng, pos_mode, previous_text, question):
    tok = stream_tokenizer
    cfg = StreamConfig(CachePolicy(text_rounds=8, vision_window_s=8, text_sink=64, text_window=64, max_new_tokens=6,
                                   max_question_tokens=24, max_answer_tokens=9),
                       sampling=GREEDY, pos_mode=pos_mode, previous_text=previous_text)
    session = StreamingSession(stream_model, tok, cfg)
    fmt, sp = session.format, tok.special
    seq = fmt.head_ids() + fmt.previous_text_ids(cfg.previous_text) + fmt.footer_ids()
    expected = []  # (index in seq, logits from the engine) pairs
    rows_all = []
    n_vis = int(np.prod(GRID)) // 4
    prev_gen = None
    for r in range(4):
        rows, grid = random_second(rng)
        rows_all.append(rows)
        asked = question if r == 2 else None
        session.step_batch([(rows, grid)], [float(r)], [float(r + 1)], questions=[asked], collect_logits=True)
        out = session.last_output
        gen = [int(t) for t in np.asarray(out.tokens_bm)[0, :int(out.n_gen_b[0])]]
        cap = 9 if asked else 6
        assert len(gen) == cap or (len(gen) < cap and gen[-1] == sp.im_end), f"round {r}: {len(gen)} tokens"
        before, after = fmt.prompt_ids(float(r), float(r + 1),
                                       round_user_text(cfg.query, r, bool(cfg.previous_text), [asked] if asked else []))
        new = []
        if prev_gen is not None:
            if prev_gen[-1] != sp.im_end:
                new += [*fmt.end_marker, sp.im_end]
            new += fmt.newline
        new += before + [sp.video_pad] * n_vis + after
        # the engine's prefill queries that were active, in order, are exactly `new`
        pre = np.asarray(out.prefill_logits_bqv)[0]
        slots = session.layout.slots

        def queries(part, n):
            return list(range(slots.prefill_offset(part), slots.prefill_offset(part) + n))

        cut = prev_gen is not None and prev_gen[-1] != sp.im_end
        qs = (queries(("previous", "close"), len(fmt.close_ids()) if cut else 0)
              + queries(("previous", "tail"), len(fmt.newline) if prev_gen is not None else 0)
              + queries(("current", "before"), len(before)) + queries(("current", "vision"), n_vis)
              + queries(("current", "after"), len(after)))
        assert len(qs) == len(new)
        start = len(seq)
        seq += new
        expected += [(start + j, pre[q]) for j, q in enumerate(qs)]
        dec = np.asarray(out.decode_logits_bmv)[0]
        start = len(seq)
        seq += gen
        expected += [(start + m, dec[m]) for m in range(len(gen))]
        prev_gen = gen
    ids = np.array([seq])
    ref = np.asarray(svlm_jax.forward(stream_model, ids, pixel_values_videos=np.concatenate(rows_all),
                                      video_grid_thw=np.array([GRID] * 4), second_per_grid_ts=[1.0] * 4))[0]
    scale = np.abs(ref).max()
    for index, logits in expected:
        assert np.abs(logits - ref[index]).max() <= 1e-4 * scale, f"token {index} of {len(seq)}"


def test_policy_matches_slow_reference(stream_model, stream_tokenizer, rng):
    """>= 100 rounds with windows small enough that the sink fills, the text ring wraps, vision
    and rounds expire: same retained ids, positions, first-token logits and greedy tokens."""
    from tests.slow_stream import SlowStream

    knobs = dict(text_rounds=3, text_sink=5, text_window=7)
    cfg = StreamConfig(CachePolicy(vision_window_s=2, max_new_tokens=4, **knobs), sampling=GREEDY,
                       previous_text="Red 1 Blue 0.")
    model = end_prone(stream_model, stream_tokenizer, dataclasses.replace(cfg, previous_text=""), random_second)
    session = StreamingSession(model, stream_tokenizer, cfg)
    slow = SlowStream(model, stream_tokenizer, vision_rounds=2, max_new=4, previous_text=cfg.previous_text, **knobs)
    scale = None
    ended = 0
    for i in range(104):
        rows, grid = random_second(rng)
        session.step_batch([(rows, grid)], [float(i)], [float(i + 1)], collect_logits=True)
        out = session.last_output
        gen = [int(t) for t in np.asarray(out.tokens_bm)[0, :int(out.n_gen_b[0])]]
        logits_ref, gen_ref = slow.round(i, rows, GRID, float(i), float(i + 1))
        assert gen == gen_ref, f"round {i}"
        ended += gen[-1] == stream_tokenizer.special.im_end
        pre = np.asarray(out.prefill_logits_bqv)[0]
        n_after = len(session.format.prompt_ids(0.0, 1.0, round_query(cfg.query, i, bool(cfg.previous_text)))[1])
        last = session.layout.slots.prefill_offset(("current", "after")) + n_after - 1
        scale = scale or np.abs(logits_ref).max()
        assert np.abs(pre[last] - logits_ref).max() <= 1e-4 * scale, f"round {i}"
        view = session.cache_view()
        retained = slow.retained()
        assert [c.token_id for c in view] == [e.token for e in retained], f"round {i}"
        assert np.array_equal(np.array([c.position for c in view]), slow.positions(retained)), f"round {i}"
    assert 5 <= ended <= 99, ended  # both ways a round ends are exercised
    assert len(slow.previous) > 5 + 7  # the sink filled and the window wrapped


def test_content_length_known_answers():
    """Commentary moved to the previous text: no <|im_end|>, no " ..." before it, nothing else cut."""
    import jax.numpy as jnp

    from svlm_jax.streaming.engine import content_length

    gen = jnp.array([[1, 2, 5, 6, 9, 0], [1, 5, 6, 0, 0, 0], [5, 6, 9, 0, 0, 0], [1, 2, 6, 9, 0, 0],
                     [9, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    n_gen = jnp.array([5, 3, 3, 4, 1, 6])
    assert content_length(gen, n_gen, 9, (5, 6)).tolist() == [2, 3, 0, 3, 0, 6]


def test_batched_streams_equal_single_streams(stream_model, stream_tokenizer, rng):
    """Three streams with their own previous text and frames, one joining late and one leaving,
    give the tokens the same streams give alone. Sampled (not greedy): rngs are per stream."""
    cfg = StreamConfig(CachePolicy(text_rounds=3, vision_window_s=2, text_sink=4, text_window=6, max_new_tokens=4),
                       sampling=SamplingConfig(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1))
    previous = ["Red 1 Blue 0.", "", "Foul by Blue, number 2."]
    frames = [[random_second(rng) for _ in range(7)] for _ in range(3)]
    starts = [0, 0, 2]   # stream 2 joins at step 2
    stops = [7, 5, 7]    # stream 1 leaves after step 4
    batched = StreamingSession(stream_model, stream_tokenizer, cfg, batch=3)
    for row in range(3):
        batched.join(row, previous[row])
    batched.leave(2)
    got = [[] for _ in range(3)]
    for step in range(7):
        if step == starts[2]:
            batched.join(2, previous[2])
        if step == stops[1]:
            batched.leave(1)
        live = [starts[r] <= step < stops[r] for r in range(3)]
        secs = [frames[r][step - starts[r]] if live[r] else None for r in range(3)]
        ts = [float(step - starts[r]) if live[r] else None for r in range(3)]
        out = batched.step_batch(secs, ts, [t + 1 if t is not None else None for t in ts])
        for r in range(3):
            if live[r]:
                got[r].append(out[r])
    for r in range(3):
        single = StreamingSession(stream_model, stream_tokenizer, dataclasses.replace(cfg, previous_text=previous[r]))
        alone = [single.step(frames[r][k], float(k), float(k + 1)) for k in range(stops[r] - starts[r])]
        assert alone == got[r], f"stream {r}"
        assert any(alone), "sampling produced text"


def test_rows_without_a_second_sit_the_round_out(stream_model, stream_tokenizer, rng):
    """A joined row given no second in a round waits unchanged: each row's commentary equals the
    same stream's alone, over only the seconds it was given."""
    cfg = StreamConfig(CachePolicy(text_rounds=3, vision_window_s=2, text_sink=4, text_window=6, max_new_tokens=4),
                       sampling=SamplingConfig(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1))
    given = [[True] * 6, [True, False, True, True, False, True]]
    frames = [[random_second(rng) for _ in range(6)] for _ in range(2)]
    batched = StreamingSession(stream_model, stream_tokenizer, cfg, batch=2)
    got, clock = [[], []], [0, 0]
    for step in range(6):
        secs = [frames[r][clock[r]] if given[r][step] else None for r in range(2)]
        ts = [float(clock[r]) if given[r][step] else None for r in range(2)]
        out = batched.step_batch(secs, ts, [t + 1 if t is not None else None for t in ts])
        for r in range(2):
            if given[r][step]:
                got[r].append(out[r])
                clock[r] += 1
            else:
                assert out[r] == ""
    for r in range(2):
        single = StreamingSession(stream_model, stream_tokenizer, cfg)
        alone = [single.step(frames[r][k], float(k), float(k + 1)) for k in range(clock[r])]
        assert alone == got[r], f"stream {r}"
        assert any(alone), "sampling produced text"


def test_no_recompilation_and_constant_memory(stream_model, stream_tokenizer, rng):
    import jax

    cfg = StreamConfig(CachePolicy(text_rounds=3, vision_window_s=2, text_sink=4, text_window=6, max_new_tokens=3))
    session = StreamingSession(stream_model, stream_tokenizer, cfg)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    second = random_second(rng)
    live_bytes = {}
    for i in range(200):
        if i == 2:
            compiles.clear()
        session.step(second, float(i), float(i + 1))
        if i in (20, 199):
            live_bytes[i] = sum(a.nbytes for a in jax.live_arrays())
    assert compiles == [], f"{len(compiles)} compilations after round 2"
    assert live_bytes[199] == live_bytes[20]


def test_sliding_overlap_rebuilds_last_window(stream_model, stream_tokenizer, rng):
    """Every second the baseline re-prefills the last W seconds from scratch: its first-token
    logits equal `forward` over exactly that context."""
    W = 3
    cfg = StreamConfig(CachePolicy(text_rounds=W, max_new_tokens=3), sampling=GREEDY, previous_text="Red 1 Blue 0.")
    session = BaselineSession(stream_model, stream_tokenizer, cfg, scheme="sliding_overlap")
    fmt, sp = session.format, stream_tokenizer.special
    history = []
    for i in range(6):
        rows, grid = random_second(rng)
        session.step_batch([(rows, grid)], [float(i)], [float(i + 1)], collect_logits=True)
        out = session.last_output
        history.append((rows, [int(t) for t in np.asarray(out.tokens_bm)[0, :int(out.n_gen_b[0])]]))
        window = list(range(max(0, i - W + 1), i + 1))
        seq = fmt.head_ids() + fmt.previous_text_ids(cfg.previous_text) + fmt.footer_ids()
        for k in window:
            before, after = fmt.prompt_ids(float(k), float(k + 1),
                                           round_query(cfg.query, k - window[0], bool(cfg.previous_text)))
            seq += before + [sp.video_pad] * (int(np.prod(GRID)) // 4) + after
            if k != i:
                gen = history[k][1]
                seq += gen + ([] if gen[-1] == sp.im_end else [*fmt.end_marker, sp.im_end]) + list(fmt.newline)
        ref = np.asarray(svlm_jax.forward(stream_model, np.array([seq]),
                                          pixel_values_videos=np.concatenate([history[k][0] for k in window]),
                                          video_grid_thw=np.array([GRID] * len(window))))[0, -1]
        n_after = len(fmt.prompt_ids(0.0, 1.0, round_query(cfg.query, len(window) - 1, bool(cfg.previous_text)))[1])
        last = session.layout.slots.prefill_offset(("current", "after")) + n_after - 1
        got = np.asarray(out.prefill_logits_bqv)[0, last]
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), f"second {i}"


def test_sliding_restarts_and_full_runs_out(stream_model, stream_tokenizer, rng):
    sliding = BaselineSession(stream_model, stream_tokenizer, StreamConfig(CachePolicy(text_rounds=2, max_new_tokens=2)),
                              scheme="sliding")
    full = BaselineSession(stream_model, stream_tokenizer, StreamConfig(CachePolicy(max_new_tokens=2)), scheme="full",
                           full_max_s=3)
    for i in range(3):
        sliding.step(random_second(rng), float(i), float(i + 1))
        full.step(random_second(rng), float(i), float(i + 1))
    pads = int(np.prod(GRID)) // 4
    # seconds 0-1 filled the first window; second 2 started a fresh context holding only itself
    sp = stream_tokenizer.special
    assert sum(c.token_id == sp.video_pad for c in sliding.cache_view()) == pads
    assert sum(c.token_id == sp.im_start for c in sliding.cache_view()) == 2 + 2
    assert sum(c.token_id == sp.video_pad for c in full.cache_view()) == 3 * pads
    with pytest.raises(CacheFullError, match="memory budget of 3 s"):
        full.step(random_second(rng), 3.0, 4.0)


def test_text_arrives_piece_by_piece(stream_model, stream_tokenizer, rng):
    """`on_text` gets each second's commentary while it is decoded: the pieces join to the returned
    text, which is the answer without a final " ..." + <|im_end|> (stripped here by hand)."""
    cfg = StreamConfig(CachePolicy(text_rounds=3, vision_window_s=2, text_sink=4, text_window=6, max_new_tokens=6),
                       sampling=SamplingConfig(temperature=1.0, repetition_penalty=1.0))
    session = StreamingSession(stream_model, stream_tokenizer, cfg)
    im_end, marker = stream_tokenizer.special.im_end, stream_tokenizer.encode(" ...")
    calls = 0
    for i in range(8):
        pieces = []
        text = session.step(random_second(rng), float(i), float(i + 1), on_text=pieces.append)
        out = session.last_output
        gen = np.asarray(out.tokens_bm)[0, :int(out.n_gen_b[0])].tolist()
        if gen[-1] == im_end:
            gen = gen[:-1]
            if gen[len(gen) - len(marker):] == marker:
                gen = gen[:len(gen) - len(marker)]
        assert text == stream_tokenizer.decode(gen, skip_special_tokens=True).strip()
        assert "".join(pieces).strip() == text
        calls += len(pieces)
    assert calls > 8  # text came in several pieces, not once per second


def test_sampling_defaults_from_generation_config(stream_model, stream_tokenizer_dir, tmp_path):
    import json
    import shutil

    from svlm_jax.tokenizer import Tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stream_tokenizer_dir / name, tmp_path / name)
    assert StreamingSession(stream_model, Tokenizer.from_pretrained(tmp_path)).sampling.temperature == 0.0  # greedy
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}))
    sampling = StreamingSession(stream_model, Tokenizer.from_pretrained(tmp_path)).sampling
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.repetition_penalty) == (0.7, 20, 0.8, 1.05)
    given = SamplingConfig(temperature=0.3)
    explicit = StreamingSession(stream_model, Tokenizer.from_pretrained(tmp_path), StreamConfig(sampling=given))
    assert explicit.sampling.temperature == 0.3 and explicit.sampling.top_k == 0


def test_special_tokens_must_match_the_model(stream_model, stream_tokenizer):
    from svlm_jax.config import ConfigError

    wrong = stream_model.replace(config=dataclasses.replace(stream_model.config,
                                                            video_token_id=stream_tokenizer.special.video_pad - 1))
    with pytest.raises(ConfigError, match="video_token_id"):
        StreamingSession(wrong, stream_tokenizer)


def test_prepare_builds_the_engine_for_the_frame_size(stream_model, stream_tokenizer, rng):
    """`prepare(h, w)` gives the layout the first second of h x w frames would give, and holds to it."""
    from svlm_jax.media.preprocess import VisionPreprocessConfig

    preprocess = VisionPreprocessConfig(min_pixels=28 * 28, max_pixels=56 * 84)
    cfg = StreamConfig(CachePolicy(text_rounds=2, vision_window_s=1, text_sink=4, text_window=4, max_new_tokens=3),
                       sampling=GREEDY)
    lazy, eager = (StreamingSession(stream_model, stream_tokenizer, cfg, preprocess=preprocess) for _ in range(2))
    layout = eager.prepare(50, 90)
    assert lazy.layout is None and layout is not None
    frames = rng.integers(0, 256, (2, 50, 90, 3), dtype=np.uint8)
    for i in range(2):
        assert eager.step(frames, float(i), i + 1.0) == lazy.step(frames, float(i), i + 1.0)
    assert lazy.layout == layout
    with pytest.raises(ValueError, match="frame grid changed"):
        eager.step(rng.integers(0, 256, (2, 90, 50, 3), dtype=np.uint8), 2.0, 3.0)
