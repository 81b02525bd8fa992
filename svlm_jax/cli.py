"""The `svlm` command line: `svlm stream` commentates a video, `svlm serve` serves many live streams,
`svlm info` describes a checkpoint.

Each subcommand is one `Command` (name, help texts, add_arguments, run) in `COMMANDS`; adding a subcommand is
adding one entry. Problems with the user's input (a missing or corrupt checkpoint, an unreadable video, invalid
settings) end with one line `svlm: error: ...` on stderr and exit code 1; Ctrl-C ends with exit code 130.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

from svlm_jax.config import ConfigError, ModelConfig
from svlm_jax.media.live import LiveIntake, paced
from svlm_jax.media.preprocess import VisionPreprocessConfig, smart_resize
from svlm_jax.media.subtitles import JsonlWriter, VttWriter
from svlm_jax.media.video import VideoError, VideoReader
from svlm_jax.model.params import param_leaves
from svlm_jax.serve.scheduler import ServeConfig
from svlm_jax.stream_format import CachePolicy, StreamFormat
from svlm_jax.streaming import baselines
from svlm_jax.streaming.baselines import BaselineSession, CacheFullError
from svlm_jax.streaming.cache import CacheLayout
from svlm_jax.streaming.sampling import SamplingConfig
from svlm_jax.streaming.session import STREAM_PREPROCESS, StreamConfig, StreamingSession
from svlm_jax.tokenizer import Tokenizer
from svlm_jax.train.config import TrainConfigError
from svlm_jax.train.data import DataError
from svlm_jax.weights import CheckpointError, load_pretrained

DEFAULT_STREAM = StreamConfig()
DEFAULT_POLICY = CachePolicy()
SCHEMES = ("streaming", *baselines.SCHEMES)
DEFAULT_FULL_MAX_S = 600
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
LINE_BREAK = re.compile("\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")  # what str.splitlines splits on
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


class CliError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


# Errors that describe bad input rather than a bug: reported as one line.
USER_ERRORS = (CliError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, CheckpointError,
               ConfigError, VideoError, TrainConfigError, DataError, CacheFullError)


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    summary: str        # one line, in `svlm --help`
    description: str    # a paragraph with an example, in `svlm NAME --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------- shared arguments

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def key_value(text: str) -> tuple[str, str]:
    """'rtsp_transport=tcp' -> ('rtsp_transport', 'tcp')."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def frame_size(text: str) -> tuple[int, int]:
    """'1280x720' -> (1280, 720)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1280x720, got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"frame sides must be positive, got {text!r}")
    return width, height


def add_cache_arguments(parser: argparse.ArgumentParser):
    """The cache-size options shared by stream, serve and info; returns their group, for the options
    only some of them have."""
    group = parser.add_argument_group("cache size (what the model keeps in memory while streaming)")
    group.add_argument("--vision-window", type=non_negative_int, default=DEFAULT_POLICY.vision_window_s,
                       metavar="S", help="seconds of video whose frames stay in the cache (default: %(default)s)")
    group.add_argument("--text-rounds", type=positive_int, default=DEFAULT_POLICY.text_rounds, metavar="N",
                       help="most recent seconds kept in full: prompt and commentary (default: %(default)s)")
    group.add_argument("--text-sink", type=non_negative_int, default=DEFAULT_POLICY.text_sink, metavar="T",
                       help="first tokens of earlier commentary kept for ever (default: %(default)s)")
    group.add_argument("--text-window", type=non_negative_int, default=DEFAULT_POLICY.text_window, metavar="T",
                       help="latest tokens of older commentary kept (default: %(default)s)")
    group.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_POLICY.max_new_tokens, metavar="N",
                       help="longest commentary per second, in tokens (default: %(default)s)")
    return group


def add_scheme_arguments(group) -> None:
    """The paper's baselines (stream and info; the server runs the streaming cache only)."""
    group.add_argument("--scheme", choices=SCHEMES, default="streaming",
                       help="attention scheme; the others are the paper's baselines (default: %(default)s)")
    group.add_argument("--full-max-s", type=positive_int, default=DEFAULT_FULL_MAX_S, metavar="S",
                       help="--scheme full: seconds of video its cache holds before it stops (default: %(default)s)")


