"""Media I/O: second-by-second video reading (exact frame choice at frame-end sample times, seeking, pipes,
errors) and the subtitle writers.

Test videos are written with PyAV; every frame shows its own index as 8 black/white stripes (bit 7 on the left),
which survives lossy compression, so the frame picked for each sample time can be checked exactly against the
known timestamps: with frames at k / rate, the frame on screen at time s is floor(s * rate).
"""

import io
import json
import math
import os
import pathlib
import random
import re
import subprocess
import sys
import threading
from fractions import Fraction

import av
import numpy as np
import pytest

from svlm_jax.media.subtitles import JsonlWriter, VttWriter
from svlm_jax.media.video import VideoError, VideoReader

WIDTH, HEIGHT, STRIPE = 128, 32, 16


def index_frame(index: int) -> np.ndarray:
    bits = [(index >> (7 - b)) & 1 for b in range(8)]
    row = np.repeat(np.array(bits, np.uint8) * 255, STRIPE)
    return np.tile(row[None, :, None], (HEIGHT, 1, 3))


def read_index(frame_hwc: np.ndarray) -> int:
    stripes = frame_hwc[:, :, 1].reshape(frame_hwc.shape[0], 8, -1).mean(axis=(0, 2)) > 127
    return int(sum(int(bit) << (7 - b) for b, bit in enumerate(stripes)))


