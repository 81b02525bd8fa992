"""`svlm eval`: stream a model over a video as `svlm stream` does (the same session, settings and
frame reading), then measure its commentary; everything the run used and found goes into --out:

  commentary.jsonl   the model's commentary, one line a second, flushed as it comes (an
                     interrupted run keeps it; a later `svlm eval --reference` can compare with it)
  judge_cache.jsonl  the judge's answers (unless --judge-cache names another file)
  eval.json          model, data, settings, environment and git state, and every result:
                     judge-free metrics (`metrics`), the judge's windows and win rate (`judge`),
                     the questions' answers and accuracy per task (`qa`), per-second details
  eval.md            the main numbers as a short markdown table

The questions are asked on a second stream of the video from the same start (a fresh session whose
cache has room for them), so the commentary measured above is the model's, never an answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import platform
import subprocess
from pathlib import Path

import jax

from svlm_jax import cli
from svlm_jax.evaluation import judge, metrics, qa
from svlm_jax.evaluation.reference import read_reference, reference_by_second
from svlm_jax.media.video import VideoReader
from svlm_jax.streaming.session import StreamConfig
from svlm_jax.weights import load_pretrained


def check_out_dir(out: Path) -> None:
    """--out: an existing writable folder, or one that can be created."""
    if out.exists() and not out.is_dir():
        raise cli.CliError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cli.CliError(f"--out {out}: cannot create: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise cli.CliError(f"--out {out}: cannot write there")


def file_record(path: str | Path) -> dict:
    path = Path(path)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def model_record(model_dir: str) -> dict:
    """The checkpoint as a run names it: its folder, config.json's hash and the weights' size."""
    folder = Path(model_dir)
    return {"dir": str(folder), "name": folder.resolve().name,
            "config_sha256": file_record(folder / "config.json")["sha256"],
            "weights_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors"))}


def git_state() -> str:
    """`git describe --always --dirty` of the source tree (the commit, "-dirty" with local changes),
    or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    device = jax.devices()[0]
    return {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
            "python": platform.python_version(), "git": git_state()}


def stream_config(args: argparse.Namespace, tokenizer, policy) -> StreamConfig:
    """`svlm stream`'s stream config of `args` (resolved by cli.with_stream_defaults) with `policy`."""
    config = args.stream_defaults.stream_config(sampling=cli.sampling_config(args, tokenizer), pos_mode=args.pos_mode,
                                                seed=args.seed)
    return dataclasses.replace(config, policy=policy)


def open_video(args: argparse.Namespace, fps: int) -> VideoReader:
    return VideoReader(args.video, fps=fps, start=args.start)


def seconds_of(reader: VideoReader, duration_s: float | None):
    """The reader's seconds, the first `duration_s` (whole seconds) of them when given."""
    return itertools.islice(iter(reader), None if duration_s is None else math.floor(duration_s))


class Recorder:
    """A writer of `cli.commentate` that keeps each second's start and commentary."""

    def __init__(self):
        self.t_starts: list[float] = []
        self.texts: list[str] = []

    def write(self, t_start: float, t_end: float, text: str) -> None:
        self.t_starts.append(t_start)
        self.texts.append(text)


def stream_commentary(reader: VideoReader, session, jsonl: Path, duration_s: float | None):
    """(t_starts, texts, times) of `svlm stream`'s loop (each second's start, commentary and wall
    time: reading, preprocessing and the round), the commentary printed and written to `jsonl` as it comes."""
    recorder, writer = Recorder(), cli.OutputWriter("--out", jsonl)
    try:
        times = cli.commentate(reader, session, [writer, recorder], duration_s)
    finally:
        writer.close()
    return recorder.t_starts, recorder.texts, times


def judge_config(args: argparse.Namespace) -> judge.JudgeConfig:
    if not args.judge_model:
        raise cli.CliError("--judge-url needs --judge-model, the model the endpoint serves")
    if not args.reference:
        raise cli.CliError("--judge-url needs --reference: the judge compares the model with it")
    return judge.JudgeConfig(url=judge.chat_url(args.judge_url), model=args.judge_model,
                             api_key=os.environ.get(args.judge_api_key_env) or None, timeout_s=args.judge_timeout,
                             attempts=args.judge_attempts, retry_wait_s=args.judge_retry_wait)


def run_judge(config: judge.JudgeConfig, cache_path: Path, t_starts, texts, reference, window_s: int) -> dict:
    windows = judge.cut_windows(t_starts, texts, reference, window_s)
    verdicts = judge.judge_windows(config, judge.JudgeCache(cache_path), windows)
    return {"url": config.url, "model": config.model, "api_key": "sent" if config.api_key else "none",
            "window_s": window_s, "cache": str(cache_path), **judge.win_rate(verdicts, len(windows)),
            "verdicts": [{"start": v.window.start, "end": v.window.end, "model_as_a": v.model_first.answer,
                          "model_as_b": v.model_second.answer, "outcome": v.outcome,
                          "cached": [v.model_first.cached, v.model_second.cached]} for v in verdicts]}


