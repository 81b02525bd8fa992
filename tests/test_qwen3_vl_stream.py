"""Streaming a Qwen3-VL model: DeepStack at prefill, timestamps as text, 16-px patches.

The oracles are `svlm_jax.forward` over the whole sequence (tests/test_qwen3_vl.py holds it to
transformers' Qwen3VLForConditionalGeneration) while nothing has left the cache, and the slow
reference `tests/slow_stream.py` through eviction.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import svlm_jax
from svlm_jax import cli
from svlm_jax.media.preprocess import VisionPreprocessConfig
from svlm_jax.stream_format import CachePolicy, StreamFormat, round_query, round_user_text
from svlm_jax.streaming import SamplingConfig, StreamConfig, StreamingSession
from svlm_jax.tokenizer import Tokenizer
from tests.conftest import end_prone, random_stream_model
from tests.test_cli import read_jsonl, write_mp4
from tests.test_qwen3_vl import HUB_VIDEO_PREPROCESSOR

GREEDY = SamplingConfig(temperature=0.0, repetition_penalty=1.0)
GRID = (1, 4, 6)


@pytest.fixture(scope="module")
def qwen3_model(stream_tokenizer):
    return random_stream_model(stream_tokenizer, seed=3, model_type="qwen3_vl")


def random_second(model, rng):
    rows = rng.standard_normal((int(np.prod(GRID)), model.config.vision.patch_dim)).astype(np.float32)
    return rows, np.array(GRID)


@pytest.mark.parametrize("pos_mode, previous_text", [("contiguous", "Red 1 Blue 0."), ("native", "")])
def test_logits_equal_forward_before_eviction(qwen3_model, stream_tokenizer, rng, pos_mode, previous_text):
    """Every prefill and decode logit of 3 rounds equals `forward` over the stream so far (fp32)."""
    sp = stream_tokenizer.special
    cfg = StreamConfig(CachePolicy(text_rounds=8, vision_window_s=8, text_sink=64, text_window=64, max_new_tokens=6),
                       sampling=GREEDY, pos_mode=pos_mode, previous_text=previous_text)
    session = StreamingSession(qwen3_model, stream_tokenizer, cfg)
    fmt = session.format
    seq = fmt.head_ids() + fmt.previous_text_ids(previous_text) + fmt.footer_ids()
    expected, rows_all, prev_gen = [], [], None  # expected: (index in seq, the engine's logits)
    n_vis = int(np.prod(GRID)) // 4
    for r in range(3):
        rows, grid = random_second(qwen3_model, rng)
        rows_all.append(rows)
        session.step_batch([(rows, grid)], [float(r)], [float(r + 1)], collect_logits=True)
        out, slots = session.last_output, session.layout.slots
        gen = [int(t) for t in np.asarray(out.tokens_bm)[0, :int(out.n_gen_b[0])]]
        before, after = fmt.prompt_ids(float(r), float(r + 1), round_user_text(cfg.query, r, bool(previous_text)))
        # the time as Qwen3-VL's processor writes it: the mean of its 2 frames' (tests/test_qwen3_vl.py checks the rule)
        assert stream_tokenizer.decode(before).endswith(f"user\n<{r + 0.25:.1f} seconds><|vision_start|>")
        cut = prev_gen is not None and prev_gen[-1] != sp.im_end
        parts = [(("previous", "close"), fmt.close_ids() if cut else []),
                 (("previous", "tail"), fmt.newline if prev_gen else []), (("current", "before"), before),
                 (("current", "vision"), [sp.video_pad] * n_vis), (("current", "after"), after)]
        pre, dec = np.asarray(out.prefill_logits_bqv)[0], np.asarray(out.decode_logits_bmv)[0]
        for part, ids in parts:
            expected += [(len(seq) + j, pre[slots.prefill_offset(part) + j]) for j in range(len(ids))]
            seq += ids
        expected += [(len(seq) + m, dec[m]) for m in range(len(gen))]
        seq += gen
        prev_gen = gen
    assert any(seq[i] == sp.video_pad for i, _ in expected)
    ref = np.asarray(svlm_jax.forward(qwen3_model, np.array([seq]), pixel_values_videos=np.concatenate(rows_all),
                                      video_grid_thw=np.array([GRID] * 3)))[0]
    scale = np.abs(ref).max()
    for index, logits in expected:
        assert np.abs(logits - ref[index]).max() <= 1e-4 * scale, f"token {index} of {len(seq)}"


def test_policy_matches_slow_reference(qwen3_model, stream_tokenizer, rng):
    """>= 100 rounds with windows small enough that the sink fills, the text ring wraps, vision and
    rounds expire: same greedy tokens, retained ids, positions (also `forward`'s rule over the
    retained tokens) and first-token logits as the slow reference."""
    from svlm_jax.model import vlm
    from tests.slow_stream import SlowStream

    knobs = dict(text_rounds=3, text_sink=5, text_window=7)
    policy = CachePolicy(vision_window_s=2, max_new_tokens=4, **knobs)
    cfg = StreamConfig(policy, sampling=GREEDY, previous_text="Red 1 Blue 0.")
    model = end_prone(qwen3_model, stream_tokenizer, cfg, functools.partial(random_second, qwen3_model))
    session = StreamingSession(model, stream_tokenizer, cfg)
    slow = SlowStream(model, stream_tokenizer, vision_rounds=2, max_new=4, previous_text=cfg.previous_text,
                      fps=policy.fps, **knobs)
    sp, scale, ended, rounds = stream_tokenizer.special, None, 0, 104
    for i in range(rounds):
        rows, grid = random_second(model, rng)
        session.step_batch([(rows, grid)], [float(i)], [float(i + 1)], collect_logits=True)
        out = session.last_output
        gen = [int(t) for t in np.asarray(out.tokens_bm)[0, :int(out.n_gen_b[0])]]
        logits_ref, gen_ref = slow.round(i, rows, GRID, float(i), float(i + 1))
        assert gen == gen_ref, f"round {i}"
        ended += gen[-1] == sp.im_end
        pre = np.asarray(out.prefill_logits_bqv)[0]
        n_after = len(session.format.prompt_ids(0.0, 1.0, round_query(cfg.query, i, bool(cfg.previous_text)))[1])
        last = session.layout.slots.prefill_offset(("current", "after")) + n_after - 1
        scale = scale or np.abs(logits_ref).max()
        assert np.abs(pre[last] - logits_ref).max() <= 1e-4 * scale, f"round {i}"
        view, retained = session.cache_view(), slow.retained()
        ids = [e.token for e in retained]
        assert [c.token_id for c in view] == ids, f"round {i}"
        positions = slow.positions(retained)
        assert np.array_equal(np.array([c.position for c in view]), positions), f"round {i}"
        n_blocks = ids.count(sp.video_pad) // (int(np.prod(GRID)) // 4)
        forward_rule = vlm.positions_for(model.config, np.array([ids]), video_grid_thw=np.array([GRID] * n_blocks))
        assert np.array_equal(forward_rule[0], positions), f"round {i}"
    assert 5 <= ended <= rounds - 5, ended  # both ways a round ends are exercised
    assert len(slow.previous) > 5 + 7  # the sink filled and the window wrapped
    assert n_blocks == 2 and len(slow.rounds) == 3  # vision and rounds expired


def test_rounds_with_eviction(qwen3_model, stream_tokenizer, rng):
    """Seconds past every window: vision, rounds and previous text are evicted, text keeps coming,
    the cache keeps the vision of `vision_window_s` seconds and each kept round's timestamp."""
    policy = CachePolicy(text_rounds=2, vision_window_s=1, text_sink=4, text_window=4, max_new_tokens=4)
    session = StreamingSession(qwen3_model, stream_tokenizer, StreamConfig(policy, sampling=GREEDY))
    texts = [session.step(random_second(qwen3_model, rng), float(i), float(i + 1)) for i in range(8)]
    assert all(isinstance(t, str) for t in texts) and any(texts)
    view = [c.token_id for c in session.cache_view()]
    sp, fmt = stream_tokenizer.special, session.format
    assert view.count(sp.video_pad) == int(np.prod(GRID)) // 4
    for i in (6, 7):  # the two kept rounds open with their own "<t seconds>"
        before = fmt.prompt_ids(float(i), float(i + 1), None)[0]
        assert any(view[j:j + len(before)] == before for j in range(len(view))), i


