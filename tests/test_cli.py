"""The `svlm` command line, end to end on a tiny random checkpoint (tokenizer trained in conftest) and short mp4s.

Frames are 56x56 and given to the model at 56x56 (--min/--max-pixels), and the cache is small, so a second costs
milliseconds once the round step is compiled (once per process; the subprocess runs compile again).
"""

import dataclasses
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import av
import jax
import numpy as np
import pytest

import svlm_jax
from svlm_jax import cli
from svlm_jax.media.subtitles import vtt_escape, vtt_timestamp
from svlm_jax.streaming import SamplingConfig, StreamConfig, StreamingSession


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SIDE = 56
SECONDS = 5
PIXELS = ["--min-pixels", str(SIDE * SIDE), "--max-pixels", str(SIDE * SIDE)]
CACHE = ["--max-new-tokens", "4", "--text-rounds", "3", "--vision-window", "2",
         "--text-sink", "8", "--text-window", "8"]
FAST = ["--dtype", "float32", "--greedy", *PIXELS, *CACHE]


def write_mp4(path, seconds: int, rate: int = 10, **container_options):
    """A moving colour pattern, faststart so that it can also be read from a pipe."""
    with av.open(str(path), "w", options={"movflags": "faststart", **container_options}) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = SIDE, SIDE, "yuv420p"
        y, x = np.mgrid[:SIDE, :SIDE]
        for index in range(seconds * rate):
            frame_hwc = np.stack([(x * 4 + index * 8) % 256, (y * 4) % 256, np.full_like(x, index * 5 % 256)], -1)
            frame = av.VideoFrame.from_ndarray(frame_hwc.astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def model_dir(stream_model, stream_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint")
    svlm_jax.save_pretrained(stream_model, path)
    tokenizer_dir = pathlib.Path(stream_tokenizer.name)  # the directory it was trained into and loaded from
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("video") / "match.mp4", SECONDS)


def stream_args(model_dir, video, *extra):
    return ["stream", "--model", str(model_dir), "--video", str(video), *FAST, *extra]


def parse_vtt(text: str) -> list[tuple[str, str, str]]:
    """(start, end, payload) of each cue; asserts the WebVTT structure."""
    assert text.startswith("WEBVTT\n\n")
    cues = []
    for block in text[len("WEBVTT\n\n"):].split("\n\n"):
        if block:
            timing, payload = block.split("\n", 1)
            match = re.fullmatch(r"(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})", timing)
            assert match, timing
            cues.append((match[1], match[2], payload))
    return cues


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def check_outputs(vtt_path, jsonl_path, first_second: float, n_seconds: int) -> list[dict]:
    """JSONL: one line per second, consecutive; VTT: exactly the non-silent seconds, same times and text."""
    records = read_jsonl(jsonl_path)
    assert [(r["start"], r["end"]) for r in records] == [(first_second + k, first_second + k + 1)
                                                         for k in range(n_seconds)]
    expected_cues = [(vtt_timestamp(r["start"]), vtt_timestamp(r["end"]), vtt_escape(r["text"]))
                     for r in records if vtt_escape(r["text"])]
    assert parse_vtt(pathlib.Path(vtt_path).read_text()) == expected_cues
    return records


def check_one_line_error(stderr: str, message: str):
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("svlm: error: ") and message in last, stderr


def test_stream_writes_one_cue_per_second(model_dir, video, tmp_path, capsys):
    vtt, jsonl = tmp_path / "out.vtt", tmp_path / "out.jsonl"
    assert cli.main(stream_args(model_dir, video, "--vtt", str(vtt), "--jsonl", str(jsonl))) == 0
    records = check_outputs(vtt, jsonl, 0.0, SECONDS)
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"[00:00:0{k}-00:00:0{k + 1}] {' '.join(r['text'].splitlines())}"
                                for k, r in enumerate(records) if r["text"]]
    assert f"svlm: {SECONDS} s of video commentated" in err and "real-time factor" in err


def test_full_scheme_budget_is_settable_and_ends_cleanly(model_dir, video, tmp_path, capsys):
    vtt, jsonl = tmp_path / "out.vtt", tmp_path / "out.jsonl"
    args = stream_args(model_dir, video, "--scheme", "full", "--full-max-s", "2", "--vtt", str(vtt), "--jsonl", str(jsonl))
    assert cli.main(args) == 1
    check_one_line_error(capsys.readouterr().err, "memory budget of 2 s")
    check_outputs(vtt, jsonl, 0.0, 2)  # what was commentated before the budget ran out is kept
    assert cli.main(stream_args(model_dir, video, "--scheme", "full", "--full-max-s", str(SECONDS),
                                "--jsonl", str(jsonl))) == 0
    assert len(read_jsonl(jsonl)) == SECONDS


