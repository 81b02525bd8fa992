"""The synthetic never-ending match: determinism, pace, commentary consistency, frames, files, scorer."""

import dataclasses
import itertools
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
    score_consistency,
    stream_seconds,
    stream_start,
    stream_window,
    summarize_scores,
    write_dataset,
)
from svlm_jax.media.video import VideoReader
from svlm_jax.synth.commentary import RECAP_PERIOD_SECONDS, VOCABULARY, number_words, parse_number
from svlm_jax.synth.render import BALL_COLOUR, BAR_COLOUR, EVENT_COLOURS, RECAP_COLOUR, TEAM_COLOURS, pitch_to_pixel
from svlm_jax.synth.world import EVENT_KINDS, HOME

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
    assert 0.3 <= per_minute["goal"] <= 1.5  # the score changes every minute or two
    assert 0.5 <= per_minute["foul"] <= 2.0  # about one foul a minute
    assert per_minute["kickoff"] == pytest.approx(per_minute["goal"], abs=2 / minutes)  # one after each goal


def test_stated_score_matches_the_goals_so_far_and_recaps_come_every_period(hour):
    teams, records, truths, _ = hour
    goals = [0, 0]
    checked = Counter()
    for record, truth in zip(records, truths):
        for event in record.events:
            if event.kind == "goal":
                goals[event.team] += 1
        facts = parse_facts(truth.text)
        for fact in facts:
            # Home first: the words say "Score <home> to <away>"; an event names its team's side.
            assert fact.score == (tuple(goals) if fact.kind in ("goal", "recap") else None), truth.text
            actor = [e.team for e in record.events]
            assert fact.side == ((["home", "away"][actor[0]]) if fact.kind != "recap" else ""), truth.text
            checked[fact.kind] += 1
        # A recap each RECAP_PERIOD_SECONDS from the first period's end, after the second's event,
        # except where a goal states the score anyway.
        s, kinds = record.second, [f.kind for f in facts]
        due = s > 0 and s % RECAP_PERIOD_SECONDS == 0 and "goal" not in kinds
        assert kinds == [e.kind for e in record.events] + (["recap"] if due else []), truth.text
    assert checked["goal"] >= 20 and checked["recap"] >= 300 and checked["foul"] >= 30
    assert "Score" not in truths[0].text and "number" not in " ".join(t.text for t in truths)


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
            assert token in VOCABULARY, word  # numbers in words too
    assert len(VOCABULARY) <= 60


def test_number_words_known_answers_and_strict_parsing(rng):
    known = {0: "zero", 7: "seven", 13: "thirteen", 20: "twenty", 21: "twenty one", 99: "ninety nine",
             100: "one hundred", 105: "one hundred five", 340: "three hundred forty",
             1000: "one thousand", 1305: "one thousand three hundred five",
             2_000_017: "two million seventeen", 3_000_000_000: "three billion"}
    for n, words in known.items():
        assert number_words(n) == words
        assert parse_number(["score", *words.split(), "to"], 1) == (n, 1 + len(words.split()))
    for n in rng.integers(0, 10 ** 12, 200).tolist() + list(range(150)):
        tokens = number_words(n).split()
        assert parse_number(tokens + ["to"], 0) == (n, len(tokens))
    assert parse_number(["42", "to"], 0) == (42, 1)
    for not_a_number in ("one one", "twenty twenty", "hundred", "five twenty", "to"):
        assert parse_number(not_a_number.split(), 0) is None, not_a_number
    with pytest.raises(ValueError):
        number_words(-1)


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
    # A goal: a border in the scorer's colour round the half the ball went in (right for home).
    for goal in [r for r in records if r.events and r.events[0].kind == "goal"][:6]:
        frame, colour = render_second(goal, teams, config)[0], TEAM_COLOURS[teams[goal.events[0].team]]
        scored_in, other = (-1, 0) if goal.events[0].team == HOME else (0, -1)
        assert tuple(frame[config.bar_height, scored_in]) == colour
        assert tuple(frame[config.bar_height, other]) != colour
    # The captions: top bar in the kind's colour, bottom strip in the actor's, both grey when silent;
    # the clock's box RECAP_COLOUR (a colour found nowhere else) in the seconds that restate the score.
    assert set(EVENT_COLOURS) == set(EVENT_KINDS)
    assert len({*EVENT_COLOURS.values(), *TEAM_COLOURS.values(), RECAP_COLOUR, BAR_COLOUR}) == len(EVENT_KINDS) + 8
    seen = set()
    for item in stream_seconds(MatchConfig(seed=3), config):
        if item.second == 600:
            break
        facts = item.truth.facts
        seen.update(f.kind for f in facts)
        recap = any(f.kind == "recap" for f in facts)
        events = [f for f in facts if f.kind != "recap"]
        for frame in item.frames:
            top, bottom = tuple(frame[0, 0]), tuple(frame[-1, 0])
            assert (frame[: config.bar_height] == RECAP_COLOUR).all(-1).any() == recap
            if events:
                assert (top, bottom) == (EVENT_COLOURS[events[0].kind], TEAM_COLOURS[events[0].team])
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
        render_frame(records[60], teams, 59.5, config)


