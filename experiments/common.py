"""What every benchmark records next to its numbers: device, versions, commit."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import jax

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
