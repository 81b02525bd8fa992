"""The `svlm` command line: `svlm stream` commentates a video, `svlm serve` serves many live streams,
`svlm info` describes a checkpoint.

Each subcommand is one `Command` (name, help texts, add_arguments, run) in `COMMANDS`; adding a subcommand is
adding one entry. Problems with the user's input (a missing or corrupt checkpoint, an unreadable video, invalid
settings) end with one line `svlm: error: ...` on stderr and exit code 1; Ctrl-C ends with exit code 130.

Parsing imports only the standard library, so `svlm --help` answers at once: each run function imports
what it needs (jax, the model, video) itself, and a subcommand's defaults come from light modules
(tests/test_cli.py checks that no --help imports jax or numpy).
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
from typing import TYPE_CHECKING, Callable

from svlm_jax import distributed
from svlm_jax import interrupts
from svlm_jax.media.subtitles import JsonlWriter, VttWriter
from svlm_jax.serve.config import ServeConfig

if TYPE_CHECKING:
    from svlm_jax.config import ModelConfig
    from svlm_jax.media.live import LiveIntake
    from svlm_jax.media.preprocess import VisionPreprocessConfig
    from svlm_jax.media.video import VideoReader
    from svlm_jax.stream_format import CachePolicy, StreamFormat
    from svlm_jax.streaming.cache import CacheLayout
    from svlm_jax.streaming.sampling import SamplingConfig
    from svlm_jax.tokenizer import Tokenizer

# "streaming", then streaming.baselines.SCHEMES, spelled out for the parser (tests/test_cli.py compares them).
SCHEMES = ("streaming", "full", "sliding", "sliding_overlap")
DEFAULT_FULL_MAX_S = 600
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
LINE_BREAK = re.compile("\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")  # what str.splitlines splits on
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


class CliError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that describe bad input rather than a bug: reported as one line. (A function: the
    modules defining them import jax, which parsing must not.)"""
    from svlm_jax.config import ConfigError
    from svlm_jax.media.video import VideoError
    from svlm_jax.streaming.baselines import CacheFullError
    from svlm_jax.train.config import TrainConfigError
    from svlm_jax.train.data import DataError
    from svlm_jax.distributed import DistributedError
    from svlm_jax.weights import CheckpointError

    return (CliError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, CheckpointError,
            ConfigError, VideoError, TrainConfigError, DataError, CacheFullError, DistributedError)


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


def mesh_shape(text: str) -> tuple[int, int]:
    """'data=2,tensor=4' -> (2, 4); an axis left out is 1."""
    sizes = {"data": 1, "tensor": 1}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"expected data=D,tensor=T with positive sizes, got {text!r}")
        sizes[name.strip()] = int(value)
    return sizes["data"], sizes["tensor"]


def device_mesh(args: argparse.Namespace):
    """The --mesh of the command (None without one), on this machine's devices."""
    shape = getattr(args, "mesh", None)
    if shape is None:
        return None
    import jax

    from svlm_jax.streaming.mesh import stream_mesh

    try:
        return stream_mesh(*shape)
    except ValueError as error:
        raise CliError(f"--mesh data={shape[0]},tensor={shape[1]}: {error} ({jax.default_backend()})") from None


CHECKPOINT_DEFAULTS = ("Unset, these take the checkpoint's stream defaults: its stream_config.json, else\n"
                       "the reference's settings (docs/method.md §3). `svlm info DIR` prints them.")
# The stream options that override a field of the checkpoint's StreamDefaults, by the field: the
# cache policy's (--vision-window sets policy.vision_window_s), then the others'.
POLICY_OPTIONS = {"vision_window": "vision_window_s", "text_rounds": "text_rounds", "text_sink": "text_sink",
                  "text_window": "text_window", "max_new_tokens": "max_new_tokens", "fps": "fps"}
STREAM_OPTIONS = ("min_pixels", "max_pixels", "previous_text", "query")


