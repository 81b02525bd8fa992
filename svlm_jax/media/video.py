"""Read a video one second at a time with PyAV: files, URLs, capture devices and pipes (stdin as "-").

Sampling rule (docs/method.md §2 "Frames"): second k covers [start + k, start + k + 1) and gets `fps` frames, taken at
the frame-end times start + k + j/fps for j = 1..fps; the frame taken at a time s is the one on screen at s, i.e.
the latest decoded frame whose timestamp is <= s. Times are seconds relative to the stream's start time (or to the
first frame's timestamp when the stream has none), compared exactly as fractions.

End of input:
- The stream covers up to (last frame timestamp + its duration). A sample time is served if it is at most half a
  frame after that end (timestamps in real files are rounded to the time base).
- A trailing partial second (a file of 10.4 s ends inside second [10, 11)) is not yielded, because a round needs
  all its frames; it is reported in `VideoReader.end_time` and `VideoReader.unused_tail_s`, and logged.
- A stream that stops more than a second before the duration its container declares (a truncated file), or whose
  data cannot be decoded part way, raises VideoError after the complete seconds before it were yielded; those
  seconds stay valid. An MPEG-TS declares no duration: a TS file is truncated when it ends inside a transport
  packet (its size is no whole number of packets), reported the same way. One cut exactly between two packets
  is a valid shorter stream, which nothing in the file tells apart.
"""

import dataclasses
import difflib
import itertools
import logging
import os
import sys
from fractions import Fraction
from typing import BinaryIO, Iterator

import av
import numpy as np

from svlm_jax.stream_format import CachePolicy

logger = logging.getLogger(__name__)
# Transport stream packet sizes FFmpeg reads: plain, M2TS (a 4-byte timecode before the sync byte) and
# with 16 bytes of Reed-Solomon parity; every packet starts with the sync byte 0x47.
TS_PACKET_SIZES = {188: 0, 192: 4, 204: 0}  # size: offset of the sync byte


class VideoError(Exception):
    """A video source could not be opened or read; the message names the source and the problem."""


@dataclasses.dataclass(frozen=True)
class VideoSecond:
    """One second of video: frames_thwc is uint8 [fps, H, W, 3] RGB, the frames on screen at frame_times."""

    t_start: float
    t_end: float
    frames_thwc: np.ndarray
    frame_times: tuple[float, ...]


