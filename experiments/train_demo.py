"""Train the model `svlm demo` ships: a tiny StreamingVLM that commentates the synthetic match.

One command reproduces svlm_jax/assets/demo_model/ and experiments/results/demo_training.json:
    python -m experiments.train_demo
Stages, each skipped when its output already exists under --work (so a re-run resumes; training
itself resumes from its latest checkpoint):
  1. data       synthetic streams (seeds 0 .. streams-1, each joined at its own minute) as SFT
                samples: samples.jsonl + mp4s
  2. tokenizer  byte-level BPE on a fixed commentary corpus (TOKENIZER_STREAMS) and the chat
                format's words, with a preprocessor_config.json that keeps the 112x112 frames as
                they are (8x8 patches, 16 vision tokens per second) for training and streaming alike
  3. init       random weights of the demo architecture (DEMO_ARCHITECTURE) as an HF directory
  4. pretrain   the LM alone on commentary text of other matches (next-token prediction, with
                svlm_jax.train's step on rows of text, `step.text_batch`): the
                miniature of starting from a pretrained LLM, which can already copy from context
                (repeating the last stated score is copying): plain text, in dense cheap rows;
                `--goal-text-steps N --score-steps M` go on with goal-dense matches
                (SCORE_TEXT_PACE), N steps on every token, then M on the score numbers alone: this
                teaches adding a goal (trained on every token at the demo's pace the LM guesses
                which number a goal raises: 75% of held-out goal score words, 99.6% after 300 and
                200 steps); measured, not in the bundled model (experiments/README.md), so off.
                `--chat-steps N` adds N steps on the text in the chat format without frames
                (`StreamFormat.flat_chunk` with no video tokens); measured to hurt (experiments/README.md), so off
  5. train      overlapped-chunk SFT (`svlm_jax.train.run.main_train`) on a generated TOML config
  6. export     float32 HF checkpoint into svlm_jax/assets/demo_model/, with its stream_config.json
                (`demo.STREAM_DEFAULTS`)
  7. evaluate   stream the held-out seed `demo.DEMO_SEED` through StreamingSession as the demo does
                and score it with the synth scorer, then the first minutes of HELD_OUT_SEEDS; score
                copying teacher-forced, and on the text pretraining's held-out rows (what SFT kept
                of it); record the demo's first seconds for the tests
  8. qa         off by default (`--qa-steps N`): fine-tune the exported model N steps on streams
                asked "What is the score?" (`DatasetConfig.qa_rate`: the question joins a random
                second's user turn, its answer "Score one to zero." follows that second's
                commentary, as `StreamingSession.step_batch(..., questions=...)` asks it) with the
                SFT stage's chunking and cache policy, the LM alone at a small rate (`--qa-lr`), and
                export it over the model before steps 7's evaluation. `--qa-only` runs this stage
                alone on the model already in --out (the bundled one), exports into --work/qa_model
                and writes experiments/results/demo_qa.json: QA accuracy before and after
                (`evaluate_qa`: questions at seconds without a recap, with no goal yet or the last
                one beyond the demo's vision window) and the demo's metrics on `demo.DEMO_SEED`
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import svlm_jax
from experiments.common import RESULTS, write_result
from svlm_jax import demo
from svlm_jax.config import ModelConfig, TextConfig, VisionConfig
from svlm_jax.model.params import Model
from svlm_jax.stream_format import END_MARKER, QUERY, SYSTEM, CachePolicy, StreamFormat, time_label
from svlm_jax.streaming import StreamingSession
from svlm_jax.synth import (LONG_MEMORY_S, QUESTION, DatasetConfig, Match, MatchConfig, RenderConfig, match_intro,
                            memory_ages, parse_facts, score_commentary, scores_by_second, stream_seconds,
                            summarize_scores, write_dataset)
from svlm_jax.synth.commentary import SIDES
from svlm_jax.synth.dataset import stream_start
from svlm_jax.tokenizer import Tokenizer, train_tokenizer
from svlm_jax.train import data, sharding, step
from svlm_jax.train.run import main_export, main_train, model_for_tokenizer

REPO = Path(__file__).resolve().parent.parent

# The bundled model: LM hidden 128, 4 layers, head_dim 32 (16 rotary pairs split t/h/w as 4/6/6);
# a 2-block vision tower of width 64. Special-token ids and vocab come from the tokenizer.
DEMO_ARCHITECTURE = ModelConfig(
    model_type="qwen2_5_vl",
    vision=VisionConfig(kind="qwen2_5_vl", depth=2, hidden_size=64, num_heads=2, intermediate_size=128,
                        out_hidden_size=128, fullatt_block_indexes=(1,)),
    text=TextConfig(vocab_size=1, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                    num_kv_heads=2, rope_theta=10_000.0, mrope_section=(4, 6, 6)),
    image_token_id=0, video_token_id=0, vision_start_token_id=0, vision_end_token_id=0)

FRAME_PIXELS = 112 * 112  # the synth renderer's frame: min = max pixels keeps it unresized
TOKENIZER_VOCAB = 512
# Text pretraining matches: disjoint from the video streams (0 .. streams-1) and the demo's seed.
TEXT_SEEDS = range(100_000, 100_064)
TEXT_HELD_OUT_SEEDS = range(200_000, 200_004)
# The goal-dense text phases: 10-minute matches of shots that mostly score (about 9 goals a minute,
# scores into the fifties, beyond the demo's hour's), disjoint from every other seed.
SCORE_TEXT_SEEDS = range(400_000, 400_128)
SCORE_TEXT_PACE = MatchConfig(seed=0, goal_probability=0.9, save_probability=0.05, shot_weight=2.0,
                              shooting_range=0.5)
SCORE_TEXT_MINUTES = 10
# The training streams' pace: livelier than the demo's (MatchConfig's defaults: 0.8 goals a minute)
# at 2.9 goals a minute, so SFT sees more of the seconds that add a goal.
TRAINING_PACE = MatchConfig(seed=0, goal_probability=0.7, save_probability=0.2, shot_weight=1.0, shooting_range=0.6)
# Late-joined video streams for the teacher-forced check (not trained on, not the demo's seed).
TEACHER_FORCED_SEEDS = range(300_000, 300_003)
# The tokenizer's corpus: the commentary of 24 ten-minute streams (what the earlier demo models
# trained on; it reproduces the bundled tokenizer), fixed so that the SFT data's flags change
# neither the vocabulary nor the text pretraining.
TOKENIZER_STREAMS = DatasetConfig(streams=24, minutes=10, start_minute_max=30, kickoff_fraction=0.25)
# Held-out matches streamed from the kickoff besides the demo's: one match's numbers swing with its
# teams (the bundled model names 100% of seed 1000's events in its first 300 s, 55% of seed 1004's).
HELD_OUT_SEEDS = range(demo.DEMO_SEED, demo.DEMO_SEED + 6)


def make_data(work: Path, args, name: str = "data", streams: int | None = None, qa_rate: float = 0.0) -> Path:
    """The SFT streams (seeds 0 .. streams-1) under work/name; with `qa_rate` asked QUESTION too."""
    out = work / name
    if not (out / "samples.jsonl").is_file():
        pace = MatchConfig(seed=0, goal_probability=args.goal_probability, save_probability=args.save_probability,
                           shot_weight=args.shot_weight, shooting_range=args.shooting_range)
        write_dataset(out, DatasetConfig(streams=args.streams if streams is None else streams, minutes=args.minutes,
                                         first_seed=0, start_minute_max=args.start_minute_max,
                                         kickoff_fraction=args.kickoff_fraction, pace=pace, qa_rate=qa_rate))
    return out / "samples.jsonl"


def clip_texts(config: DatasetConfig) -> list[str]:
    """The commentary of each clip `write_dataset(config)` would write, simulated without rendering."""
    texts = []
    for seed in range(config.first_seed, config.first_seed + config.streams):
        first = stream_start(config, seed)
        end = first + config.minutes * 60
        truths = [item.truth for item in itertools.islice(stream_seconds(config.match(seed), render_from=end), end)]
        texts += [" ".join(w for truth in truths[start:start + config.clip_seconds] for _, _, w in truth.words)
                  for start in range(first, end, config.clip_seconds)]
    return texts


def make_tokenizer(work: Path) -> Path:
    out = work / "tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    texts = clip_texts(TOKENIZER_STREAMS)
    # The chat format's own words, so prompts tokenize into few tokens too.
    times = [time_label(t, t + 1) for t in range(0, 4000, 7)]
    texts += [SYSTEM, "system", "previous text", "user", "assistant", QUERY, END_MARKER,
              *times] * 20
    train_tokenizer(texts, TOKENIZER_VOCAB, out)
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": FRAME_PIXELS, "max_pixels": FRAME_PIXELS, "patch_size": 14, "temporal_patch_size": 2,
         "merge_size": 2}, indent=2))
    return out


def make_init(work: Path, tokenizer_dir: Path, seed: int) -> Path:
    out = work / "init"
    if not (out / "config.json").is_file():
        tok = Tokenizer.from_pretrained(tokenizer_dir)
        base = dataclasses.replace(DEMO_ARCHITECTURE,
                                   text=dataclasses.replace(DEMO_ARCHITECTURE.text, vocab_size=tok.vocab_size))
        cfg = model_for_tokenizer(base, tok)
        svlm_jax.save_pretrained(Model(cfg, svlm_jax.init_params(cfg, jax.random.key(seed))), out)
    return out


def commentary_windows(tok: Tokenizer, match: MatchConfig, minutes: int, length: int,
                        stride: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A match's commentary from the kickoff as one token stream, in the previous-text format (words
    joined by spaces), cut into windows of `length` tokens every `stride`, each opening with the
    match's intro as the text sink keeps it: (ids, labels = ids) each. Simulation only, no frames."""
    seconds = itertools.islice(stream_seconds(match, render_from=minutes * 60), minutes * 60)
    fmt = StreamFormat.from_tokenizer(tok)
    ids = np.asarray(fmt.commentary_ids([w for item in seconds for _, _, w in item.truth.words]), np.int32)
    intro = np.asarray(fmt.previous_text_ids(match_intro(Match(match).teams)), np.int32)
    body = length - len(intro)
    windows = [np.concatenate([intro, ids[i:i + body]]) for i in range(0, len(ids) - body + 1, stride)]
    return [(w, w) for w in windows]


