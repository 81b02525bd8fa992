"""Synthetic match streams as training samples (docs/method.md §5 JSONL + mp4) or in memory.

One mp4 per stream (seed): H.264 (libx264, yuv444p so the team colours keep full resolution; the
demo's video, for people, is yuv420p)
at `fps` frames per second. Frame i (pts i / fps) shows the match at time i / fps from the
stream's start: an opening frame (the first instant) and then every second's frames, so the
frames VideoReader samples for second s (those on screen at s + j / fps, j = 1..fps, docs/method.md
§2) are exactly the frames `render_second` gives for s, which streaming inference sees.

Every stream's `previous` opens with the match's intro (`commentary.match_intro`: which team is
at home), as the demo streams it. A stream may join its match late (`start_minute_max`): its video
then starts at that minute and the commentary before it follows the intro in `previous`, so
training sees the scores of long matches.
Each stream is cut into consecutive clips of `clip_seconds`, one JSONL line each:
  video        path of the mp4, relative to the JSONL file's folder
  video_start  clip start, seconds on the video's timeline
  video_end    clip end (exclusive), same timeline
  text_stream  [start, end, word] for every word whose end falls in [video_start, video_end),
               times on the same timeline (not relative to video_start)
  previous     the match's intro, then all commentary before video_start, as one text
  qa_stream    only with `qa_rate` > 0: [time, time, question, answer] for the seconds of the clip
               asked QUESTION (each second with probability qa_rate, seeded by the stream's seed),
               time the second's start on the video's timeline; the answer is the commentary's own
               score sentence for the score after that second (`score_answer`: "Score one to
               zero."), which `svlm_jax.train.data` appends to that second's commentary
"""

import dataclasses
import json
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from svlm_jax.synth.commentary import Commentator, Fact, SecondTruth, fact_sentence, match_intro
from svlm_jax.synth.render import RenderConfig, render_frame, render_second
from svlm_jax.synth.world import Match, MatchConfig

VIDEO_CODEC = "libx264"
VIDEO_PIXEL_FORMAT = "yuv444p"
# What browsers and common players decode (4:2:0 chroma: both sides even, as RenderConfig's are):
# the demo's video, which a person watches (the model sees the rendered frames themselves).
PLAYABLE_PIXEL_FORMAT = "yuv420p"
QUESTION = "What is the score?"  # the question qa_stream asks


@dataclass(frozen=True)
class StreamSecond:
    second: int
    frames: np.ndarray | None  # (fps, height, width, 3) uint8; None when not rendered
    truth: SecondTruth


@dataclass(frozen=True)
class StreamWindow:
    teams: tuple[str, str]  # (home, away)
    start: int  # first second
    end: int  # one past the last second
    frames: np.ndarray  # ((end - start) * fps, height, width, 3) uint8
    truths: tuple[SecondTruth, ...]  # seconds start .. end - 1
    previous: str  # the match's intro, then all commentary before `start`


@dataclass(frozen=True)
class DatasetConfig:
    streams: int = 8
    minutes: int = 10
    first_seed: int = 0  # stream k uses seed first_seed + k
    clip_seconds: int = 60
    # Stream k starts at a minute of its match drawn uniformly from 0 .. start_minute_max (seeded by
    # its seed), or at the kickoff with probability kickoff_fraction (streams watched from the start,
    # as the demo's, whose first recap has no earlier statement to repeat); its video and clips
    # cover `minutes` from there.
    start_minute_max: int = 0
    kickoff_fraction: float = 0.0
    # The pace of every stream's match (its seed is replaced by the stream's): training data may
    # play livelier than the matches a model is evaluated on, e.g. more goals per minute.
    pace: MatchConfig = field(default_factory=lambda: MatchConfig(seed=0))
    render: RenderConfig = field(default_factory=RenderConfig)
    # Each second of a stream is asked QUESTION with this probability (0: no qa_stream entries, the
    # samples are as without it); the answer is `score_answer` of the score after that second.
    qa_rate: float = 0.0

    def match(self, seed: int) -> MatchConfig:
        return dataclasses.replace(self.pace, seed=seed)


def stream_seconds(match_config: MatchConfig, render_config: RenderConfig = RenderConfig(),
                   render_from: int = 0) -> Iterator[StreamSecond]:
    """Every second of the match from second 0, forever; seconds before `render_from` come
    without frames, which makes fast-forwarding cheap."""
    match = Match(match_config)
    commentator = Commentator(match.teams)
    for record in match:
        truth = commentator.comment(record)
        recap = any(fact.kind == "recap" for fact in truth.facts)
        frames = render_second(record, match.teams, render_config, recap) if record.second >= render_from else None
        yield StreamSecond(record.second, frames, truth)


