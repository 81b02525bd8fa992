"""The synthetic never-ending match: determinism, pace, commentary consistency, frames, files, scorer."""

import json
import time
from collections import Counter

import av
import numpy as np
import pytest

from svlm_jax.synth import (
    Commentator,
    DatasetConfig,
    Match,
    MatchConfig,
    RenderConfig,
    parse_facts,
    render_frame,
    render_second,
    score_commentary,
    stream_seconds,
    stream_start,
    stream_window,
    summarize_scores,
    write_dataset,
)
from svlm_jax.synth.commentary import VOCABULARY
from svlm_jax.synth.render import BALL_COLOUR, BAR_COLOUR, EVENT_COLOURS, RECAP_COLOUR, TEAM_COLOURS, pitch_to_pixel
from svlm_jax.synth.world import EVENT_KINDS

HOUR = 3600


@pytest.fixture(scope="module")
def hour():
    """One simulated hour of world and commentary, with the wall time it took."""
    began = time.perf_counter()
    match = Match(MatchConfig(seed=11))
    commentator = Commentator(match.teams)
    records = [match.step() for _ in range(HOUR)]
    truths = [commentator.comment(record) for record in records]
    return match.teams, records, truths, time.perf_counter() - began


def test_same_seed_same_match():
    a, b = Match(MatchConfig(seed=7)), Match(MatchConfig(seed=7))
    assert a.teams == b.teams
    for _ in range(300):
        ra, rb = a.step(), b.step()
        assert ra.events == rb.events
        for sa, sb in zip(ra.snapshots, rb.snapshots):
            np.testing.assert_array_equal(sa.players, sb.players)
            np.testing.assert_array_equal(sa.ball, sb.ball)
            assert sa.possessor == sb.possessor
    np.testing.assert_array_equal(stream_window(MatchConfig(seed=7), 30, 40).frames,
                                  stream_window(MatchConfig(seed=7), 30, 40).frames)


def test_different_seeds_differ():
    texts = [" ".join(t.text for t in stream_window(MatchConfig(seed), 0, 120).truths) for seed in (1, 2)]
    assert texts[0] != texts[1]


def test_an_hour_simulates_fast_at_the_intended_pace(hour):
    _, records, _, elapsed = hour
    assert elapsed < HOUR / 200, f"an hour took {elapsed:.1f} s"
    minutes = HOUR / 60
    per_minute = {kind: n / minutes for kind, n in Counter(e.kind for r in records for e in r.events).items()}
    silent = sum(not r.events for r in records) / HOUR
    assert all(len(r.events) <= 1 for r in records)
    assert set(per_minute) == set(EVENT_KINDS)
    assert 0.2 <= silent <= 0.4
    assert 0.1 <= per_minute["goal"] <= 0.7  # the score changes every few minutes
    assert 0.5 <= per_minute["foul"] <= 2.0  # about one foul a minute
    assert per_minute["kickoff"] == pytest.approx(per_minute["goal"], abs=2 / minutes)  # one after each goal


def test_stated_score_and_fouls_match_the_events_so_far(hour):
    teams, records, truths, _ = hour
    goals, fouls = Counter(), Counter()
    checked = Counter()
    for record, truth in zip(records, truths):
        for event in record.events:
            if event.kind == "goal":
                goals[teams[event.team]] += 1
            if event.kind == "foul":
                fouls[teams[event.team]] += 1
        for fact in parse_facts(truth.text):
            if fact.kind in ("goal", "recap"):
                assert dict(fact.counts) == {team: goals[team] for team in teams}, truth.text
            if fact.kind == "foul":
                assert dict(fact.counts) == {fact.team: fouls[fact.team]}, truth.text
            checked[fact.kind] += 1
    assert checked["goal"] >= 5 and checked["recap"] >= 40 and checked["foul"] >= 30


def test_words_are_timed_inside_their_second_and_in_order(hour):
    _, _, truths, _ = hour
    last_end = 0.0
    for truth in truths:
        assert parse_facts(truth.text) == truth.facts
        for start, end, word in truth.words:
            assert truth.second < start < end < truth.second + 1
            assert start >= last_end
            last_end = end
            token = word.strip(".,!").lower()
            assert token in VOCABULARY or token.isdigit(), word
    assert len(VOCABULARY) <= 30


def test_frame_shows_ball_possessor_events_and_clock(hour):
    teams, records, _, _ = hour
    config = RenderConfig()
    possessed = [r for r in records[:300] if r.snapshots[2].possessor is not None]
    for record in possessed[:50]:
        frame = render_second(record, teams, config)[-1]
        assert frame.shape == (112, 112, 3) and frame.dtype == np.uint8
        row, col = pitch_to_pixel(record.snapshots[2].ball, config)
        assert tuple(frame[row, col]) == BALL_COLOUR
        team = record.snapshots[2].possessor[0]
        assert tuple(frame[row, col + config.ball_half + 1]) == TEAM_COLOURS[teams[team]]
    goal = next(r for r in records if r.events and r.events[0].kind == "goal")
    pitch_corner = render_second(goal, teams, config)[0][config.bar_height, 0]
    assert tuple(pitch_corner) == TEAM_COLOURS[teams[goal.events[0].team]]
    # The captions: top bar in the kind's colour, bottom strip in the actor's, both grey when silent,
    # the top bar RECAP_COLOUR in the seconds whose commentary restates the score.
    assert set(EVENT_COLOURS) == set(EVENT_KINDS)
    assert len({*EVENT_COLOURS.values(), RECAP_COLOUR, BAR_COLOUR}) == len(EVENT_KINDS) + 2
    seen = set()
    for item in stream_seconds(MatchConfig(seed=3), config):
        if item.second == 600:
            break
        facts = item.truth.facts
        seen.update(f.kind for f in facts)
        for frame in item.frames:
            top, bottom = tuple(frame[0, 0]), tuple(frame[-1, 0])
            if facts and facts[0].kind == "recap":
                assert (top, bottom) == (RECAP_COLOUR, BAR_COLOUR)
            elif facts:
                assert (top, bottom) == (EVENT_COLOURS[facts[0].kind], TEAM_COLOURS[facts[0].team])
            else:
                assert top == bottom == BAR_COLOUR
    assert seen == {*EVENT_KINDS, "recap"}
    # The clock changes each second; frames within a second share it. Times between sub-steps render too.
    bar = config.bar_height
    assert not np.array_equal(render_second(records[59], teams, config)[0][:bar],
                              render_second(records[60], teams, config)[0][:bar])
    fast = render_second(records[60], teams, RenderConfig(height=168, width=168, fps=4))
    assert fast.shape == (4, 168, 168, 3)
    np.testing.assert_array_equal(fast[0][:21], fast[3][:21])
    with pytest.raises(ValueError):
        render_frame(records[60], teams, 60.0, config)