def add_pixel_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("frame size given to the model (pixels per frame, after resizing)")
    group.add_argument("--min-pixels", type=positive_int, metavar="N",
                       help=f"smallest frame area (default: {STREAM_PREPROCESS.min_pixels} = 100 x 28 x 28)")
    group.add_argument("--max-pixels", type=positive_int, metavar="N",
                       help=f"largest frame area (default: {STREAM_PREPROCESS.max_pixels} = 768 x 28 x 28)")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bfloat16",
                        help="weights and cache number type (default: %(default)s)")


def cache_policy(args: argparse.Namespace) -> CachePolicy:
    """The cache policy of the cache arguments; invalid combinations become a CliError."""
    try:
        return CachePolicy(vision_window_s=args.vision_window, text_rounds=args.text_rounds,
                           text_sink=args.text_sink, text_window=args.text_window,
                           max_new_tokens=args.max_new_tokens, fps=getattr(args, "fps", DEFAULT_POLICY.fps))
    except ValueError as error:
        raise CliError(str(error)) from None


def cache_layout(args: argparse.Namespace, fmt: StreamFormat, model_config: ModelConfig, grid) -> CacheLayout:
    """The cache the chosen scheme builds (the baselines keep whole seconds)."""
    policy = cache_policy(args)
    if args.scheme == "streaming":
        return CacheLayout.for_stream(fmt, policy, model_config, grid)
    rounds = args.full_max_s if args.scheme == "full" else policy.text_rounds
    return CacheLayout.for_stream(fmt, policy, model_config, grid, rounds=rounds, vision_rounds=rounds)


def make_session(args: argparse.Namespace, model, tokenizer, config: StreamConfig, preprocess):
    if args.scheme == "streaming":
        return StreamingSession(model, tokenizer, config, preprocess=preprocess)
    return BaselineSession(model, tokenizer, config, scheme=args.scheme, full_max_s=args.full_max_s,
                           preprocess=preprocess)


def require_checkpoint_dir(model_dir: str) -> None:
    if not Path(model_dir).is_dir():
        raise CliError(f"checkpoint directory {model_dir} does not exist")


def load_tokenizer(model_dir: str) -> Tokenizer:
    try:
        return Tokenizer.from_pretrained(model_dir)
    except FileNotFoundError:
        raise
    except Exception as error:  # the tokenizers library raises bare Exceptions for malformed files
        raise CliError(f"{model_dir}: cannot read the tokenizer: {error}") from None


def stream_preprocess(tokenizer: Tokenizer, min_pixels: int | None, max_pixels: int | None) -> VisionPreprocessConfig:
    """The checkpoint's preprocessing (mean, std, patch sizes) with the streaming pixel bounds, unless overridden."""
    base = tokenizer.vision_preprocess or STREAM_PREPROCESS
    config = dataclasses.replace(base, min_pixels=min_pixels or STREAM_PREPROCESS.min_pixels,
                                 max_pixels=max_pixels or STREAM_PREPROCESS.max_pixels)
    if config.min_pixels > config.max_pixels:
        raise CliError(f"--min-pixels ({config.min_pixels}) is larger than --max-pixels ({config.max_pixels})")
    return config


def clock(seconds: float) -> str:
    """HH:MM:SS, with milliseconds only when the time is not whole."""
    total_ms = round(seconds * 1000)
    whole, millis = divmod(total_ms, 1000)
    hours, rest = divmod(whole, 3600)
    text = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return text if millis == 0 else f"{text}.{millis:03d}"


# ---------------------------------------------------------------- svlm stream

