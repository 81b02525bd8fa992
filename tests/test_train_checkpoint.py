"""Training runs end to end: stop + resume equals a straight run, Ctrl-C saves, export loads in
transformers. Tiny model on a synthetic 56x56 match."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import svlm_jax
from svlm_jax.train import run
from svlm_jax.train.config import TrainConfigError, load_config
from train_runs import ROOT, logged, params_of, saved_steps, write_config


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, stream_tokenizer, synth_sft):
    tmp = tmp_path_factory.mktemp("straight")
    assert run.main_train(write_config(tmp, "a", stream_tokenizer, synth_sft)) == 4
    return tmp / "a"


def test_stop_and_resume_equals_straight_run(tmp_path, stream_tokenizer, synth_sft, straight_run):
    config = write_config(tmp_path, "b", stream_tokenizer, synth_sft)
    assert run.main_train(config, max_steps=1) == 1  # stops off the save schedule: saved anyway
    assert run.main_train(config) == 4
    b = tmp_path / "b"
    assert saved_steps(b) == [2, 4]  # keep = 2
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


def test_ctrl_c_saves_and_exits_cleanly(tmp_path, stream_tokenizer, synth_sft):
    config = write_config(tmp_path, "c", stream_tokenizer, synth_sft, steps=1000, every=1000)
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


def test_config_errors_name_the_field(tmp_path, stream_tokenizer, synth_sft):
    good = write_config(tmp_path, "d", stream_tokenizer, synth_sft).read_text()
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


def test_qwen3_vl_stops_resumes_and_exports(tmp_path, stream_tokenizer, synth_sft):
    """Overlapped-chunk SFT of a tiny Qwen3-VL on video (DeepStack in the loss): a run stopped after
    one step and resumed equals a straight run; the export loads in transformers with our weights."""
    from transformers import Qwen3VLForConditionalGeneration

    def config(name):
        path = write_config(tmp_path, name, stream_tokenizer, synth_sft, steps=2, every=1, grad_accum=1,
                            buckets=((500, 160),))
        # Qwen3-VL's video processor bounds a second's two frames together: 64x64 frames, 16 patches.
        path.write_text(path.read_text().replace('preset = "tiny"', 'preset = "tiny-qwen3-vl"').replace(
            "overlap_seconds = 3", "overlap_seconds = 3\nmin_pixels = 8192\nmax_pixels = 8192"))
        return path

    assert run.main_train(config("straight")) == 2
    assert run.main_train(config("resumed"), max_steps=1) == 1
    assert run.main_train(config("resumed")) == 2
    (pa, _), (pb, _) = params_of(tmp_path / "straight"), params_of(tmp_path / "resumed")
    assert pa.vision.deepstack is not None  # the tower of this preset has DeepStack mergers
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
    losses = [r["loss"] for r in logged(tmp_path / "straight") if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert run.main_export(tmp_path / "straight", tmp_path / "hf") == 2
    hf = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "hf")
    np.testing.assert_array_equal(hf.get_input_embeddings().weight.detach().numpy(), np.asarray(pa.text.embed_vd))
    ours = svlm_jax.load_pretrained(tmp_path / "hf", dtype="float32")
    for x, y in zip(jax.tree.leaves(ours.params), jax.tree.leaves(pa)):
        np.testing.assert_array_equal(x, y)
