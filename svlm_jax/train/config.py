"""The training config file (TOML): six tables, every field below; unknown fields are refused.

[model]
  tokenizer      (required) directory with tokenizer.json (+ optional tokenizer_config.json,
                 generation_config.json, preprocessor_config.json); copied into the run
  pretrained     HF Qwen2(.5)-VL directory to fine-tune; or else
  preset         a `svlm_jax.config` preset to start from random weights ("tiny", ...); its special
                 token ids are replaced by the tokenizer's and its vocab grown to hold them
  param_dtype    master weights and optimizer state: "float32" (default) or "bfloat16"
  compute_dtype  forward / backward: "bfloat16" (default) or "float32"
  freeze_vision  true (default): only the LM is trained
  remat          true (default): rematerialise decoder layers in the backward pass
  remat_policy   what a rematerialised layer keeps (`step.REMAT_POLICIES`): "full" (default: only
                 its input) or "dots" (also its matmul outputs: more memory, less recomputation)
  loss_chunk     tokens per row whose logits exist at once in the loss, default 1024 (the LM head
                 and the cross-entropy run chunk by chunk; the [T, vocab] logits never exist whole)
  init_seed      seed of the random initialisation (preset only), default 0
[data]
  train          (required) JSONL of samples (format: `svlm_jax.train.data`)
  eval           JSONL of held-out samples (same format), default none: their mean loss over
                 every labelled token is logged every `train.eval_every` steps and at the end
  buckets        (required) [[tokens, patches], ...]: padded chunk sizes; one compilation each
  chunk_seconds  24; overlap_seconds 12
  system, query  the prompt's system text and first-round query (`svlm_jax.stream_format` defaults)
  min_pixels, max_pixels   frame size bounds for smart_resize; 0 = the tokenizer directory's
                 preprocessor_config.json, else Qwen's defaults
  workers        Grain worker processes decoding video (0 = in the training process)
  prefetch       batches buffered ahead (per worker), default 2
  seed           data order seed, default 0
[train]
  out_dir        (required) run directory: checkpoints/, tokenizer/, model/config.json, log.jsonl
  steps          (required) optimizer updates in the whole run
  batch_size     chunks per micro-batch over all devices, default 1
  grad_accum     micro-batches per update, default 1
  lr 1e-5; vision_lr 0 (the vision tower's peak learning rate, only with freeze_vision = false;
                 0: lr); warmup_ratio 0.03; weight_decay 0.0; adam_b1 0.9; adam_b2 0.999; clip_norm 1.0
  log_every      steps between progress lines / log records, default 1
  eval_every     steps between evaluations of `data.eval`, default 100
[policy]         the streaming cache policy the chunks follow (`stream_format.CachePolicy`):
  text_sink 512; text_window 512 (previous text kept); fps 2 (frames per second); text_rounds 16,
  vision_window_s 16, max_new_tokens 20 (what streaming keeps: checked, not used by chunking)
[mesh]
  data -1 (all devices the other axes leave); fsdp 1; tensor 1
[checkpoint]
  every 100 (steps between saves); keep 3 (most recent kept); async true
Relative paths are relative to the config file's folder.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path

from svlm_jax.stream_format import QUERY, SYSTEM, CachePolicy
from svlm_jax.train.data import ChunkSpec
from svlm_jax.train.step import REMAT_POLICIES, OptimConfig, StepSpec


class TrainConfigError(ValueError):
    """The config file is unusable; the message names the table and field."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    tokenizer: str
    pretrained: str = ""
    preset: str = ""
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    freeze_vision: bool = True
    remat: bool = True
    remat_policy: str = StepSpec.remat_policy
    loss_chunk: int = StepSpec.loss_chunk
    init_seed: int = 0


@dataclasses.dataclass(frozen=True)
class DataSection:
    train: str
    buckets: tuple[tuple[int, int], ...]
    eval: str = ""
    # How streams become chunks: defaults are ChunkSpec's (one definition), copied field by field.
    chunk_seconds: int = ChunkSpec.chunk_seconds
    overlap_seconds: int = ChunkSpec.overlap_seconds
    system: str = SYSTEM
    query: str = QUERY
    min_pixels: int = 0
    max_pixels: int = 0
    workers: int = 0
    prefetch: int = 2
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainSection:
    out_dir: str
    steps: int
    batch_size: int = 1
    grad_accum: int = 1
    # Optimizer defaults are OptimConfig's (one definition); warmup is a ratio of `steps` here.
    lr: float = OptimConfig.lr
    vision_lr: float = OptimConfig.vision_lr
    warmup_ratio: float = 0.03
    weight_decay: float = OptimConfig.weight_decay
    adam_b1: float = OptimConfig.b1
    adam_b2: float = OptimConfig.b2
    clip_norm: float = OptimConfig.clip_norm
    log_every: int = 1
    eval_every: int = 100


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 100
    keep: int = 3
    # "async" is a Python keyword, hence the field name; the file spells it `async`.
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection
    data: DataSection
    train: TrainSection
    policy: CachePolicy = CachePolicy()
    mesh: MeshSection = MeshSection()
    checkpoint: CheckpointSection = CheckpointSection()


_FILE_NAMES = {"async_save": "async"}
DTYPES = ("float32", "bfloat16")


