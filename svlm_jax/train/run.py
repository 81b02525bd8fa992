"""Entries of `svlm train --config FILE` and `svlm export RUN_DIR OUT_DIR`.

A run directory (`train.out_dir`) holds:
  model/config.json   the model config (HF format, plus the master "dtype")
  tokenizer/          the tokenizer files, copied at the start
  checkpoints/<step>/ Orbax checkpoints (see checkpoint.py)
  log.jsonl           one JSON record per logged step ({"step", "loss", "lr", ...}) and per
                      evaluation ({"step", "eval_loss", "eval_tokens", ...})
Starting `main_train` on a run directory with checkpoints resumes from the latest one (weights,
optimizer, step, data position), so an interrupted run continues exactly, bit for bit; log records
past that checkpoint (steps a killed run did not save) are dropped, and those steps are done again.
Ctrl-C (SIGINT) stops after the current step, saves, waits for the save and returns; a second
Ctrl-C aborts at once.

A pretrained checkpoint is read straight into the mesh (`sharded_load`): each process reads only
its devices' parts. With `data.eval`, the held-out samples' mean loss is computed every
`train.eval_every` steps and at the end. Several processes: `launch` (`svlm_jax.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import svlm_jax
from svlm_jax import distributed
from svlm_jax.config import ModelConfig, preset
from svlm_jax.media.preprocess import VisionPreprocessConfig
from svlm_jax.model.params import Model, Params
from svlm_jax.sharded_load import load_sharded
from svlm_jax.stream_format import check_special_tokens
from svlm_jax.tokenizer import Tokenizer
from svlm_jax.train import data, sharding, step
from svlm_jax.train.checkpoint import Checkpointer, abstract_params, restore_params
from svlm_jax.train.config import TrainConfig, TrainConfigError, load_config
from svlm_jax.weights import check_output_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "vocab.json", "merges.txt", "chat_template.json",
                   "chat_template.jinja")


def model_for_tokenizer(cfg: ModelConfig, tok: Tokenizer) -> ModelConfig:
    """A preset's config with the tokenizer's special-token ids and a vocab that holds them."""
    sp = tok.special
    text = dataclasses.replace(cfg.text, vocab_size=max(cfg.text.vocab_size, tok.vocab_size))
    return dataclasses.replace(cfg, text=text, image_token_id=sp.image_pad, video_token_id=sp.video_pad,
                               vision_start_token_id=sp.vision_start, vision_end_token_id=sp.vision_end)


def model_config(cfg: TrainConfig, tok: Tokenizer) -> ModelConfig:
    m = cfg.model
    return ModelConfig.from_file(m.pretrained) if m.pretrained else model_for_tokenizer(preset(m.preset), tok)


def initial_params(cfg: TrainConfig, model_cfg: ModelConfig, shardings: Params) -> Params:
    """The weights a run starts from, laid out with `shardings`: the pretrained checkpoint's (each
    process reading its own parts) or a random initialisation (the same in every process)."""
    m = cfg.model
    if m.pretrained:
        return load_sharded(m.pretrained, shardings, m.param_dtype).params
    return jax.device_put(svlm_jax.init_params(model_cfg, jax.random.key(m.init_seed), jnp.dtype(m.param_dtype)),
                          shardings)


def vision_preprocess(cfg: TrainConfig, tok: Tokenizer, model_cfg: ModelConfig) -> VisionPreprocessConfig:
    """The tokenizer directory's processor (else the model family's defaults), [data]'s pixel bounds."""
    base = tok.vision_preprocess or VisionPreprocessConfig.family_defaults(model_cfg.model_type)
    try:
        base.check_model(model_cfg)
    except ValueError as error:
        raise TrainConfigError(f"model.tokenizer {cfg.model.tokenizer}: {error}") from None
    return dataclasses.replace(base, min_pixels=cfg.data.min_pixels or base.min_pixels,
                               max_pixels=cfg.data.max_pixels or base.max_pixels)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


