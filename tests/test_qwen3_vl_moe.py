"""Qwen3-VL-MoE against transformers' `Qwen3VLMoeForConditionalGeneration`: the sparse block and its
routing (forward and gradients), logits (text, images, videos), checkpoints in and out in both expert
layouts (and into a mesh), config.json and the presets, `svlm info`, the streaming engine and an SFT step.

The oracle models are built from configs drawn at random on every run (tests/test_qwen3_vl.py's
draw, plus drawn expert counts, top-k and widths), saved with transformers' own `save_pretrained`
(which writes the experts [X, out, in], the hub's checkpoints hold them [X, in, out]).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AbstractMesh, PartitionSpec
from safetensors import safe_open

import svlm_jax
from svlm_jax import ConfigError
from svlm_jax.config import PRESETS, ModelConfig, TextConfig, preset
from svlm_jax.model import text
from svlm_jax.model.params import Model, TextLayers, param_leaves
from svlm_jax.sharded_load import load_sharded
from svlm_jax.train import sharding
from svlm_jax.train.checkpoint import abstract_params
from tests.conftest import random_stream_model
from tests.test_qwen3_vl import (IMAGE, VEND, VIDEO, VSTART, check_export_round_trip,
                                 check_random_params_through_transformers, random_hf_config)
# Tests of the dense model run here on this module's fixtures (`oracle`, `qwen3_model`: MoE models):
# logits against transformers (text, odd image grids, videos of several frames, both in a padded
# batch), `svlm info` (its parameter count is transformers') and the streaming engine against `forward`.
from tests.test_qwen3_vl import (test_images_and_videos_padded_batch, test_images_odd_grids,  # noqa: F401
                                 test_svlm_info, test_text_only_padded, test_videos_several_frames)
from tests.test_qwen3_vl_stream import test_logits_equal_forward_before_eviction  # noqa: F401


def random_moe_config(rng: np.random.Generator, tie: bool):
    """A tiny transformers Qwen3VLMoeConfig: test_qwen3_vl's random draw with drawn experts."""
    from transformers import Qwen3VLMoeConfig

    dense = random_hf_config(rng, tie)
    hidden = dense.text_config.hidden_size
    # expert widths that keep the two expert layouts apart by shape (hidden != F, 2F)
    width = int(rng.choice([f for f in range(8, 48, 8) if hidden not in (f, 2 * f)]))
    n_experts = int(rng.integers(4, 9))
    text_cfg = {k: v for k, v in dense.text_config.to_dict().items() if k not in ("model_type", "intermediate_size")}
    text_cfg.update(num_experts=n_experts, num_experts_per_tok=int(rng.integers(1, 4)), moe_intermediate_size=width,
                    intermediate_size=int(8 * rng.integers(4, 13)))
    vision = {k: v for k, v in dense.vision_config.to_dict().items() if k != "model_type"}
    return Qwen3VLMoeConfig(text_config=text_cfg, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                            vision_start_token_id=VSTART, vision_end_token_id=VEND, tie_word_embeddings=tie)


def perturbed(model):
    """`model` in eval mode, every parameter (norms too) perturbed."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """(HF model, its directory, ours loaded in float32); tied or untied as drawn."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    rng = np.random.default_rng()
    hf_config = random_moe_config(rng, tie=bool(rng.integers(2)))
    torch.manual_seed(int(rng.integers(1 << 30)))
    model = perturbed(Qwen3VLMoeForConditionalGeneration(hf_config))
    path = tmp_path_factory.mktemp("qwen3_vl_moe")
    model.save_pretrained(path)
    return model, path, svlm_jax.load_pretrained(path, dtype="float32")


# ---- the sparse block --------------------------------------------------------------------------