def add_cache_arguments(parser: argparse.ArgumentParser):
    """The cache-size options shared by stream, serve and info; returns their group, for the options
    only some of them have."""
    group = parser.add_argument_group("cache size (what the model keeps in memory while streaming)",
                                      CHECKPOINT_DEFAULTS)
    group.add_argument("--vision-window", type=non_negative_int, metavar="S",
                       help="seconds of video whose frames stay in the cache")
    group.add_argument("--text-rounds", type=positive_int, metavar="N",
                       help="most recent seconds kept in full: prompt and commentary")
    group.add_argument("--text-sink", type=non_negative_int, metavar="T",
                       help="first tokens of earlier commentary kept for ever")
    group.add_argument("--text-window", type=non_negative_int, metavar="T",
                       help="latest tokens of older commentary kept")
    group.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                       help="longest commentary per second, in tokens")
    return group


def add_scheme_arguments(group) -> None:
    """The paper's baselines (stream and info; the server runs the streaming cache only)."""
    group.add_argument("--scheme", choices=SCHEMES, default="streaming",
                       help="attention scheme; the others are the paper's baselines (default: %(default)s)")
    group.add_argument("--full-max-s", type=positive_int, default=DEFAULT_FULL_MAX_S, metavar="S",
                       help="--scheme full: seconds of video its cache holds before it stops (default: %(default)s)")


def add_pixel_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("frame size given to the model (pixels per frame, after resizing)",
                                      CHECKPOINT_DEFAULTS)
    group.add_argument("--min-pixels", type=positive_int, metavar="N", help="smallest frame area")
    group.add_argument("--max-pixels", type=positive_int, metavar="N", help="largest frame area")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=("auto", *DTYPE_BYTES), default="auto",
                        help="weights and cache number type; auto: float32 on a CPU, bfloat16 on a GPU or TPU "
                             "(default: %(default)s)")


def run_dtype(choice: str) -> str:
    """The number type `--dtype auto` means here: float32 when jax computes on the CPU, whose
    backend runs bfloat16 by converting to float32 (a whole cache layer per stream's write in a
    batch), bfloat16 on an accelerator."""
    if choice != "auto":
        return choice
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def with_stream_defaults(args: argparse.Namespace, model_dir: str) -> argparse.Namespace:
    """`args` with every stream setting resolved: the option given, else the checkpoint's stream default
    (svlm_jax/stream_defaults.py). The resolved StreamDefaults is `stream_defaults`, and each option
    (--fps, --query... also those the subcommand lacks) holds its value."""
    from svlm_jax.stream_defaults import StreamDefaults

    require_checkpoint_dir(model_dir)
    checkpoint = StreamDefaults.from_dir(model_dir)

    def given(options):
        return {name: getattr(args, option) for option, name in options.items()
                if getattr(args, option, None) is not None}

    try:
        policy = dataclasses.replace(checkpoint.policy, **given(POLICY_OPTIONS))
        resolved = dataclasses.replace(checkpoint, policy=policy, **given({o: o for o in STREAM_OPTIONS}))
    except ValueError as error:
        raise CliError(str(error)) from None
    values = {option: getattr(policy, name) for option, name in POLICY_OPTIONS.items()}
    values |= {option: getattr(resolved, option) for option in STREAM_OPTIONS}
    return argparse.Namespace(**{**vars(args), **values, "stream_defaults": resolved})


def cache_policy(args: argparse.Namespace) -> CachePolicy:
    """The cache policy of `args` resolved by `with_stream_defaults`."""
    return args.stream_defaults.policy


def cache_layout(args: argparse.Namespace, fmt: StreamFormat, model_config: ModelConfig, grid) -> CacheLayout:
    """The cache the chosen scheme builds (the baselines keep whole seconds)."""
    from svlm_jax.streaming.cache import CacheLayout

    policy = cache_policy(args)
    if args.scheme == "streaming":
        return CacheLayout.for_stream(fmt, policy, model_config, grid)
    rounds = args.full_max_s if args.scheme == "full" else policy.text_rounds
    return CacheLayout.for_stream(fmt, policy, model_config, grid, rounds=rounds, vision_rounds=rounds)


def make_session(args: argparse.Namespace, model, tokenizer, config, preprocess):
    from svlm_jax.streaming import BaselineSession, StreamingSession

    mesh = device_mesh(args)
    if args.scheme == "streaming":
        return StreamingSession(model, tokenizer, config, preprocess=preprocess, mesh=mesh)
    return BaselineSession(model, tokenizer, config, scheme=args.scheme, full_max_s=args.full_max_s,
                           preprocess=preprocess, mesh=mesh)