STREAM_DESCRIPTION = """\
Watch a video and commentate it live, one round per second, as StreamingVLM does: every
second the model sees that second's frames and writes a short commentary (or stays silent).
Memory and time per second stay constant however long the video runs. Each commentary is
printed as it is produced; --vtt and --jsonl also save it as subtitles and as JSON lines,
flushed every second, so an interrupted run keeps what it produced. On a terminal, stderr
shows a progress bar and the real-time factor (processing time / video time: below 1 keeps
up with live video). The video can be a file, a URL, or "-" for standard input.

example:
  svlm stream --model ./StreamingVLM --video match.mp4 --vtt match.vtt
  ffmpeg -i rtsp://camera -f mpegts - | svlm stream --model ./StreamingVLM --video - --format mpegts"""


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="checkpoint directory (config.json, safetensors weights, tokenizer.json)")
    parser.add_argument("--video", required=True, metavar="PATH_OR_URL", help='video file, URL, or "-" for stdin')
    parser.add_argument("--format", metavar="FMT",
                        help="container format of the input when it cannot be detected, e.g. mpegts for a pipe")
    parser.add_argument("--demuxer-option", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="an option for the demuxer (FFmpeg's), e.g. rtsp_transport=tcp; repeatable")
    parser.add_argument("--live", action="store_true",
                        help="a live source: read beside the model (a file at its real speed); when the model "
                             "falls behind by --max-queue-s seconds the oldest are dropped")
    parser.add_argument("--max-queue-s", type=positive_int, default=ServeConfig.max_queue_s, metavar="S",
                        help="--live: seconds waiting for the model before the oldest is dropped (default: %(default)s)")
    parser.add_argument("--start", type=non_negative_float, default=0.0, metavar="S",
                        help="skip the first S seconds of the video (default: %(default)s)")
    parser.add_argument("--duration", type=non_negative_float, metavar="D",
                        help="commentate at most D seconds (default: until the video ends)")
    parser.add_argument("--fps", type=positive_int, default=DEFAULT_POLICY.fps,
                        help="frames per second given to the model, a multiple of 2 (default: %(default)s, the rate "
                             "the model was trained on)")
    parser.add_argument("--query", default=DEFAULT_STREAM.query,
                        help="instruction given with the first second, unless the stream continues from "
                             "--previous-text (default: %(default)r)")
    parser.add_argument("--previous-text", default="", metavar="TEXT",
                        help="context the commentary continues from, e.g. the story so far of the match; the "
                             "stream continues one that began before, so it gets no --query (as in training)")
    parser.add_argument("--vtt", metavar="OUT.vtt", help="also write the commentary as WebVTT subtitles")
    parser.add_argument("--jsonl", metavar="OUT.jsonl",
                        help='also write one JSON line per second: {"start": s, "end": s, "text": ...}')
    add_scheme_arguments(add_model_arguments(parser))


def add_model_arguments(parser: argparse.ArgumentParser):
    """Number type, cache, positions, sampling and frame size: what stream and serve share; returns
    the cache group."""
    add_dtype_argument(parser)
    cache = add_cache_arguments(parser)
    cache.add_argument(
        "--pos-mode", choices=("contiguous", "native"), default=DEFAULT_STREAM.pos_mode,
        help="contiguous re-indexes positions so they stay bounded; native lets them grow (default: %(default)s)")
    sampling = parser.add_argument_group(
        "sampling (how the next word is chosen; unset options take the checkpoint's generation_config.json, "
        "greedy without one)")
    sampling.add_argument("--temperature", type=non_negative_float,
                          help="higher is more varied, 0 is greedy")
    sampling.add_argument("--top-k", type=non_negative_int, help="sample among the k likeliest tokens; 0 keeps all")
    sampling.add_argument("--top-p", type=float, help="sample among the likeliest tokens holding this probability mass")
    sampling.add_argument("--repetition-penalty", type=float,
                          help="discourages repeating tokens already in the context; 1 disables")
    sampling.add_argument("--greedy", action="store_true", help="always take the likeliest token (temperature 0)")
    sampling.add_argument("--seed", type=int, default=DEFAULT_STREAM.seed, help="random seed (default: %(default)s)")
    add_pixel_arguments(parser)
    return cache