def test_written_dataset_reads_back(tmp_path):
    config = DatasetConfig(streams=2, minutes=1, first_seed=3, clip_seconds=24)
    jsonl = write_dataset(tmp_path, config)
    samples = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(samples) == 2 * 3  # clips of 24, 24, 12 s per stream
    first, second = samples[0], samples[1]
    assert (first["video_start"], first["video_end"], second["video_start"]) == (0.0, 24.0, 24.0)
    home, away = Match(MatchConfig(seed=3)).teams
    intro = f"{home} home, {away} away."
    assert first["previous"] == intro
    assert second["previous"] == " ".join([intro] + [word for _, _, word in first["text_stream"]])
    for sample in samples:
        assert all(sample["video_start"] <= end < sample["video_end"] for _, end, _ in sample["text_stream"])
    with av.open(str(tmp_path / first["video"])) as container:
        assert container.streams.video[0].frames == 60 * config.render.fps + 1  # + the opening frame
    # What training reads (VideoReader, the sampling rule of docs/method.md §2) is what inference streams:
    # second s's frames as render_second draws them, from any start (near-lossless encoding).
    expected = stream_window(MatchConfig(seed=3), 0, 60).frames.astype(int)
    for start in (0, 7, 24):
        with VideoReader(tmp_path / first["video"], fps=config.render.fps, start=start) as reader:
            read = np.concatenate([second.frames_thwc for second in reader]).astype(int)
        assert read.shape == expected[2 * start:].shape
        errors = np.abs(read - expected[2 * start:]).mean(axis=(1, 2, 3))
        assert errors.max() < 1.0, errors.max()


def test_kickoff_fraction_moves_that_share_of_streams_to_the_kickoff():
    late = DatasetConfig(start_minute_max=30)
    mixed = dataclasses.replace(late, kickoff_fraction=0.5)
    seeds = range(400)
    starts = [(stream_start(late, s), stream_start(mixed, s)) for s in seeds]
    moved = [a for a, b in starts if b != a]
    assert all(b in (0, a) for a, b in starts)  # a stream either keeps its minute or starts at 0
    at_kickoff = sum(b == 0 for _, b in starts) / len(seeds)
    assert 0.43 < at_kickoff < 0.6, at_kickoff  # 0.5 + 0.5 / 31 expected; binomial sd 0.025
    assert len(moved) > 150
    assert {stream_start(dataclasses.replace(late, kickoff_fraction=1.0), s) for s in seeds} == {0}


def test_stream_joining_late_carries_the_earlier_match_as_previous(tmp_path):
    # at a livelier pace than MatchConfig's default, which the streams must follow
    lively = dict(goal_probability=0.8, save_probability=0.1, shot_weight=2.0, shooting_range=0.5)
    config = DatasetConfig(streams=3, minutes=1, first_seed=20, clip_seconds=30, start_minute_max=5,
                           pace=MatchConfig(seed=0, **lively))
    starts = [stream_start(config, seed) for seed in (20, 21, 22)]
    assert all(s % 60 == 0 and 0 <= s <= 300 for s in starts) and max(starts) > 0
    samples = [json.loads(line) for line in write_dataset(tmp_path, config).read_text().splitlines()]
    seed, first = max(zip(starts, (20, 21, 22)))[1], max(starts)
    whole = stream_window(MatchConfig(seed=seed, **lively), 0, first + 60)
    default_pace = itertools.islice(stream_seconds(MatchConfig(seed=seed), render_from=first + 60), first + 60)
    assert [t.text for t in whole.truths] != [item.truth.text for item in default_pace]
    late = [s for s in samples if s["video"].endswith(f"{seed:05d}.mp4")]
    assert [(s["video_start"], s["video_end"]) for s in late] == [(0.0, 30.0), (30.0, 60.0)]
    for sample, clip_start in zip(late, (first, first + 30)):
        assert sample["previous"] == " ".join([whole.previous] + [t.text for t in whole.truths[:clip_start] if t.words])
        truths = whole.truths[clip_start:clip_start + 30]
        assert [w for _, _, w in sample["text_stream"]] == [w for t in truths for _, _, w in t.words]
        # on the video's timeline: each word inside its second, counted from the video's start
        assert [int(end) for _, end, _ in sample["text_stream"]] == [
            t.second - first for t in truths for _ in t.words]
    with VideoReader(tmp_path / late[0]["video"], fps=2) as reader:  # as training reads it
        frames = np.concatenate([second.frames_thwc for second in reader])
    assert np.abs(frames.astype(int) - whole.frames[first * 2:]).mean(axis=(1, 2, 3)).max() < 1.0