def require_checkpoint_dir(model_dir: str) -> None:
    if not Path(model_dir).is_dir():
        raise CliError(f"checkpoint directory {model_dir} does not exist")


def load_tokenizer(model_dir: str) -> Tokenizer:
    from svlm_jax.tokenizer import Tokenizer

    try:
        return Tokenizer.from_pretrained(model_dir)
    except FileNotFoundError:
        raise
    except Exception as error:  # the tokenizers library raises bare Exceptions for malformed files
        raise CliError(f"{model_dir}: cannot read the tokenizer: {error}") from None


def stream_preprocess(tokenizer: Tokenizer, min_pixels: int, max_pixels: int) -> VisionPreprocessConfig:
    """The checkpoint's preprocessing (mean, std, patch sizes) with these pixel bounds (resolved by
    `with_stream_defaults`)."""
    from svlm_jax.stream_defaults import with_pixel_bounds

    return with_pixel_bounds(tokenizer.vision_preprocess, min_pixels, max_pixels)


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
    add_span_arguments(parser)
    parser.add_argument("--vtt", metavar="OUT.vtt", help="also write the commentary as WebVTT subtitles")
    parser.add_argument("--jsonl", metavar="OUT.jsonl",
                        help='also write one JSON line per second: {"start": s, "end": s, "text": ...}')
    add_scheme_arguments(add_model_arguments(parser))


def add_span_arguments(parser: argparse.ArgumentParser) -> None:
    """Which seconds are streamed and how the stream begins (stream and eval)."""
    parser.add_argument("--start", type=non_negative_float, default=0.0, metavar="S",
                        help="skip the first S seconds of the video (default: %(default)s)")
    parser.add_argument("--duration", type=non_negative_float, metavar="D",
                        help="commentate at most D seconds (default: until the video ends)")
    parser.add_argument("--fps", type=positive_int,
                        help="frames per second given to the model, a multiple of 2 (default: the checkpoint's, "
                             "the rate it was trained on)")
    parser.add_argument("--query",
                        help="instruction given with the first second, unless the stream continues from "
                             "previous text (default: the checkpoint's)")
    parser.add_argument("--previous-text", metavar="TEXT",
                        help="context the commentary continues from, e.g. the story so far of the match; the "
                             "stream continues one that began before, so it gets no --query (as in training); "
                             "\"\" for none (default: the checkpoint's)")


def add_model_arguments(parser: argparse.ArgumentParser):
    """Number type, cache, positions, sampling and frame size: what stream and serve share; returns
    the cache group."""
    add_dtype_argument(parser)
    cache = add_cache_arguments(parser)
    cache.add_argument(
        "--pos-mode", choices=("contiguous", "native"), default="contiguous",
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
    sampling.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    add_pixel_arguments(parser)
    add_mesh_argument(parser)
    return cache


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", type=mesh_shape, metavar="data=D,tensor=T",
                        help="run on D x T devices: streams split over data, heads and MLP over tensor "
                             "(default: one device)")


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
    from svlm_jax.media.live import LiveIntake, paced
    from svlm_jax.media.video import VideoReader
    from svlm_jax.weights import load_pretrained

    outputs = check_output_paths(args)
    args = with_stream_defaults(args, args.model)
    # Opened before the (slow) model load, so a wrong path or an unreadable video fails at once.
    with VideoReader(args.video, fps=args.fps, start=args.start, format=args.format,
                     options=dict(args.demuxer_option)) as reader:
        tokenizer = load_tokenizer(args.model)
        preprocess = stream_preprocess(tokenizer, args.min_pixels, args.max_pixels)
        if args.fps % preprocess.temporal_patch_size:
            raise CliError(f"--fps must be a multiple of the model's temporal patch size "
                           f"({preprocess.temporal_patch_size}), got {args.fps}")
        config = args.stream_defaults.stream_config(sampling=sampling_config(args, tokenizer), pos_mode=args.pos_mode,
                                                    seed=args.seed)
        model = load_pretrained(args.model, dtype=run_dtype(args.dtype))
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
    from svlm_jax.streaming.sampling import SamplingConfig

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
               intake: LiveIntake | None = None) -> StreamTimes:
    """The stream loop: one second in (from `intake` for a live source), its commentary out (stdout and
    writers); returns each second's time. The summary is printed however the loop ends: end of input,
    a video error, or Ctrl-C."""
    limit = None if duration_s is None else math.floor(duration_s)
    declared = reader.declared_duration
    total_s = None if declared is None else max(0, math.floor(declared - float(reader.start)))
    if limit is not None:
        total_s = limit if total_s is None else min(total_s, limit)
    progress = Progress(total_s, enabled=sys.stderr.isatty())
    printer = LivePrinter(progress)
    times = StreamTimes()
    seconds = itertools.islice(iter(intake if intake is not None else reader), limit)
    print("svlm: compiling the model (the first second waits for it)", file=sys.stderr, flush=True)
    progress.update(0, None)  # shows the bar during the first second
    try:
        while True:
            interrupts.check()
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
    return times


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
    add_mesh_argument(parser)