def commentary_rows(tok: Tokenizer, seeds, pace: MatchConfig, minutes: int, length: int,
                    stride: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """commentary_windows of the matches `seeds` played at `pace`."""
    return [w for seed in seeds for w in commentary_windows(tok, dataclasses.replace(pace, seed=seed), minutes,
                                                            length, stride)]


def commentary_chunks(fmt: StreamFormat, spec: data.ChunkSpec, seed: int, minutes: int, n_chunks: int,
                      rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n_chunks` random chunks of a match's commentary from the kickoff, as the SFT lays them out
    (`fmt.flat_chunk`: system, previous text, then a user and an assistant turn per second) but
    with no frames, so no video tokens: (ids [T], labels [T]) each. Simulation only, no rendering."""
    seconds = itertools.islice(stream_seconds(MatchConfig(seed), render_from=minutes * 60), minutes * 60)
    sample = data.Sample(video=None, video_start=0, video_end=minutes * 60,
                         words=tuple(w for item in seconds for w in item.truth.words),
                         previous=match_intro(Match(MatchConfig(seed)).teams))
    rounds = data.sample_rounds(sample, fmt)
    bounds = data.chunk_bounds(len(rounds), spec)
    return [fmt.flat_chunk(data.previous_ids(fmt, sample, rounds, start, spec.policy), rounds[start:end],
                           [0] * (end - start))
            for start, end in (bounds[i] for i in rng.choice(len(bounds), n_chunks, replace=False))]


def text_rows(chunks: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chunks right-padded into ids [N, T], labels [N, T] (IGNORE on padding) and real [N, T] (True on
    the chunks' own tokens); T - 1, the inputs' length, a multiple of 64."""
    length = -(-(max(len(ids) for ids, _ in chunks) - 1) // 64) * 64 + 1
    ids = np.full((len(chunks), length), pad_id, np.int32)
    labels = np.full((len(chunks), length), data.IGNORE, np.int32)
    real = np.zeros((len(chunks), length), bool)
    for row, (chunk_ids, chunk_labels) in enumerate(chunks):
        ids[row, :len(chunk_ids)], labels[row, :len(chunk_labels)], real[row, :len(chunk_ids)] = chunk_ids, chunk_labels, True
    return ids, labels, real


def score_number_mask(tok: Tokenizer, ids_bt: np.ndarray) -> np.ndarray:
    """True where a token belongs to a number of a stated score ("... Score twelve to 3."): the
    tokens that only memory of earlier text can predict."""
    score_word = np.isin(ids_bt, [tok.encode(" Score")[-1], tok.encode("Score")[-1]])
    to_word = np.isin(ids_bt, [tok.encode(" to")[-1]])
    full_stop = np.isin(ids_bt, tok.encode("."))
    alphanumeric = np.asarray([any(c.isalnum() for c in tok.decode([i])) for i in range(tok.vocab_size)])
    counted = alphanumeric[ids_bt] & ~score_word & ~to_word
    return _from_word_to_full_stop(score_word, full_stop) & counted


def side_word_mask(tok: Tokenizer, ids_bt: np.ndarray) -> np.ndarray:
    """True at a goal's side word ("Goal for Red home!"): text predicts it only by copying the word
    after the scorer's name in earlier text (the intro, or any earlier event of that team)."""
    return goal_statement_mask(tok, ids_bt) & np.isin(ids_bt, [tok.encode(f" {side}")[-1] for side in SIDES])


def memory_word_mask(tok: Tokenizer, ids_bt: np.ndarray) -> np.ndarray:
    """The score numbers and goals' side words: the words only the context can predict."""
    return score_number_mask(tok, ids_bt) | side_word_mask(tok, ids_bt)


def goal_statement_mask(tok: Tokenizer, ids_bt: np.ndarray) -> np.ndarray:
    """True from a "Goal" token to the next full stop: the goal's sentence, whose score adds one
    to the previous statement's ("Goal for Red! Score two to one.")."""
    goal_word = np.isin(ids_bt, [tok.encode(" Goal")[-1], tok.encode("Goal")[-1]])
    return _from_word_to_full_stop(goal_word, np.isin(ids_bt, tok.encode(".")))


def previous_other_number(tok: Tokenizer, ids_t: np.ndarray) -> np.ndarray:
    """[T]: at the numbers of each single-token score statement "Score h to a", the other number of
    the statement before it (its a at h, its h at a); -1 elsewhere. A recap predicting it has copied
    the right statement's wrong slot: home and away swapped."""
    score = np.isin(ids_t, [tok.encode(" Score")[-1], tok.encode("Score")[-1]])
    to_id = tok.encode(" to")[-1]
    other_t, previous = np.full(len(ids_t), -1), None
    for i in np.nonzero(score[:-3])[0]:
        if ids_t[i + 2] == to_id:
            if previous is not None:
                other_t[i + 1], other_t[i + 3] = previous[1], previous[0]
            previous = ids_t[i + 1], ids_t[i + 3]
    return other_t


def _from_word_to_full_stop(word_bt: np.ndarray, full_stop_bt: np.ndarray) -> np.ndarray:
    """[B, T] True from each `word` token up to (not including) the next full stop."""
    mask = np.zeros(word_bt.shape, bool)
    inside = np.zeros(word_bt.shape[0], bool)
    for t in range(word_bt.shape[1]):
        inside = (inside | word_bt[:, t]) & ~full_stop_bt[:, t]
        mask[:, t] = inside
    return mask


def text_spec(cfg: ModelConfig, optim: step.OptimConfig = step.OptimConfig()) -> step.StepSpec:
    """svlm_jax.train's step on text rows: the LM alone (the tower stays frozen), in float32 (bfloat16
    matmuls are slow on CPUs), without remat (small activations)."""
    return step.StepSpec(cfg, optim, compute_dtype="float32", freeze_vision=True, remat=False)


def train_text(model: Model, chunks, pad_id: int, batch: int, steps: int, lr: float, rng: np.random.Generator,
               name: str, counted=None) -> tuple[Model, list[dict]]:
    """(trained model, loss curve): `steps` updates of svlm_jax.train's step on batches of `batch` rows
    drawn from the padded `chunks` (text_rows), the loss over every real target or, given a function of
    the padded ids [N, T], over its targets [N, T-1]."""
    ids_nt, _, real_nt = text_rows(chunks, pad_id)
    counted_nt = real_nt[:, 1:] if counted is None else counted(ids_nt[:, 1:]) & real_nt[:, 1:]
    spec = text_spec(model.config, step.OptimConfig(lr=lr, warmup_steps=steps // 20, total_steps=steps))
    mesh = sharding.make_mesh()
    update = step.compile_step(spec, mesh, step.state_shardings(spec, model.params, mesh))
    state = step.sharded_state(spec, model.params, mesh)  # the step donates it: model.params are gone after
    curve, started = [], time.perf_counter()
    for i in range(steps):
        picks = rng.integers(0, len(ids_nt), batch)
        batch_rows = step.text_batch(ids_nt[picks], real_nt[picks], counted_nt[picks])
        state, metrics = update(state, sharding.put_batch(batch_rows, mesh))
        if (i + 1) % 50 == 0:
            loss = float(metrics["loss"])
            curve.append({"step": i + 1, "loss": loss, "time_s": time.perf_counter() - started})
            print(f"{name} pretraining step {i + 1:5d}  loss {loss:.4f}", flush=True)
    return model.replace(params=state.params), curve


def text_held_out(model: Model, tok: Tokenizer, chunks, pad_id: int, batch: int) -> dict:
    """On the padded `chunks` (text_rows): the mean of the batches' losses (the step's loss) and the
    accuracy of the labelled score-number tokens (`svlm_jax.forward`'s next-token argmax)."""
    loss_of = jax.jit(step.batch_loss, static_argnums=0)
    spec = text_spec(model.config)
    ids_nt, labels_nt, real_nt = text_rows(chunks, pad_id)
    losses, right, counted = [], Counter(), Counter()
    for first in range(0, len(ids_nt), batch):
        rows = slice(first, first + batch)
        losses.append(float(loss_of(spec, model.params, step.text_batch(ids_nt[rows], real_nt[rows],
                                                                          real_nt[rows, 1:]))))
        logits_btv = svlm_jax.forward(model, ids_nt[rows], attention_mask=real_nt[rows])
        targets = ids_nt[rows, 1:]
        labelled = labels_nt[rows, 1:] != data.IGNORE
        mask = score_number_mask(tok, targets) & labelled
        goal = goal_statement_mask(tok, targets)
        correct = np.asarray(jnp.argmax(logits_btv[:, :-1], axis=-1)) == targets
        for kind, kind_mask in (("goal", mask & goal), ("recap", mask & ~goal),
                                ("side", side_word_mask(tok, targets) & labelled)):
            right[kind] += int(correct[kind_mask].sum())
            counted[kind] += int(kind_mask.sum())
    n_right, n_counted = right["goal"] + right["recap"], counted["goal"] + counted["recap"]
    return {"loss": float(np.mean(losses)), "score_tokens": n_counted,
            "score_token_accuracy": n_right / max(n_counted, 1),
            # a goal's numbers: one copied, one raised by the goal; and the scorer's side word
            **{f"{kind}_score_tokens": counted[kind] for kind in ("goal", "recap")},
            **{f"{kind}_score_token_accuracy": right[kind] / max(counted[kind], 1) for kind in ("goal", "recap")},
            "side_tokens": counted["side"], "side_token_accuracy": right["side"] / max(counted["side"], 1)}


def train_text_phase(model: Model, tok: Tokenizer, pad_id: int, args, name: str, steps: int, chunks,
                     rng: np.random.Generator, counted, held_out: dict) -> tuple[Model, dict]:
    """One text pretraining phase (train_text, args.text_batch rows at peak rate args.text_lr) and its
    report: loss curve, time, and text_held_out of each {format: rows} of `held_out`."""
    started = time.perf_counter()
    model, curve = train_text(model, chunks, pad_id, args.text_batch, steps, args.text_lr, rng, name, counted)
    report = {"steps": steps, "batch": args.text_batch, "wall_s": time.perf_counter() - started,
              "loss_on": "all" if counted is None else "score numbers", "loss_curve": curve,
              "held_out": {fmt_name: text_held_out(model, tok, rows, pad_id, args.text_batch)
                           for fmt_name, rows in held_out.items()}}
    print(f"{name} pretraining held out: {report['held_out']}", flush=True)
    return model, report


def plain_rows(tok: Tokenizer, args, seeds, stride: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The plain text rows of matches `seeds` at the demo's pace (args.text_minutes, args.text_length)."""
    return commentary_rows(tok, seeds, MatchConfig(seed=0), args.text_minutes, args.text_length + 1, stride)


def text_corpora(tok: Tokenizer, fmt: StreamFormat, spec: data.ChunkSpec, args, rng: np.random.Generator):
    """{format: function of (match seeds, stride) -> text rows}. Plain: dense, short rows, where copying
    the last score is learned cheaply. Chat: the SFT's layout without frames, whose turn tokens
    between two statements break plain-text copying until trained on."""
    return {
        "plain": functools.partial(plain_rows, tok, args),
        "chat": lambda seeds, _: [c for s in seeds for c in commentary_chunks(fmt, spec, s, args.text_minutes,
                                                                                args.text_chunks, rng)]}


def text_after_sft(model_dir: Path, args) -> dict:
    """The trained model's LM on the text pretraining's held-out rows (the same rows: the rng is
    replayed): how much of the score copying learned from text survives SFT."""
    tok = Tokenizer.from_pretrained(model_dir)
    model = svlm_jax.load_pretrained(model_dir, "float32")
    corpora = text_corpora(tok, StreamFormat.from_tokenizer(tok), chunk_spec(args), args,
                           np.random.default_rng(args.seed))
    return {name: text_held_out(model, tok, corpus(TEXT_HELD_OUT_SEEDS, args.text_length), data.pad_id(tok),
                                args.text_batch)
            for name, corpus in corpora.items()}


def make_pretrained(work: Path, tokenizer_dir: Path, init_dir: Path, args) -> tuple[Path, dict]:
    """Stage 4: next-token training of the LM on commentary text, first as plain text, then in the
    chat format without frames; returns its HF directory and a report (per phase: loss curve, time,
    held-out loss and score-number accuracy in both formats)."""
    out, report_path = work / "pretrain", work / "pretrain" / "report.json"
    if report_path.is_file():
        return out, json.loads(report_path.read_text())
    if args.text_steps == 0 and args.chat_steps == 0:
        return init_dir, {}
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    fmt, spec = StreamFormat.from_tokenizer(tok), chunk_spec(args)
    model = svlm_jax.load_pretrained(init_dir, "float32")
    rng = np.random.default_rng(args.seed)
    corpora = text_corpora(tok, fmt, spec, args, rng)
    held_out = {name: corpus(TEXT_HELD_OUT_SEEDS, args.text_length) for name, corpus in corpora.items()}
    report = {}
    for name, steps in (("plain", args.text_steps), ("chat", args.chat_steps)):
        if steps == 0:
            continue
        # Chat rows without frames: the loss on every token taught the model to name the team from
        # the context (experiments/README.md); on the score numbers alone it can only teach copying the score.
        counted = functools.partial(score_number_mask, tok) if name == "chat" and args.chat_loss == "scores" else None
        model, report[name] = train_text_phase(model, tok, data.pad_id(tok), args, name, steps,
                                               corpora[name](TEXT_SEEDS, 64), rng, counted, held_out)
    report["corpus"] = {"matches": len(TEXT_SEEDS), "held_out_matches": len(TEXT_HELD_OUT_SEEDS),
                        "minutes_per_match": args.text_minutes, "plain_row_tokens": args.text_length,
                        "chat_chunks_per_match": args.text_chunks}
    svlm_jax.save_pretrained(model, out)
    report_path.write_text(json.dumps(report, indent=2))
    return out, report


def make_goal_trained(work: Path, tokenizer_dir: Path, pretrained_dir: Path, args) -> tuple[Path, dict]:
    """Stage 4b: the pretrained LM trained further on goal-dense matches (SCORE_TEXT_PACE), first on
    every token (mixed with the plain rows), then on the words only the context predicts (the score
    numbers and the goals' side words) alone. With the loss on every token of the demo's pace, a
    goal's raised number stayed a guess between its two slots (75% of held-out goal score words)
    while goals alone said the side. Returns its HF directory and a report per phase (loss curve, time,
    held-out accuracies on the demo's pace)."""
    out, report_path = work / "pretrain_goals", work / "pretrain_goals" / "report.json"
    if report_path.is_file():
        return out, json.loads(report_path.read_text())
    if args.goal_text_steps == 0 and args.score_steps == 0:
        return pretrained_dir, {}
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    model = svlm_jax.load_pretrained(pretrained_dir, "float32")
    pad_id = data.pad_id(tok)
    goal_dense = commentary_rows(tok, SCORE_TEXT_SEEDS, SCORE_TEXT_PACE, SCORE_TEXT_MINUTES, args.text_length + 1, 64)
    held_out = {"plain": plain_rows(tok, args, TEXT_HELD_OUT_SEEDS, args.text_length)}
    report = {"corpus": {"matches": len(SCORE_TEXT_SEEDS), "minutes_per_match": SCORE_TEXT_MINUTES,
                         "pace": dataclasses.asdict(SCORE_TEXT_PACE)}}
    for name, steps, chunks, counted in (("goals", args.goal_text_steps,
                                          goal_dense + plain_rows(tok, args, TEXT_SEEDS, 64), None),
                                         ("scores", args.score_steps, goal_dense,
                                          functools.partial(memory_word_mask, tok))):
        if steps:
            model, report[name] = train_text_phase(model, tok, pad_id, args, name, steps, chunks,
                                                   np.random.default_rng(args.seed), counted, held_out)
    svlm_jax.save_pretrained(model, out)
    report_path.write_text(json.dumps(report, indent=2))
    return out, report


def bucket_for(samples: Path, tokenizer_dir: Path, spec: data.ChunkSpec) -> tuple[int, int]:
    """One bucket holding the longest chunk (tokens rounded up to 64): a single compilation."""
    fmt = StreamFormat.from_tokenizer(Tokenizer.from_pretrained(tokenizer_dir))
    n_vision = demo.VISION_TOKENS_PER_SECOND
    longest = 0
    for sample in data.read_samples(samples):
        rounds = data.sample_rounds(sample, fmt)
        for start, end in data.chunk_bounds(len(rounds), spec):
            ids, _ = fmt.flat_chunk(data.previous_ids(fmt, sample, rounds, start, spec.policy), rounds[start:end],
                                    [n_vision] * (end - start))
            longest = max(longest, len(ids))
    return -(-longest // 64) * 64, spec.chunk_seconds * 4 * n_vision  # 4 patches per merged token


def write_run_config(work: Path, samples: Path, tokenizer_dir: Path, init_dir: Path, args, name: str = "run",
                     steps: int | None = None, lr: float | None = None, vision_lr: float | None = None) -> Path:
    """work/<name>.toml training init_dir on samples into work/<name>; the SFT stage's by default.
    `vision_lr` 0 freezes the vision tower."""
    spec = chunk_spec(args)
    tokens, patches = bucket_for(samples, tokenizer_dir, spec)
    steps = args.steps if steps is None else steps
    lr = args.lr if lr is None else lr
    vision_lr = args.vision_lr if vision_lr is None else vision_lr
    freeze = "true            # the QA stage trains the LM alone" if vision_lr == 0 else \
        "false          # the tower starts random: it has to learn to see the match"
    path = work / f"{name}.toml"
    path.write_text(f"""# Written by experiments/train_demo.py
[model]
tokenizer = "{tokenizer_dir}"
pretrained = "{init_dir}"
compute_dtype = "float32"      # bfloat16 matmuls are slow on CPUs
freeze_vision = {freeze}
remat = false                  # small activations; recomputing them only costs time

[data]
train = "{samples}"
chunk_seconds = {spec.chunk_seconds}
overlap_seconds = {spec.overlap_seconds}
buckets = [[{tokens}, {patches}]]
workers = 0

[policy]
text_sink = {spec.policy.text_sink}
text_window = {spec.policy.text_window}

[train]
out_dir = "{work / name}"
steps = {steps}
batch_size = {args.batch_size}
lr = {lr}
vision_lr = {vision_lr}
warmup_ratio = 0.03
clip_norm = 1.0
log_every = 10

[checkpoint]
every = 100
keep = 2
""")
    return path


def chunk_spec(args) -> data.ChunkSpec:
    # The demo's previous-text policy, so training sees the previous text the demo will keep.
    return data.ChunkSpec(chunk_seconds=args.chunk_seconds, overlap_seconds=args.overlap_seconds,
                          policy=CachePolicy(text_sink=demo.STREAM.policy.text_sink,
                                             text_window=demo.STREAM.policy.text_window))


def evaluate(model_dir: Path, seconds: int, seed: int = demo.DEMO_SEED) -> dict:
    """Stream a held-out seed as the demo does; accuracy overall and per kind of fact."""
    model, tok = demo.load_model(model_dir)
    started = time.perf_counter()
    texts, truths = [], []
    for item, said in demo.commentate(model, tok, seed, seconds):
        texts.append(said)
        truths.append(item.truth)
    wall = time.perf_counter() - started
    scores = score_commentary(texts, truths)
    by_kind, scores_by_kind = Counter(), Counter()
    right_by_kind, scores_right_by_kind = Counter(), Counter()
    for truth, score in zip(truths, scores):
        for fact in truth.facts:
            by_kind[fact.kind] += 1
            right_by_kind[fact.kind] += score.events_correct
            if fact.score is not None:
                scores_by_kind[fact.kind] += 1
                scores_right_by_kind[fact.kind] += bool(score.score_correct)
    ages = memory_ages(truths)
    examples = [{"second": t.second, "truth": t.text, "predicted": p, "memory_age_s": a}
                for t, p, a in zip(truths, texts, ages) if a is not None][:30]
    return {"seed": seed, "seconds": seconds, "wall_s_with_compilation": wall,
            **summarize_scores(scores, ages, LONG_MEMORY_S),
            "event_accuracy_by_kind": {k: right_by_kind[k] / n for k, n in sorted(by_kind.items())},
            "score_accuracy_by_kind": {k: scores_right_by_kind[k] / n for k, n in sorted(scores_by_kind.items())},
            "facts_by_kind": dict(sorted(by_kind.items())), "score_examples": examples}


SUMMARY_KEYS = ("accuracy", "event_accuracy", "silence_accuracy", "score_accuracy", "memory_accuracy")


def evaluate_seeds(model_dir: Path, seconds: int, seeds=HELD_OUT_SEEDS) -> dict:
    """The first `seconds` of each held-out seed streamed: the summary per seed and its mean."""
    per_seed = {}
    for seed in seeds:
        result = evaluate(model_dir, seconds, seed)
        per_seed[seed] = {k: result[k] for k in (*SUMMARY_KEYS, "score_seconds", "memory_seconds")}
    mean = {k: float(np.mean([r[k] for r in per_seed.values() if r[k] is not None])) for k in SUMMARY_KEYS}
    return {"seconds": seconds, "mean": mean, "per_seed": per_seed}


def teacher_forced_held_out(work: Path) -> Path:
    """samples.jsonl of the teacher-forced check: 2 minutes of each TEACHER_FORCED_SEEDS match,
    joined late (never trained on)."""
    held_out = work / "teacher_forced"
    if not (held_out / "samples.jsonl").is_file():
        write_dataset(held_out, DatasetConfig(streams=len(TEACHER_FORCED_SEEDS), minutes=2,
                                              first_seed=TEACHER_FORCED_SEEDS[0], start_minute_max=30))
    return held_out / "samples.jsonl"


def teacher_forced_scores(model_dir: Path, samples: Path, seconds: int = 360) -> dict:
    """Score-number token accuracy with the true commentary in context (teacher forcing) on the
    first `seconds` of the late-joined streams of `samples` (those with a score stated before them),
    in file order: whether the model repeats the last stated score, apart from whether its own
    earlier statements were right (streaming feeds back its own). On held-out streams against
    training streams, it tells copying from remembering the training matches."""
    model, tok = demo.load_model(model_dir)
    fmt = StreamFormat.from_tokenizer(tok)
    # chunks as long as the rounds streaming keeps in full, and its cache policy
    spec = data.ChunkSpec(chunk_seconds=demo.STREAM.policy.text_rounds, overlap_seconds=0, policy=demo.STREAM.policy)
    right, total = {"goal": 0, "recap": 0}, {"goal": 0, "recap": 0}
    swapped = 0
    left = seconds
    for sample in (sample for sample in data.read_samples(samples) if "Score" in sample.previous):
        if left == 0:
            break
        n = min(len(data.sample_rounds(sample, fmt)), left)
        left -= n
        for start in range(0, n, spec.chunk_seconds):
            end = min(start + spec.chunk_seconds, n)
            chunk = data.chunk_from_frames(fmt, model.config, spec, tok.vision_preprocess, sample, start,
                                           data.read_frames(sample, start, end, spec.policy.fps))
            logits_btv = svlm_jax.forward(model, chunk.ids_t[None], pixel_values_videos=chunk.rows_pv,
                                          video_grid_thw=chunk.grids_s3,
                                          second_per_grid_ts=[spec.policy.second_per_grid(
                                              tok.vision_preprocess.temporal_patch_size)] * len(chunk.grids_s3))
            predicted = np.asarray(jnp.argmax(logits_btv, axis=-1))[0, :-1]
            targets = chunk.ids_t[1:]
            mask = score_number_mask(tok, targets[None])[0] & (chunk.labels_t[1:] != data.IGNORE)
            goal = goal_statement_mask(tok, targets[None])[0]
            for kind, kind_mask in (("goal", mask & goal), ("recap", mask & ~goal)):
                right[kind] += int((predicted == targets)[kind_mask].sum())
                total[kind] += int(kind_mask.sum())
            other = previous_other_number(tok, chunk.ids_t)[1:]
            swapped += int((mask & ~goal & (predicted != targets) & (predicted == other)).sum())
    n_right, n_total = sum(right.values()), sum(total.values())
    return {"samples": str(samples), "seconds": seconds - left, "score_tokens": n_total,
            "score_token_accuracy": n_right / max(n_total, 1),
            # recaps only copy the previous statement; goals also add one to it
            **{f"{kind}_score_tokens": total[kind] for kind in total},
            **{f"{kind}_score_token_accuracy": right[kind] / max(total[kind], 1) for kind in total},
            "recap_errors": total["recap"] - right["recap"], "recap_errors_home_away_swapped": swapped}


def make_qa_trained(work: Path, base_dir: Path, args) -> Path:
    """Stage 8: `base_dir` fine-tuned `args.qa_steps` steps on `args.qa_streams` SFT streams asked
    QUESTION (`args.qa_rate` of their seconds), exported into work/qa_model."""
    out = work / "qa_model"
    if (out / "config.json").is_file():
        return out
    samples = make_data(work, args, "qa_data", args.qa_streams, args.qa_rate)
    config = write_run_config(work, samples, base_dir, base_dir, args, "qa_run", args.qa_steps, args.qa_lr, 0.0)
    main_train(config)
    main_export(work / "qa_run", out)
    return out


def qa_policy_stream(seed: int):
    """The demo's stream of match `seed` with room for a question and its answer."""
    config = demo.match_stream(seed)
    return dataclasses.replace(config, policy=dataclasses.replace(config.policy, max_question_tokens=16,
                                                                  max_answer_tokens=24))


def qa_ask_seconds(scores: list[tuple[int, int]], seconds: int, every: int = 6,
                   window_s: int | None = None) -> list[tuple[int, str]]:
    """Seconds to ask QUESTION at, each at least `every` after the last: odd ones (no recap states
    the score there, so only an answer does) with no goal yet ("no goal") or the last goal older
    than the demo's vision window ("goal out of view"); goals are where `scores` changes."""
    window_s = demo.STREAM.policy.vision_window_s if window_s is None else window_s
    asked, last_goal = [], None
    for s in range(1, seconds):
        if scores[s] != scores[s - 1]:
            last_goal = s
        if s % 2 == 0 or (asked and s - asked[-1][0] < every):
            continue
        if last_goal is None:
            asked.append((s, "no goal"))
        elif s - last_goal > window_s:
            asked.append((s, "goal out of view"))
    return asked


def evaluate_qa(model_dir: Path, seeds, seconds: int) -> dict:
    """Stream the first `seconds` of each match of `seeds` as the demo does, asking QUESTION at
    `qa_ask_seconds`; an answer is right when the scores it states are all the true one (at least one)."""
    model, tok = demo.load_model(model_dir)
    right, total, examples = Counter(), Counter(), []
    consistent = 0  # answers stating the score the model's own commentary last stated (what the cache holds)
    for seed in seeds:
        items = list(itertools.islice(stream_seconds(MatchConfig(seed), render_from=seconds), seconds))
        scores = scores_by_second(item.truth for item in items)
        asked = dict(qa_ask_seconds(scores, seconds))
        session = StreamingSession(model, tok, qa_policy_stream(seed), preprocess=tok.vision_preprocess)
        own = (0, 0)
        for item in itertools.islice(stream_seconds(MatchConfig(seed), RenderConfig()), seconds):
            question = QUESTION if item.second in asked else None
            said = session.step_batch([item.frames], [float(item.second)], [item.second + 1.0], questions=[question])[0]
            facts = parse_facts(said)
            stated = [fact.score for fact in facts if fact.score is not None]
            if question is None:
                own = stated[-1] if stated else own
                continue
            # the score the commentary holds: its last statement, raised by a goal it calls now
            goals = [fact for fact in facts if fact.kind == "goal"]
            holds = goals[-1].score if goals else own
            ok = bool(stated) and all(score == scores[item.second] for score in stated)
            agrees = bool(stated) and all(score == holds for score in stated)
            consistent += agrees
            own = stated[-1] if stated else own
            kind = asked[item.second]
            right[kind] += ok
            total[kind] += 1
            examples.append({"seed": seed, "second": item.second, "kind": kind, "score": scores[item.second],
                             "answer": said, "right": ok, "own_commentary_score": holds,
                             "agrees_with_own_commentary": agrees})
    return {"seeds": list(seeds), "seconds": seconds, "questions": sum(total.values()),
            "accuracy": sum(right.values()) / max(sum(total.values()), 1),
            "accuracy_by_kind": {k: right[k] / n for k, n in sorted(total.items())},
            "agrees_with_own_commentary": consistent / max(sum(total.values()), 1),
            "accuracy_by_seed": {seed: sum(a["right"] for a in examples if a["seed"] == seed) /
                                 max(sum(a["seed"] == seed for a in examples), 1) for seed in seeds},
            "questions_by_kind": dict(sorted(total.items())), "answers": examples}


def demo_metrics(model_dir: Path, seconds: int) -> dict:
    """The demo's summary (`svlm_jax.demo.run`'s numbers, without writing video) on demo.DEMO_SEED."""
    model, tok = demo.load_model(model_dir)
    texts, truths = [], []
    for item, said in demo.commentate(model, tok, demo.DEMO_SEED, seconds):
        texts.append(said)
        truths.append(item.truth)
    return {"seed": demo.DEMO_SEED, "seconds": seconds,
            **summarize_scores(score_commentary(texts, truths), memory_ages(truths), LONG_MEMORY_S)}


def run_qa_only(work: Path, out: Path, args) -> None:
    """--qa-only: stage 8 on the model in `out`; QA and demo numbers before and after into args.qa_result."""
    started = time.perf_counter()
    qa_dir = make_qa_trained(work, out, args)
    trained = time.perf_counter()
    seeds = range(HELD_OUT_SEEDS[0], HELD_OUT_SEEDS[0] + args.qa_eval_seeds)
    result = {"settings": {k: v for k, v in vars(args).items() if k.startswith("qa") or k in (
                  "batch_size", "chunk_seconds", "overlap_seconds", "minutes", "start_minute_max",
                  "kickoff_fraction", "eval_seconds")},
              "question": QUESTION, "base_model": str(out), "qa_model": str(qa_dir),
              "run_config": (work / "qa_run.toml").read_text()}
    log_path = work / "qa_run" / "log.jsonl"
    if log_path.is_file():
        log = [json.loads(line) for line in log_path.open()]
        result["loss_curve"] = [{k: r[k] for k in ("step", "loss", "lr")} for r in log]
        result["train_wall_s_from_step_10"] = log[-1]["time"] - log[0]["time"]
    result["wall_s_prepare_and_train"] = trained - started
    if args.qa_before_from:  # the base model's numbers from an earlier result of the same base and settings
        result["before"] = json.loads(Path(args.qa_before_from).read_text())["before"]
    for name, model_dir in (("before", out), ("after", qa_dir))[1 if args.qa_before_from else 0:]:
        result[name] = {"qa": evaluate_qa(model_dir, seeds, args.qa_eval_seconds),
                        "demo": demo_metrics(model_dir, args.eval_seconds)}
        print(name, json.dumps({"qa": {k: result[name]["qa"][k] for k in ("questions", "accuracy", "accuracy_by_kind")},
                                "demo": result[name]["demo"]}), flush=True)
    path = write_result("demo_qa", result, args.qa_result)
    print(f"wrote {qa_dir} and {path}")


def record_outputs(model_dir: Path, seconds: int) -> None:
    model, tok = demo.load_model(model_dir)
    texts = [text for _, text in demo.commentate(model, tok, demo.DEMO_SEED, seconds)]
    (model_dir / "recorded_outputs.json").write_text(json.dumps(
        {"seed": demo.DEMO_SEED, "seconds": seconds, "texts": texts}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(REPO / "runs" / "train_demo"), help="data, tokenizer and run directory")
    parser.add_argument("--out", default=str(demo.DEMO_MODEL_DIR), help="where the exported model goes")
    # Many short streams, not a few long ones (24 x 10 min): with few matches the model learns each
    # one's score from its teams and clock (teacher-forced recaps 100% on training streams, 66% on
    # held-out ones) instead of copying it from the commentary (91.5% on both with 240 x 1 min).
    parser.add_argument("--streams", type=int, default=240, help="training streams (seeds 0 .. streams-1)")
    parser.add_argument("--minutes", type=int, default=1, help="minutes per training stream")
    parser.add_argument("--start-minute-max", type=int, default=10,
                        help="each stream joins its match at a random minute up to this (scores of long matches)")
    for field, meaning in (("goal_probability", "a shot's chance to score"),
                           ("save_probability", "a shot's chance to be saved"),
                           ("shot_weight", "weight of shooting in range"),
                           ("shooting_range", "attacking progress from which shots are possible")):
        parser.add_argument(f"--{field.replace('_', '-')}", type=float, default=getattr(TRAINING_PACE, field),
                            help=f"training matches: {meaning}")
    # Most streams from the kickoff, as the demo's is: the model learns the teams' names from the
    # frames there, with the intro the only names in context.
    parser.add_argument("--kickoff-fraction", type=float, default=0.6,
                        help="share of the streams watched from the kickoff, as the demo's is")
    parser.add_argument("--text-steps", type=int, default=600, help="plain text pretraining steps (0: none)")
    parser.add_argument("--text-batch", type=int, default=32)
    parser.add_argument("--text-length", type=int, default=256, help="tokens per plain text row")
    parser.add_argument("--chat-steps", type=int, default=0,
                        help="chat-format text pretraining steps after the plain ones (0: none; 100 made the"
                             " model name one team for every event, see experiments/README.md)")
    parser.add_argument("--chat-loss", choices=("all", "scores"), default="all",
                        help="chat-format targets with a loss: every token, or the score numbers only")
    # The goal-dense text phases (stage 4b): measured with 300 and 200 steps, not in the bundled model
    # (experiments/README.md).
    parser.add_argument("--goal-text-steps", type=int, default=0,
                        help="text pretraining steps on goal-dense matches and the plain rows, every token (0: none)")
    parser.add_argument("--score-steps", type=int, default=0,
                        help="then text pretraining steps on the score numbers of goal-dense matches (0: none)")
    parser.add_argument("--text-chunks", type=int, default=40, help="chat-format chunks drawn per text match")
    parser.add_argument("--text-minutes", type=int, default=40, help="minutes of commentary per text match")
    parser.add_argument("--chunk-seconds", type=int, default=16)
    parser.add_argument("--overlap-seconds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--text-lr", type=float, default=2e-3, help="peak learning rate of text pretraining")
    # The LM at a quarter of the tower's rate: at the same rate SFT overwrote the text pretraining's
    # copying of each team's side (47% of held-out side words after it, "home" after every team).
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the LM in SFT")
    parser.add_argument("--vision-lr", type=float, default=2e-3, help="peak learning rate of the vision tower in SFT")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    parser.add_argument("--eval-seconds", type=int, default=600, help="seconds of the held-out seed scored")
    parser.add_argument("--seeds-seconds", type=int, default=300,
                        help="seconds scored of each of the held-out seeds HELD_OUT_SEEDS")
    parser.add_argument("--record-seconds", type=int, default=20, help="seconds recorded for the tests")
    parser.add_argument("--result", default=str(RESULTS / "demo_training.json"), help="where the JSON result goes")
    parser.add_argument("--qa-steps", type=int, default=0,
                        help="stage 8: steps fine-tuning the exported model on streams asked the score (0: none)")
    parser.add_argument("--qa-only", action="store_true",
                        help="run stage 8 alone on the model in --out (into --work/qa_model) and write --qa-result")
    parser.add_argument("--qa-streams", type=int, default=120, help="stage 8: training streams (seeds 0 ..)")
    parser.add_argument("--qa-rate", type=float, default=0.1, help="stage 8: share of seconds asked the score")
    parser.add_argument("--qa-lr", type=float, default=2e-4, help="stage 8: peak learning rate of the LM")
    parser.add_argument("--qa-eval-seeds", type=int, default=len(HELD_OUT_SEEDS),
                        help=f"stage 8: held-out matches asked, from seed {HELD_OUT_SEEDS[0]}")
    parser.add_argument("--qa-eval-seconds", type=int, default=120, help="stage 8: seconds of each asked match")
    parser.add_argument("--qa-before-from", default=None,
                        help="stage 8: take the base model's numbers from this earlier --qa-result (same base)")
    parser.add_argument("--qa-result", default=str(RESULTS / "demo_qa.json"), help="where stage 8's JSON goes")
    args = parser.parse_args()
    if HELD_OUT_SEEDS[0] < args.streams:
        parser.error(f"the held-out seeds from {HELD_OUT_SEEDS[0]} must stay out of the training seeds "
                     f"0..{args.streams - 1}")

    work, out = Path(args.work).resolve(), Path(args.out).resolve()  # run.toml paths are read relative to itself
    work.mkdir(parents=True, exist_ok=True)
    if args.qa_only:
        run_qa_only(work, out, args)
        return
    started = time.perf_counter()
    samples = make_data(work, args)
    tokenizer_dir = make_tokenizer(work)
    init_dir = make_init(work, tokenizer_dir, args.seed)
    pretrained_dir, text_pretraining = make_pretrained(work, tokenizer_dir, init_dir, args)
    pretrained_dir, text_pretraining["goal_dense"] = make_goal_trained(work, tokenizer_dir, pretrained_dir, args)
    config = write_run_config(work, samples, tokenizer_dir, pretrained_dir, args)
    prepared = time.perf_counter()
    main_train(config)
    trained = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    main_export(work / "run", out)
    if args.qa_steps:
        qa_dir = make_qa_trained(work, out, args)
        shutil.rmtree(out)
        shutil.copytree(qa_dir, out)
    demo.STREAM_DEFAULTS.save(out)  # how `svlm stream` and `svlm demo` stream it
    evaluation = {**evaluate(out, args.eval_seconds),
                  "held_out_seeds": evaluate_seeds(out, args.seeds_seconds),
                  "teacher_forced": teacher_forced_scores(out, teacher_forced_held_out(work)),
                  "teacher_forced_training_streams": teacher_forced_scores(out, samples),
                  "text_held_out_after_sft": text_after_sft(out, args)}
    record_outputs(out, args.record_seconds)

    log = [json.loads(line) for line in (work / "run" / "log.jsonl").open()]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(svlm_jax.load_pretrained(out, "float32").params))
    result = {
        "settings": {**vars(args), "architecture": DEMO_ARCHITECTURE.to_dict(), "parameters": n_params,
                     "stream": dataclasses.asdict(demo.STREAM), "run_config": config.read_text()},
        # From the log, so a resumed run (or a re-run that only exports and evaluates) reports the
        # training itself; step 10's record is the first, after compilation.
        "train_wall_s_from_step_10": log[-1]["time"] - log[0]["time"],
        "wall_s_this_invocation": {"prepare": prepared - started, "train": trained - prepared,
                                   "total": time.perf_counter() - started},
        "loss_curve": [{k: r[k] for k in ("step", "loss", "lr", "grad_norm", "tokens_per_s")} for r in log],
        "final_loss": log[-1]["loss"],
        "text_pretraining": text_pretraining,
        "evaluation": evaluation,
    }
    path = write_result("demo_training", result, args.result)
    print(json.dumps({"demo_seed": {k: evaluation[k] for k in SUMMARY_KEYS},
                      "held_out_seeds_mean": evaluation["held_out_seeds"]["mean"]}, indent=2))
    print(f"wrote {out} and {path}")


if __name__ == "__main__":
    main()
