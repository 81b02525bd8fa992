"""Checkpoint round trips with transformers and the errors bad checkpoint directories raise."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import svlm_jax
from svlm_jax import CheckpointError, ConfigError
from tests.conftest import perturbed_hf_model


def _hf_class(model_type):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration if model_type == "qwen2_5_vl" else Qwen2VLForConditionalGeneration


def _load_hf(model_type, path):
    model, info = _hf_class(model_type).from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_hf_ours_hf_identical(hf_checkpoint, ours_f32, tmp_path, rng, shard):
    model_type, hf, _ = hf_checkpoint
    kw = {} if shard is None else {"max_shard_size": shard}
    svlm_jax.save_pretrained(ours_f32, tmp_path, **kw)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    back = _load_hf(model_type, tmp_path)
    ref_sd, back_sd = hf.state_dict(), back.state_dict()
    assert ref_sd.keys() == back_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], back_sd[k]), k
    ids = torch.tensor(rng.integers(0, 380, (2, 9)))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, back(input_ids=ids).logits)
    reloaded = svlm_jax.load_pretrained(tmp_path, dtype="float32")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), ours_f32.params, reloaded.params))


@pytest.mark.parametrize("model_type,tie", [("qwen2_5_vl", True), ("qwen2_vl", False)])
def test_ours_hf_ours_identical_params(model_type, tie, tmp_path):
    """Random params of ours (norms and biases perturbed) -> HF directory -> ours again."""
    hf = perturbed_hf_model(model_type, seed=1, tie=tie)
    hf.save_pretrained(tmp_path / "hf")
    base = svlm_jax.load_pretrained(tmp_path / "hf", dtype="float32")
    keys = iter(jax.random.split(jax.random.key(np.random.randint(1 << 30)), 200))
    noisy = base.replace(params=jax.tree.map(lambda x: x + jax.random.normal(next(keys), x.shape), base.params))
    svlm_jax.save_pretrained(noisy, tmp_path / "ours")
    again = svlm_jax.load_pretrained(tmp_path / "ours", dtype="float32")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), noisy.params, again.params))
    _load_hf(model_type, tmp_path / "ours")  # and transformers takes it with no missing/unexpected keys


def test_bfloat16_close_to_float32(hf_checkpoint, ours_f32, rng):
    ours_bf16 = svlm_jax.load_pretrained(hf_checkpoint[2], dtype="bfloat16")
    assert ours_bf16.params.text.embed_vd.dtype == np.dtype("bfloat16")
    ids = rng.integers(0, 380, (2, 21))
    ref = np.asarray(svlm_jax.forward(ours_f32, ids))
    out = np.asarray(svlm_jax.forward(ours_bf16, ids))
    assert np.isfinite(out).all()
    # bf16 keeps 8 bits of mantissa: errors of a few percent of the logit scale after the layers.
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) > 0.8


@pytest.fixture
def checkpoint_copy(hf_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint[2], dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        svlm_jax.load_pretrained(tmp_path / "nope")


def test_missing_config(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        svlm_jax.load_pretrained(checkpoint_copy)


def test_missing_weights(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        svlm_jax.load_pretrained(checkpoint_copy)


def test_truncated_safetensors(checkpoint_copy):
    f = checkpoint_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        svlm_jax.load_pretrained(checkpoint_copy)


def test_wrong_shape_names_tensor(checkpoint_copy):
    f = checkpoint_copy / "model.safetensors"
    tensors = load_file(f)
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = np.zeros((tensors[name].shape[0] + 1, tensors[name].shape[1]), np.float32)
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + ".*shape"):
        svlm_jax.load_pretrained(checkpoint_copy)


def test_missing_and_unexpected_tensors(checkpoint_copy):
    f = checkpoint_copy / "model.safetensors"
    tensors = load_file(f)
    del tensors["visual.merger.mlp.2.bias"]
    tensors["model.layers.7.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"missing tensors \['visual\.merger\.mlp\.2\.bias'\].*unexpected.*layers\.7"):
        svlm_jax.load_pretrained(checkpoint_copy)


def test_unknown_model_type(checkpoint_copy):
    cfg = json.loads((checkpoint_copy / "config.json").read_text())
    cfg["model_type"] = "llava"
    (checkpoint_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'llava' is not supported; supported: qwen2_5_vl, qwen2_vl"):
        svlm_jax.load_pretrained(checkpoint_copy)


def test_index_naming_missing_shard(hf_checkpoint, ours_f32, tmp_path):
    svlm_jax.save_pretrained(ours_f32, tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"names {victim.name}, which is missing"):
        svlm_jax.load_pretrained(tmp_path)