def load_config(path: str | Path) -> TrainConfig:
    """Read, validate and resolve (relative paths) a training config file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TrainConfigError(f"{path}: {e}") from None
    return parse_config(raw, base_dir=path.parent, where=str(path))


def parse_config(raw: dict, base_dir: Path, where: str = "config") -> TrainConfig:
    cfg = _parse_table(TrainConfig, raw, where)
    _validate(cfg, where)

    def resolve(p: str) -> str:
        return str((base_dir / p).resolve()) if p else p

    resolved = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, tokenizer=resolve(cfg.model.tokenizer),
                                  pretrained=resolve(cfg.model.pretrained)),
        data=dataclasses.replace(cfg.data, train=resolve(cfg.data.train), eval=resolve(cfg.data.eval)),
        train=dataclasses.replace(cfg.train, out_dir=resolve(cfg.train.out_dir)))
    _check_out_dir(Path(resolved.train.out_dir), where)
    return resolved


def _check_out_dir(out: Path, where: str) -> None:
    """train.out_dir must be a directory, or creatable in a writable one (checked before any work)."""
    if not out.name:
        raise TrainConfigError(f"{where}: train.out_dir must name a directory, got {str(out)!r}")
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"{where}: train.out_dir {out} is an existing file, not a directory")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TrainConfigError(f"{where}: train.out_dir {out} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainConfigError(f"{where}: train.out_dir {out} is not writable "
                               f"({existing} is read-only or not ours to write)")


def _parse_table(cls, raw, where: str):
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{where}: expected a table, got {raw!r}")
    fields = {_FILE_NAMES.get(f.name, f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise TrainConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    missing = [name for name, f in fields.items() if name not in raw and f.default is dataclasses.MISSING]
    if missing:
        raise TrainConfigError(f"{where}: missing required field(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    values = {f.name: _convert(hints[f.name], raw[name], f"{where} [{name}]" if dataclasses.is_dataclass(hints[f.name])
                               else f"{where}: {name}")
              for name, f in fields.items() if name in raw}
    try:
        return cls(**values)
    except ValueError as e:  # a section's own checks (CachePolicy)
        raise TrainConfigError(f"{where}: {e}") from None


def _convert(kind, value, where: str):
    if dataclasses.is_dataclass(kind):
        return _parse_table(kind, value, where)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    else:  # tuple[tuple[int, int], ...]: the buckets
        ok = (isinstance(value, list) and value and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            for v in value))
        value = tuple(tuple(v) for v in value) if ok else value
    if not ok:
        expected = getattr(kind, "__name__", None) if not isinstance(kind, types.GenericAlias) else "[[int, int], ...]"
        raise TrainConfigError(f"{where} must be {expected}, got {value!r}")
    return value


def _validate(cfg: TrainConfig, where: str) -> None:
    m, d, t, c = cfg.model, cfg.data, cfg.train, cfg.checkpoint
    problems = []
    if bool(m.pretrained) == bool(m.preset):
        problems.append("model: give exactly one of pretrained or preset")
    for name in ("param_dtype", "compute_dtype"):
        if getattr(m, name) not in DTYPES:
            problems.append(f"model: {name} must be one of {DTYPES}")
    if m.remat_policy not in REMAT_POLICIES:
        problems.append(f"model: remat_policy must be one of {tuple(REMAT_POLICIES)}")
    positive = {"data.chunk_seconds": d.chunk_seconds, "data.prefetch": d.prefetch,
                "train.steps": t.steps, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                "train.log_every": t.log_every, "train.eval_every": t.eval_every, "model.loss_chunk": m.loss_chunk,
                "checkpoint.every": c.every, "checkpoint.keep": c.keep}
    problems += [f"{k} must be >= 1" for k, v in positive.items() if v < 1]
    non_negative = {"data.overlap_seconds": d.overlap_seconds, "data.min_pixels": d.min_pixels,
                    "data.max_pixels": d.max_pixels, "data.workers": d.workers, "data.seed": d.seed,
                    "train.weight_decay": t.weight_decay, "train.vision_lr": t.vision_lr,
                    "model.init_seed": m.init_seed}
    problems += [f"{k} must be >= 0" for k, v in non_negative.items() if v < 0]
    if d.overlap_seconds >= d.chunk_seconds:
        problems.append("data: overlap_seconds must be smaller than chunk_seconds")
    if any(tok < 1 or p < 0 or p % 4 for tok, p in d.buckets):
        problems.append("data: buckets need tokens >= 1 and patches a multiple of 4 (2x2-merged patches)")
    if not t.lr > 0 or not 0 <= t.warmup_ratio < 1 or not t.clip_norm > 0:
        problems.append("train: need lr > 0, 0 <= warmup_ratio < 1, clip_norm > 0")
    if t.vision_lr and m.freeze_vision:
        problems.append("train: vision_lr needs model.freeze_vision = false (a frozen tower is not trained)")
    if not (0 <= t.adam_b1 < 1 and 0 <= t.adam_b2 < 1):
        problems.append("train: adam_b1 and adam_b2 must lie in [0, 1)")
    if cfg.mesh.data < 1 and cfg.mesh.data != -1 or cfg.mesh.fsdp < 1 or cfg.mesh.tensor < 1:
        problems.append("mesh: data must be >= 1 or -1, fsdp and tensor >= 1")
    if problems:
        raise TrainConfigError(f"{where}: " + "; ".join(problems))