class _StopOnSigint:
    """Turns the first SIGINT into a flag checked between steps; the second one interrupts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def main_train(config_path: str | Path, *, max_steps: int | None = None,
               launch: distributed.Launch = distributed.Launch()) -> int:
    """Train (or resume) the run a config file describes; returns the step reached.
    `max_steps` bounds the updates of this invocation (a checkpoint is saved when it stops);
    `launch` joins a multi-process run (every process calls main_train with its own)."""
    cfg = load_config(config_path)
    distributed.initialize(launch)
    out = Path(cfg.train.out_dir)
    tok = Tokenizer.from_pretrained(cfg.model.tokenizer)
    model_cfg = model_config(cfg, tok)
    d, t = cfg.data, cfg.train
    cfg.policy.check_model(model_cfg)
    check_special_tokens(tok.special, model_cfg)
    if jax.process_index() == 0:
        _copy_tokenizer(Path(cfg.model.tokenizer), out / "tokenizer")
        (out / "model").mkdir(parents=True, exist_ok=True)
        (out / "model" / "config.json").write_text(
            json.dumps({**model_cfg.to_dict(), "dtype": cfg.model.param_dtype}, indent=2))

    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    part, parts = sharding.batch_part(mesh)
    fmt = data.training_format(tok, cfg.model.tokenizer, system=d.system, query=d.query,
                               stamp_frames=cfg.policy.stamp_frames(model_cfg))
    plan = _plan(cfg, tok, model_cfg, fmt, d.train)
    dataset = data.make_dataset(plan, batch_size=t.batch_size, grad_accum=t.grad_accum, seed=d.seed, steps=t.steps,
                                workers=d.workers, prefetch=d.prefetch, process_index=part, process_count=parts)
    evaluate = _evaluator(cfg, _plan(cfg, tok, model_cfg, fmt, d.eval), mesh) if d.eval else None
    optim = step.OptimConfig(lr=t.lr, vision_lr=t.vision_lr, warmup_steps=round(t.warmup_ratio * t.steps),
                             total_steps=t.steps,
                             weight_decay=t.weight_decay, b1=t.adam_b1, b2=t.adam_b2, clip_norm=t.clip_norm)
    spec = step.StepSpec(model_cfg, optim, cfg.model.compute_dtype, cfg.model.freeze_vision, cfg.model.remat,
                         cfg.model.remat_policy, cfg.model.loss_chunk)
    abstract = abstract_params(model_cfg, cfg.model.param_dtype)
    shardings = step.state_shardings(spec, abstract, mesh)
    ckpt = Checkpointer(out / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    iterator = iter(dataset)
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(jax.eval_shape(lambda p: step.init_state(spec, p), abstract), shardings)
        iterator.set_state(data_state)
    else:
        state = step.sharded_state(spec, initial_params(cfg, model_cfg, shardings.params), mesh)
    train_step = step.compile_step(spec, mesh, shardings)
    eval_sums = step.compile_eval(spec, mesh, shardings.params) if evaluate else None
    current = int(jax.device_get(state.step))
    saved = current
    if jax.process_index() == 0:
        _drop_records_after(out / "log.jsonl", current)
    print(f"training {out.name}: step {current} of {t.steps}, {len(plan.refs)} chunks, mesh {dict(mesh.shape)}"
          + (f", process {jax.process_index()} of {jax.process_count()}" if jax.process_count() > 1 else ""),
          flush=True)

    with _StopOnSigint() as stop, open(out / "log.jsonl", "a", encoding="utf-8") as log:
        def record(entry: dict) -> None:
            if jax.process_index() == 0:
                log.write(json.dumps({**entry, "time": time.time()}) + "\n")
                log.flush()

        tokens, started, done = 0, time.perf_counter(), 0
        while current < t.steps and (max_steps is None or done < max_steps) and not stop.requested:
            arrays = next(iterator)
            tokens += int(arrays["segment_bt"].sum()) * parts
            state, metrics = train_step(state, sharding.put_batch(step.host_batch(spec.model, arrays), mesh))
            current, done = current + 1, done + 1
            if current % t.log_every == 0 or current == t.steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                seconds = time.perf_counter() - started
                record({"step": current, **metrics, "tokens_per_s": tokens / seconds})
                print(f"step {current:6d}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.3g}  "
                      f"grad_norm {metrics['grad_norm']:.3g}  tokens/s {tokens / seconds:.0f}", flush=True)
                tokens, started = 0, time.perf_counter()
            if evaluate and (current % t.eval_every == 0 or current == t.steps):
                loss, n = evaluate(eval_sums, state.params)
                record({"step": current, "eval_loss": loss, "eval_tokens": n})
                print(f"step {current:6d}  eval_loss {loss:.4f}  ({n} held-out tokens)", flush=True)
                started = time.perf_counter()  # evaluation time is not training throughput
            if current % cfg.checkpoint.every == 0:
                ckpt.save(state, iterator.get_state())
                saved = current
        if saved != current:
            ckpt.save(state, iterator.get_state())
        ckpt.close()
        iterator.close()  # stops Grain's worker processes
    if stop.requested:
        print(f"stopped at step {current}; checkpoint saved", flush=True)
    return current


def _plan(cfg: TrainConfig, tok: Tokenizer, model_cfg: ModelConfig, fmt, samples_path: str) -> data.DataPlan:
    d = cfg.data
    return data.plan_chunks(fmt, data.pad_id(tok), model_cfg, data.ChunkSpec(d.chunk_seconds, d.overlap_seconds,
                                                                              cfg.policy),
                            vision_preprocess(cfg, tok, model_cfg), data.read_samples(samples_path),
                            [data.Bucket(n, p) for n, p in d.buckets])


def _evaluator(cfg: TrainConfig, plan: data.DataPlan, mesh):
    """evaluate(eval_sums, params) -> (mean loss, labelled tokens) over every held-out chunk."""
    part, parts = sharding.batch_part(mesh)
    batches = data.eval_dataset(plan, batch_size=cfg.train.batch_size, process_index=part, process_count=parts)

    def evaluate(eval_sums, params) -> tuple[float, int]:
        total, count = 0.0, 0.0
        for arrays in batches:
            s, n = jax.device_get(eval_sums(params, sharding.put_batch(step.host_batch(plan.model_cfg, arrays), mesh)))
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0), int(count)

    return evaluate


def _drop_records_after(log: Path, step_reached: int) -> None:
    """Keep the log records of steps up to `step_reached` (a resumed run redoes the later ones)."""
    if not log.is_file():
        return
    lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _record_step(line) <= step_reached]
    if len(kept) != len(lines):
        partial = log.with_name(log.name + ".partial")
        partial.write_text("".join(kept), encoding="utf-8")
        os.replace(partial, log)


def _record_step(line: str) -> float:
    """The step of a log line; infinite for a line a killed run left half-written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def main_export(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None, dtype: str | None = None) -> int:
    """Write the weights of a run's checkpoint (default: latest) as an HF model directory with its
    tokenizer files, loadable by transformers and `svlm_jax.load_pretrained`; returns the step.
    `dtype` converts the weights (default: the master dtype)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_output_dir(out_dir)  # before the slow restore
    raw = json.loads((run_dir / "model" / "config.json").read_text())
    model_cfg = ModelConfig.from_dict(raw)
    params, step_done = restore_params(run_dir / "checkpoints", abstract_params(model_cfg, raw["dtype"]), step)
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    svlm_jax.save_pretrained(Model(model_cfg, params), out_dir)
    _copy_tokenizer(run_dir / "tokenizer", out_dir)
    return step_done