def test_moved_keys_turn_by_interleaved_mrope(qwen3_model, stream_tokenizer, rng):
    """Eviction re-rotates kept keys by the change of position with the model's own (interleaved)
    angles: equal to rotating the raw keys by the new positions from scratch."""
    import jax.numpy as jnp

    from svlm_jax.model import rope, text
    from svlm_jax.streaming.cache import CacheLayout, empty_state, rotate_moved_keys

    cfg = qwen3_model.config.text
    assert cfg.mrope_interleaved
    angles_of = functools.partial(text.text_angles, cfg)
    lay = CacheLayout.for_stream(StreamFormat.from_tokenizer(stream_tokenizer), CachePolicy(text_rounds=2),
                                 qwen3_model.config, GRID)
    state = empty_state(lay, 1, 1, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    old_s3, new_s3 = (jnp.asarray(rng.integers(0, 2000, (1, lay.size, 3)), jnp.int32) for _ in range(2))
    raw_ksh = jnp.asarray(rng.standard_normal((cfg.num_kv_heads, lay.size + 1, cfg.head_dim)), jnp.float32)
    at = lambda pos_s3: rope.rotate_by_angles(raw_ksh, angles_of(jnp.pad(pos_s3, ((0, 0), (0, 1), (0, 0))))[0][None])
    state = state.replace(k_layers_csh=(at(old_s3),), pos_bs3=old_s3, valid_bs=jnp.ones((1, lay.size), bool))
    moved = rotate_moved_keys(state, new_s3, angles_of)
    np.testing.assert_allclose(np.asarray(moved.k_layers_csh[0])[:, :-1], np.asarray(at(new_s3))[:, :-1],
                               atol=1e-3, rtol=0)


def test_refuses_rows_or_preprocessing_of_another_patch_size(qwen3_model, stream_tokenizer, rng):
    from svlm_jax.streaming.session import STREAM_PREPROCESS

    with pytest.raises(ValueError, match=r"\(14, 2, 2\) are not the qwen3_vl vision tower's \(16, 2, 2\)"):
        StreamingSession(qwen3_model, stream_tokenizer, preprocess=STREAM_PREPROCESS)
    session = StreamingSession(qwen3_model, stream_tokenizer)
    with pytest.raises(ValueError, match="this model's rows are 1536 wide"):
        session.step((np.zeros((24, 1176), np.float32), np.array(GRID)), 0.0, 1.0)


def test_svlm_stream_on_a_qwen3_checkpoint(qwen3_model, stream_tokenizer, tmp_path):
    """`svlm stream` on a Qwen3-VL directory with the hub's video processor config: one JSONL line
    per second (the frames cut into the model's 16-px patches: 14-px rows would not fit its tower)."""
    model_dir = tmp_path / "checkpoint"
    svlm_jax.save_pretrained(qwen3_model, model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(stream_tokenizer.name) / name, model_dir / name)
    (model_dir / "video_preprocessor_config.json").write_text(json.dumps(HUB_VIDEO_PREPROCESSOR))
    # The image processor's file (here with other bounds) gives way to the video processor's.
    image = {**HUB_VIDEO_PREPROCESSOR, "size": {"longest_edge": 16777216, "shortest_edge": 65536}}
    (model_dir / "preprocessor_config.json").write_text(json.dumps(image))
    assert Tokenizer.from_pretrained(model_dir).vision_preprocess == \
        VisionPreprocessConfig.from_video_preprocessor_config(HUB_VIDEO_PREPROCESSOR)
    video, jsonl = write_mp4(tmp_path / "match.mp4", 3), tmp_path / "out.jsonl"
    pixels = str(2 * 64 * 64)  # a second's two frames together: 64x64 each
    args = ["stream", "--model", str(model_dir), "--video", str(video), "--jsonl", str(jsonl), "--dtype", "float32",
            "--greedy", "--min-pixels", pixels, "--max-pixels", pixels, "--max-new-tokens", "4", "--text-rounds", "2",
            "--vision-window", "1", "--text-sink", "8", "--text-window", "8"]
    assert cli.main(args) == 0
    assert [(r["start"], r["end"]) for r in read_jsonl(jsonl)] == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
