"""`kill -9` of `svlm train` (real processes, tiny model): killed while training, the run loses only
the steps after its last finished checkpoint; killed while a checkpoint is being written (held just
before Orbax commits it), the previous checkpoint stays the latest and loads. Either way the resumed
run ends bit for bit where an uninterrupted run does, with the same log."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from train_runs import ROOT, cpu_env, params_of, saved_steps, train_command, train_records, write_config

STEPS = 5
# Holds the commit of checkpoint argv[1] (after its arrays are written, before the rename that
# finishes it) and says so in the file argv[2]; then runs `svlm` with the remaining arguments.
HOLD_COMMIT = textwrap.dedent("""
    import asyncio, pathlib, sys
    from orbax.checkpoint._src.path import atomicity
    commit = atomicity.AtomicRenameTemporaryPath.finalize
    async def held(self):
        if self.get_final().name == sys.argv[1]:
            pathlib.Path(sys.argv[2]).write_text(str(self.get()))
            await asyncio.sleep(3600)
        await commit(self)
    atomicity.AtomicRenameTemporaryPath.finalize = held
    from svlm_jax.cli import main
    sys.exit(main(sys.argv[3:]))
""")


@pytest.fixture(scope="module")
def config(stream_tokenizer, synth_sft):
    """config(folder, name): the config file of a run of STEPS steps, saved every 2."""
    return lambda tmp_path, name: write_config(tmp_path, name, stream_tokenizer, synth_sft, steps=STEPS, every=2,
                                               keep=3, buckets=[(500, 96)])


def run_to_end(config_path: Path, cache: Path) -> None:
    proc = subprocess.run(train_command(config_path), cwd=ROOT, env=cpu_env(1, cache), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def kill_when(command: list[str], cache: Path, ready) -> None:
    """Start `command`, wait until ready() holds, then SIGKILL it."""
    proc = subprocess.Popen(command, cwd=ROOT, env=cpu_env(1, cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ready():
        assert proc.poll() is None, f"the run ended before it was killed:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def steps_logged(run_dir: Path) -> list[int]:
    try:
        return [r["step"] for r in train_records(run_dir)]
    except (FileNotFoundError, ValueError):  # not there yet, or a line being written
        return []


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One compilation cache: every run here executes the same compiled step."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, config, cache):
    tmp = tmp_path_factory.mktemp("straight")
    run_to_end(config(tmp, "straight"), cache)
    return tmp / "straight"


def assert_same_run(run_dir: Path, straight: Path) -> None:
    keys = ("step", "loss", "grad_norm", "lr", "labelled_tokens")
    assert [{k: r[k] for k in keys} for r in train_records(run_dir)] == \
        [{k: r[k] for k in keys} for r in train_records(straight)]
    (got, step_got), (want, step_want) = params_of(run_dir), params_of(straight)
    assert step_got == step_want == STEPS
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(x, y)  # bit for bit


def test_kill_during_training_loses_only_the_steps_since_the_last_checkpoint(tmp_path, config, straight, cache):
    path = config(tmp_path, "killed")
    run_dir = tmp_path / "killed"
    kill_when(train_command(path), cache,
              lambda: 2 in saved_steps(run_dir) and max(steps_logged(run_dir), default=0) >= 3)
    last = saved_steps(run_dir)[-1]
    logged = steps_logged(run_dir)
    assert max(logged) > last  # steps were done after the last checkpoint: these are the ones lost
    np.testing.assert_array_equal(params_of(run_dir)[0].text.embed_vd, params_of(straight, last)[0].text.embed_vd)
    run_to_end(path, cache)
    assert_same_run(run_dir, straight)


def test_kill_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path, config, straight, cache):
    path = config(tmp_path, "killed")
    run_dir, held = tmp_path / "killed", tmp_path / "held"
    script = tmp_path / "hold_commit.py"
    script.write_text(HOLD_COMMIT)
    kill_when([sys.executable, str(script), "4", str(held), *train_command(path)[3:]], cache, held.exists)
    assert Path(held.read_text()).is_dir()  # checkpoint 4 was killed half-way: written, not committed
    assert saved_steps(run_dir) == [2]
    params, step = params_of(run_dir)
    assert step == 2
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params_of(straight, 2)[0])):
        np.testing.assert_array_equal(x, y)
    run_to_end(path, cache)
    assert_same_run(run_dir, straight)
