"""Tiny training runs for the tests: a config file, the `svlm train` command line, and what a run
directory holds (the log, the checkpointed parameters)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from svlm_jax.config import ModelConfig
from svlm_jax.train.checkpoint import abstract_params, restore_params

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
[model]
tokenizer = "{tokenizer}"
preset = "tiny"
compute_dtype = "float32"
[data]
train = "{train}"
buckets = {buckets}
chunk_seconds = 6
overlap_seconds = 3
[policy]
text_sink = 16
text_window = 16
[train]
out_dir = "{out}"
steps = {steps}
batch_size = 2
grad_accum = {grad_accum}
lr = 1e-3
warmup_ratio = 0.25
[checkpoint]
every = {every}
keep = {keep}
"""


def write_config(tmp_path: Path, name: str, tokenizer, jsonl, steps=4, every=2, grad_accum=2, keep=2,
                 buckets=((300, 96), (500, 96)), extra: str = "") -> Path:
    """Config file `tmp_path/name.toml` of a run in `tmp_path/name` (one compilation per bucket);
    `extra`: more TOML tables."""
    path = tmp_path / f"{name}.toml"
    path.write_text(CONFIG.format(tokenizer=tokenizer.name, train=jsonl, out=name, steps=steps, every=every,
                                  grad_accum=grad_accum, keep=keep, buckets=json.dumps([list(b) for b in buckets]))
                    + extra)
    return path


def params_of(run_dir: Path, step: int | None = None):
    """(parameters, step) of a run's checkpoint (default: the latest)."""
    cfg = ModelConfig.from_file(run_dir / "model")
    return restore_params(run_dir / "checkpoints", abstract_params(cfg, "float32"), step)


def logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def train_records(run_dir: Path) -> list[dict]:
    """The log's training records (not evaluations)."""
    return [r for r in logged(run_dir) if "loss" in r]


def saved_steps(run_dir: Path) -> list[int]:
    """The finished (committed) checkpoints of a run."""
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def train_command(config: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "svlm_jax.cli", "train", "--config", str(config), *flags]


def cpu_env(devices: int = 1, compilation_cache: Path | None = None) -> dict[str, str]:
    """The environment of a training subprocess with `devices` virtual CPU devices (fast, unoptimized
    compilation), sharing compiled programs through `compilation_cache` when given (a resumed run
    then skips compiling its step)."""
    cache = {"JAX_COMPILATION_CACHE_DIR": str(compilation_cache)} if compilation_cache else {}
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **cache,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