def stream_grid(preprocess: VisionPreprocessConfig, width: int, height: int, fps: int) -> tuple[int, int, int]:
    """(grid_t, grid_h, grid_w) of one second of frames of this size at `fps`, in the model's patches."""
    try:
        resized_h, resized_w = preprocess.resized_size(height, width, fps)
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


def print_stream_defaults(args: argparse.Namespace) -> None:
    """The stream settings `svlm stream` would use for this checkpoint (with the options given)."""
    from svlm_jax.stream_defaults import FILE_NAME

    d = args.stream_defaults
    p = d.policy
    found = (Path(args.model) / FILE_NAME).is_file()
    print(f"stream defaults {f'from {FILE_NAME}' if found else f'the reference settings (no {FILE_NAME})'}, "
          "options override them")
    print(f"  cache         vision {p.vision_window_s} s, {p.text_rounds} text rounds, previous text sink "
          f"{p.text_sink} + window {p.text_window} tokens, up to {p.max_new_tokens} new tokens a second")
    print(f"  frames        {p.fps} a second, {d.min_pixels:,} to {d.max_pixels:,} pixels each")
    print(f"  previous text {d.previous_text!r}")
    print(f"  query         {d.query!r}")


def run_info(args: argparse.Namespace) -> int:
    from svlm_jax.config import ModelConfig
    from svlm_jax.model.params import param_leaves
    from svlm_jax.stream_format import StreamFormat

    args = with_stream_defaults(args, args.model)
    model_config = ModelConfig.from_file(args.model)
    leaves = param_leaves(model_config)
    n_params = sum(math.prod(shape) for _, shape in leaves)
    n_vision = sum(math.prod(shape) for path, shape in leaves if path.startswith("vision."))
    t, v = model_config.text, model_config.vision
    dtype = run_dtype(args.dtype)
    dtype_bytes = DTYPE_BYTES[dtype]
    weight_bytes = n_params * dtype_bytes
    print(f"checkpoint      {args.model}")
    mlp = (f"{t.num_experts} experts of MLP {t.moe_intermediate_size}, {t.num_experts_per_tok} a token"
           if t.num_experts else f"MLP {t.intermediate_size}")
    print(f"model type      {model_config.hf_model_type}")
    print(f"language model  {t.num_layers} layers, hidden {t.hidden_size}, {t.num_heads} heads "
          f"({t.num_kv_heads} key/value heads, head dim {t.head_dim}), {mlp}, "
          f"vocab {t.vocab_size}, {'tied' if t.tie_word_embeddings else 'untied'} embeddings")
    print(f"vision tower    {v.depth} blocks, hidden {v.hidden_size}, {v.num_heads} heads, MLP {v.intermediate_size}, "
          f"{v.patch_size} px patches merged {v.spatial_merge_size}x{v.spatial_merge_size}")
    print(f"parameters      {n_params:,} (vision {n_vision:,}, language {n_params - n_vision:,})")
    print(f"memory at {dtype}")
    print(f"  weights       {human_bytes(weight_bytes)}")
    print_stream_defaults(args)
    if not (Path(args.model) / "tokenizer.json").is_file():
        print(f"  KV cache      unknown: {args.model} has no tokenizer.json to measure the prompt with")
        return 0
    tokenizer = load_tokenizer(args.model)
    preprocess = stream_preprocess(tokenizer, args.min_pixels, args.max_pixels)
    width, height = args.frame_size
    grid = stream_grid(preprocess, width, height, args.fps)
    layout = cache_layout(args, StreamFormat.from_tokenizer(tokenizer), model_config, grid)
    # Keys and values of every layer, slot and key/value head, per stream.
    cache_bytes = t.num_layers * layout.size * t.num_kv_heads * t.head_dim * 2 * dtype_bytes * args.streams
    print(f"  KV cache      {human_bytes(cache_bytes)}: {args.streams} stream(s) x {layout.size:,} slots "
          f"({width}x{height} frames -> {grid[2] * preprocess.patch_size}x{grid[1] * preprocess.patch_size}, "
          f"{layout.slots.cap('vision')} vision tokens per second)")
    print(f"  total         {human_bytes(weight_bytes + cache_bytes)} (activations not included)")
    if args.mesh:
        from svlm_jax.streaming.mesh import per_device_bytes

        data, tensor = args.mesh
        if args.streams % data:
            raise CliError(f"--streams {args.streams} do not split over data={data} devices")
        weights, cache = per_device_bytes(model_config, dtype_bytes, cache_bytes, *args.mesh)
        print(f"  per device    {human_bytes(weights + cache)} on each of {data * tensor} devices "
              f"(data={data}, tensor={tensor}): weights {human_bytes(weights)}, KV cache {human_bytes(cache)}")
    return 0


