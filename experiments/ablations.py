"""The paper's ablations in miniature: the bundled demo model on long synthetic matches.

    python -m experiments.ablations                    # every variant over 1 hour of a held-out match
    python -m experiments.ablations --smoke            # 20 s of each variant, results to /tmp
    python -m experiments.ablations --sft non_overlapped=DIR   # adds the SFT ablation

Every variant streams the same held-out match (seed `demo.DEMO_SEED`, never trained on) second
by second through `StreamingSession` (the baselines through `BaselineSession`), greedy, one stream,
and is scored per second by the synth scorer. Variants differ from `ours` (the demo's cache:
streaming scheme, contiguous positions, 8 s of vision in 16 rounds, text sink 64 + window 192
tokens) in one setting each:
  full             nothing evicted, until its memory budget (`--full-budget-s` seconds of video)
  sliding          a fresh context every 16 s (no overlap)
  sliding_overlap  every second, the last 16 s re-encoded and re-prefilled (overlap)
  native           native (ever-growing) positions instead of contiguous ones
  vision_4s, vision_16s           a shorter vision window, and the paper's (and the training chunks')
  no_sink          text sink 0 (window 256: the same text budget)
  short_text       sink 16 + window 48 tokens
  rounds_4         4 rounds kept in full (so 4 s of vision): commentary older than 4 s lives only
                   in the text sink + window, which then carries the score from one recap to the next
  rounds_4_no_text the same without sink or window: nothing older than 4 s is kept
  sft_<name>       `ours` on another model (`--sft name=DIR`); the bundled model is trained by
                   experiments/train_demo.py with overlapped chunks, so `ours` vs
                   `sft_non_overlapped` (trained with `--overlap-seconds 0`, the same data, steps
                   and batch) is the SFT ablation
Per 10-minute segment: accuracy (events and silences), accuracy of the scores due (goals and
recaps), accuracy of the scores whose last change is older than 16 s (`synth.LONG_MEMORY_S`, `memory`:
only the commentary history can carry them), the share of stated scores that agree with the
variant's own earlier commentary (`consistent`: its last stated score, raised for each goal it
calls; one miscounted goal makes every later score wrong but only that second inconsistent), and
latency (ms per generated token = round wall time / tokens generated, and ms per round). A variant
stops at the end of the stream, when it runs out of its memory budget (full), or past `--budget-s`
of wall time (recorded as `stopped`).
Writes experiments/results/ablations.json, ablations.png and ablations.md (tables and the checks of
what held and what did not; a check on accuracy compares the seconds both variants streamed).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np

from experiments.common import RESULTS, config_record, git_commit, make_session, write_result
from svlm_jax import demo
from svlm_jax.streaming import CacheFullError, StreamConfig
from svlm_jax.synth import (LONG_MEMORY_S, MatchConfig, RenderConfig, SecondTruth, memory_ages,
                            score_commentary, score_consistency, stream_seconds, summarize_scores)

OURS = demo.STREAM


def with_policy(config: StreamConfig, **changes) -> StreamConfig:
    return dataclasses.replace(config, policy=dataclasses.replace(config.policy, **changes))


# Each variant: (scheme, stream config); `ours` is the streaming cache with the demo's config.
VARIANTS = {
    "ours": ("streaming", OURS),
    "full": ("full", OURS),
    "sliding": ("sliding", OURS),
    "sliding_overlap": ("sliding_overlap", OURS),
    "native": ("streaming", dataclasses.replace(OURS, pos_mode="native")),
    "vision_4s": ("streaming", with_policy(OURS, vision_window_s=4)),
    "vision_16s": ("streaming", with_policy(OURS, vision_window_s=16)),
    "no_sink": ("streaming", with_policy(OURS, text_sink=0,
                                         text_window=OURS.policy.text_sink + OURS.policy.text_window)),
    "short_text": ("streaming", with_policy(OURS, text_sink=16, text_window=48)),
    "rounds_4": ("streaming", with_policy(OURS, text_rounds=4)),
    "rounds_4_no_text": ("streaming", with_policy(OURS, text_rounds=4, text_sink=0, text_window=0)),
}
FULL_BUDGET_S = 600  # full attention's memory budget, seconds of video (--full-budget-s)


def stream_variant(model, tokenizer, scheme: str, config: StreamConfig, seed: int, seconds: int, budget_s: float,
                   full_max_s: int = FULL_BUDGET_S) -> dict:
    """Per-second texts, truths, generated token counts and wall times of one variant."""
    session = make_session(model, tokenizer, scheme, demo.match_stream(seed, config), full_max_s=full_max_s,
                           preprocess=tokenizer.vision_preprocess)
    texts, truths, n_tokens, walls, stopped = [], [], [], [], None
    started = time.perf_counter()
    for item in itertools.islice(stream_seconds(MatchConfig(seed), RenderConfig()), seconds):
        t0 = time.perf_counter()
        try:
            text = session.step(item.frames, float(item.second), float(item.second + 1))
        except CacheFullError as e:
            stopped = f"at {item.second} s: {e}"
            break
        walls.append(time.perf_counter() - t0)
        texts.append(text)
        truths.append(item.truth)
        n_tokens.append(int(session.last_output.n_gen_b[0]))
        if time.perf_counter() - started > budget_s and len(texts) < seconds:
            stopped = f"at {len(texts)} s: wall-time budget of {budget_s:.0f} s spent"
            break
    return {"texts": texts, "truths": truths, "n_tokens": n_tokens, "walls": walls, "stopped": stopped}


def summarize(run: dict, segment_s: int, memory_age_s: int) -> dict:
    scores = score_commentary(run["texts"], run["truths"])
    ages = memory_ages(run["truths"])
    consistent = score_consistency(run["texts"])

    def latency(walls, tokens):
        return {"ms_per_round": 1e3 * float(np.mean(walls)) if walls else None,
                "ms_per_token": 1e3 * sum(walls) / max(1, sum(tokens))}

    # Second 0 compiles: steady-state latency leaves it out.
    walls, tokens = run["walls"][1:], run["n_tokens"][1:]
    segments = []
    for start in range(0, len(scores), segment_s):
        part, timed = slice(start, start + segment_s), slice(max(0, start - 1), start + segment_s - 1)
        segments.append({"start_s": start, "end_s": min(start + segment_s, len(scores)),
                         **summarize_scores(scores[part], ages[part], memory_age_s, consistent[part]),
                         **latency(walls[timed], tokens[timed])})
    return {
        **summarize_scores(scores, ages, memory_age_s, consistent), "stopped": run["stopped"],
        **latency(walls, tokens),
        "first_round_s": run["walls"][0] if run["walls"] else None,
        "correct_by_second": "".join("1" if s.correct else "0" for s in scores),
        "segments": segments,
        "examples": [{"second": t.second, "truth": t.text, "predicted": p, "memory_age_s": a}
                     for t, p, a in zip(run["truths"], run["texts"], ages) if a is not None and a > memory_age_s][:12],
    }


def memoryless_baseline(truths: list[SecondTruth], memory_age_s: int) -> float | None:
    """Accuracy on the long-memory scores of a commentator that remembers nothing (but sees which
    side scored): every score as if no earlier goal happened, 0-0 in a recap and 1-0 or 0-1 for a goal."""
    def guessed(fact) -> bool:
        return sum(fact.score) == (fact.kind == "goal")

    hits = [all(guessed(f) for f in t.facts if f.score is not None)
            for t, a in zip(truths, memory_ages(truths)) if a is not None and a > memory_age_s]
    return sum(hits) / len(hits) if hits else None


def checks(variants: dict) -> list[dict]:
    """The paper's claims, each compared on this task: held or not, with the numbers."""
    def get(name, key):
        v = variants.get(name)
        return None if v is None else v.get(key)

    claims = []

    def claim(text, held, *names, key="accuracy"):
        if all(get(n, key) is not None for n in names):
            values, over_s = {n: get(n, key) for n in names}, None
            # A variant stopped early (full, sliding_overlap) is compared over the seconds it streamed:
            # the later, harder part of the hour would otherwise count against the others only.
            per_second = [variants[n].get("correct_by_second") for n in names]
            if key == "accuracy" and all(per_second):
                over_s = min(map(len, per_second))
                values = {n: flags[:over_s].count("1") / over_s for n, flags in zip(names, per_second)}
            claims.append({"claim": text, "held": bool(held(*values.values())), "key": key, "values": values,
                           "over_s": over_s})

    claim("our cache is more accurate than sliding windows without overlap", lambda o, s: o > s, "ours", "sliding")
    claim("our cache is at least as accurate as sliding windows with overlap (within 2 points)",
          lambda o, s: o >= s - 0.02, "ours", "sliding_overlap")
    claim("our cache is at least 3x cheaper per token than sliding windows with overlap",
          lambda o, s: 3 * o <= s, "ours", "sliding_overlap", key="ms_per_token")
    claim("our cache is cheaper per token than full attention", lambda o, f: o < f, "ours", "full",
          key="ms_per_token")
    claim("full attention covers less of the stream than our cache (memory budget)",
          lambda o, f: f < o, "ours", "full", key="seconds")
    claim("contiguous positions are at least as accurate as native ones", lambda c, n: c >= n, "ours", "native")
    claim("the attention sink helps the long-memory score", lambda o, n: o > n, "ours", "no_sink",
          key="memory_accuracy")
    claim("a text window of 192 tokens helps the long-memory score more than one of 48",
          lambda o, s: o > s, "ours", "short_text", key="memory_accuracy")
    claim("the text sink + window carry the score past the rounds kept in full",
          lambda w, n: w > n, "rounds_4", "rounds_4_no_text", key="memory_accuracy")
    claim("an 8 s vision window is at least as accurate as 4 s", lambda o, v: o >= v, "ours", "vision_4s")
    claim("an 8 s vision window is at least as accurate as 16 s (the paper's)", lambda o, v: o >= v, "ours",
          "vision_16s")
    claim("overlapped-chunk SFT (the bundled model) is at least as accurate as non-overlapped SFT",
          lambda o, n: o >= n, "ours", "sft_non_overlapped")
    return claims


