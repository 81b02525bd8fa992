"""`svlm eval` on the bundled demo model: held-out synthetic matches against their ground-truth
commentary, with the judge-free metrics and multiple-choice score questions (no judge: no LLM
endpoint is reachable from where this ran).

Per seed: the match's first --seconds are written as an mp4 (as `svlm demo` writes it), its
ground-truth words as a [start, end, word] transcript, and questions "What is the score?" at
seconds a recap does not state it (`train_demo.qa_ask_seconds`: no goal yet, or the last goal out of
the 8 s vision window), three options each (the true score, it with the home and the away side
one goal up, in a seeded order); then the command

  svlm eval --model svlm_jax/assets/demo_model --video match_SEED.mp4 --reference truth_SEED.json
            --questions questions_SEED.jsonl --out WORK/eval_SEED --dtype float32
            --previous-text "<the match's intro>" <the demo's stream settings>

runs, and the synth scorer's accuracy of the same commentary (the demo's number) is added beside it.
Writes experiments/results/eval_demo.json (every run's eval.json) and eval_demo.md (their tables).

  python -m experiments.eval_demo [--seeds 1000 1001 1002] [--seconds 600] [--work runs/eval_demo]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from experiments.common import RESULTS, write_result
from experiments.train_demo import qa_ask_seconds
from svlm_jax import cli, demo
from svlm_jax.synth import (LONG_MEMORY_S, QUESTION, Match, MatchConfig, RenderConfig, match_intro, memory_ages,
                            score_commentary, scores_by_second, stream_seconds, summarize_scores)
from svlm_jax.synth.commentary import number_words
from svlm_jax.synth.dataset import opening_frame, write_video


def demo_stream_flags() -> list[str]:
    """The demo's stream settings (`demo.STREAM_DEFAULTS`) as `svlm eval` options."""
    d = demo.STREAM_DEFAULTS
    p = d.policy
    return ["--vision-window", str(p.vision_window_s), "--text-rounds", str(p.text_rounds), "--text-sink",
            str(p.text_sink), "--text-window", str(p.text_window), "--max-new-tokens", str(p.max_new_tokens),
            "--fps", str(p.fps), "--min-pixels", str(d.min_pixels), "--max-pixels", str(d.max_pixels)]


def score_text(score: tuple[int, int]) -> str:
    return f"{number_words(score[0])} to {number_words(score[1])}"


def write_match(work: Path, seed: int, seconds: int) -> tuple[Path, Path, Path, list]:
    """The match's video, ground-truth transcript and questions; its truths."""
    render = RenderConfig()
    items = list(itertools.islice(stream_seconds(MatchConfig(seed), render), seconds))
    video = work / f"match_{seed}.mp4"
    write_video(video, itertools.chain([opening_frame(MatchConfig(seed), 0, render)],
                                       *(item.frames for item in items)), render.fps, render.height, render.width)
    truths = [item.truth for item in items]
    transcript = work / f"truth_{seed}.json"
    transcript.write_text(json.dumps([list(w) for truth in truths for w in truth.words]))
    scores = scores_by_second(truths)
    rng = np.random.default_rng(seed)
    questions = work / f"questions_{seed}.jsonl"
    with questions.open("w") as file:
        for second, kind in qa_ask_seconds(scores, seconds):
            home, away = scores[second]
            options = [(home, away), (home + 1, away), (home, away + 1)]
            order = rng.permutation(len(options))
            file.write(json.dumps({"time": float(second), "task": kind, "question": QUESTION,
                                   "options": [score_text(options[i]) for i in order],
                                   "answer": "ABC"[int(np.argmin(order))]}) + "\n")
    return video, transcript, questions, truths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[demo.DEMO_SEED, demo.DEMO_SEED + 1, demo.DEMO_SEED + 2])
    parser.add_argument("--seconds", type=int, default=600)
    parser.add_argument("--work", type=Path, default=Path("runs/eval_demo"))
    parser.add_argument("--result", type=Path, default=RESULTS / "eval_demo.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runs, tables = {}, []
    for seed in args.seeds:
        video, transcript, questions, truths = write_match(args.work, seed, args.seconds)
        out = args.work / f"eval_{seed}"
        command = ["eval", "--model", str(demo.DEMO_MODEL_DIR), "--video", str(video), "--reference", str(transcript),
                   "--questions", str(questions), "--out", str(out), "--dtype", "float32",
                   "--previous-text", match_intro(Match(MatchConfig(seed)).teams), "--max-question-tokens", "128",
                   "--max-answer-tokens", "24", *demo_stream_flags()]
        if cli.main(command) != 0:
            raise SystemExit(f"svlm eval failed on seed {seed}")
        result = json.loads((out / "eval.json").read_text())
        texts = [s["text"] for s in result["per_second"]]
        result["synth_scorer"] = summarize_scores(score_commentary(texts, truths), memory_ages(truths), LONG_MEMORY_S)
        result["command_line"] = ["svlm", *command]
        runs[str(seed)] = result
        tables.append(f"### seed {seed}\n\n" + (out / "eval.md").read_text())
    path = write_result("eval_demo", {"what": __doc__.split("\n\n")[0], "seeds": args.seeds, "seconds": args.seconds,
                                      "runs": runs}, args.result)
    path.with_suffix(".md").write_text("\n".join(tables))
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