# ---------------------------------------------------------------- train and export

TRAIN_DESCRIPTION = """\
Fine-tune with overlapped-chunk SFT (docs/method.md §5) as a config file describes (see
experiments/configs/sft_tiny.toml; every field is documented in svlm_jax/train/config.py).
A run resumes from its latest checkpoint; Ctrl-C saves one and stops. Over several hosts,
start one process per host with the same config: the [mesh] spans all their devices.

examples:
  svlm train --config experiments/configs/sft_tiny.toml
  svlm train --config run.toml --coordinator host0:1234 --num-processes 2 --process-id 0   # on host0
  svlm train --config run.toml --coordinator host0:1234 --num-processes 2 --process-id 1   # on host1
  srun svlm train --config run.toml --cluster                                             # SLURM"""

EXPORT_DESCRIPTION = """\
Write a training run's checkpoint (the latest unless --step) as a HuggingFace model directory:
config.json, safetensors and tokenizer files, loadable by transformers and `svlm stream`.

example:
  svlm export runs/synth_sft exported_model"""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run's config file (TOML)")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop after this many updates in this invocation (default: the config's)")
    distributed.add_arguments(parser)


def run_train(args: argparse.Namespace) -> int:
    from svlm_jax.train.run import main_train

    main_train(args.config, max_steps=args.max_steps, launch=distributed.launch_from_args(args))
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


DEMO_MINUTES = 1


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=non_negative_int,
                        help="which match to play (default: the demo's own, which training never saw)")
    # No parser defaults here: argparse tells a given option from an unset one by its default, and
    # `--minutes 1` (the default) would then not count as given beside --seconds.
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=positive_int, help=f"length of the match (default: {DEMO_MINUTES})")
    length.add_argument("--seconds", type=positive_int, help="length of the match in seconds, instead of --minutes")
    parser.add_argument("--out", default="svlm_demo", metavar="DIR",
                        help="folder for the match video and its subtitles (default: %(default)s)")


