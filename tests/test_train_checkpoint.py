"""Training runs end to end: stop + resume equals a straight run, Ctrl-C saves, export loads in
transformers. Tiny model on a synthetic 56x56 match."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import svlm_jax
from svlm_jax.config import ModelConfig
from svlm_jax.train import run
from svlm_jax.train.checkpoint import abstract_params, restore_params
from svlm_jax.train.config import TrainConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
[model]
tokenizer = "{tokenizer}"
preset = "tiny"
compute_dtype = "float32"
[data]
train = "{train}"
buckets = [[300, 96], [500, 96]]
chunk_seconds = 6
overlap_seconds = 3
[policy]
text_sink = 16
text_window = 16
[train]
out_dir = "{out}"
steps = {steps}
batch_size = 2
grad_accum = 2
lr = 1e-3
warmup_ratio = 0.25
[checkpoint]
every = {every}
keep = 2
"""


@pytest.fixture(scope="module")
def synth_jsonl(tmp_path_factory):
    from svlm_jax.synth import DatasetConfig, RenderConfig, write_dataset

    return write_dataset(tmp_path_factory.mktemp("sft"), DatasetConfig(streams=1, minutes=1, clip_seconds=30,
                                                                       render=RenderConfig(height=56, width=56)))


def write_config(tmp_path: Path, name: str, tokenizer, jsonl, steps=4, every=2) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(CONFIG.format(tokenizer=tokenizer.name, train=jsonl, out=name, steps=steps, every=every))
    return path


def params_of(run_dir: Path):
    cfg = ModelConfig.from_file(run_dir / "model")
    return restore_params(run_dir / "checkpoints", abstract_params(cfg, "float32"))


def logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, stream_tokenizer, synth_jsonl):
    tmp = tmp_path_factory.mktemp("straight")
    assert run.main_train(write_config(tmp, "a", stream_tokenizer, synth_jsonl)) == 4
    return tmp / "a"


def test_stop_and_resume_equals_straight_run(tmp_path, stream_tokenizer, synth_jsonl, straight_run):
    config = write_config(tmp_path, "b", stream_tokenizer, synth_jsonl)
    assert run.main_train(config, max_steps=1) == 1  # stops off the save schedule: saved anyway
    assert run.main_train(config) == 4
    b = tmp_path / "b"
    assert sorted(int(p.name) for p in (b / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]  # keep = 2
    (pa, step_a), (pb, step_b) = params_of(straight_run), params_of(b)
    assert step_a == step_b == 4
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
    la, lb = logged(straight_run), logged(b)
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-6)
    # one warmup step from 0, then a cosine over the 3 remaining steps
    np.testing.assert_allclose([r["lr"] for r in la], [0.0, 1e-3, 1e-3 * 0.75, 1e-3 * 0.25], atol=1e-9)


def test_export_loads_in_transformers(tmp_path, straight_run):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    assert run.main_export(straight_run, tmp_path / "hf") == 4
    params, _ = params_of(straight_run)
    ours = svlm_jax.load_pretrained(tmp_path / "hf", dtype="float32")
    for x, y in zip(jax.tree.leaves(ours.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, y)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf")
    embed = hf.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(embed, np.asarray(params.text.embed_vd))
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.convert_tokens_to_ids("<|video_pad|>") == ours.config.video_token_id


def test_ctrl_c_saves_and_exits_cleanly(tmp_path, stream_tokenizer, synth_jsonl):
    config = write_config(tmp_path, "c", stream_tokenizer, synth_jsonl, steps=1000, every=1000)
    proc = subprocess.Popen([sys.executable, "-c", f"from svlm_jax.train.run import main_train; "
                             f"main_train({str(config)!r})"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    log = tmp_path / "c" / "log.jsonl"
    deadline = time.time() + 240
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    last = logged(tmp_path / "c")[-1]["step"]
    assert "checkpoint saved" in output and params_of(tmp_path / "c")[1] == last


def test_config_errors_name_the_field(tmp_path, stream_tokenizer, synth_jsonl):
    good = write_config(tmp_path, "d", stream_tokenizer, synth_jsonl).read_text()
    cases = {"unknown field(s) stepz": good.replace("steps = 4", "stepz = 4"),
             "missing required field(s) steps": good.replace("steps = 4", ""),
             "lr must be float": good.replace("lr = 1e-3", 'lr = "fast"'),
             "[mesh]: unknown field(s) pipeline": good + "[mesh]\npipeline = 2\n",
             "vision_lr needs model.freeze_vision = false": good.replace("lr = 1e-3", "lr = 1e-3\nvision_lr = 1e-2"),
             "exactly one of pretrained or preset": good.replace('preset = "tiny"', "")}
    for message, text in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(TrainConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            load_config(path)
    assert load_config(tmp_path / "d.toml").data.buckets == ((300, 96), (500, 96))
