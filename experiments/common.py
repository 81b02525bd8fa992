"""What every benchmark records next to its numbers (device, versions, commit), and the session of
a scheme: `streaming` (the product) or one of the paper's baselines."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
from pathlib import Path

import jax

from svlm_jax.media.preprocess import VisionPreprocessConfig
from svlm_jax.streaming import BaselineSession, StreamConfig, StreamingSession
from svlm_jax.streaming.session import STREAM_PREPROCESS

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """SVLM_COMMIT when set (a tree copied to a lent GPU, whose .git may be stale), else git's HEAD."""
    if os.environ.get("SVLM_COMMIT"):
        return os.environ["SVLM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def uncommitted_changes() -> list[str] | None:
    """Tracked files that differ from the commit (the numbers may not be the commit's); None when
    unknown (SVLM_COMMIT set, or no git)."""
    if os.environ.get("SVLM_COMMIT"):
        return None
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, check=True, cwd=Path(__file__).parent).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sorted(line[3:] for line in status.splitlines())


def environment() -> dict:
    dev = jax.devices()[0]
    return {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "python": platform.python_version(), "host": platform.machine(), "commit": git_commit(),
            "uncommitted_changes": uncommitted_changes()}


def device_tag() -> str:
    return jax.devices()[0].device_kind.lower().replace(" ", "_")


def write_result(name: str, payload: dict, out: str | Path | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}_{device_tag()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**environment(), **payload}, indent=2))
    return path


def make_session(model, tokenizer, scheme: str, config: StreamConfig, *, full_max_s: int,
                 preprocess: VisionPreprocessConfig = STREAM_PREPROCESS) -> StreamingSession:
    """The session of `scheme`; `full_max_s` is the full-attention baseline's memory budget."""
    if scheme == "streaming":
        return StreamingSession(model, tokenizer, config, preprocess=preprocess)
    return BaselineSession(model, tokenizer, config, scheme=scheme, full_max_s=full_max_s, preprocess=preprocess)


def config_record(scheme: str, config: StreamConfig, **settings) -> dict:
    """A run's stream settings as results record them: the cache policy's fields at the top level,
    beside the scheme and `settings`."""
    fields = dataclasses.asdict(config)
    return {**fields.pop("policy"), **fields, "scheme": scheme, **settings}
