"""Streaming on a device mesh (8 virtual CPU devices, in a child process): greedy commentary equal
to one device's, token for token, the cache laid out as `streaming.mesh` says, no recompilation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, sys.argv[1]); sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
    import jax, numpy as np
    import conftest
    from svlm_jax.stream_format import CachePolicy
    from svlm_jax.streaming import SamplingConfig, StreamConfig, StreamingSession, engine
    from svlm_jax.streaming.mesh import stream_mesh
    from svlm_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(sys.argv[2])
    model = conftest.random_stream_model(tok, seed=int(sys.argv[3]))
    config = StreamConfig(policy=CachePolicy(vision_window_s=2, text_rounds=3, text_sink=8, text_window=8,
                                             max_new_tokens=6), sampling=SamplingConfig(temperature=0.0))
    rng = np.random.default_rng(int(sys.argv[3]))
    grid, batch, rounds = (1, 4, 4), 4, 6
    seconds = [[rng.standard_normal((16, 1176)).astype(np.float32) for _ in range(batch)] for _ in range(rounds)]

    def run(mesh):
        session = StreamingSession(model, tok, config, batch=batch, mesh=mesh)
        before = engine.round_step._cache_size()
        texts = [session.step_batch([(x, grid) for x in seconds[r]], [float(r)] * batch, [r + 1.0] * batch)
                 for r in range(rounds)]
        tokens = np.asarray(session.last_output.tokens_bm).tolist()
        spec = str(getattr(session._state.k_layers_csh[0].sharding, "spec", None))
        return {"texts": texts, "tokens": tokens, "programs": engine.round_step._cache_size() - before,
                "cache_spec": spec}

    out = {"one": run(None)}
    for data, tensor in ((2, 2), (2, 4), (1, 4)):
        out[f"{data}x{tensor}"] = run(stream_mesh(data, tensor))

    # svlm stream: one video is one stream, so its mesh splits the model only.
    import pathlib, shutil, svlm_jax, test_cli
    from svlm_jax import cli
    work = pathlib.Path(sys.argv[4])
    svlm_jax.save_pretrained(model, work / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(pathlib.Path(sys.argv[2]) / name, work / "model" / name)
    video = test_cli.write_mp4(work / "match.mp4", 4)
    for mesh in (None, "tensor=2", "data=1,tensor=4", "data=2,tensor=2"):
        extra = [] if mesh is None else ["--mesh", mesh]
        jsonl = work / f"{mesh}.jsonl"
        code = cli.main(["stream", "--model", str(work / "model"), "--video", str(video), "--jsonl", str(jsonl),
                         "--greedy", "--dtype", "float32", *extra])
        out[f"cli {mesh}"] = {"code": code, "lines": jsonl.read_text().splitlines() if jsonl.exists() else None}
    print(json.dumps(out))
""")


def test_mesh_streaming_equals_one_device(stream_tokenizer_dir, tmp_path):
    script = tmp_path / "mesh.py"
    script.write_text(SCRIPT)
    seed = str(int(np.random.default_rng().integers(1000)))
    proc = subprocess.run([sys.executable, str(script), str(ROOT), str(stream_tokenizer_dir), seed, str(tmp_path)],
                          env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    cli_runs = {name: out.pop(name) for name in list(out) if name.startswith("cli ")}
    one_video = cli_runs.pop("cli None")
    assert one_video["code"] == 0 and len(one_video["lines"]) == 4
    assert cli_runs.pop("cli data=2,tensor=2")["code"] == 1  # one stream cannot split over data=2
    for name, run in cli_runs.items():
        assert run == one_video, name
    one = out.pop("one")
    assert any(any(t for t in row) for row in one["texts"])  # something was said
    for name, got in out.items():
        assert got["tokens"] == one["tokens"], name
        assert got["texts"] == one["texts"], name
    # 2 kv heads: rows split over data x tensor where tensor divides them, over data alone where not.
    assert out["2x2"]["cache_spec"] == "P(('data', 'tensor'),)"
    assert out["2x4"]["cache_spec"] == "P('data',)"
    assert out["2x2"]["programs"] == out["2x4"]["programs"] == 1