def write_video(path, num_frames, rate, codec="libx264", gop=None, options=None, container_options=None):
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate, options=options or {})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(index_frame(index), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def expected_second(k, start, fps, rate, num_frames):
    times = [Fraction(repr(start)) + k + Fraction(j, fps) for j in range(1, fps + 1)]
    return [min(math.floor(t * rate), num_frames - 1) for t in times]


def collect(reader):
    return [(s.t_start, s.t_end, [read_index(f) for f in s.frames_thwc], s.frame_times, s.frames_thwc.shape)
            for s in reader]


def test_index_stripes_round_trip():
    for index in (0, 1, 77, 255):
        assert read_index(index_frame(index)) == index


@pytest.mark.parametrize("rate,fps,num_frames", [(30, 2, 95), (7, 2, 30), (25, 3, 50), (24, 1, 80)])
def test_sampling_at_frame_end_times(tmp_path, rate, fps, num_frames):
    path = write_video(tmp_path / "v.mp4", num_frames, rate)
    with VideoReader(path, fps=fps) as reader:
        seconds = collect(reader)
        duration = Fraction(num_frames, rate)
        assert len(seconds) == math.floor(duration)  # a trailing partial second is not yielded
        for k, (t_start, t_end, indices, times, shape) in enumerate(seconds):
            assert (t_start, t_end) == (k, k + 1)
            assert shape == (fps, HEIGHT, WIDTH, 3)
            assert times == pytest.approx([k + j / fps for j in range(1, fps + 1)])
            assert indices == expected_second(k, 0.0, fps, rate, num_frames), k
        assert reader.end_time == pytest.approx(float(duration))
        assert reader.unused_tail_s == pytest.approx(float(duration - math.floor(duration)))
        assert (reader.width, reader.height) == (WIDTH, HEIGHT)


def test_whole_seconds_use_the_last_frame(tmp_path):
    # 2.0 s at 30 fps: the sample at 2.0 is still covered by frame 59 (shown from 59/30 to 2.0).
    path = write_video(tmp_path / "v.mkv", 60, 30)
    with VideoReader(path) as reader:
        seconds = collect(reader)
        assert [s[2] for s in seconds] == [[15, 30], [45, 59]]
        assert reader.unused_tail_s == 0.0


@pytest.mark.parametrize("start", [2.0, 1.25, 3.5])
def test_start_seeks(tmp_path, start):
    rate, num_frames = 30, 200
    path = write_video(tmp_path / "v.mp4", num_frames, rate, gop=12)
    with VideoReader(path, start=start) as reader:
        seconds = collect(reader)
    assert len(seconds) == math.floor(num_frames / rate - start)
    for k, (t_start, _, indices, times, _) in enumerate(seconds):
        assert t_start == pytest.approx(start + k)
        assert indices == expected_second(k, start, 2, rate, num_frames)


def _pipe_reader(data: bytes):
    read_fd, write_fd = os.pipe()

    def feed():
        with os.fdopen(write_fd, "wb") as pipe:
            for offset in range(0, len(data), 4096):
                pipe.write(data[offset : offset + 4096])

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return os.fdopen(read_fd, "rb"), thread


@pytest.mark.parametrize("container_format,start", [("mpegts", 0.0), ("matroska", 0.0), ("mpegts", 1.5)])
def test_pipe_input(tmp_path, container_format, start):
    """A non-seekable OS pipe, as stdin would be: same seconds as reading the file."""
    rate, num_frames = 25, 110
    suffix = {"mpegts": "ts", "matroska": "mkv"}[container_format]
    path = write_video(tmp_path / f"v.{suffix}", num_frames, rate)
    with VideoReader(path, start=start) as reader:
        from_file = collect(reader)
    pipe, thread = _pipe_reader(path.read_bytes())
    with pipe, VideoReader(pipe, start=start, format=container_format) as reader:
        from_pipe = collect(reader)
    thread.join()
    assert len(from_pipe) == math.floor(num_frames / rate - start) == len(from_file)
    for k, ((_, _, pipe_indices, _, _), (_, _, file_indices, _, _)) in enumerate(zip(from_pipe, from_file)):
        assert pipe_indices == file_indices
    if container_format == "mpegts" and start == 0.0:
        # mpegts timestamps do not start at 0: times are relative to the stream start.
        assert [s[2] for s in from_pipe] == [expected_second(k, 0.0, 2, rate, num_frames) for k in range(4)]


def test_frames_are_decoded_lazily(tmp_path):
    """Reading the first second of a long pipe must not wait for the rest of the input."""
    path = write_video(tmp_path / "v.ts", 250, 25)
    data = path.read_bytes()
    read_fd, write_fd = os.pipe()
    released = threading.Event()

    def feed():
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(data[: len(data) // 2])
            pipe.flush()
            released.wait(timeout=30)
            pipe.write(data[len(data) // 2 :])

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    with os.fdopen(read_fd, "rb") as pipe, VideoReader(pipe, format="mpegts") as reader:
        seconds = iter(reader)
        first = next(seconds)  # would block forever if the whole input were read first
        assert [read_index(f) for f in first.frames_thwc] == [12, 25]
        released.set()
        assert len([first, *seconds]) == 10
    thread.join()


def test_missing_file(tmp_path):
    with pytest.raises(VideoError, match=r"nothing\.mp4: no such file"):
        VideoReader(tmp_path / "nothing.mp4")


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.mp4"
    path.write_bytes(random.Random(0).randbytes(20000))
    with pytest.raises(VideoError, match=r"garbage\.mp4: cannot open"):
        VideoReader(path)


def test_no_video_stream(tmp_path):
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
    with pytest.raises(VideoError, match=r"sound\.wav: no video stream \(streams found: audio\)"):
        VideoReader(path)


def test_unsupported_codec(tmp_path):
    """An mkv whose codec id names no codec FFmpeg can decode."""
    path = write_video(tmp_path / "v.mkv", 30, 30, codec="mpeg4")
    data = path.read_bytes()
    assert data.count(b"V_MPEG4/ISO/ASP") == 1
    path.write_bytes(data.replace(b"V_MPEG4/ISO/ASP", b"V_MPEG4/ISO/XYZ"))
    with pytest.raises(VideoError, match=r"v\.mkv: unsupported video codec"):
        VideoReader(path)


def test_truncated_file_reports_early_end(tmp_path):
    """A faststart mp4 cut in the middle: the seconds before the cut are yielded, then VideoError."""
    rate, num_frames = 30, 300
    path = write_video(tmp_path / "v.mp4", num_frames, rate, container_options={"movflags": "faststart"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    yielded = []
    with pytest.raises(VideoError, match=r"v\.mp4: stream ended early"), VideoReader(path) as reader:
        for second in reader:
            yielded.append([read_index(f) for f in second.frames_thwc])
    assert 1 <= len(yielded) < 10
    assert yielded == [expected_second(k, 0.0, 2, rate, num_frames) for k in range(len(yielded))]


def test_truncated_mpegts_reports_early_end(tmp_path):
    """MPEG-TS declares no duration: a file cut inside a transport packet is reported after the seconds
    before the cut; one cut between packets is a valid shorter stream, and the whole file is fine."""
    rate, num_frames = 25, 250
    data = write_video(tmp_path / "v.ts", num_frames, rate).read_bytes()
    assert len(data) % 188 == 0
    cut = tmp_path / "cut.ts"
    cut.write_bytes(data[: len(data) // 2 + 100])
    yielded = []
    with pytest.raises(VideoError, match=r"cut\.ts: stream ended early at [\d.]+ s: the file stops 100 bytes into "
                                         r"a 188-byte transport stream packet"), VideoReader(cut) as reader:
        for second in reader:
            yielded.append([read_index(f) for f in second.frames_thwc])
    assert 1 <= len(yielded) < 10
    assert yielded == [expected_second(k, 0.0, 2, rate, num_frames) for k in range(len(yielded))]
    cut.write_bytes(data[: len(data) // 2 // 188 * 188])
    with VideoReader(cut) as reader:
        assert 1 <= len(list(reader)) < 10
    with VideoReader(tmp_path / "v.ts") as reader:
        assert len(list(reader)) == 10


def test_bad_arguments(tmp_path):
    path = write_video(tmp_path / "v.mp4", 10, 10)
    with pytest.raises(ValueError, match="fps"):
        VideoReader(path, fps=0)
    with pytest.raises(ValueError, match="start"):
        VideoReader(path, start=-1.0)


def test_stdin_dash(tmp_path):
    """"-" reads standard input (here a file redirected into a child process)."""
    path = write_video(tmp_path / "v.ts", 80, 25)
    repo_root = pathlib.Path(__file__).resolve().parents[1]
    script = (
        "from svlm_jax.media.video import VideoReader\n"
        "with VideoReader('-', format='mpegts') as reader:\n"
        "    print([s.t_start for s in reader])\n"
    )
    with open(path, "rb") as stdin:
        result = subprocess.run(
            [sys.executable, "-c", script], stdin=stdin, capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(repo_root)},
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0.0, 1.0, 2.0]"


# --- subtitles (media outputs) ---------------------------------------------------------------------------------


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    """Minimal WebVTT parser written from the spec: header, then blank-line separated cues."""
    blocks = text.split("\n\n")
    assert blocks[0] == "WEBVTT"
    cues = []
    for block in blocks[1:]:
        if not block.strip():
            continue
        timing, *payload = block.split("\n")
        start, arrow, end = timing.split(" ")
        assert arrow == "-->"

        def seconds(stamp):
            assert re.fullmatch(r"\d{2,}:\d{2}:\d{2}\.\d{3}", stamp), stamp
            h, m, s = stamp.split(":")
            return int(h) * 3600 + int(m) * 60 + float(s)

        body = "\n".join(payload)
        body = body.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
        cues.append((seconds(start), seconds(end), body))
    return cues


def test_vtt_writer_round_trip(tmp_path):
    path = tmp_path / "out.vtt"
    cues = [
        (0.0, 1.0, "Kick-off!"),
        (1.0, 2.0, " ..."),
        (2.0, 3.0, ""),  # silent second: skipped in VTT
        (3.0, 4.0, "a --> b & <c> \u00e9\u4e2d\U0001f600"),
        (4.0, 5.0, "two\n\nlines"),
        (3723.5, 3724.5, "after an hour"),
        (360000.25, 360001.0, "after 100 hours"),
    ]
    with VttWriter(path) as writer:
        for cue in cues:
            writer.write(*cue)
    text = path.read_text(encoding="utf-8")
    assert "00:00:03.000 --> 00:00:04.000\na --&gt; b &amp; &lt;c&gt;" in text
    assert "01:02:03.500 --> 01:02:04.500" in text and "100:00:00.250 --> 100:00:01.000" in text
    parsed = parse_vtt(text)
    expected = [(s, e, t.strip().replace("\n\n", "\n")) for s, e, t in cues if t.strip()]
    assert [x for s, e, _ in parsed for x in (s, e)] == pytest.approx([x for s, e, _ in expected for x in (s, e)])
    assert [t for _, _, t in parsed] == [t for _, _, t in expected]


def test_writers_flush_every_cue(tmp_path):
    """What was written is on disk before close (a killed run keeps it)."""
    with VttWriter(tmp_path / "a.vtt") as vtt, JsonlWriter(tmp_path / "a.jsonl") as jsonl:
        for second in range(3):
            vtt.write(second, second + 1, f"second {second}")
            jsonl.write(second, second + 1, f"second {second}")
            on_disk_vtt = parse_vtt((tmp_path / "a.vtt").read_text(encoding="utf-8"))
            on_disk_jsonl = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
            assert len(on_disk_vtt) == len(on_disk_jsonl) == second + 1
            assert on_disk_vtt[-1][2] == json.loads(on_disk_jsonl[-1])["text"] == f"second {second}"


def test_jsonl_writer_round_trip(tmp_path):
    cues = [(0.0, 1.0, "Goal!"), (1.0, 2.0, ""), (2.0, 3.0, 'quote " and \\ and \n newline \u4e2d')]
    buffer = io.StringIO()
    with JsonlWriter(buffer) as writer:  # an open file is flushed but left open
        for cue in cues:
            writer.write(*cue)
    records = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [(r["start"], r["end"], r["text"]) for r in records] == cues
    with pytest.raises(ValueError):
        JsonlWriter(io.StringIO()).write(2.0, 1.0, "backwards")
