"""The synth QA data that teaches questions to the demo model (experiments/train_demo.py stage 8,
experiments/results/demo_qa.json)."""

from __future__ import annotations

import dataclasses
import itertools
import json

from svlm_jax.synth import (QUESTION, DatasetConfig, parse_facts, score_answer, scores_by_second, stream_seconds,
                            stream_start, write_dataset)
from svlm_jax.train import data


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