class Progress:
    """One status line on stderr, redrawn in place: a bar when the length is known, the real-time factor."""

    WIDTH = 30

    def __init__(self, total_s: int | None, enabled: bool):
        self.total_s, self.enabled = total_s, enabled
        self.shown = False

    def update(self, done_s: int, real_time_factor: float | None, intake: LiveIntake | None = None) -> None:
        if not self.enabled:
            return
        if self.total_s:
            fraction = min(1.0, done_s / self.total_s)
            filled = round(fraction * self.WIDTH)
            line = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done_s}/{self.total_s} s"
        else:
            line = f"{done_s} s"
        if real_time_factor is not None:
            line += f"  real-time factor {real_time_factor:.2f}"
        if intake is not None:
            line += f"  lag {intake.lag_s} s, dropped {intake.dropped_s} s"
        sys.stderr.write(f"\r\x1b[K{line}")
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        """Erases the line so ordinary output does not mix with it (it is redrawn on the next update)."""
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


class StreamTimes:
    """Wall time of each processed second of video (reading, preprocessing and the model step)."""

    def __init__(self):
        self.seconds: list[float] = []

    def real_time_factor(self) -> float | None:
        """Processing time / video time, leaving out the first second, which includes compilation."""
        steady = self.seconds[1:] or self.seconds
        return sum(steady) / len(steady) if steady else None

    def summary(self) -> str:
        if not self.seconds:
            return "svlm: no second of video was commentated"
        return (f"svlm: {len(self.seconds)} s of video commentated in {sum(self.seconds):.1f} s, the first second "
                f"(with compilation) in {self.seconds[0]:.1f} s; real-time factor {self.real_time_factor():.2f}")