def test_sparse_block_and_its_gradients_match_transformers(rng):
    """Tokens drawn near a few points, so that several pick the same experts and some experts get
    none: the block's output and its gradients (input, router, experts) equal transformers'."""
    from transformers import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

    n_experts, top_k, hidden, width = 8, 2, 24, 16
    cfg = Qwen3VLMoeTextConfig(hidden_size=hidden, num_experts=n_experts, num_experts_per_tok=top_k,
                               moe_intermediate_size=width)
    torch.manual_seed(int(rng.integers(1 << 30)))
    block = Qwen3VLMoeTextSparseMoeBlock(cfg).double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    centres = rng.standard_normal((3, hidden))
    x = torch.tensor((centres[rng.integers(0, 3, (2, 7))] + 0.01 * rng.standard_normal((2, 7, hidden))),
                     requires_grad=True)
    _, _, chosen = block.gate(x.detach().reshape(-1, hidden))
    counts = np.bincount(chosen.numpy().reshape(-1), minlength=n_experts)
    assert counts.min() == 0 and counts.max() >= 2, counts  # what this test is about
    out = block(x)
    cotangent = torch.tensor(rng.standard_normal(out.shape))
    (out * cotangent).sum().backward()

    layer = TextLayers(  # our layout: [in, out] (the hub's), transformers' is [out, in]
        attn_norm_ld=None, q_w_ldnh=None, q_b_lnh=None, k_w_ldkh=None, k_b_lkh=None, v_w_ldkh=None, v_b_lkh=None,
        o_w_lnhd=None, mlp_norm_ld=None, gate_w_ldf=None, up_w_ldf=None, down_w_lfd=None,
        router_w_ldx=jnp.asarray(block.gate.weight.detach().numpy().T, jnp.float32),
        expert_gate_up_w_lxdg=jnp.asarray(block.experts.gate_up_proj.detach().numpy().transpose(0, 2, 1), jnp.float32),
        expert_down_w_lxfd=jnp.asarray(block.experts.down_proj.detach().numpy().transpose(0, 2, 1), jnp.float32))
    tcfg = TextConfig(
        vocab_size=8, hidden_size=hidden, intermediate_size=1, num_layers=1, num_heads=1, num_kv_heads=1,
        num_experts=n_experts, num_experts_per_tok=top_k, moe_intermediate_size=width)
    x_j = jnp.asarray(x.detach().numpy(), jnp.float32)
    ours, vjp = jax.vjp(lambda x, lay: text.experts_mlp(tcfg, lay, x), x_j, layer)
    np.testing.assert_allclose(np.asarray(ours), out.detach().numpy(), rtol=1e-5, atol=1e-5)
    dx, dlayer = vjp(jnp.asarray(cotangent.numpy(), jnp.float32))
    scale = lambda a: np.abs(a).max()
    for got, want in [(dx, x.grad), (dlayer.router_w_ldx.T, block.gate.weight.grad),
                      (dlayer.expert_gate_up_w_lxdg.transpose(0, 2, 1), block.experts.gate_up_proj.grad),
                      (dlayer.expert_down_w_lxfd.transpose(0, 2, 1), block.experts.down_proj.grad)]:
        want = want.numpy()
        assert np.abs(np.asarray(got) - want).max() <= 1e-5 * scale(want)
    # an expert no token picked gets no gradient
    idle = np.flatnonzero(counts == 0)
    assert not np.asarray(dlayer.expert_down_w_lxfd)[idle].any()


# ---- logits against transformers: test_qwen3_vl's, run on this module's `oracle` (a MoE) -------

# ---- checkpoints -------------------------------------------------------------------------------

@pytest.mark.parametrize("shard", [None, "20KB"])
def test_export_round_trip_bit_exact(oracle, tmp_path, shard):
    """Saved with the experts in the hub's layout, loaded by transformers and ours unchanged."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    check_export_round_trip(oracle, tmp_path, shard, Qwen3VLMoeForConditionalGeneration)
    ours = oracle[2]
    t = ours.config.text
    # read straight into a mesh (as training reads a pretrained checkpoint): the same parameters
    mesh = sharding.make_mesh()
    placed = load_sharded(tmp_path, sharding.tree_shardings(abstract_params(ours.config, "float32"), mesh), "float32")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), ours.params, placed.params))
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(f, "np") as st:
            for name in st.keys():
                if name.endswith("experts.gate_up_proj"):
                    assert st.get_slice(name).get_shape() == [t.num_experts, t.hidden_size, 2 * t.moe_intermediate_size]


def test_sharded_reads_of_transformers_saved_experts(oracle):
    """transformers' own save_pretrained (the oracle's directory) writes the experts [X, out, in]:
    the mesh loader reads them too, any box of them equal to the same box of `load_pretrained`'s."""
    from svlm_jax.sharded_load import _read_into
    from svlm_jax.weights import _weight_files, hf_slots, matched_names

    _, path, ours = oracle
    placed = load_sharded(path, sharding.tree_shardings(abstract_params(ours.config, "float32"), sharding.make_mesh()),
                          "float32")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), ours.params, placed.params))
    rng = np.random.default_rng()
    files, slots = _weight_files(path), hf_slots(ours.config)
    stored = matched_names(path, ours.config, slots, files)
    for name, slot in slots.items():
        if slot.layer != 0 or not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            continue
        full = np.asarray(getattr(ours.params.text.layers, slot.leaf.split(".")[-1])[0])
        box = tuple((int(a), int(rng.integers(a + 1, n + 1))) for n in full.shape for a in [rng.integers(n)])
        out = np.empty([b - a for a, b in box], np.float32)
        _read_into(out, files[stored[name]], stored[name], slot, full.shape, box)
        np.testing.assert_array_equal(out, full[tuple(slice(a, b) for a, b in box)])