def run_demo(args: argparse.Namespace) -> int:
    from svlm_jax.demo import DEMO_SEED, run

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CliError(f"--out {args.out} exists and is not a folder")
    run(DEMO_SEED if args.seed is None else args.seed, args.seconds or 60 * (args.minutes or DEMO_MINUTES),
        Path(args.out))
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
    parser.add_argument("--query",
                        help="instruction given with a stream's first second unless its start message sets "
                             "one or gives previous text (default: the checkpoint's)")
    cache = add_model_arguments(parser)
    cache.add_argument("--max-question-tokens", type=non_negative_int, default=64, metavar="N",
                       help="longest question a client may ask (default: %(default)s)")
    cache.add_argument("--max-answer-tokens", type=non_negative_int, default=64, metavar="N",
                       help="longest answer to a question, in tokens (default: %(default)s)")


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn  # the server's stack is loaded only to serve

    from svlm_jax.serve.app import create_app
    from svlm_jax.serve.scheduler import Server
    from svlm_jax.streaming import StreamingSession
    from svlm_jax.weights import load_pretrained

    args = with_stream_defaults(args, args.model)
    try:
        serve_config = ServeConfig(max_streams=args.max_streams, frame_size=args.frame_size,
                                   max_queue_s=args.max_queue_s, max_message_bytes=args.max_message_bytes)
        policy = dataclasses.replace(cache_policy(args), max_question_tokens=args.max_question_tokens,
                                     max_answer_tokens=args.max_answer_tokens)
    except ValueError as error:
        raise CliError(str(error)) from None
    tokenizer = load_tokenizer(args.model)
    preprocess = stream_preprocess(tokenizer, args.min_pixels, args.max_pixels)
    config = dataclasses.replace(args.stream_defaults, policy=policy).stream_config(
        sampling=sampling_config(args, tokenizer), pos_mode=args.pos_mode, seed=args.seed)
    model = load_pretrained(args.model, dtype=run_dtype(args.dtype))
    try:
        session = StreamingSession(model, tokenizer, config, batch=args.max_streams, preprocess=preprocess,
                                   mesh=device_mesh(args))
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


# ---------------------------------------------------------------- svlm eval and svlm data

EVAL_DESCRIPTION = """\
Stream a model over a video as `svlm stream` does and measure it (docs/eval.md): latency per
second and the real-time factor, silence and words per second, and word agreement with a
--reference (a transcript, or another model's commentary); with --judge-url the Inf-Streams-Eval
win rate against the reference (windows of commentary compared by an OpenAI-compatible judge in
both orders, ties when they disagree, a Wilson interval; every answer cached, so a re-run asks
nothing); with --questions multiple-choice questions at given seconds, scored per task. Writes
eval.json (model, data, settings, git state, results), eval.md and commentary.jsonl into --out.

example:
  svlm eval --model ./StreamingVLM --video match.mp4 --reference match.json --out eval_match
  OPENAI_API_KEY=... svlm eval --model ./StreamingVLM --video match.mp4 --reference match.json \\
      --out eval_match --judge-url https://api.openai.com/v1 --judge-model gpt-4o"""


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="checkpoint directory (config.json, safetensors weights, tokenizer.json)")
    parser.add_argument("--video", required=True, metavar="PATH_OR_URL", help="the video: a file or a URL")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for eval.json, eval.md, commentary.jsonl (and the judge's cache)")
    parser.add_argument("--reference", metavar="FILE",
                        help="what the commentary is compared with: a transcript (*.json, WhisperX or [start, end, "
                             "word] triples) or a commentary (*.jsonl, as svlm stream --jsonl and svlm eval write)")
    parser.add_argument("--questions", metavar="FILE.jsonl",
                        help="multiple-choice questions at given seconds (format: docs/eval.md)")
    add_span_arguments(parser)
    judging = parser.add_argument_group("judge (any OpenAI-compatible chat-completions endpoint)")
    judging.add_argument("--judge-url", metavar="URL",
                         help="the endpoint or its base, e.g. https://api.openai.com/v1 (default: no judge)")
    judging.add_argument("--judge-model", metavar="NAME", help="the judge model the endpoint serves")
    judging.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                         help="environment variable holding the API key; unset sends none (default: %(default)s)")
    judging.add_argument("--judge-cache", metavar="FILE.jsonl",
                         help="the judge's answers, read and appended (default: OUT/judge_cache.jsonl)")
    judging.add_argument("--window", type=positive_int, default=100, metavar="S",
                         help="seconds of commentary judged at once (default: %(default)s)")
    judging.add_argument("--judge-timeout", type=non_negative_float, default=60.0, metavar="S",
                         help="seconds to wait for an answer (default: %(default)s)")
    judging.add_argument("--judge-attempts", type=positive_int, default=3, metavar="N",
                         help="tries per request before it is reported as failed (default: %(default)s)")
    judging.add_argument("--judge-retry-wait", type=non_negative_float, default=2.0, metavar="S",
                         help="wait before the k-th retry: k times this (default: %(default)s)")
    cache = add_model_arguments(parser)
    add_scheme_arguments(cache)
    cache.add_argument("--max-question-tokens", type=non_negative_int, default=64, metavar="N",
                       help="--questions: longest question with its options, in tokens (default: %(default)s)")
    cache.add_argument("--max-answer-tokens", type=non_negative_int, default=64, metavar="N",
                       help="--questions: longest answer, in tokens (default: %(default)s)")


