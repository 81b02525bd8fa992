"""Training chunks and the streaming cache are built from one stream format and one cache policy:
a stream replayed through the engine with known commentary holds exactly the ids and positions of
the training chunk covering its retained seconds."""

from __future__ import annotations

import numpy as np
import pytest

from svlm_jax.media.preprocess import VisionPreprocessConfig
from svlm_jax.stream_format import CachePolicy
from svlm_jax.streaming import StreamConfig, StreamingSession
from svlm_jax.train.data import ChunkSpec, Sample, chunk_from_frames, training_format

WORDS = ["Red", "passes.", "Blue", "shoots!", "Goal", "for", "Red!", "Saved", "by", "Blue."]


# A stream's true start (no previous text) asks the query in round 0; one with previous text does not.
@pytest.mark.parametrize("previous", ["Goal for Red! Score 1 to 0.", ""])
def test_replayed_stream_equals_training_chunk(stream_model, stream_tokenizer, stream_tokenizer_dir, rng, previous):
    n_seconds, rounds, sink, window = 11, 4, 5, 6
    words = []  # [start, end, word] with the end inside its second; some seconds silent
    for s in range(n_seconds):
        for j in range(int(rng.integers(0, 3))):
            end = s + 0.2 + 0.3 * j
            words.append((end - 0.1, end, str(rng.choice(WORDS))))
    # Questions (the SFT data's qa_stream) join their second's user turn and are answered in its turn.
    qa = ((2.5, 2.5, "Who scored?", "Red did."), (9.4, 9.6, "What is the score?", "One to nil."))
    sample = Sample(video=None, video_start=0.0, video_end=float(n_seconds), words=tuple(words),
                    previous=previous, qa=qa)
    side = 56
    vision_cfg = VisionPreprocessConfig(min_pixels=side * side, max_pixels=side * side)
    frames = [rng.integers(0, 256, (2, side, side, 3), dtype=np.uint8) for _ in range(n_seconds)]

    policy = CachePolicy(text_rounds=rounds, vision_window_s=rounds, text_sink=sink, text_window=window,
                         max_new_tokens=16, max_question_tokens=24, max_answer_tokens=24)
    config = StreamConfig(policy, previous_text=sample.previous)
    session = StreamingSession(stream_model, stream_tokenizer, config, preprocess=vision_cfg)
    fmt = training_format(stream_tokenizer, stream_tokenizer_dir, system=config.system, query=config.query)
    assert fmt.special == session.format.special and fmt.head_ids() == session.format.head_ids()
    spec = ChunkSpec(chunk_seconds=rounds, overlap_seconds=0, policy=policy)
    tail = len(fmt.tail_ids())  # the last round's tail ("\n") arrives with the next second
    for s in range(n_seconds):
        said = " ".join(w for _, end, w in words if s <= end < s + 1)
        asked = [(question, answer) for _, time, question, answer in qa if s <= time < s + 1]
        if asked:
            session.replay(frames[s], float(s), float(s + 1), f"{said} {asked[0][1]}", question=asked[0][0])
        else:
            session.replay(frames[s], float(s), float(s + 1), said)
        if s + 1 in (rounds, n_seconds):  # the stream's first chunk, then its last
            chunk = chunk_from_frames(fmt, stream_model.config, spec, vision_cfg, sample, s + 1 - rounds,
                                      frames[s + 1 - rounds:s + 1])
            view = session.cache_view()
            assert [c.token_id for c in view] == chunk.ids_t[:-tail].tolist(), f"second {s}"
            assert np.array_equal(np.array([c.position for c in view]), chunk.positions_t3[:-tail]), f"second {s}"