def test_ours_to_transformers_random_params(tmp_path):
    """transformers' own save writes the experts transposed: read back unchanged all the same."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    check_random_params_through_transformers(tmp_path, preset("tiny-qwen3-vl-moe"), Qwen3VLMoeForConditionalGeneration)


def test_expert_weights_sharding():
    mesh = AbstractMesh((1, 2, 4), sharding.MESH_AXES)
    shapes = dict(param_leaves(preset("qwen3-vl-30b-a3b")))

    def spec(leaf):
        path = f"text.layers.{leaf}"
        return sharding.param_spec(path, shapes[path], mesh)

    assert spec("router_w_ldx") == PartitionSpec(None, "fsdp", None)
    assert spec("expert_gate_up_w_lxdg") == PartitionSpec(None, None, "fsdp", "tensor")
    assert spec("expert_down_w_lxfd") == PartitionSpec(None, None, "tensor", "fsdp")


# ---- config.json, presets ---------------------------------------------------------------------

# Qwen3-VL-30B-A3B-Instruct's config.json on the hub (its model fields; transformers 4.57 layout).
HUB_QWEN3_VL_30B_A3B = {
    "architectures": ["Qwen3VLMoeForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl_moe",
    "text_config": {
        "attention_bias": False, "decoder_sparse_step": 1, "head_dim": 128, "hidden_size": 2048,
        "intermediate_size": 6144, "max_position_embeddings": 262144, "mlp_only_layers": [],
        "model_type": "qwen3_vl_moe_text", "moe_intermediate_size": 768, "norm_topk_prob": True,
        "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "vocab_size": 151936},
    "tie_word_embeddings": False, "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
        "in_channels": 3, "intermediate_size": 4304, "model_type": "qwen3_vl_moe", "num_heads": 16,
        "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2,
        "temporal_patch_size": 2},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652,
}


def test_hub_config_reads_as_preset():
    assert ModelConfig.from_dict(HUB_QWEN3_VL_30B_A3B) == preset("qwen3-vl-30b-a3b")


def test_config_through_transformers(oracle):
    from transformers import Qwen3VLMoeConfig

    hf, path, ours = oracle
    t = ours.config.text
    want = hf.config.text_config
    assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size) == (
        want.num_experts, want.num_experts_per_tok, want.moe_intermediate_size)
    written = ours.config.to_dict()
    assert written["model_type"] == "qwen3_vl_moe"
    back = Qwen3VLMoeConfig(**{k: v for k, v in written.items() if k not in ("architectures", "model_type")})
    assert ModelConfig.from_dict(back.to_dict()) == ours.config


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if "a3b" in n or "a22b" in n or "moe" in n))
def test_presets_through_transformers(name):
    from transformers import Qwen3VLMoeConfig

    ours = preset(name)
    hf = Qwen3VLMoeConfig(**{k: v for k, v in ours.to_dict().items() if k not in ("architectures", "model_type")})
    assert ModelConfig.from_dict(hf.to_dict()) == ours


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update(mlp_only_layers=[3]), r"text_config.mlp_only_layers must be empty.*got \[3\]"),
    (lambda t: t.update(decoder_sparse_step=2), "text_config.decoder_sparse_step must be 1"),
    (lambda t: t.update(norm_topk_prob=False), "text_config.norm_topk_prob=false is not supported"),
    (lambda t: t.update(num_experts_per_tok=129), r"num_experts_per_tok \(129\) must be between 1 and num_experts"),
    (lambda t: t.update(num_experts=0), "text_config.num_experts must be a positive integer"),
    (lambda t: t.update(moe_intermediate_size="768"), "text_config.moe_intermediate_size must be a positive integer"),
])
def test_bad_configs_named(edit, message):
    cfg = copy.deepcopy(HUB_QWEN3_VL_30B_A3B)
    edit(cfg["text_config"])
    with pytest.raises(ConfigError, match=f"config.json: .*{message}"):
        ModelConfig.from_dict(cfg)


# ---- streaming and training --------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen3_model(stream_tokenizer):
    """The model `test_logits_equal_forward_before_eviction` streams: a tiny random Qwen3-VL-MoE."""
    model = random_stream_model(stream_tokenizer, seed=5, model_type="qwen3_vl_moe")
    assert model.config.text.num_experts
    return model


def test_train_step_text_rows():
    """One SFT step on text rows: the loss equals the forward's cross-entropy, the gradient is finite
    and the router and the experts move."""
    from svlm_jax.train import step as train

    cfg = preset("tiny-qwen3-vl-moe")
    params = svlm_jax.init_params(cfg, jax.random.key(0), std=0.1)
    spec = train.StepSpec(model=cfg, optim=train.OptimConfig(lr=1e-3, total_steps=10), compute_dtype="float32")
    rng = np.random.default_rng()
    rows = rng.integers(0, cfg.text.vocab_size - 8, (2, 13)).astype(np.int32)
    batch = train.text_batch(rows, np.ones_like(rows, bool), np.ones((2, 12), bool))
    logits = np.asarray(svlm_jax.forward(Model(cfg, params), rows[:, :-1]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, rows[:, 1:, None], -1).mean()
    new_state, metrics = jax.jit(train.train_step, static_argnums=0)(spec, train.init_state(spec, params), batch)
    assert abs(float(metrics["loss"]) - want) <= 1e-4 * want
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params.text.layers,
                           new_state.params.text.layers)
    assert changed.router_w_ldx and changed.expert_gate_up_w_lxdg and changed.expert_down_w_lxfd
