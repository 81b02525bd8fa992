"""What a stream is compared with, as one text per second of the evaluated span.

  a transcript  *.json in a layout of `svlm_jax.transcripts` (WhisperX, or [start, end, word]
                triples): a word belongs to the second its end time falls in, the trainer's rule
  a commentary  *.jsonl, one {"start": s, "end": s, "text": ...} per line, as `svlm stream --jsonl`
                and `svlm eval` write a model's commentary: a line belongs to the second its start
                falls in (a second model's commentary, compared with this one)
Times are seconds on the video's timeline; what falls outside the evaluated span is left out.
"""

from __future__ import annotations

import json
from pathlib import Path

from svlm_jax.train.data import DataError, Sample, _number, _shown
from svlm_jax.transcripts import read_transcript

Cue = tuple[float, float, str]  # (start, end, text) of one line of a commentary


def read_commentary(path: str | Path) -> list[Cue]:
    """The lines of a commentary JSONL file; errors name the file and the line."""
    path = Path(path)
    cues = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the commentary: {getattr(e, 'strerror', None) or e}") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); each line must be one "
                            '{"start": s, "end": s, "text": ...}') from None
        if not isinstance(record, dict) or not {"start", "end", "text"} <= set(record):
            raise DataError(f'{where}: expected an object with "start", "end" and "text", got {_shown(record)}')
        start, end, text = _number(record["start"]), _number(record["end"]), record["text"]
        if start is None or end is None or not 0 <= start <= end or not isinstance(text, str):
            raise DataError(f"{where}: needs numbers 0 <= start <= end and a string text, got {_shown(record)}")
        cues.append((start, end, text))
    return cues


Placed = tuple[float, str]  # (the time that places a text in its second, the text)


def read_reference(path: str | Path) -> list[Placed]:
    """The texts of a reference file with the times that place them (see the module docstring)."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return [(start, text.strip()) for start, _, text in read_commentary(path) if text.strip()]
    return [(end, word) for _, end, word in read_transcript(path).triples()]


def reference_by_second(placed: list[Placed], start_s: float, n_seconds: int) -> list[str]:
    """The reference's text of each of the `n_seconds` seconds from `start_s`."""
    span = Sample(video=None, video_start=start_s, video_end=start_s + n_seconds, words=())
    texts: list[list[str]] = [[] for _ in range(n_seconds)]
    for time_s, text in placed:
        if 0 <= (k := span.second_of(time_s)) < n_seconds:
            texts[k].append(text)
    return [" ".join(parts) for parts in texts]