def run_questions(args, model, tokenizer, preprocess, policy, questions) -> dict:
    """The questions asked on a fresh stream of the video (see the module docstring)."""
    policy = dataclasses.replace(policy, max_question_tokens=args.max_question_tokens,
                                 max_answer_tokens=args.max_answer_tokens)
    try:
        session = cli.make_session(args, model, tokenizer, stream_config(args, tokenizer, policy), preprocess)
    except ValueError as error:
        raise cli.CliError(str(error)) from None
    with open_video(args, policy.fps) as reader:
        replies = qa.ask_questions(session, seconds_of(reader, args.duration), questions, args.start, args.questions)
    return qa.score_questions(questions, replies)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    """The run's main numbers as a markdown table."""
    m, lat = result["metrics"], result["metrics"]["latency"]
    rows = [("model", result["model"]["name"]), ("video", f"{result['data']['video']} ({m['seconds']} s from "
                                                          f"{result['data']['start_s']} s)"),
            ("real-time factor", number(lat.get("real_time_factor"))),
            ("latency per second: mean / p95 / max (first)", " / ".join(
                number(lat.get(k)) for k in ("mean_s", "p95_s", "max_s")) + f" s ({number(lat.get('first_s'), 1)} s)"),
            ("silence ratio", percent(m["silence_ratio"])), ("words per second", number(m["words_per_second"], 2))]
    if "agreement" in m:
        rows[-2:] = [("silence ratio: model / reference", f"{percent(m['silence_ratio'])} / "
                                                           f"{percent(m['reference_silence_ratio'])}"),
                     ("words per second: model / reference", f"{number(m['words_per_second'], 2)} / "
                                                             f"{number(m['reference_words_per_second'], 2)}")]
        for key, label in (("within_0s", "inside the second"), ("within_1s", "within ±1 s")):
            a = m["agreement"][key]
            rows.append((f"word agreement {label}: precision / recall / F1",
                         " / ".join(percent(a[k]) for k in ("precision", "recall", "f1"))))
    if "judge" in result:
        j = result["judge"]
        bounds = j["interval"]["bounds"]
        interval = "-" if bounds is None else f"[{percent(bounds[0])}, {percent(bounds[1])}]"
        rows.append((f"win rate vs reference ({j['model']}, {j['window_s']} s windows)",
                     f"{percent(j['win_rate'])} {interval} 95% Wilson; {j['wins']} wins, {j['ties']} ties, "
                     f"{j['losses']} losses of {j['judged']} judged ({j['silent_windows']} silent, "
                     f"{len(j['failed'])} failed)"))
    if "qa" in result:
        q = result["qa"]
        rows.append(("questions: accuracy (mean over tasks)",
                     f"{percent(q['accuracy'])} of {q['asked']} asked ({percent(q['mean_task_accuracy'])})"))
        rows += [(f"questions, task {task}", f"{percent(t['accuracy'])} of {t['asked']} ({t['unparsed']} unparsed)")
                 for task, t in q["tasks"].items()]
    lines = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise cli.CliError(f"{path}: cannot write: {e.strerror or e}") from None


def main(args: argparse.Namespace) -> dict:
    """Runs `svlm eval` (the options: cli.add_eval_arguments); returns what eval.json holds."""
    out = Path(args.out)
    check_out_dir(out)
    placed = read_reference(args.reference) if args.reference else None
    questions = qa.read_questions(args.questions) if args.questions else None
    judging = judge_config(args) if args.judge_url else None
    args = cli.with_stream_defaults(args, args.model)
    policy = cli.cache_policy(args)
    with open_video(args, policy.fps) as reader:
        tokenizer = cli.load_tokenizer(args.model)
        preprocess = cli.stream_preprocess(tokenizer, args.min_pixels, args.max_pixels)
        if args.fps % preprocess.temporal_patch_size:
            raise cli.CliError(f"--fps must be a multiple of the model's temporal patch size "
                               f"({preprocess.temporal_patch_size}), got {args.fps}")
        model = load_pretrained(args.model, dtype=cli.run_dtype(args.dtype))
        config = stream_config(args, tokenizer, policy)
        try:
            session = cli.make_session(args, model, tokenizer, config, preprocess)
        except ValueError as error:
            raise cli.CliError(str(error)) from None
        declared = reader.declared_duration
        t_starts, texts, times = stream_commentary(reader, session, out / "commentary.jsonl", args.duration)
    reference = None if placed is None else reference_by_second(placed, args.start, len(texts))
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "stream_defaults")}
    result = {"command": "svlm eval", "model": model_record(args.model),
              "data": {"video": args.video, "video_file": file_record(args.video) if Path(args.video).is_file() else None,
                       "declared_duration_s": declared, "start_s": args.start,
                       "reference": file_record(args.reference) if args.reference else None,
                       "questions": file_record(args.questions) if args.questions else None},
              "settings": settings, "stream": {**dataclasses.asdict(config), "preprocess": dataclasses.asdict(preprocess)},
              "environment": environment(),
              "metrics": {**metrics.commentary_metrics(texts, reference),
                          "latency": metrics.latency_summary(times.seconds, times.real_time_factor())}}
    if judging is not None:
        cache = Path(args.judge_cache) if args.judge_cache else out / "judge_cache.jsonl"
        result["judge"] = run_judge(judging, cache, t_starts, texts, reference, args.window)
    if questions is not None:
        result["qa"] = run_questions(args, model, tokenizer, preprocess, policy, questions)
    result["per_second"] = [{"t_start": t, "latency_s": latency, "text": text}
                            for t, latency, text in zip(t_starts, times.seconds, texts)]
    for record, ref in zip(result["per_second"], reference or ()):
        record["reference"] = ref
    write_text(out / "eval.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    table = markdown(result)
    write_text(out / "eval.md", table)
    print(table, end="")
    return result