def _source_name(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return "<stdin>" if str(source) == "-" else str(source)
    return getattr(source, "name", None) or f"<{type(source).__name__}>"


def _is_url(text: str) -> bool:
    return "://" in text


class VideoReader:
    """Iterates over a video source second by second (see the module docstring for the sampling rule).

    source: a path, a URL, "-" for stdin, or a readable binary file object (a pipe works: nothing is read ahead
    beyond what the demuxer needs). format / options are passed to av.open (e.g. format="v4l2" for a capture
    device, or a container format for a pipe whose format cannot be probed). start: seconds to skip (by seeking
    on files, by decoding and dropping on pipes). Use as a context manager or call close().
    """

    def __init__(
        self,
        source: str | os.PathLike | BinaryIO,
        *,
        fps: int = CachePolicy.fps,
        start: float = 0.0,
        format: str | None = None,
        options: dict[str, str] | None = None,
    ):
        if not isinstance(fps, int) or fps < 1:
            raise ValueError(f"fps must be a positive integer, got {fps!r}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.source_name = _source_name(source)
        self.fps = fps
        self.start = Fraction(repr(float(start)))
        self.end_time: float | None = None
        self.unused_tail_s: float = 0.0
        is_path = isinstance(source, (str, os.PathLike)) and str(source) != "-" and not _is_url(str(source))
        if format is not None and format not in av.formats_available:
            close = difflib.get_close_matches(format, sorted(av.formats_available), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else " (`ffmpeg -formats` lists them)"
            raise VideoError(f"{self.source_name}: unknown container format {format!r}{hint}")
        if is_path and format is None and not os.path.exists(source):
            raise VideoError(f"{self.source_name}: no such file")
        if is_path and os.path.isdir(source):
            raise VideoError(f"{self.source_name}: is a directory, not a video file")
        if is_path and os.path.isfile(source) and os.path.getsize(source) == 0:
            raise VideoError(f"{self.source_name}: the file is empty (0 bytes)")
        if isinstance(source, (str, os.PathLike)) and str(source) == "-":
            source = sys.stdin.buffer
        self._path = os.fspath(source) if is_path else None
        self._seekable = is_path or (not isinstance(source, (str, os.PathLike)) and _file_seekable(source))
        try:
            self._container = av.open(source, mode="r", format=format, options=options or {})
        except av.error.FFmpegError as error:
            raise VideoError(f"{self.source_name}: cannot open as video: {error}") from error
        try:
            self._stream = self._open_stream()
        except VideoError:
            self._container.close()
            raise

    def _open_stream(self):
        if not self._container.streams.video:
            kinds = ", ".join(sorted({s.type for s in self._container.streams})) or "none"
            raise VideoError(f"{self.source_name}: no video stream (streams found: {kinds})")
        stream = self._container.streams.video[0]
        if stream.codec_context is None or stream.codec_context.codec is None:
            raise VideoError(f"{self.source_name}: unsupported video codec (no decoder in this FFmpeg build)")
        stream.thread_type = "AUTO"
        return stream

    @property
    def width(self) -> int:
        return self._stream.codec_context.width

    @property
    def height(self) -> int:
        return self._stream.codec_context.height

    @property
    def declared_duration(self) -> float | None:
        """Duration the container declares in seconds, or None (live sources, pipes without headers)."""
        duration = self._declared_duration()
        return None if duration is None else float(duration)

    def _declared_duration(self) -> Fraction | None:
        if self._stream.duration is not None:
            return self._stream.duration * self._stream.time_base
        if self._container.duration is not None:
            return Fraction(self._container.duration, av.time_base)
        return None

    def _frame_rate(self) -> Fraction | None:
        rate = self._stream.average_rate or self._stream.guessed_rate
        return Fraction(rate) if rate else None

    def _timed_frames(self) -> Iterator[tuple[Fraction, Fraction, "av.VideoFrame"]]:
        """Decoded frames as (time relative to the stream origin, duration, frame), all times exact fractions."""
        time_base = self._stream.time_base
        origin_pts = self._stream.start_time
        rate = self._frame_rate()
        previous_time = None
        try:
            if self.start > 0 and self._seekable and origin_pts is not None:
                frames = self._seek_near_start(origin_pts)
            else:
                frames = self._container.decode(self._stream)
            for frame in frames:
                if frame.pts is not None:
                    if origin_pts is None:
                        origin_pts = frame.pts
                    time = (frame.pts - origin_pts) * time_base
                elif previous_time is not None and rate:
                    time = previous_time + 1 / rate
                elif rate:
                    time = Fraction(0)
                else:
                    raise VideoError(f"{self.source_name}: frames carry no timestamps and the frame rate is unknown")
                if frame.duration:
                    duration = frame.duration * time_base
                else:
                    duration = 1 / rate if rate else Fraction(0)
                previous_time = time
                yield time, duration, frame
        except av.error.FFmpegError as error:
            at = "the start" if previous_time is None else f"{float(previous_time):.3f} s"
            raise VideoError(f"{self.source_name}: stream ended early at {at}: {error}") from error

    def _seek_near_start(self, origin_pts: int) -> Iterator["av.VideoFrame"]:
        """Decoded frames from a keyframe at or before `start`. Falls back to decoding from the beginning (the
        frames before `start` are then dropped by the sampler) when the container seeks imprecisely, e.g. MPEG-TS
        landing between keyframes, which would yield broken frames."""
        target = origin_pts + int(self.start / self._stream.time_base)
        try:
            self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
            frames = self._container.decode(self._stream)
            first = next(frames, None)
            if first is not None and first.key_frame and first.pts is not None and first.pts <= target:
                return itertools.chain([first], frames)
        except av.error.FFmpegError:
            pass
        self._container.seek(0, backward=True, any_frame=False)
        return self._container.decode(self._stream)

    def seconds(self) -> Iterator[VideoSecond]:
        """Yields consecutive complete seconds from `start` until the input ends."""
        fps = self.fps
        second_index = 0
        sample_index = 1  # sample j of the current second is at start + second_index + j / fps
        picked_frames: list[np.ndarray] = []
        picked_times: list[float] = []
        shown = None  # the frame on screen at the next sample time
        shown_array = None  # its RGB array, converted once even when picked for several samples
        size = None  # (width, height) of the first frame; later frames are scaled to it so seconds stack

        def sample_time() -> Fraction:
            return self.start + second_index + Fraction(sample_index, fps)

        def take_shown():
            nonlocal shown_array, sample_index, second_index, picked_frames, picked_times
            if shown_array is None:
                shown_array = shown.to_ndarray(format="rgb24", width=size[0], height=size[1])
            picked_frames.append(shown_array)
            picked_times.append(float(sample_time()))
            sample_index += 1
            if sample_index <= fps:
                return None
            t_start = self.start + second_index
            second = VideoSecond(
                t_start=float(t_start),
                t_end=float(t_start + 1),
                frames_thwc=np.stack(picked_frames),
                frame_times=tuple(picked_times),
            )
            second_index += 1
            sample_index = 1
            picked_frames, picked_times = [], []
            return second

        end = None
        half_frame = Fraction(0)
        for time, duration, frame in self._timed_frames():
            if size is None:
                size = (frame.width, frame.height)
            while time > sample_time():
                if shown is None:
                    # Nothing was on screen yet at this sample time: the first frame is the best we have.
                    shown, shown_array = frame, None
                if (second := take_shown()) is not None:
                    yield second
            shown, shown_array = frame, None
            end = time + duration
            half_frame = duration / 2
        if shown is not None:
            while sample_time() <= end + half_frame:
                if (second := take_shown()) is not None:
                    yield second
        self._report_end(end, second_index)

    def _report_end(self, end: Fraction | None, complete_seconds: int) -> None:
        if end is None:
            after = f" after {float(self.start):.3f} s" if self.start > 0 else ""
            raise VideoError(f"{self.source_name}: no decodable video frames{after}")
        self.end_time = float(end)
        self.unused_tail_s = max(0.0, float(end - (self.start + complete_seconds)))
        if (partial := self._partial_ts_packet()) is not None:
            raise VideoError(f"{self.source_name}: stream ended early at {float(end):.3f} s: the file stops "
                             f"{partial[0]} bytes into a {partial[1]}-byte transport stream packet (truncated input)")
        declared = self._declared_duration()
        if declared is not None and end < declared - 1:
            raise VideoError(
                f"{self.source_name}: stream ended early at {float(end):.3f} s of a declared "
                f"{float(declared):.3f} s (truncated or damaged input)"
            )
        if self.unused_tail_s > 0:
            logger.info(
                "%s: input ends at %.3f s; the last %.3f s do not fill a whole second and were not used",
                self.source_name, self.end_time, self.unused_tail_s,
            )

    def _partial_ts_packet(self) -> tuple[int, int] | None:
        """(bytes of the last packet, packet size) when this is an MPEG-TS file ending inside a packet."""
        if self._path is None or "mpegts" not in self._container.format.name.split(","):
            return None
        with open(self._path, "rb") as file:
            head = file.read(3 * max(TS_PACKET_SIZES) + max(TS_PACKET_SIZES.values()))
        size = next((size for size, sync in TS_PACKET_SIZES.items()
                     if len(head) >= sync + 2 * size + 1 and all(head[sync + k * size] == 0x47 for k in range(3))),
                    None)
        tail = None if size is None else os.path.getsize(self._path) % size
        return (tail, size) if tail else None

    __iter__ = seconds

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _file_seekable(file) -> bool:
    seekable = getattr(file, "seekable", None)
    return bool(seekable and seekable())