def stream_window(match_config: MatchConfig, start: int, end: int,
                  render_config: RenderConfig = RenderConfig()) -> StreamWindow:
    """Frames and ground truth for seconds [start, end), without touching files."""
    previous, frames, truths = [], [], []
    for item in stream_seconds(match_config, render_config, render_from=start):
        if item.second >= end:
            break
        if item.frames is None:
            previous.append(item.truth.text)
        else:
            frames.append(item.frames)
            truths.append(item.truth)
    teams = Match(match_config).teams
    return StreamWindow(teams, start, end, np.concatenate(frames), tuple(truths),
                        " ".join(text for text in [match_intro(teams), *previous] if text))


def opening_frame(match_config: MatchConfig, second: int, render_config: RenderConfig = RenderConfig()) -> np.ndarray:
    """The (height, width, 3) frame showing the instant `second` starts: a video's frame 0."""
    match = Match(match_config)
    for record in match:
        if record.second == second:
            return render_frame(record, match.teams, float(second), render_config)


def write_video(path: Path, frames: Iterable[np.ndarray], fps: int, height: int, width: int,
                pix_fmt: str = VIDEO_PIXEL_FORMAT) -> None:
    """Encode (height, width, 3) uint8 RGB frames into an mp4 at `fps`, its index first (faststart: it
    plays while it downloads, and reads from a pipe)."""
    if pix_fmt == PLAYABLE_PIXEL_FORMAT and (height % 2 or width % 2):
        raise ValueError(f"{pix_fmt} needs even frame sides, got {width}x{height}")
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream(VIDEO_CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = {"crf": "10"}  # near-lossless: small flat shapes must survive
        try:
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
        finally:  # the frames given so far, however `frames` ends (Ctrl-C during the demo)
            for packet in stream.encode():
                container.mux(packet)


def _frames_recording_truths(items: Iterable[StreamSecond],
                             truths: list[SecondTruth]) -> Iterator[np.ndarray]:
    """The frames of `items`, appending each second's truth to `truths` on the way (streaming:
    a long video is never held in memory); seconds without frames only add their truth."""
    for item in items:
        truths.append(item.truth)
        if item.frames is not None:
            yield from item.frames


def stream_start(config: DatasetConfig, seed: int) -> int:
    """The match second at which stream `seed` of a dataset starts."""
    rng = np.random.default_rng([seed, 1])
    minute = int(rng.integers(0, config.start_minute_max + 1))
    return 0 if rng.random() < config.kickoff_fraction else 60 * minute


def score_answer(score: tuple[int, int]) -> str:
    """The answer to QUESTION: the commentary's own score sentence ("Score one to zero.")."""
    return fact_sentence(Fact("recap", "", score))


def scores_by_second(truths: Iterable[SecondTruth]) -> list[tuple[int, int]]:
    """For truths from a match's second 0, in order: the score after each second (0-0 before any
    stated score; goals and recaps state it)."""
    score, scores = (0, 0), []
    for truth in truths:
        for fact in truth.facts:
            if fact.score is not None:
                score = fact.score
        scores.append(score)
    return scores


def qa_seconds(config: DatasetConfig, seed: int, seconds: int) -> list[int]:
    """The seconds (from the stream's start) of stream `seed` asked QUESTION."""
    if config.qa_rate <= 0:
        return []
    rng = np.random.default_rng([seed, 2])  # its own stream: the rest of the dataset is unchanged
    return [int(k) for k in np.nonzero(rng.random(seconds) < config.qa_rate)[0]]


def write_dataset(out_dir: Path, config: DatasetConfig) -> Path:
    """Write `config.streams` streams of `config.minutes` minutes; return the JSONL path."""
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    jsonl_path = out_dir / "samples.jsonl"
    seconds = config.minutes * 60
    with jsonl_path.open("w") as jsonl:
        for k in range(config.streams):
            seed = config.first_seed + k
            first = stream_start(config, seed)
            video = Path("videos") / f"stream_{seed:05d}.mp4"
            truths: list[SecondTruth] = []  # from the match's second 0, filled while frames are encoded
            intro = match_intro(Match(config.match(seed)).teams)
            items = islice(stream_seconds(config.match(seed), config.render, render_from=first), first + seconds)
            frames = chain([opening_frame(config.match(seed), first, config.render)],
                           _frames_recording_truths(items, truths))
            write_video(out_dir / video, frames, config.render.fps, config.render.height, config.render.width)
            for start in range(0, seconds, config.clip_seconds):
                end = min(start + config.clip_seconds, seconds)
                sample = {
                    "video": str(video),
                    "video_start": float(start),
                    "video_end": float(end),
                    # Word times move onto the video's timeline (match time - first).
                    "text_stream": [[round(a - first, 3), round(b - first, 3), word]
                                    for truth in truths[first + start:first + end] for a, b, word in truth.words],
                }
                sample["previous"] = " ".join([intro] + [truth.text for truth in truths[:first + start] if truth.words])
                asked = [k for k in qa_seconds(config, seed, seconds) if start <= k < end]
                if asked:
                    scores = scores_by_second(truths[:first + end])
                    sample["qa_stream"] = [[float(k), float(k), QUESTION, score_answer(scores[first + k])]
                                           for k in asked]
                jsonl.write(json.dumps(sample) + "\n")
    return jsonl_path