def check_output_paths(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(flag, path) of the outputs asked for, checked before anything is read or written: not the
    input video, not the same file twice, a file in an existing writable folder."""
    outputs, seen = [], {}
    video = Path(args.video).resolve() if args.video != "-" and Path(args.video).exists() else None
    for flag, path in (("--vtt", args.vtt), ("--jsonl", args.jsonl)):
        if not path:
            continue
        path = Path(path)
        if path.resolve() == video:
            raise CliError(f"{flag} {path} is the input video; write the output to another file")
        if path.resolve() in seen:
            raise CliError(f"{seen[path.resolve()]} and {flag} both name {path}; give each its own file")
        if path.is_dir():
            raise CliError(f"{flag} {path} is a folder, not a file")
        folder = path.parent
        if not folder.is_dir():
            raise CliError(f"{flag} {path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise CliError(f"{flag} {path}: cannot write there")
        seen[path.resolve()] = flag
        outputs.append((flag, path))
    return outputs


class OutputWriter:
    """A subtitle or JSON-lines writer whose write failures (a full disk) name its file as a CliError;
    every earlier second stays in the file, flushed."""

    def __init__(self, flag: str, path: Path):
        self.label = f"{flag} {path}"
        try:
            self.writer = (VttWriter if flag == "--vtt" else JsonlWriter)(path)
        except OSError as error:
            raise CliError(f"{self.label}: cannot write: {error.strerror or error}") from None

    def write(self, t_start: float, t_end: float, text: str) -> None:
        try:
            self.writer.write(t_start, t_end, text)
        except OSError as error:
            raise CliError(f"{self.label}: cannot write: {error.strerror or error}") from None

    def close(self) -> None:
        try:
            self.writer.close()
        except OSError as error:
            raise CliError(f"{self.label}: cannot write: {error.strerror or error}") from None


def run_stream(args: argparse.Namespace) -> int:
    policy = cache_policy(args)
    outputs = check_output_paths(args)
    # Opened before the (slow) model load, so a wrong path or an unreadable video fails at once.
    with VideoReader(args.video, fps=policy.fps, start=args.start, format=args.format,
                     options=dict(args.demuxer_option)) as reader:
        require_checkpoint_dir(args.model)
        tokenizer = load_tokenizer(args.model)
        preprocess = stream_preprocess(tokenizer, args.min_pixels, args.max_pixels)
        if args.fps % preprocess.temporal_patch_size:
            raise CliError(f"--fps must be a multiple of the model's temporal patch size "
                           f"({preprocess.temporal_patch_size}), got {args.fps}")
        config = StreamConfig(policy=policy, sampling=sampling_config(args, tokenizer), pos_mode=args.pos_mode,
                              previous_text=args.previous_text, query=args.query, seed=args.seed)
        model = load_pretrained(args.model, dtype=args.dtype)
        try:
            session = make_session(args, model, tokenizer, config, preprocess)
        except ValueError as error:
            raise CliError(str(error)) from None
        with contextlib.ExitStack() as opened:
            writers = []
            for flag, path in outputs:
                writers.append(OutputWriter(flag, path))
                opened.callback(writers[-1].close)
            if not args.live:
                commentate(reader, session, writers, args.duration)
                return 0
            with LiveIntake(paced(reader), args.max_queue_s) as intake:
                commentate(reader, session, writers, args.duration, intake)
    return 0


def sampling_config(args: argparse.Namespace, tokenizer: Tokenizer) -> SamplingConfig:
    """The sampling options given, the others from the checkpoint's generation_config.json."""
    given = {"temperature": 0.0 if args.greedy else args.temperature, "top_k": args.top_k, "top_p": args.top_p,
             "repetition_penalty": args.repetition_penalty}
    try:
        return dataclasses.replace(SamplingConfig.from_generation(tokenizer.generation),
                                   **{k: v for k, v in given.items() if v is not None})
    except ValueError as error:
        raise CliError(str(error)) from None


class LivePrinter:
    """Prints each second's commentary on one line as it is decoded, "[start-end]" before it; line
    breaks become spaces and whitespace at either end is left out (the line is the stripped text)."""

    def __init__(self, progress: "Progress"):
        self.progress, self.label, self.open, self.pending = progress, "", False, ""

    def begin(self, t_start: float, t_end: float) -> None:
        self.label, self.open, self.pending = f"[{clock(t_start)}-{clock(t_end)}]", False, ""

    def piece(self, text: str) -> None:
        text = self.pending + LINE_BREAK.sub(" ", text)
        body = text.rstrip()
        self.pending = text[len(body):]  # printed only if more text follows
        if not self.open:
            body = body.lstrip()
            if not body:
                self.pending = ""
                return
            self.progress.clear()
            sys.stdout.write(f"{self.label} ")
            self.open = True
        sys.stdout.write(body)
        sys.stdout.flush()

    def end(self) -> None:
        if self.open:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.open = False


def commentate(reader: VideoReader, session, writers, duration_s: float | None,
               intake: LiveIntake | None = None) -> None:
    """The stream loop: one second in (from `intake` for a live source), its commentary out (stdout and
    writers). The summary is printed however the loop ends: end of input, a video error, or Ctrl-C."""
    limit = None if duration_s is None else math.floor(duration_s)
    declared = reader.declared_duration
    total_s = None if declared is None else max(0, math.floor(declared - float(reader.start)))
    if limit is not None:
        total_s = limit if total_s is None else min(total_s, limit)
    progress = Progress(total_s, enabled=sys.stderr.isatty())
    printer = LivePrinter(progress)
    times = StreamTimes()
    seconds = itertools.islice(iter(intake if intake is not None else reader), limit)
    progress.update(0, None)  # shows the bar during the first second, which compiles
    try:
        while True:
            began = time.perf_counter()
            second = next(seconds, None)
            if second is None:
                break
            if intake is not None:  # waiting for a live source is not processing time
                began = time.perf_counter()
            printer.begin(second.t_start, second.t_end)
            text = session.step(second.frames_thwc, second.t_start, second.t_end, on_text=printer.piece)
            printer.end()
            for writer in writers:
                writer.write(second.t_start, second.t_end, text)
            times.seconds.append(time.perf_counter() - began)
            progress.update(len(times.seconds), times.real_time_factor(), intake)
    finally:
        printer.end()
        progress.clear()
        print(times.summary(), file=sys.stderr)
        if intake is not None and intake.dropped_s:
            print(f"svlm: {intake.dropped_s} s of live video dropped while the model was behind", file=sys.stderr)


# ---------------------------------------------------------------- svlm info

INFO_DESCRIPTION = """\
Describe a checkpoint without loading its weights: the architecture from config.json, the
number of parameters, and how much accelerator memory streaming needs: the weights at --dtype
plus the KV cache for the chosen cache size, frame size and number of streams (activations
not included). The cache size needs the checkpoint's tokenizer.json (prompt lengths).

example:
  svlm info ./StreamingVLM
  svlm info ./StreamingVLM --frame-size 640x360 --streams 8 --vision-window 8"""


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR", help="checkpoint directory (config.json; tokenizer.json for the cache)")
    parser.add_argument("--frame-size", type=frame_size, default=(1280, 720), metavar="WxH",
                        help="size of the input video frames (default: 1280x720)")
    parser.add_argument("--streams", type=positive_int, default=1, metavar="N",
                        help="streams served at once, one cache each (default: %(default)s)")
    add_dtype_argument(parser)
    add_scheme_arguments(add_cache_arguments(parser))
    add_pixel_arguments(parser)


def stream_grid(preprocess: VisionPreprocessConfig, width: int, height: int, fps: int) -> tuple[int, int, int]:
    """(grid_t, grid_h, grid_w) of one second of frames of this size at `fps`, in 14 px patches."""
    try:
        resized_h, resized_w = smart_resize(height, width, factor=preprocess.resize_factor,
                                            min_pixels=preprocess.min_pixels, max_pixels=preprocess.max_pixels)
    except ValueError as error:  # an extreme aspect ratio
        raise CliError(str(error)) from None
    return (fps // preprocess.temporal_patch_size, resized_h // preprocess.patch_size,
            resized_w // preprocess.patch_size)


def human_bytes(n_bytes: int) -> str:
    """1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes} B" if unit == "B" else f"{n_bytes:.2f} {unit}"
        n_bytes /= 1024


def run_info(args: argparse.Namespace) -> int:
    require_checkpoint_dir(args.model)
    model_config = ModelConfig.from_file(args.model)
    leaves = param_leaves(model_config)
    n_params = sum(math.prod(shape) for _, shape in leaves)
    n_vision = sum(math.prod(shape) for path, shape in leaves if path.startswith("vision."))
    t, v = model_config.text, model_config.vision
    dtype_bytes = DTYPE_BYTES[args.dtype]
    weight_bytes = n_params * dtype_bytes
    print(f"checkpoint      {args.model}")
    print(f"model type      {model_config.model_type}")
    print(f"language model  {t.num_layers} layers, hidden {t.hidden_size}, {t.num_heads} heads "
          f"({t.num_kv_heads} key/value heads, head dim {t.head_dim}), MLP {t.intermediate_size}, "
          f"vocab {t.vocab_size}, {'tied' if t.tie_word_embeddings else 'untied'} embeddings")
    print(f"vision tower    {v.depth} blocks, hidden {v.hidden_size}, {v.num_heads} heads, MLP {v.intermediate_size}, "
          f"{v.patch_size} px patches merged {v.spatial_merge_size}x{v.spatial_merge_size}")
    print(f"parameters      {n_params:,} (vision {n_vision:,}, language {n_params - n_vision:,})")
    print(f"memory at {args.dtype}")
    print(f"  weights       {human_bytes(weight_bytes)}")
    if not (Path(args.model) / "tokenizer.json").is_file():
        print(f"  KV cache      unknown: {args.model} has no tokenizer.json to measure the prompt with")
        return 0
    tokenizer = load_tokenizer(args.model)
    preprocess = stream_preprocess(tokenizer, args.min_pixels, args.max_pixels)
    width, height = args.frame_size
    grid = stream_grid(preprocess, width, height, DEFAULT_POLICY.fps)
    layout = cache_layout(args, StreamFormat.from_tokenizer(tokenizer), model_config, grid)
    # Keys and values of every layer, slot and key/value head, per stream.
    cache_bytes = t.num_layers * layout.size * t.num_kv_heads * t.head_dim * 2 * dtype_bytes * args.streams
    print(f"  KV cache      {human_bytes(cache_bytes)}: {args.streams} stream(s) x {layout.size:,} slots "
          f"({width}x{height} frames -> {grid[2] * preprocess.patch_size}x{grid[1] * preprocess.patch_size}, "
          f"{layout.slots.cap('vision')} vision tokens per second)")
    print(f"  total         {human_bytes(weight_bytes + cache_bytes)} (activations not included)")
    return 0


# ---------------------------------------------------------------- train and export

TRAIN_DESCRIPTION = """\
Fine-tune with overlapped-chunk SFT (docs/method.md §5) as a config file describes (see
experiments/configs/sft_tiny.toml; every field is documented in svlm_jax/train/config.py).
A run resumes from its latest checkpoint; Ctrl-C saves one and stops.

example:
  svlm train --config experiments/configs/sft_tiny.toml"""

EXPORT_DESCRIPTION = """\
Write a training run's checkpoint (the latest unless --step) as a HuggingFace model directory:
config.json, safetensors and tokenizer files, loadable by transformers and `svlm stream`.

example:
  svlm export runs/synth_sft exported_model"""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run's config file (TOML)")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop after this many updates in this invocation (default: the config's)")


def run_train(args: argparse.Namespace) -> int:
    from svlm_jax.train.run import main_train

    main_train(args.config, max_steps=args.max_steps)
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the training run's directory (its config's out_dir)")
    parser.add_argument("out_dir", help="where the HF model directory is written")
    parser.add_argument("--step", type=non_negative_int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default=None,
                        help="convert the weights (default: the run's master dtype)")


def run_export(args: argparse.Namespace) -> int:
    from svlm_jax.train.run import main_export

    step = main_export(args.run_dir, args.out_dir, step=args.step, dtype=args.dtype)
    print(f"exported step {step} to {args.out_dir}")
    return 0


# ---------------------------------------------------------------- svlm demo

DEMO_DESCRIPTION = """\
Watch the bundled tiny StreamingVLM commentate a synthetic football match it has never seen,
one second at a time, on the CPU: each second's commentary is printed beside the ground truth
with a running accuracy, and the match is saved as an mp4 with the commentary as WebVTT
subtitles beside it. The score is never drawn on the pitch: the model can only state it (every
few seconds, home first) by remembering its own earlier commentary.

example:
  svlm demo
  svlm demo --minutes 5 --seed 2024 --out demo_out"""


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from svlm_jax.demo import DEMO_SEED

    parser.add_argument("--seed", type=non_negative_int, default=DEMO_SEED,
                        help="which match to play (default: %(default)s, never seen in training)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=positive_int, default=1, help="length of the match (default: %(default)s)")
    length.add_argument("--seconds", type=positive_int, help="length of the match in seconds, instead of --minutes")
    parser.add_argument("--out", default="svlm_demo", metavar="DIR",
                        help="folder for the match video and its subtitles (default: %(default)s)")


def run_demo(args: argparse.Namespace) -> int:
    from svlm_jax.demo import run

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CliError(f"--out {args.out} exists and is not a folder")
    run(args.seed, args.seconds or 60 * args.minutes, Path(args.out))
    return 0


# ---------------------------------------------------------------- svlm serve

SERVE_DESCRIPTION = """\
Serve live commentary to many clients at once: one engine batch of --max-streams rows, compiled
at start-up; each WebSocket client takes a row while it is connected. A browser viewer is at
http://HOST:PORT/ (a video file or the webcam), GET /health describes the server, and the
protocol of the WebSocket /v1/stream is in docs/serve.md. Frames are resized to --frame-size.
Ctrl-C stops the server.

example:
  svlm serve --model ./StreamingVLM --max-streams 8 --frame-size 640x360"""


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="checkpoint directory (config.json, safetensors weights, tokenizer.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--max-streams", type=positive_int, default=ServeConfig.max_streams, metavar="B",
                        help="streams served at once: the engine's batch (default: %(default)s)")
    parser.add_argument("--frame-size", type=frame_size, default=ServeConfig.frame_size, metavar="WxH",
                        help="every frame is resized to this size (default: %dx%d)" % ServeConfig.frame_size)
    parser.add_argument("--max-queue-s", type=positive_int, default=ServeConfig.max_queue_s, metavar="S",
                        help="whole seconds a live stream may queue before its oldest is dropped "
                             "(default: %(default)s)")
    parser.add_argument("--max-message-bytes", type=positive_int, default=ServeConfig.max_message_bytes,
                        metavar="N", help="largest client message (default: %(default)s)")
    parser.add_argument("--query", default=DEFAULT_STREAM.query,
                        help="instruction given with a stream's first second unless its start message sets "
                             "one or gives previous text (default: %(default)r)")
    cache = add_model_arguments(parser)
    cache.add_argument("--max-question-tokens", type=non_negative_int, default=64, metavar="N",
                       help="longest question a client may ask (default: %(default)s)")
    cache.add_argument("--max-answer-tokens", type=non_negative_int, default=64, metavar="N",
                       help="longest answer to a question, in tokens (default: %(default)s)")


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn  # the server's stack is loaded only to serve

    from svlm_jax.serve.app import create_app
    from svlm_jax.serve.scheduler import Server

    try:
        serve_config = ServeConfig(max_streams=args.max_streams, frame_size=args.frame_size,
                                   max_queue_s=args.max_queue_s, max_message_bytes=args.max_message_bytes)
        policy = dataclasses.replace(cache_policy(args), max_question_tokens=args.max_question_tokens,
                                     max_answer_tokens=args.max_answer_tokens)
    except ValueError as error:
        raise CliError(str(error)) from None
    require_checkpoint_dir(args.model)
    tokenizer = load_tokenizer(args.model)
    preprocess = stream_preprocess(tokenizer, args.min_pixels, args.max_pixels)
    config = StreamConfig(policy=policy, sampling=sampling_config(args, tokenizer), pos_mode=args.pos_mode,
                          query=args.query, seed=args.seed)
    model = load_pretrained(args.model, dtype=args.dtype)
    try:
        session = StreamingSession(model, tokenizer, config, batch=args.max_streams, preprocess=preprocess)
    except ValueError as error:
        raise CliError(str(error)) from None
    server = Server(session, serve_config, model_name=Path(args.model).resolve().name)
    print(f"svlm: compiling for {args.max_streams} streams of {args.frame_size[0]}x{args.frame_size[1]} frames",
          file=sys.stderr, flush=True)
    server.start()
    try:
        # uvicorn closes a connection whose message is over ws_max_size; above our own limit, so
        # that a message a little too large gets an error message instead.
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning",
                    ws_max_size=4 * serve_config.max_message_bytes)
    finally:
        server.close()
    return 0


# ---------------------------------------------------------------- the parser

COMMANDS = (
    Command("stream", "commentate a video, one round per second", STREAM_DESCRIPTION, add_stream_arguments,
            run_stream),
    Command("serve", "serve live commentary to many clients over WebSockets", SERVE_DESCRIPTION,
            add_serve_arguments, run_serve),
    Command("info", "describe a checkpoint: architecture, parameters, memory", INFO_DESCRIPTION,
            add_info_arguments, run_info),
    Command("train", "fine-tune with overlapped-chunk SFT", TRAIN_DESCRIPTION, add_train_arguments, run_train),
    Command("export", "write a training checkpoint as a HuggingFace model", EXPORT_DESCRIPTION,
            add_export_arguments, run_export),
    Command("demo", "watch the bundled tiny model commentate a synthetic match", DEMO_DESCRIPTION,
            add_demo_arguments, run_demo),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svlm", description="StreamingVLM in JAX: a vision-language model that commentates endless video.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.summary, description=command.description,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error argparse has already reported
        return stop.code if isinstance(stop.code, int) else 0
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"svlm: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("svlm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
