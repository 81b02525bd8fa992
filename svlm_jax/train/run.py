"""Entries of `svlm train --config FILE` and `svlm export RUN_DIR OUT_DIR`.

A run directory (`train.out_dir`) holds:
  model/config.json   the model config (HF format, plus the master "dtype")
  tokenizer/          the tokenizer files, copied at the start
  checkpoints/<step>/ Orbax checkpoints (see checkpoint.py)
  log.jsonl           one JSON record per logged step
Starting `main_train` on a run directory with checkpoints resumes from the latest one (weights,
optimizer, step, data position), so an interrupted run continues exactly. Ctrl-C (SIGINT) stops
after the current step, saves, waits for the save and returns; a second Ctrl-C aborts at once.

Several hosts: set SVLM_DISTRIBUTED=1 in every process; `jax.distributed.initialize()` then finds
the cluster (SLURM, Open MPI, Kubernetes, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID) before jax sees any device.
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
from svlm_jax.config import ModelConfig, preset
from svlm_jax.media.preprocess import VisionPreprocessConfig
from svlm_jax.model.params import Model
from svlm_jax.stream_format import check_special_tokens
from svlm_jax.tokenizer import Tokenizer
from svlm_jax.train import data, sharding, step
from svlm_jax.train.checkpoint import Checkpointer, abstract_params, restore_params
from svlm_jax.train.config import TrainConfig, load_config
from svlm_jax.weights import check_output_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json",
                   "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja")


def model_for_tokenizer(cfg: ModelConfig, tok: Tokenizer) -> ModelConfig:
    """A preset's config with the tokenizer's special-token ids and a vocab that holds them."""
    sp = tok.special
    text = dataclasses.replace(cfg.text, vocab_size=max(cfg.text.vocab_size, tok.vocab_size))
    return dataclasses.replace(cfg, text=text, image_token_id=sp.image_pad, video_token_id=sp.video_pad,
                               vision_start_token_id=sp.vision_start, vision_end_token_id=sp.vision_end)


def initial_model(cfg: TrainConfig, tok: Tokenizer) -> Model:
    m = cfg.model
    if m.pretrained:
        return svlm_jax.load_pretrained(m.pretrained, dtype=m.param_dtype)
    model_cfg = model_for_tokenizer(preset(m.preset), tok)
    return Model(model_cfg, svlm_jax.init_params(model_cfg, jax.random.key(m.init_seed), jnp.dtype(m.param_dtype)))


def vision_preprocess(cfg: TrainConfig, tok: Tokenizer) -> VisionPreprocessConfig:
    base = tok.vision_preprocess or VisionPreprocessConfig()
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


def main_train(config_path: str | Path, *, max_steps: int | None = None) -> int:
    """Train (or resume) the run a config file describes; returns the step reached.
    `max_steps` bounds the updates of this invocation (a checkpoint is saved when it stops)."""
    cfg = load_config(config_path)
    if os.environ.get("SVLM_DISTRIBUTED") == "1":
        jax.distributed.initialize()
    out = Path(cfg.train.out_dir)
    tok = Tokenizer.from_pretrained(cfg.model.tokenizer)
    model = initial_model(cfg, tok)
    if jax.process_index() == 0:
        _copy_tokenizer(Path(cfg.model.tokenizer), out / "tokenizer")
        (out / "model").mkdir(parents=True, exist_ok=True)
        (out / "model" / "config.json").write_text(
            json.dumps({**model.config.to_dict(), "dtype": cfg.model.param_dtype}, indent=2))

    d, t = cfg.data, cfg.train
    cfg.policy.check_model(model.config)
    check_special_tokens(tok.special, model.config)
    chunk_spec = data.ChunkSpec(d.chunk_seconds, d.overlap_seconds, cfg.policy)
    fmt = data.training_format(tok, cfg.model.tokenizer, system=d.system, query=d.query)
    plan = data.plan_chunks(fmt, data.pad_id(tok), model.config, chunk_spec,
                            vision_preprocess(cfg, tok), data.read_samples(d.train),
                            [data.Bucket(n, p) for n, p in d.buckets])
    dataset = data.make_dataset(plan, batch_size=t.batch_size, grad_accum=t.grad_accum, seed=d.seed, steps=t.steps,
                                workers=d.workers, prefetch=d.prefetch, process_index=jax.process_index(),
                                process_count=jax.process_count())
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    optim = step.OptimConfig(lr=t.lr, vision_lr=t.vision_lr, warmup_steps=round(t.warmup_ratio * t.steps),
                             total_steps=t.steps,
                             weight_decay=t.weight_decay, b1=t.adam_b1, b2=t.adam_b2, clip_norm=t.clip_norm)
    spec = step.StepSpec(model.config, optim, cfg.model.compute_dtype, cfg.model.freeze_vision, cfg.model.remat)
    shardings = step.state_shardings(spec, model.params, mesh)
    ckpt = Checkpointer(out / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    iterator = iter(dataset)
    if ckpt.latest_step() is not None:
        like = jax.eval_shape(lambda p: step.init_state(spec, p), model.params)
        state, data_state = ckpt.restore(like, shardings)
        iterator.set_state(data_state)
    else:
        state = step.sharded_state(spec, model.params, mesh)
    del model
    train_step = step.compile_step(spec, mesh, shardings)
    current = int(jax.device_get(state.step))
    saved = current
    print(f"training {out.name}: step {current} of {t.steps}, {len(plan.refs)} chunks, mesh {dict(mesh.shape)}",
          flush=True)

    with _StopOnSigint() as stop, open(out / "log.jsonl", "a", encoding="utf-8") as log:
        tokens, started, done = 0, time.perf_counter(), 0
        while current < t.steps and (max_steps is None or done < max_steps) and not stop.requested:
            arrays = next(iterator)
            tokens += int(arrays["segment_bt"].sum()) * jax.process_count()
            state, metrics = train_step(state, sharding.put_batch(step.host_batch(spec.model, arrays), mesh))
            current, done = current + 1, done + 1
            if current % t.log_every == 0 or current == t.steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                seconds = time.perf_counter() - started
                record = {"step": current, **metrics, "tokens_per_s": tokens / seconds, "time": time.time()}
                print(f"step {current:6d}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.3g}  "
                      f"grad_norm {metrics['grad_norm']:.3g}  tokens/s {record['tokens_per_s']:.0f}", flush=True)
                if jax.process_index() == 0:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                tokens, started = 0, time.perf_counter()
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