def test_live_stream_keeps_up_or_drops_the_oldest(model_dir, video, tmp_path, capsys):
    """--live plays the file at its real speed beside the model: every second written is in order
    and the last is never dropped; what was dropped is said (none when the model keeps up)."""
    jsonl = tmp_path / "out.jsonl"
    assert cli.main(stream_args(model_dir, video, "--live", "--max-queue-s", "2", "--jsonl", str(jsonl),
                                "--demuxer-option", "probesize=5000000")) == 0
    starts = [r["start"] for r in read_jsonl(jsonl)]
    assert starts == sorted(set(starts)) and starts[-1] == SECONDS - 1
    err = capsys.readouterr().err
    dropped = SECONDS - len(starts)
    assert (f"svlm: {dropped} s of live video dropped" in err) == (dropped > 0), err


def test_stream_start_and_duration(model_dir, video, tmp_path):
    vtt, jsonl = tmp_path / "out.vtt", tmp_path / "out.jsonl"
    args = stream_args(model_dir, video, "--start", "1", "--duration", "2.5", "--vtt", str(vtt), "--jsonl", str(jsonl))
    assert cli.main(args) == 0
    check_outputs(vtt, jsonl, 1.0, 2)


def test_stream_from_stdin_in_a_real_process(model_dir, video, tmp_path):
    """`--video -` with the mp4 on stdin, as `cat match.mp4 | svlm stream ...`; greedy, so the same text as from
    the file."""
    from_file = tmp_path / "file.jsonl"
    assert cli.main(stream_args(model_dir, video, "--jsonl", str(from_file))) == 0
    from_pipe = tmp_path / "pipe.jsonl"
    with open(video, "rb") as stdin:
        result = subprocess.run(
            [sys.executable, "-m", "svlm_jax.cli", *stream_args(model_dir, "-", "--jsonl", str(from_pipe))],
            stdin=stdin, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert read_jsonl(from_pipe) == read_jsonl(from_file)


def test_bad_input_in_a_real_process(tmp_path, video):
    """The exit code and stderr a shell sees: one line, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "svlm_jax.cli", *stream_args(tmp_path / "missing", video)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 1
    assert result.stderr.strip() == f"svlm: error: checkpoint directory {tmp_path / 'missing'} does not exist"


def garbage_video(tmp_path):
    path = tmp_path / "garbage.mp4"
    path.write_bytes(random.Random(0).randbytes(20000))
    return path


def audio_only(tmp_path):
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
    return path


def unknown_codec(tmp_path):
    """An mkv whose codec id names no codec FFmpeg can decode."""
    path = tmp_path / "v.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = SIDE, SIDE, "yuv420p"
        black = av.VideoFrame.from_ndarray(np.zeros((SIDE, SIDE, 3), np.uint8), format="rgb24")
        for _ in range(10):
            for packet in stream.encode(black):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    path.write_bytes(path.read_bytes().replace(b"V_MPEG4/ISO/ASP", b"V_MPEG4/ISO/XYZ"))
    return path


@pytest.mark.parametrize("case,message", [
    ("missing model", "does not exist"),
    ("corrupt weights", "is corrupt or truncated"),
    ("bad config", "is not valid JSON"),
    ("missing video", "nothing.mp4: no such file"),
    ("garbage video", "garbage.mp4: cannot open as video"),
    ("no video stream", "sound.wav: no video stream (streams found: audio)"),
    ("unsupported codec", "v.mkv: unsupported video codec"),
    ("invalid setting", "invalid sampling settings"),
])
def test_bad_input_is_one_line(case, message, model_dir, video, tmp_path, capsys):
    model, source, extra = model_dir, video, []
    if case == "missing model":
        model = tmp_path / "missing"
    elif case in ("corrupt weights", "bad config"):
        model = tmp_path / "broken"
        shutil.copytree(model_dir, model)
        if case == "corrupt weights":
            (model / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:1000])
        else:
            (model / "config.json").write_text("{ not json")
    elif case == "missing video":
        source = tmp_path / "nothing.mp4"
    elif case == "garbage video":
        source = garbage_video(tmp_path)
    elif case == "no video stream":
        source = audio_only(tmp_path)
    elif case == "unsupported codec":
        source = unknown_codec(tmp_path)
    else:
        extra = ["--top-p", "0"]
    assert cli.main(stream_args(model, source, *extra)) == 1
    check_one_line_error(capsys.readouterr().err, message)


@pytest.mark.parametrize("case,message", [
    ("output is the video", "is the input video"),
    ("one file twice", "--vtt and --jsonl both name"),
    ("missing folder", "the folder"),
    ("output is a folder", "is a folder, not a file"),
    ("top-k above the vocabulary", "above the vocabulary size"),
])
def test_bad_outputs_and_options_are_one_line(case, message, model_dir, video, tmp_path, capsys):
    """Checked before the video is read or any file written: the video is never overwritten."""
    copy = tmp_path / "match.mp4"
    shutil.copy(video, copy)
    extra = {"output is the video": ["--vtt", str(copy)],
             "one file twice": ["--vtt", str(tmp_path / "o.txt"), "--jsonl", str(tmp_path / "o.txt")],
             "missing folder": ["--jsonl", str(tmp_path / "nowhere" / "o.jsonl")],
             "output is a folder": ["--jsonl", str(tmp_path)],
             "top-k above the vocabulary": ["--top-k", "100000000"]}[case]
    assert cli.main(stream_args(model_dir, copy, *extra)) == 1
    check_one_line_error(capsys.readouterr().err, message)
    assert copy.read_bytes() == video.read_bytes()


def test_a_full_disk_is_one_line(model_dir, video, tmp_path, capsys):
    """/dev/full: every write fails with ENOSPC, as on a full file system."""
    vtt = tmp_path / "out.vtt"
    assert cli.main(stream_args(model_dir, video, "--vtt", str(vtt), "--jsonl", "/dev/full")) == 1
    check_one_line_error(capsys.readouterr().err, "--jsonl /dev/full: cannot write: No space left on device")


def test_video_that_ends_early_keeps_earlier_cues(model_dir, tmp_path, capsys):
    video = write_mp4(tmp_path / "cut.mp4", 10)
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    vtt, jsonl = tmp_path / "out.vtt", tmp_path / "out.jsonl"
    assert cli.main(stream_args(model_dir, video, "--vtt", str(vtt), "--jsonl", str(jsonl))) == 1
    n_seconds = len(read_jsonl(jsonl))
    assert 1 <= n_seconds < 10
    check_outputs(vtt, jsonl, 0.0, n_seconds)
    err = capsys.readouterr().err
    check_one_line_error(err, "cut.mp4: stream ended early")
    assert f"svlm: {n_seconds} s of video commentated" in err


def test_ctrl_c_ends_cleanly(model_dir, video, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the third second: files closed with the first two, summary, exit code 130."""
    step, calls = StreamingSession.step, []

    def interrupted_step(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(StreamingSession, "step", interrupted_step)
    vtt, jsonl = tmp_path / "out.vtt", tmp_path / "out.jsonl"
    assert cli.main(stream_args(model_dir, video, "--vtt", str(vtt), "--jsonl", str(jsonl))) == 130
    check_outputs(vtt, jsonl, 0.0, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "svlm: 2 s of video commentated" in err and err.strip().splitlines()[-1] == "svlm: interrupted"


def interrupted_run(argv, marker: str, delay_s: float) -> tuple[int, str, str]:
    """`svlm ARGV` in a real process, sent SIGINT `delay_s` after it prints a line starting with
    `marker` (on stdout or stderr); (exit code, stdout, stderr)."""
    process = subprocess.Popen([sys.executable, "-m", "svlm_jax.cli", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    seen = {"out": [], "err": []}

    def read(name, pipe):
        for line in pipe:
            seen[name].append(line)
    readers = [threading.Thread(target=read, args=(name, pipe)) for name, pipe in
               (("out", process.stdout), ("err", process.stderr))]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 300
    while not any(line.startswith(marker) for line in seen["out"] + seen["err"]):
        assert process.poll() is None and time.monotonic() < deadline, "".join(seen["err"])
        time.sleep(0.02)
    time.sleep(delay_s)
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=300)
    for reader in readers:
        reader.join()
    return code, "".join(seen["out"]), "".join(seen["err"])


@pytest.mark.parametrize("command", ["stream", "demo"])
def test_ctrl_c_during_compilation_never_crashes(command, model_dir, tmp_path):
    """SIGINT while the first second compiles, in a real process: XLA goes on compiling on its own
    threads, and the interpreter's shutdown under them crashed (segfault, abort) in 5 of 6 tries.
    Every try ends with "svlm: interrupted", exit 130, no traceback, the subtitles it opened intact."""
    video = write_mp4(tmp_path / "long.mp4", 60)
    for attempt, delay_s in enumerate((0.0, 0.4, 1.2)):
        out = tmp_path / str(attempt)
        out.mkdir()
        if command == "stream":
            vtt = out / "out.vtt"
            argv, marker = [*stream_args(model_dir, video), "--vtt", str(vtt)], "svlm: compiling"
        else:
            vtt = out / "match_1000.vtt"
            argv, marker = ["demo", "--minutes", "10", "--out", str(out)], "compiling"
        code, _, err = interrupted_run(argv, marker, delay_s)
        assert code == cli.EXIT_INTERRUPTED and "Traceback" not in err, (delay_s, code, err)
        assert err.strip().splitlines()[-1] == "svlm: interrupted", err
        parse_vtt(vtt.read_text())


def test_progress_line(capsys):
    progress = cli.Progress(total_s=4, enabled=True)
    progress.update(1, 0.25)
    progress.clear()
    err = capsys.readouterr().err
    assert f"[{'#' * 8}{'.' * 22}] 1/4 s  real-time factor 0.25" in err and err.endswith("\r\x1b[K")


def test_info_counts_parameters_and_memory(model_dir, stream_tokenizer, capsys):
    model = svlm_jax.load_pretrained(model_dir, dtype="float32")
    n_params = sum(x.size for x in jax.tree.leaves(model.params))
    assert cli.main(["info", str(model_dir), "--dtype", "float32", "--frame-size", f"{SIDE}x{SIDE}", "--streams", "3",
                     *PIXELS, *CACHE]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^parameters +{n_params:,} ", out, re.M)
    assert re.search(rf"^  weights +{cli.human_bytes(n_params * 4)}$", out, re.M)

    # The cache layout info computes is the one a session builds for the same settings.
    args = cli.with_stream_defaults(cli.build_parser().parse_args(stream_args(model_dir, "unused")), model_dir)
    config = StreamConfig(cli.cache_policy(args), sampling=SamplingConfig(temperature=0.0))
    preprocess = cli.stream_preprocess(stream_tokenizer, SIDE * SIDE, SIDE * SIDE)
    session = StreamingSession(model, stream_tokenizer, config, preprocess=preprocess)
    session.step(np.zeros((2, SIDE, SIDE, 3), np.uint8), 0.0, 1.0)
    layout = session.layout
    t = model.config.text
    cache_bytes = 3 * t.num_layers * layout.size * t.num_kv_heads * t.head_dim * 2 * 4
    assert re.search(rf"^  KV cache +{cli.human_bytes(cache_bytes)}: 3 stream\(s\) x {layout.size:,} slots", out, re.M)
    assert re.search(rf"^  total +{cli.human_bytes(n_params * 4 + cache_bytes)} ", out, re.M)


def test_options_override_the_checkpoints_stream_defaults(model_dir, tmp_path):
    """Each stream setting: the option when given, else the checkpoint's stream_config.json, else the
    reference's (StreamDefaults())."""
    from svlm_jax.stream_defaults import FILE_NAME, StreamDefaults

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(model_dir, checkpoint)
    (checkpoint / FILE_NAME).write_text(json.dumps({"policy": {"text_sink": 5, "text_window": 6},
                                                    "min_pixels": 2000, "max_pixels": 4000,
                                                    "previous_text": "Before."}))
    parse = cli.build_parser().parse_args
    args = cli.with_stream_defaults(parse(["stream", "--model", str(checkpoint), "--video", "v.mp4",
                                           "--text-window", "7", "--min-pixels", "1000"]), str(checkpoint))
    reference = StreamDefaults()
    assert args.stream_defaults == StreamDefaults(
        policy=dataclasses.replace(reference.policy, text_sink=5, text_window=7), min_pixels=1000, max_pixels=4000,
        previous_text="Before.")
    assert (args.text_sink, args.text_window, args.fps, args.max_pixels, args.previous_text, args.query) == (
        5, 7, reference.policy.fps, 4000, "Before.", reference.query)
    assert cli.with_stream_defaults(parse(["stream", "--model", str(checkpoint), "--video", "v.mp4",
                                           "--previous-text", ""]), str(checkpoint)).previous_text == ""
    info = cli.with_stream_defaults(parse(["info", str(model_dir)]), str(model_dir))  # no stream_config.json
    assert info.stream_defaults == reference and info.fps == reference.policy.fps


def test_help_imports_nothing_heavy():
    """`svlm --help` and every subcommand's, in a fresh process, import no jax, numpy, PyAV...: so
    they answer at once (experiments/bench_help.py times them; a time limit here would fail on a
    loaded machine)."""
    from experiments.bench_help import HEAVY, help_commands, imported_modules

    for command in help_commands():
        modules = imported_modules(command)
        assert "svlm_jax" in modules and "argparse" in modules, modules  # the import record was read
        assert not modules & set(HEAVY), (command, sorted(modules & set(HEAVY)))


def test_schemes_spelled_out_for_the_parser_are_the_baselines():
    from svlm_jax.streaming import baselines

    assert cli.SCHEMES == ("streaming", *baselines.SCHEMES)


def test_help_and_usage_errors(capsys):
    assert cli.main(["stream", "--help"]) == 0
    assert "example:" in capsys.readouterr().out
    assert cli.main(["info", "--help"]) == 0
    assert "example:" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["stream", "--model", "m"]) == 2  # --video missing
