"""How long `svlm --help` and every subcommand's --help take, and what they import (issue 28: under
0.5 s, so parsing must not import jax). Each command runs as a user runs it, in a fresh process: the
`svlm` console script when it is installed, else `python -m svlm_jax.cli`. Beside them the floor (a
bare `python -c pass`) and what importing jax alone costs.

    python -m experiments.bench_help          # writes experiments/results/bench_help_cpu.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Modules whose import takes a large part of a second (or more): none may load for --help.
HEAVY = ("jax", "jaxlib", "numpy", "flax", "av", "PIL", "tokenizers", "safetensors", "torch", "grain", "optax",
         "orbax", "uvicorn", "starlette")


def help_commands() -> list[list[str]]:
    """[] (svlm --help) and each subcommand's name."""
    from svlm_jax.cli import COMMANDS

    return [[]] + [[command.name] for command in COMMANDS]


def svlm_argv() -> list[str]:
    script = shutil.which("svlm")
    return [script] if script else [sys.executable, "-m", "svlm_jax.cli"]


def imported_modules(command: list[str]) -> set[str]:
    """Top-level packages `svlm COMMAND --help` imports (from python -X importtime)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "svlm_jax.cli", *command, "--help"],
                            capture_output=True, text=True, check=True, cwd=REPO)
    return {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def wall_seconds(argv: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True, cwd=REPO)
        times.append(time.perf_counter() - started)
    return times


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="result file (default: experiments/results/bench_help_<device>.json)")
    args = parser.parse_args()
    from experiments.common import write_result

    commands = {}
    for command in help_commands():
        argv = [*svlm_argv(), *command, "--help"]
        heavy = sorted(imported_modules(command) & set(HEAVY))
        commands[" ".join(["svlm", *command, "--help"])] = {**summary(wall_seconds(argv, args.repeats)),
                                                           "heavy_modules_imported": heavy}
    payload = {
        "runner": svlm_argv(),
        "commands": commands,
        "python_startup": summary(wall_seconds([sys.executable, "-c", "pass"], args.repeats)),
        "import_jax": summary(wall_seconds([sys.executable, "-c", "import jax"], args.repeats)),
        "slowest_median_s": max(c["median_s"] for c in commands.values()),
    }
    path = write_result("bench_help", payload, args.out)
    for name, record in commands.items():
        print(f"{name:<24} median {record['median_s']:.3f} s, max {record['max_s']:.3f} s, heavy imports "
              f"{record['heavy_modules_imported'] or 'none'}")
    print(f"python -c pass median {payload['python_startup']['median_s']:.3f} s; "
          f"import jax median {payload['import_jax']['median_s']:.3f} s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