def _fmt(x, pct=True):
    if x is None:
        return "-"
    if pct:
        return f"{100 * x:.1f}%"
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"# Ablations on the synthetic match ({result['device']}, commit {result['commit'][:10]})", "",
             f"Seed {c['seed']} (held out), up to {c['seconds']} s per variant, model `{c['model']}`; "
             f"`memory` = scores whose last change is more than {c['memory_age_s']} s old "
             f"(a commentator remembering nothing, every score as if it were the first goal or 0-0, "
             f"would get {_fmt(result['memoryless_baseline'])} of them). "
             "Latency: round wall time / generated tokens, second 0 (compilation) left out.", "",
             "| variant | seconds | accuracy | events | silence | score | memory (n) | consistent (n) | ms/token | "
             "ms/round | stopped |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['seconds']} | {_fmt(v['accuracy'])} | {_fmt(v['event_accuracy'])} | "
                     f"{_fmt(v['silence_accuracy'])} | {_fmt(v['score_accuracy'])} | "
                     f"{_fmt(v['memory_accuracy'])} ({v['memory_seconds']}) | "
                     f"{_fmt(v.get('score_consistency'))} ({v.get('stated_score_seconds', '-')}) | "
                     f"{_fmt(v['ms_per_token'], False)} | "
                     f"{_fmt(v['ms_per_round'], False)} | {v['stopped'] or ''} |")
    lines += ["", "## Accuracy per segment", "",
              "| variant | " + " | ".join(f"{s['start_s']}-{s['end_s']} s"
                                         for s in max(result["variants"].values(),
                                                      key=lambda v: len(v["segments"]))["segments"]) + " |"]
    lines.append("|---" * (1 + max(len(v["segments"]) for v in result["variants"].values())) + "|")
    for name, v in result["variants"].items():
        lines.append(f"| {name} | " + " | ".join(f"{_fmt(s['accuracy'])} / {_fmt(s['memory_accuracy'])} / "
                                                f"{_fmt(s.get('score_consistency'))}" for s in v["segments"]) + " |")
    lines += ["", "(accuracy / memory accuracy / consistent)", "", "## Checks", ""]
    for ch in result["checks"]:
        shown = ", ".join(f"{name} {_fmt(x, ch['key'].endswith('accuracy'))}" for name, x in ch["values"].items())
        over = f" over the first {ch['over_s']} s" if ch.get("over_s") else ""
        lines.append(f"- {'held' if ch['held'] else 'did NOT hold'}: {ch['claim']} ({ch['key']}{over}: {shown})")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ModuleNotFoundError as e:  # the JSON and markdown are already written
        raise SystemExit(f"ablations.png needs matplotlib: pip install 'svlm-jax[bench]' ({e})") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    # Matplotlib's colour cycle has 10 colours and there are more variants: the line style tells
    # the variants that share a colour apart.
    for i, (name, v) in enumerate(result["variants"].items()):
        mids = [(s["start_s"] + s["end_s"]) / 2 / 60 for s in v["segments"]]
        style = dict(color=f"C{i % 10}", linestyle=("-", "--", ":")[i // 10 % 3], marker=".", label=name)
        for ax, key in zip(axes, ("accuracy", "memory_accuracy", "score_consistency", "ms_per_token")):
            ax.plot(mids, [np.nan if s.get(key) is None else s[key] for s in v["segments"]], **style)
    for ax, title in zip(axes, ("accuracy per segment", "long-memory score per segment",
                                "stated scores consistent with the own commentary", "ms per generated token")):
        ax.set(xlabel="stream minutes", title=title)
        ax.grid(True, alpha=0.3)
    axes[3].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"demo model on seed {result['config']['seed']}, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def previous_variants(path: Path, seed: int, seconds: int) -> dict:
    """The variants of an earlier run on the same match and length, each with the commit it ran at."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if (old["config"]["seed"], old["config"]["seconds"]) != (seed, seconds):
        raise SystemExit(f"--merge: {path} is seed {old['config']['seed']} over {old['config']['seconds']} s, "
                         f"this run is seed {seed} over {seconds} s")
    return {name: {"commit": old.get("commit"), **v} for name, v in old["variants"].items()}


def previous_sft(path: Path) -> list[str]:
    return json.loads(path.read_text())["config"].get("sft", []) if path.exists() else []


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(demo.DEMO_MODEL_DIR))
    ap.add_argument("--seed", type=int, default=demo.DEMO_SEED)
    ap.add_argument("--minutes", type=float, default=60.0, help="stream length per variant")
    ap.add_argument("--segment-minutes", type=float, default=10.0)
    ap.add_argument("--budget-s", type=float, default=600.0, help="wall-time budget per variant")
    ap.add_argument("--full-budget-s", type=int, default=FULL_BUDGET_S,
                    help="full attention's memory budget, video seconds")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--sft", nargs="*", default=[], metavar="NAME=DIR",
                    help="models for the SFT ablation, streamed with the `ours` cache")
    ap.add_argument("--smoke", action="store_true", help="20 s of each variant, results to /tmp")
    ap.add_argument("--out", default=None, help="results folder (default experiments/results)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the variants of the existing ablations.json that this run does not redo")
    args = ap.parse_args(argv)
    seconds = 20 if args.smoke else int(args.minutes * 60)
    segment_s = 10 if args.smoke else int(args.segment_minutes * 60)
    out_dir = Path(args.out or ("/tmp/ablations_smoke" if args.smoke else RESULTS))
    memory_age_s = LONG_MEMORY_S

    models = {"": demo.load_model(Path(args.model))}
    runs = [(name, "", *VARIANTS[name]) for name in args.variants]
    for spec in args.sft:
        name, _, model_dir = spec.partition("=")
        if not model_dir:
            ap.error(f"--sft takes NAME=DIR, got {spec!r}")
        models[name] = demo.load_model(Path(model_dir))
        runs.append((f"sft_{name}", name, "streaming", OURS))

    variants = previous_variants(out_dir / "ablations.json", args.seed, seconds) if args.merge else {}
    truths = None
    for name, model_key, scheme, config in runs:
        model, tokenizer = models[model_key]
        run = stream_variant(model, tokenizer, scheme, config, args.seed, seconds, args.budget_s, args.full_budget_s)
        if truths is None or len(run["truths"]) > len(truths):
            truths = run["truths"]
        variants[name] = {"config": config_record(scheme, config, full_max_s=args.full_budget_s),
                          "commit": git_commit(),
                          **summarize(run, segment_s, memory_age_s)}
        print(json.dumps({"variant": name, **{k: variants[name][k] for k in (
            "seconds", "accuracy", "event_accuracy", "score_accuracy", "memory_accuracy", "score_consistency",
            "ms_per_token", "stopped")}}), flush=True)

    result = {"config": {"model": args.model, "seed": args.seed, "seconds": seconds, "segment_s": segment_s,
                         "budget_s": args.budget_s, "full_budget_s": args.full_budget_s,
                         "memory_age_s": memory_age_s,
                         "sft": sorted({*args.sft, *(previous_sft(out_dir / "ablations.json") if args.merge else [])})},
              "memoryless_baseline": memoryless_baseline(truths, memory_age_s),
              "variants": variants, "checks": checks(variants)}
    path = write_result("ablations", result, out_dir / "ablations.json")
    result = json.loads(path.read_text())  # with device and commit
    (out_dir / "ablations.md").write_text(markdown(result))
    plot(result, out_dir / "ablations.png")
    print(f"wrote {path}, ablations.md and ablations.png in {out_dir}")


if __name__ == "__main__":
    main()