def run_eval(args: argparse.Namespace) -> int:
    from svlm_jax.evaluation.run import main as main_eval

    main_eval(with_stream_defaults(args, args.model))
    return 0


DATA_DESCRIPTION = """\
Turn videos with word-level transcripts into the SFT samples `svlm train` reads. Each transcript
(*.json in --transcripts: WhisperX's aligned output, or a list of [start, end, word]) goes with the
video of the same name in --videos; its words are checked (timed, ordered, not overlapping, inside
the video: a problem names the file and the word, and nothing is written), the stream is cut into
samples of --sample-seconds whose previous text is what was said before them, and whole videos are
held out for validation (seeded). Writes train.jsonl, validation.jsonl and data.json into --out.

example:
  svlm data --transcripts whisperx/ --videos videos/ --out sft_data
  then in the training config: [data] train = "sft_data/train.jsonl\""""


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transcripts", required=True, metavar="DIR", help="folder of transcripts (*.json)")
    parser.add_argument("--videos", metavar="DIR", help="folder of the videos (default: the transcripts' folder)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for train.jsonl, validation.jsonl, data.json")
    parser.add_argument("--sample-seconds", type=positive_int, default=60, metavar="S",
                        help="length of a sample (default: %(default)s)")
    parser.add_argument("--validation-fraction", type=fraction, default=0.1, metavar="F",
                        help="share of the videos held out for validation (default: %(default)s)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the split (default: %(default)s)")
    parser.add_argument("--text-sink", type=non_negative_int, metavar="W",
                        help="first words of the earlier text kept as a sample's previous text; at least the "
                             "training config's text_sink tokens (default: the paper's cache policy's text_sink)")
    parser.add_argument("--text-window", type=non_negative_int, metavar="W",
                        help="latest words kept; at least the config's text_window (default: the paper's "
                             "text_window)")
    parser.add_argument("--drop-untimed", action="store_true",
                        help="leave out words without times (WhisperX's unaligned words) instead of refusing them")


def run_data(args: argparse.Namespace) -> int:
    from svlm_jax.stream_format import CachePolicy
    from svlm_jax.transcripts import prepare_dataset

    paper = CachePolicy()
    summary = prepare_dataset(Path(args.transcripts), Path(args.videos or args.transcripts), Path(args.out),
                              sample_seconds=args.sample_seconds, validation_fraction=args.validation_fraction,
                              seed=args.seed, text_sink=paper.text_sink if args.text_sink is None else args.text_sink,
                              text_window=paper.text_window if args.text_window is None else args.text_window,
                              drop_untimed=args.drop_untimed)
    for split, s in summary["splits"].items():
        print(f"{split}: {s['videos']} videos, {s['samples']} samples, {s['seconds']} s, {s['words']} words "
              f"-> {Path(args.out) / s['file']}")
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
    Command("eval", "measure a model on a video: metrics, a judge's win rate, questions", EVAL_DESCRIPTION,
            add_eval_arguments, run_eval),
    Command("data", "turn videos with word-level transcripts into SFT samples", DATA_DESCRIPTION,
            add_data_arguments, run_data),
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
    """Runs `svlm ARGV`; returns the exit code. Without `argv` (the process's own command line, as the
    `svlm` script and `python -m svlm_jax.cli` run it) Ctrl-C ends the process itself, see `exit_now`."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error argparse has already reported
        return stop.code if isinstance(stop.code, int) else 0
    try:
        with interrupts.remembered():
            return args.run(args)
    except KeyboardInterrupt:  # first: user_errors() imports, which an interrupted import may not survive
        print("svlm: interrupted", file=sys.stderr)
        if argv is None:
            exit_now(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except user_errors() as error:
        print(f"svlm: error: {error}", file=sys.stderr)
        return 1


def exit_now(code: int) -> None:
    """Ends the process without the interpreter's shutdown. After Ctrl-C, XLA may still be compiling on
    its own threads, and tearing the runtime down under them crashes (segfaults, "pure virtual method
    called", LLVM errors). Everything the run wrote is closed by then; only stdout and stderr are
    still buffered."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
