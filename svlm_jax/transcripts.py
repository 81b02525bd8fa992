"""Word-level transcripts: reading and checking them, and turning videos with transcripts into the
SFT samples `svlm train` reads (`svlm data`). `svlm eval` reads reference transcripts with the same
reader.

A transcript is a JSON file in one of two layouts:
  WhisperX   {"segments": [{"words": [{"word": "Goal", "start": 12.31, "end": 12.6}, ...]}, ...]}
             (other keys of the file, its segments and its words are ignored)
  triples    [[12.31, 12.6, "Goal"], ...]
Times are seconds on the video's timeline. The words of a transcript, in file order, must be
timed (WhisperX leaves a word it could not align without times: an error, or dropped with
`drop_untimed`), non-empty, start before they end, lie inside the video, and follow each other
without overlapping. Every problem is reported as a DataError naming the file and the word
(`segments[3].words[5]`, or `[17]` for triples), a JSON syntax error the file's line and column.

Samples (the JSONL format of `svlm_jax.train.data`): a video's stream is its whole seconds, a
word belongs to the second its end time falls in (`Sample.second_of`, the trainer's rule; words
ending in the trailing part of a second the stream does not cover are left out and counted). The
stream is cut into samples of `sample_seconds`: their `previous` is what was said before them,
so a trainer that sees the samples sees what it would for the whole stream. A cut comes only
after the first word: a sample without previous text is a stream's true start to the trainer,
which asks it the query (`stream_format.round_query`). The previous text is cut by the policy's
own `stream_format.truncate_previous` applied to words, the first `text_sink` and last
`text_window` of them: every word is at least one token and a text tokenizes as its words do one
by one, so the trainer's cut to `text_sink` + `text_window` tokens (at most as many as given
here) keeps exactly what it keeps of the whole text, while a sample hours into a stream stays small.

Videos are split into training and validation by video (never a video in both): a seeded
permutation of the videos sorted by name, the first round(validation_fraction * n) of it (at
most n - 1) held out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from svlm_jax.media.video import VideoReader
from svlm_jax.stream_format import truncate_previous
from svlm_jax.train.data import DataError, Sample, _number, _shown, read_samples

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".ts", ".flv", ".mpg", ".mpeg")


class TranscriptError(DataError):
    """A transcript is unusable; the message names the file and the word."""


@dataclasses.dataclass(frozen=True)
class TimedWord:
    start: float
    end: float
    word: str
    where: str  # "segments[3].words[5]" or "[17]": the word's place in its file, for messages


@dataclasses.dataclass(frozen=True)
class Transcript:
    path: Path
    words: tuple[TimedWord, ...]
    untimed: int = 0  # words without times that were dropped

    def triples(self) -> tuple[tuple[float, float, str], ...]:
        return tuple((w.start, w.end, w.word) for w in self.words)


def _raw_words(data, path: Path) -> list[tuple[str, object, object, object]]:
    """(where, start, end, word) of every word of a parsed transcript, values unchecked."""
    if isinstance(data, dict):
        segments = data.get("segments")
        if not isinstance(segments, list):
            raise TranscriptError(f"{path}: a WhisperX transcript needs a list 'segments', got "
                                  f"{_shown(segments) if 'segments' in data else 'none'}")
        out = []
        for i, segment in enumerate(segments):
            words = segment.get("words") if isinstance(segment, dict) else None
            if not isinstance(words, list):
                raise TranscriptError(f"{path}: segments[{i}] needs a list 'words' (WhisperX's aligned output), got "
                                      f"{_shown(segment)}")
            for j, word in enumerate(words):
                where = f"segments[{i}].words[{j}]"
                if not isinstance(word, dict) or "word" not in word:
                    raise TranscriptError(f"{path}: {where} must be an object with 'word', 'start' and 'end', "
                                          f"got {_shown(word)}")
                out.append((where, word.get("start"), word.get("end"), word["word"]))
        return out
    if isinstance(data, list):
        out = []
        for i, entry in enumerate(data):
            if not isinstance(entry, list) or len(entry) != 3:
                raise TranscriptError(f"{path}: [{i}] must be [start, end, word], got {_shown(entry)}")
            out.append((f"[{i}]", *entry))
        return out
    raise TranscriptError(f"{path}: expected a WhisperX object with 'segments' or a list of [start, end, word], "
                          f"got {_shown(data)}")


def read_transcript(path: str | Path, *, drop_untimed: bool = False) -> Transcript:
    """The words of a transcript file, each well-formed and following the one before it (not yet
    checked against a video: `check_inside`)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TranscriptError(f"{path}: cannot read the transcript: {e.strerror or e}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TranscriptError(f"{path}: not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise TranscriptError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    except RecursionError:
        raise TranscriptError(f"{path}: not valid JSON: nested too deeply") from None
    words, untimed = [], 0
    for where, start, end, word in _raw_words(data, path):
        if not isinstance(word, str) or not word.strip():
            raise TranscriptError(f"{path}: {where}: the word must be a non-empty string, got {_shown(word)}")
        if start is None or end is None:
            if drop_untimed:
                untimed += 1
                continue
            raise TranscriptError(f"{path}: {where} ({word!r}) has no start or end time (WhisperX leaves words it "
                                  "could not align untimed); align them, or drop them with --drop-untimed")
        a, b = _number(start), _number(end)
        if a is None or b is None:
            raise TranscriptError(f"{path}: {where} ({word!r}): start and end must be numbers of seconds, got "
                                  f"{_shown(start)} and {_shown(end)}")
        if a < 0 or b < a:
            raise TranscriptError(f"{path}: {where} ({word!r}): needs 0 <= start <= end, got {a} .. {b}")
        if words and a < words[-1].start:
            raise TranscriptError(f"{path}: {where} ({word!r}) is out of time order: it starts at {a} s, before the "
                                  f"word before it ({words[-1].where}, {words[-1].word!r}) at {words[-1].start} s")
        if words and a < words[-1].end:
            raise TranscriptError(f"{path}: {where} ({word!r}) overlaps the word before it: it starts at {a} s, "
                                  f"before {words[-1].where} ({words[-1].word!r}) ends at {words[-1].end} s")
        words.append(TimedWord(a, b, word.strip(), where))
    return Transcript(path, tuple(words), untimed)


def check_inside(transcript: Transcript, duration_s: float, video: Path | str) -> None:
    """TranscriptError unless every word ends within the video's `duration_s`."""
    outside = [w for w in transcript.words if w.end > duration_s]
    if outside:
        w = outside[0]
        more = f" ({len(outside) - 1} more after it)" if len(outside) > 1 else ""
        raise TranscriptError(f"{transcript.path}: {w.where} ({w.word!r}) lies outside its video: it ends at {w.end} s "
                              f"and {video} lasts {duration_s:.3f} s{more}")


def video_duration(path: Path) -> float:
    """Seconds the video lasts: what its container declares, else (no declared duration) where its
    frames end, decoding them."""
    with VideoReader(path) as reader:
        if reader.declared_duration is not None:
            return reader.declared_duration
        for _ in reader:
            pass
        return reader.end_time


# ---- samples --------------------------------------------------------------------------------------

def stream_sample(video: Path | None, transcript: Transcript, n_seconds: int, start: float = 0.0) -> Sample:
    """The `n_seconds` whole seconds of a video from `start`, with the transcript's words that end in
    them, as one trainer Sample (its `second_of` places a word)."""
    whole = Sample(video=video, video_start=start, video_end=start + n_seconds, words=())
    words = tuple(w for w in transcript.triples() if 0 <= whole.second_of(w[1]) < n_seconds)
    return dataclasses.replace(whole, words=words)


def cut_stream(stream: Sample, sample_seconds: int, text_sink: int, text_window: int) -> list[Sample]:
    """The samples of a stream (see the module docstring): cuts every `sample_seconds`, none before
    the first word; each sample's previous text is the words before it, truncated in words."""
    seconds_of = [stream.second_of(end) for _, end, _ in stream.words]
    cuts = [s for s in range(sample_seconds, stream.n_seconds, sample_seconds) if seconds_of and s > seconds_of[0]]
    bounds = list(zip([0, *cuts], [*cuts, stream.n_seconds]))
    samples = []
    for a, b in bounds:
        before = [w for w, k in zip(stream.words, seconds_of) if k < a]
        previous = truncate_previous([word for _, _, word in before], text_sink, text_window)
        samples.append(dataclasses.replace(
            stream, video_start=stream.video_start + a, video_end=stream.video_start + b,
            words=tuple(w for w, k in zip(stream.words, seconds_of) if a <= k < b), previous=" ".join(previous)))
    return samples


def sample_record(sample: Sample, jsonl_dir: Path) -> dict:
    """A sample as a JSONL line of `svlm_jax.train.data` (its video relative to the JSONL's folder)."""
    record = {"video": os.path.relpath(Path(sample.video).resolve(), jsonl_dir.resolve()),
              "video_start": sample.video_start, "video_end": sample.video_end,
              "text_stream": [list(w) for w in sample.words]}
    if sample.previous:
        record["previous"] = sample.previous
    return record


def split_videos(names: Sequence[str], validation_fraction: float, seed: int) -> set[str]:
    """The names held out for validation (see the module docstring)."""
    if not 0 <= validation_fraction < 1:
        raise DataError(f"the validation fraction must lie in [0, 1), got {validation_fraction}")
    ordered = sorted(names)
    n_held = min(int(validation_fraction * len(ordered) + 0.5), max(len(ordered) - 1, 0))
    order = np.random.default_rng(seed).permutation(len(ordered))
    return {ordered[i] for i in order[:n_held]}


def pair_videos(transcripts_dir: Path, videos_dir: Path) -> list[tuple[Path, Path]]:
    """(transcript, video) for every *.json in `transcripts_dir`, its video the file of the same stem
    in `videos_dir` with a video suffix (VIDEO_SUFFIXES)."""
    for flag, folder in (("--transcripts", transcripts_dir), ("--videos", videos_dir)):
        if not folder.is_dir():
            raise DataError(f"{flag} {folder}: no such folder")
    transcripts = sorted(transcripts_dir.glob("*.json"))
    if not transcripts:
        raise DataError(f"--transcripts {transcripts_dir}: no transcript (*.json) in it")
    videos: dict[str, list[Path]] = {}
    for path in sorted(videos_dir.iterdir()):
        if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
            videos.setdefault(path.stem, []).append(path)
    pairs = []
    for transcript in transcripts:
        found = videos.get(transcript.stem, [])
        if not found:
            raise TranscriptError(f"{transcript}: its video is missing: no video named {transcript.stem}.* in "
                                  f"{videos_dir} (suffixes: {' '.join(VIDEO_SUFFIXES)})")
        if len(found) > 1:
            raise TranscriptError(f"{transcript}: more than one video of that name in {videos_dir}: "
                                  f"{', '.join(p.name for p in found)}")
        pairs.append((transcript, found[0]))
    return pairs


@dataclasses.dataclass(frozen=True)
class PreparedVideo:
    name: str
    transcript: Path
    video: Path
    duration_s: float
    samples: tuple[Sample, ...]
    tail_words: int  # words ending after the last whole second, left out
    untimed_words: int

    @property
    def seconds(self) -> int:
        return sum(s.n_seconds for s in self.samples)

    @property
    def words(self) -> int:
        return sum(len(s.words) for s in self.samples)


def prepare_video(transcript_path: Path, video: Path, *, sample_seconds: int, text_sink: int, text_window: int,
                  drop_untimed: bool) -> PreparedVideo:
    transcript = read_transcript(transcript_path, drop_untimed=drop_untimed)
    duration = video_duration(video)
    check_inside(transcript, duration, video)
    n_seconds = math.floor(duration)
    if n_seconds < 1:
        raise DataError(f"{video}: lasts {duration:.3f} s, less than one whole second")
    stream = stream_sample(video, transcript, n_seconds)
    samples = cut_stream(stream, sample_seconds, text_sink, text_window)
    return PreparedVideo(transcript_path.stem, transcript_path, video, duration, tuple(samples),
                         len(transcript.words) - len(stream.words), transcript.untimed)


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    """All lines or none: written beside `path`, then renamed over it."""
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(partial, path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise DataError(f"{path}: cannot write: {e.strerror or e}") from None


def prepare_dataset(transcripts_dir: Path, videos_dir: Path, out_dir: Path, *, sample_seconds: int,
                    validation_fraction: float, seed: int, text_sink: int, text_window: int,
                    drop_untimed: bool) -> dict:
    """`svlm data`: every transcript checked first (nothing is written on a problem), then
    out_dir/train.jsonl, out_dir/validation.jsonl (when a video is held out) and out_dir/data.json
    (settings, and per video its seconds, words, samples and split). Returns data.json's content."""
    if sample_seconds < 1:
        raise DataError(f"the sample length must be at least 1 s, got {sample_seconds}")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} exists and is not a folder")
    pairs = pair_videos(transcripts_dir, videos_dir)
    held_out = split_videos([t.stem for t, _ in pairs], validation_fraction, seed)
    prepared = [prepare_video(t, v, sample_seconds=sample_seconds, text_sink=text_sink, text_window=text_window,
                              drop_untimed=drop_untimed) for t, v in pairs]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out_dir}: cannot create: {e.strerror or e}") from None
    splits = {"train": [p for p in prepared if p.name not in held_out],
              "validation": [p for p in prepared if p.name in held_out]}
    summary = {"settings": {"transcripts": str(transcripts_dir), "videos": str(videos_dir),
                            "sample_seconds": sample_seconds, "validation_fraction": validation_fraction,
                            "seed": seed, "text_sink_words": text_sink, "text_window_words": text_window,
                            "drop_untimed": drop_untimed},
               "splits": {}, "videos": []}
    for split, videos in splits.items():
        path = out_dir / f"{split}.jsonl"
        if not videos:
            path.unlink(missing_ok=True)  # an earlier run's file would mislead
            continue
        write_jsonl(path, [sample_record(s, out_dir) for p in videos for s in p.samples])
        read_samples(path)  # what the trainer will read, read as it reads it
        summary["splits"][split] = {"file": path.name, "videos": len(videos), "samples": sum(len(p.samples) for p in videos),
                                    "seconds": sum(p.seconds for p in videos), "words": sum(p.words for p in videos)}
    for p in prepared:
        summary["videos"].append({"name": p.name, "split": "validation" if p.name in held_out else "train",
                                  "video": str(p.video), "transcript": str(p.transcript),
                                  "duration_s": p.duration_s, "seconds": p.seconds, "words": p.words,
                                  "samples": len(p.samples), "words_after_last_whole_second": p.tail_words,
                                  "untimed_words_dropped": p.untimed_words})
    path = out_dir / "data.json"
    try:
        path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot write: {e.strerror or e}") from None
    return summary