def test_written_dataset_reads_back(tmp_path):
    config = DatasetConfig(streams=2, minutes=1, first_seed=3, clip_seconds=24)
    jsonl = write_dataset(tmp_path, config)
    samples = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(samples) == 2 * 3  # clips of 24, 24, 12 s per stream
    first, second = samples[0], samples[1]
    assert (first["video_start"], first["video_end"], second["video_start"]) == (0.0, 24.0, 24.0)
    assert "previous" not in first
    assert second["previous"] == " ".join(word for _, _, word in first["text_stream"])
    for sample in samples:
        assert all(sample["video_start"] <= end < sample["video_end"] for _, end, _ in sample["text_stream"])
    with av.open(str(tmp_path / first["video"])) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 60 * config.render.fps
    assert frames[0].shape == (112, 112, 3)
    expected = stream_window(MatchConfig(seed=3), 0, 60).frames
    assert np.abs(np.stack(frames).astype(int) - expected).mean() < 1.0  # near-lossless encoding


def test_stream_joining_late_carries_the_earlier_match_as_previous(tmp_path):
    config = DatasetConfig(streams=3, minutes=1, first_seed=20, clip_seconds=30, start_minute_max=5)
    starts = [stream_start(config, seed) for seed in (20, 21, 22)]
    assert all(s % 60 == 0 and 0 <= s <= 300 for s in starts) and max(starts) > 0
    samples = [json.loads(line) for line in write_dataset(tmp_path, config).read_text().splitlines()]
    seed, first = max(zip(starts, (20, 21, 22)))[1], max(starts)
    whole = stream_window(MatchConfig(seed=seed), 0, first + 60)
    late = [s for s in samples if s["video"].endswith(f"{seed:05d}.mp4")]
    assert [(s["video_start"], s["video_end"]) for s in late] == [(0.0, 30.0), (30.0, 60.0)]
    for sample, clip_start in zip(late, (first, first + 30)):
        assert sample["previous"] == " ".join(t.text for t in whole.truths[:clip_start] if t.words)
        truths = whole.truths[clip_start:clip_start + 30]
        assert [w for _, _, w in sample["text_stream"]] == [w for t in truths for _, _, w in t.words]
        # on the video's timeline: each word inside its second, counted from the video's start
        assert [int(end) for _, end, _ in sample["text_stream"]] == [
            t.second - first for t in truths for _ in t.words]
    with av.open(str(tmp_path / late[0]["video"])) as container:
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    assert np.abs(frames.astype(int) - whole.frames[first * 2:]).mean(axis=(1, 2, 3)).max() < 1.0


def test_stream_window_previous_is_the_earlier_commentary():
    whole = stream_window(MatchConfig(seed=4), 0, 50)
    later = stream_window(MatchConfig(seed=4), 30, 50)
    assert later.previous == " ".join(t.text for t in whole.truths[:30] if t.words)
    assert later.truths == whole.truths[30:]
    np.testing.assert_array_equal(later.frames, whole.frames[60:])


def test_scorer_accepts_truth_and_rejects_wrong_teams_and_numbers(hour):
    teams, _, truths, _ = hour
    scores = score_commentary([t.text for t in truths], truths)
    assert all(s.correct for s in scores)
    summary = summarize_scores(scores)
    assert summary["accuracy"] == 1.0 and summary["count_seconds"] > 0

    goal = next(t for t in truths if t.facts and t.facts[0].kind == "goal")
    home, away = teams
    (home_goals,), (away_goals,) = [[n for team, n in goal.facts[0].counts if team == name] for name in teams]
    scorer, other = goal.facts[0].team, (away if goal.facts[0].team == home else home)

    def judge(text):
        return score_commentary([text], [goal])[0]

    assert judge(goal.text.upper().replace("!", "").replace(".", " ...")).correct
    swapped_order = f"goal for {scorer} {away} {away_goals} {home} {home_goals}"
    assert judge(swapped_order).correct
    assert not judge(goal.text.replace(f"for {scorer}", f"for {other}")).events_correct
    wrong_score = f"Goal for {scorer}! {home} {home_goals + 1} {away} {away_goals}."
    assert judge(wrong_score).events_correct and judge(wrong_score).counts_correct is False
    assert not judge("...").correct

    silent = next(t for t in truths if not t.facts)
    assert score_commentary([" ..."], [silent])[0].correct
    assert not score_commentary([f"{home} passes."], [silent])[0].correct
    with pytest.raises(ValueError):
        score_commentary([], [silent])
