"""Commentary outputs, one cue per second: WebVTT and JSON lines.

Both writers flush after every cue, so a run that is killed keeps everything it produced up to the last second.
Both are context managers and accept a path (opened for writing, UTF-8) or an open text file (not closed by them).
"""

import json
import os
from typing import TextIO


def vtt_timestamp(seconds: float) -> str:
    """WebVTT cue time HH:MM:SS.mmm (hours grow past two digits when needed), rounded to the millisecond."""
    if seconds < 0:
        raise ValueError(f"cue time must be >= 0, got {seconds}")
    total_ms = round(seconds * 1000)
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{millis:03d}"


def vtt_escape(text: str) -> str:
    """Cue payload text: &, < and > escaped (this also rules out "-->"), line breaks kept but blank lines removed,
    since a blank line would end the cue."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    lines = [line.strip() for line in escaped.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(line for line in lines if line)


class _CueWriter:
    def __init__(self, target: str | os.PathLike | TextIO):
        if isinstance(target, (str, os.PathLike)):
            self._file = open(target, "w", encoding="utf-8", newline="\n")
            self._owns_file = True
        else:
            self._file = target
            self._owns_file = False

    def _check_times(self, start: float, end: float) -> None:
        if not 0 <= start <= end:
            raise ValueError(f"cue times must satisfy 0 <= start <= end, got {start} -> {end}")

    def close(self) -> None:
        if self._owns_file:
            self._file.close()
        else:
            self._file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class VttWriter(_CueWriter):
    """WebVTT file of commentary cues. Cues whose text is empty after escaping (silent seconds) are skipped: an
    empty cue shows nothing, and JSON lines keep every second."""

    def __init__(self, target: str | os.PathLike | TextIO):
        super().__init__(target)
        self._file.write("WEBVTT\n\n")
        self._file.flush()

    def write(self, start: float, end: float, text: str) -> None:
        self._check_times(start, end)
        payload = vtt_escape(text)
        if not payload:
            return
        self._file.write(f"{vtt_timestamp(start)} --> {vtt_timestamp(end)}\n{payload}\n\n")
        self._file.flush()


class JsonlWriter(_CueWriter):
    """One JSON object per line: {"start": s, "end": s, "text": str}, written for every second, silent ones too."""

    def write(self, start: float, end: float, text: str) -> None:
        self._check_times(start, end)
        record = {"start": float(start), "end": float(end), "text": text}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
