"""Questions to the bundled demo model, answered from what its cache holds, and the synth QA data
that teaches them (experiments/train_demo.py stage 8, experiments/results/demo_qa.json)."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest

from svlm_jax import demo
from svlm_jax.streaming import StreamingSession
from svlm_jax.synth import (QUESTION, DatasetConfig, MatchConfig, RenderConfig, parse_facts, score_answer,
                            scores_by_second, stream_seconds, stream_start, write_dataset)
from svlm_jax.train import data

# Seed 1005: its first goal comes at second 19; at second 31 it is 12 s old, beyond the demo's
# 8 s vision window, so only the text the cache keeps (the commentary's score statements) holds it.
SEED, GOAL, ASKED = 1005, 19, 31


@pytest.mark.xfail(strict=True, reason="the bundled model was never trained on questions (it commentates "
                   "instead: 'Yellow home.'); train_demo's qa stage teaches it but was not adopted, since it cost "
                   "the demo's own accuracy (experiments/results/demo_qa.json)")
def test_the_score_asked_after_the_goal_left_the_vision_window_is_answered_right():
    model, tok = demo.load_model()
    config = demo.match_stream(SEED)
    config = dataclasses.replace(config, policy=dataclasses.replace(config.policy, max_question_tokens=16,
                                                                    max_answer_tokens=24))
    session = StreamingSession(model, tok, config, preprocess=tok.vision_preprocess)
    items = list(itertools.islice(stream_seconds(MatchConfig(SEED), RenderConfig()), ASKED + 1))
    scores = scores_by_second(item.truth for item in items)
    goals = [s for s in range(1, len(scores)) if scores[s] != scores[s - 1]]
    assert goals and goals[-1] == GOAL and ASKED - GOAL > config.policy.vision_window_s, goals
    assert scores[ASKED] != (0, 0)
    # an odd second: no recap is due, so only an answer states the score
    assert not any(fact.score for fact in items[ASKED].truth.facts)
    for item in items:
        question = QUESTION if item.second == ASKED else None
        said = session.step_batch([item.frames], [float(item.second)], [item.second + 1.0], questions=[question])[0]
    stated = [fact.score for fact in parse_facts(said) if fact.score is not None]
    assert stated and all(score == scores[ASKED] for score in stated), (said, scores[ASKED])


def test_score_answer_is_the_commentary_sentence():
    assert score_answer((1, 0)) == "Score one to zero."
    assert parse_facts(score_answer((12, 3)))[0].score == (12, 3)


def test_write_dataset_asks_the_score_only_with_a_qa_rate(tmp_path):
    base = DatasetConfig(streams=1, minutes=1, first_seed=3, clip_seconds=30, start_minute_max=5)
    plain = [json.loads(line) for line in write_dataset(tmp_path / "plain", base).open()]
    asked = [json.loads(line) for line in
             write_dataset(tmp_path / "qa", dataclasses.replace(base, qa_rate=0.2)).open()]
    assert not any("qa_stream" in sample for sample in plain)
    assert [{k: v for k, v in s.items() if k != "qa_stream"} for s in asked] == plain
    entries = [entry for sample in asked for entry in sample.get("qa_stream", [])]
    assert entries, "a fifth of 60 seconds should ask something"
    # the answer: the score after that second (times on the video's timeline, which starts where
    # the stream joins its match), from the match's own commentary
    joined = stream_start(base, 3)
    truths = [item.truth for item in itertools.islice(stream_seconds(base.match(3), render_from=10 ** 6), joined + 60)]
    scores = scores_by_second(truths)
    for time, time_again, question, answer in entries:
        assert time == time_again and question == QUESTION
        assert answer == score_answer(scores[joined + int(time)])
    samples = data.read_samples(tmp_path / "qa" / "samples.jsonl")
    assert sum(len(sample.qa) for sample in samples) == len(entries)
