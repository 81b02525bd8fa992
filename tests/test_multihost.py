"""`svlm train` over two real processes on localhost (jax.distributed, Gloo CPU collectives, two
virtual devices each): one (data, fsdp, tensor) = (1, 2, 2) mesh spans both, so every parameter
and the batch are split across the processes. Its losses equal one process's with the four
devices, each process writes its part of one Orbax checkpoint, and both resume from it. Bad
launch flags end in one `svlm: error:` line."""

from __future__ import annotations

import subprocess

import jax
import numpy as np
import pytest

from train_runs import ROOT, cpu_env, free_port, params_of, saved_steps, train_command, train_records, write_config

MESH = "[mesh]\nfsdp = 2\ntensor = 2\n"


def run_processes(config, n: int, *flags: str) -> list[str]:
    """`svlm train` in `n` processes of 4 / n devices each, joined on a fresh localhost port; their
    outputs. Compiled programs are cached next to the config (the resumed run's step is the first's)."""
    port = free_port()
    distributed = [] if n == 1 else ["--coordinator", f"localhost:{port}", "--num-processes", str(n)]
    procs = [subprocess.Popen(train_command(config, *flags, *distributed, *(["--process-id", str(i)] if n > 1 else [])),
                              cwd=ROOT, env=cpu_env(4 // n, config.parent / "jax_cache"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(n)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def test_two_processes_train_and_resume_like_one(tmp_path, stream_tokenizer, synth_sft):
    one, two = (write_config(tmp_path, name, stream_tokenizer, synth_sft, steps=3, every=2, grad_accum=1,
                             buckets=[(500, 96)], extra=MESH) for name in ("one", "two"))
    run_processes(one, 1)
    first = run_processes(two, 2, "--max-steps", "2")
    assert all("process 1 of 2" in out for out in first[1:]) and "mesh {'data': 1, 'fsdp': 2, 'tensor': 2}" in first[0]
    assert saved_steps(tmp_path / "two") == [2]
    # Orbax's OCDBT layout: each process writes the parameter shards its devices hold.
    params_dir = tmp_path / "two" / "checkpoints" / "2" / "params"
    assert {p.name for p in params_dir.glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}
    resumed = run_processes(two, 2)
    assert all("step 2 of 3" in out for out in resumed)  # both restored step 2

    a, b = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert [r["step"] for r in b] == [1, 2, 3]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
    np.testing.assert_allclose([r["grad_norm"] for r in b], [r["grad_norm"] for r in a], rtol=1e-5)
    (pa, sa), (pb, sb) = params_of(tmp_path / "one"), params_of(tmp_path / "two")
    assert sa == sb == 3
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "localhost:1234"], "give all three of --coordinator"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "must be HOST:PORT"),
    (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"], "0 <= --process-id"),
    (["--cluster", "--process-id", "0"], "--cluster takes the coordinator"),
])
def test_bad_launch_flags_are_one_line_errors(flags, message, capsys):
    from svlm_jax.cli import main

    assert main(["train", "--config", "unread.toml", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("svlm: error: ") and message in err and "Traceback" not in err