def test_stream_window_previous_is_the_earlier_commentary():
    whole = stream_window(MatchConfig(seed=4), 0, 50)
    later = stream_window(MatchConfig(seed=4), 30, 50)
    home, away = Match(MatchConfig(seed=4)).teams
    assert whole.previous == f"{home} home, {away} away."
    assert later.previous == " ".join([whole.previous] + [t.text for t in whole.truths[:30] if t.words])
    assert later.truths == whole.truths[30:]
    np.testing.assert_array_equal(later.frames, whole.frames[60:])


def test_scorer_accepts_truth_and_rejects_wrong_teams_and_numbers(hour):
    teams, _, truths, _ = hour
    scores = score_commentary([t.text for t in truths], truths)
    assert all(s.correct for s in scores)
    summary = summarize_scores(scores)
    assert summary["accuracy"] == 1.0 and summary["score_seconds"] > 0

    goal = next(t for t in truths if t.facts and t.facts[0].kind == "goal" and min(t.facts[0].score) > 0)
    home, away = teams
    home_goals, away_goals = goal.facts[0].score
    scorer, other = goal.facts[0].team, (away if goal.facts[0].team == home else home)
    side, other_side = ("home", "away") if scorer == home else ("away", "home")
    said_for = f"Goal for {scorer} {side}!"

    def judge(text):
        return score_commentary([text], [goal])[0]

    assert goal.text.startswith(said_for)
    assert judge(goal.text.upper().replace("!", "").replace(".", " ...")).correct
    assert judge(f"Oh! goal for {scorer} {side}! Score {home_goals} to {away_goals}, what a strike").correct
    assert not judge(goal.text.replace(f"for {scorer}", f"for {other}")).events_correct
    assert not judge(goal.text.replace(f"for {scorer} {side}", f"for {scorer}")).events_correct  # side left out
    assert f"Score {number_words(home_goals)} to {number_words(away_goals)}." in goal.text
    for wrong in [(home_goals + 1, away_goals), (away_goals, home_goals) if home_goals != away_goals else (0, 0)]:
        for wrong_score in (f"{said_for} Score {wrong[0]} to {wrong[1]}.",
                            f"{said_for} Score {number_words(wrong[0])} to {number_words(wrong[1])}."):
            assert judge(wrong_score).events_correct and judge(wrong_score).score_correct is False
    wrong_side = goal.text.replace(f"{scorer} {side}", f"{scorer} {other_side}")
    assert not judge(wrong_side).events_correct and judge(wrong_side).score_correct is False
    assert judge(f"{said_for}").score_correct is False  # the score left out
    assert not judge("...").correct

    silent = next(t for t in truths if not t.facts)
    assert score_commentary([" ..."], [silent])[0].correct
    assert not score_commentary([f"{home} home passes."], [silent])[0].correct
    with pytest.raises(ValueError):
        score_commentary([], [silent])


def test_score_consistency_follows_the_commentary_not_the_truth(hour):
    _, _, truths, _ = hour
    truth_texts = [t.text for t in truths]
    consistent = score_consistency(truth_texts)
    assert [c is not None for c in consistent] == [any(f.score for f in t.facts) for t in truths]
    assert all(c is not False for c in consistent)

    said = ["Red home kick off.", "Score zero to zero.", "Goal for Red home! Score one to zero.",
            "Score one to zero.", "Goal for Blue away! Score one to one.",
            "Goal for Red home! Score one to one.",  # the goal not counted
            "Score one to one.",  # its own miscount carried on: consistent
            "Goal for Blue away! Score two to two.",  # raises the wrong side
            "Red home passes.", "Score two to two.", "Score two to three.",  # a recap that changed
            "Score 2 to 3. Goal for Red home! Score three to three."]
    assert score_consistency(said) == [None, True, True, True, True, False, True, False, None, True, False, True]
    summary = summarize_scores(score_commentary(said, truths[:len(said)]), consistent=score_consistency(said))
    assert summary["stated_score_seconds"] == 10 and summary["score_consistency"] == 0.7
    with pytest.raises(ValueError):
        summarize_scores(score_commentary(said, truths[:len(said)]), consistent=[True])


def test_every_team_mention_repeats_the_intro_side_after_the_name():
    # The intro (the previous text every stream starts from) names each team and its side, as every
    # event's sentence does, so the word after a team's name is always a copy from context.
    lively = MatchConfig(seed=11, goal_probability=0.9, save_probability=0.05, shot_weight=2.0, shooting_range=0.5)
    window = stream_window(lively, 0, 300)
    goals = [f for t in window.truths for f in t.facts if f.kind == "goal"]
    assert {f.side for f in goals} == {"home", "away"}
    home, away = window.teams
    side_after = {home: "home", away: "away"}
    words = window.previous.replace(",", "").replace(".", "").split()
    assert words == [home, "home", away, "away"]
    for truth in window.truths:
        words = truth.text.replace("!", "").replace(".", "").split()
        for i, word in enumerate(words):
            if word in side_after:
                assert words[i + 1] == side_after[word], truth.text
        for fact in truth.facts:
            if fact.kind != "recap":
                assert fact.side == side_after[fact.team] and f"{fact.team} {fact.side}" in truth.text
