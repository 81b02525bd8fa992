"""Qwen3-VL (dense) against transformers' `Qwen3VLForConditionalGeneration`: logits, vision tower,
DeepStack, bf16, checkpoints in and out, config.json, `svlm info`, preprocessing, a training step.

The oracle models are built here from configs drawn at random on every run (sizes, head dims,
M-RoPE sections, patch size, position table, DeepStack blocks in any order, tied or untied), saved
with transformers' own `save_pretrained`; the assertion messages name the config drawn.
"""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import svlm_jax
from svlm_jax import ConfigError
from svlm_jax.config import PRESETS, ModelConfig, preset
from svlm_jax.media.preprocess import VisionPreprocessConfig, preprocess_image, preprocess_video, smart_resize
from svlm_jax.model import rope, text, vision, vlm
from svlm_jax.model.params import Model
from tests.test_model_parity import build_batch as parity_build_batch
from tests.test_preprocess import _hf_normalize, _hf_resize, _smooth_frames, assert_rows_near_torch

VOCAB = 300
IMAGE, VIDEO, VSTART, VEND = 296, 297, 294, 295
TEXT_VOCAB = 290  # random text ids stay clear of the special tokens


def random_hf_config(rng: np.random.Generator, tie: bool):
    """A tiny transformers Qwen3VLConfig with every size drawn from `rng`."""
    from transformers import Qwen3VLConfig

    heads = int(rng.choice([2, 4]))
    head_dim = int(rng.choice([8, 16, 24]))
    cuts = np.sort(rng.choice(np.arange(1, head_dim // 2), 2, replace=False))
    mrope = [int(cuts[0]), int(cuts[1] - cuts[0]), int(head_dim // 2 - cuts[1])]
    layers = int(rng.integers(2, 5))
    hidden = int(8 * rng.integers(4, 11))  # not heads * head_dim: Qwen3's o_proj maps between them
    depth = int(rng.integers(2, 5))
    v_heads = int(rng.choice([1, 2]))
    v_hidden = v_heads * int(rng.choice([8, 16]))
    side = int(rng.integers(3, 8))
    n_deep = int(rng.integers(1, min(depth, layers) + 1))
    text = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=int(8 * rng.integers(4, 13)),
                num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=int(rng.choice([k for k in (1, 2, 4) if heads % k == 0])), head_dim=head_dim,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": float(rng.choice([1e4, 5e6])),
                                                    "mrope_section": mrope, "mrope_interleaved": True})
    vis = dict(depth=depth, hidden_size=v_hidden, intermediate_size=int(8 * rng.integers(2, 9)), num_heads=v_heads,
               out_hidden_size=hidden, patch_size=int(rng.choice([8, 16])),
               # a non-square table too: transformers uses its first isqrt(n)^2 rows
               num_position_embeddings=side * side + int(rng.choice([0, 3])),
               deepstack_visual_indexes=[int(i) for i in rng.permutation(depth)[:n_deep]])
    return Qwen3VLConfig(text_config=text, vision_config=vis, image_token_id=IMAGE, video_token_id=VIDEO,
                         vision_start_token_id=VSTART, vision_end_token_id=VEND, tie_word_embeddings=tie)


def describe(hf_config) -> str:
    t, v = hf_config.text_config, hf_config.vision_config
    return (f"text(hidden={t.hidden_size}, layers={t.num_hidden_layers}, heads={t.num_attention_heads}/"
            f"{t.num_key_value_heads}, head_dim={t.head_dim}, mrope={t.rope_parameters['mrope_section']}), "
            f"vision(depth={v.depth}, hidden={v.hidden_size}, heads={v.num_heads}, patch={v.patch_size}, "
            f"pos={v.num_position_embeddings}, deepstack={v.deepstack_visual_indexes}), "
            f"tie={hf_config.tie_word_embeddings}")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def oracle(request, tmp_path_factory):
    """(HF model in eval mode with every parameter perturbed, its directory, ours loaded in float32)."""
    from transformers import Qwen3VLForConditionalGeneration

    rng = np.random.default_rng()
    hf_config = random_hf_config(rng, tie=request.param)
    torch.manual_seed(int(rng.integers(1 << 30)))
    model = Qwen3VLForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("qwen3_vl")
    model.save_pretrained(path)
    return model, path, svlm_jax.load_pretrained(path, dtype="float32")


@pytest.fixture
def rng():
    return np.random.default_rng()


# ---- inputs as transformers' Qwen3-VL processor lays them out ---------------------------------

def build_row(parts, rng):
    """parts: ("text", n) | ("image", grid) | ("video", grid) -> ids, token types, image grids, video
    grids. A video is one block per temporal patch, each after its timestamp text ("<t seconds>")."""
    ids, types, images, videos = [], [], [], []

    def block(pad, kind, n):
        nonlocal ids, types
        ids += [VSTART] + [pad] * n + [VEND]
        types += [0] + [kind] * n + [0]

    for kind, arg in parts:
        if kind == "text":
            ids += rng.integers(0, TEXT_VOCAB, arg).tolist()
            types += [0] * arg
        elif kind == "image":
            block(IMAGE, 1, math.prod(arg) // 4)
            images.append(list(arg))
        else:
            for _ in range(arg[0]):
                stamp = int(rng.integers(2, 5))  # the timestamp's text tokens
                ids += rng.integers(0, TEXT_VOCAB, stamp).tolist()
                types += [0] * stamp
                block(VIDEO, 2, arg[1] * arg[2] // 4)
            videos.append(list(arg))
    return ids, types, images, videos


def build_batch(rows_parts, rng, *, left_pad: bool):
    return parity_build_batch(rows_parts, rng, left_pad=left_pad, row_builder=build_row)


def hf_inputs(hf, ids, types, mask, images, videos, rng):
    patch_dim = 3 * 2 * hf.config.vision_config.patch_size ** 2
    pix = rng.standard_normal((sum(math.prod(g) for g in images), patch_dim)).astype(np.float32) if images else None
    pixv = rng.standard_normal((sum(math.prod(g) for g in videos), patch_dim)).astype(np.float32) if videos else None
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), mm_token_type_ids=torch.tensor(types))
    if images:
        kw.update(pixel_values=torch.tensor(pix), image_grid_thw=torch.tensor(images))
    if videos:
        kw.update(pixel_values_videos=torch.tensor(pixv), video_grid_thw=torch.tensor(videos))
    if not images and not videos:  # text only: transformers ignores padding in positions unless told
        kw["position_ids"] = hf.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"],
                                                     attention_mask=kw["attention_mask"])[0]
    ours = dict(attention_mask=mask, pixel_values=pix, image_grid_thw=np.array(images) if images else None,
                pixel_values_videos=pixv, video_grid_thw=np.array(videos) if videos else None)
    return kw, ours


def compare_logits(oracle, rows_parts, rng, *, left_pad=False):
    hf, _, ours = oracle
    ids, types, mask, images, videos = build_batch(rows_parts, rng, left_pad=left_pad)
    kw, ours_kw = hf_inputs(hf, ids, types, mask, images, videos, rng)
    with torch.no_grad():
        ref = hf(**kw).logits.numpy()
    out = np.asarray(svlm_jax.forward(ours, ids, **ours_kw))
    valid = mask.astype(bool)
    err, scale = np.abs(out[valid] - ref[valid]).max(), np.abs(ref[valid]).max()
    assert err <= 1e-4 * scale, f"max |diff| {err:.3g} vs max |logit| {scale:.3g}; {describe(hf.config)}"


def test_text_only_padded(oracle, rng):
    compare_logits(oracle, [[("text", 19)], [("text", 7)]], rng, left_pad=True)


def test_images_odd_grids(oracle, rng):
    # Merged grids 5x7 and 3x2; the position table is resampled to each.
    compare_logits(oracle, [[("text", 5), ("image", (1, 10, 14)), ("text", 3), ("image", (1, 6, 4)), ("text", 4)]],
                   rng)


def test_videos_several_frames(oracle, rng):
    compare_logits(oracle, [[("text", 4), ("video", (3, 6, 8)), ("text", 2), ("video", (2, 4, 10)), ("text", 5)]],
                   rng)


@pytest.mark.parametrize("left_pad", [True, False])
def test_images_and_videos_padded_batch(oracle, rng, left_pad):
    rows = [[("text", 3), ("image", (1, 6, 10)), ("text", 2), ("video", (2, 4, 6)), ("text", 4)],
            [("text", 2), ("video", (1, 6, 4)), ("text", 3), ("image", (1, 4, 4)), ("text", 1)],
            [("text", 9)]]
    compare_logits(oracle, rows, rng, left_pad=left_pad)


@pytest.mark.parametrize("oracle", [False], ids=["untied"], indirect=True)  # tying plays no part
def test_vision_tower_and_deepstack(oracle, rng):
    hf, _, ours = oracle
    grids = np.array([[2, 10, 14], [1, 6, 4], [1, 2, 18]])
    pix = rng.standard_normal((int(np.prod(grids, axis=1).sum()), ours.config.vision.patch_dim)).astype(np.float32)
    with torch.no_grad():
        ref = hf.model.visual(torch.tensor(pix), grid_thw=torch.tensor(grids))
    cfg = ours.config.vision
    merged, deep = jax.jit(vision.encode_with_deepstack, static_argnums=0)(
        cfg, ours.params.vision, jnp.asarray(pix), vision.vision_layout(cfg, grids))
    levels = [ref.pooler_output.numpy()] + [d.numpy() for d in ref.deepstack_features]
    assert deep.shape[0] == len(levels) - 1 == len(cfg.deepstack_visual_indexes)
    for got, want in zip([merged, *deep], levels):
        assert got.shape == want.shape
        assert np.abs(np.asarray(got) - want).max() <= 1e-4 * np.abs(want).max(), describe(hf.config)
    # the public entry point (jit-compiled: equal up to float32 rounding)
    np.testing.assert_allclose(np.asarray(svlm_jax.encode_vision(ours, pix, grids)), np.asarray(merged), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("oracle", [False], ids=["untied"], indirect=True)  # tying plays no part
def test_position_taps_match_transformers(oracle):
    """The host-side bilinear taps, bit for bit, on grids larger and smaller than the table."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    side = oracle[2].config.vision.position_grid_side
    grids = [[1, 2, 2], [2, 4, 18], [1, 30, 6]]
    index, weight = get_vision_interpolation_indices_and_weights(
        torch.tensor(grids), num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    ours = [vision.position_taps(g, 2, side) for g in grids]
    np.testing.assert_array_equal(np.concatenate([i for i, _ in ours]), index.numpy())
    np.testing.assert_array_equal(np.concatenate([w for _, w in ours]), weight.numpy())


@pytest.mark.parametrize("oracle", [False], ids=["untied"], indirect=True)  # tying plays no part
def test_positions_match_transformers(oracle, rng):
    hf, _, ours = oracle
    rows = [[("text", 3), ("video", (3, 4, 6)), ("text", 2), ("image", (1, 6, 10)), ("text", 4)],
            [("text", 1), ("image", (1, 2, 2)), ("video", (2, 8, 2)), ("text", 6)]]
    ids, types, mask, images, videos = build_batch(rows, rng, left_pad=True)
    want, _ = hf.model.get_rope_index(torch.tensor(ids), torch.tensor(types), image_grid_thw=torch.tensor(images),
                                      video_grid_thw=torch.tensor(videos), attention_mask=torch.tensor(mask))
    got = vlm.positions_for(ours.config, ids, image_grid_thw=images, video_grid_thw=videos,
                                           attention_mask=mask)
    np.testing.assert_array_equal(got[mask > 0], want.permute(1, 2, 0).numpy()[mask > 0])


@pytest.mark.parametrize("oracle", [False], ids=["untied"], indirect=True)  # tying plays no part
def test_interleaved_mrope_matches_transformers(oracle):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    hf_rope = Qwen3VLTextRotaryEmbedding(oracle[0].config.text_config)
    positions = torch.randint(0, 500, (3, 2, 9))
    cos, _ = hf_rope(torch.zeros(1, dtype=torch.float32), positions)
    angles = text.text_angles(oracle[2].config.text, jnp.asarray(positions.permute(1, 2, 0).numpy()))
    # Both sides round an angle of up to ~500 rad to float32 (ulp 3e-5 there): cos agrees to a few ulps of it.
    atol = 4 * np.finfo(np.float32).eps * float(np.abs(np.asarray(angles)).max())
    np.testing.assert_allclose(np.cos(np.asarray(angles)), cos.numpy()[..., :angles.shape[-1]], atol=atol)


@pytest.mark.parametrize("oracle", [False], ids=["untied"], indirect=True)  # tying plays no part
def test_bfloat16_at_transformers_error(oracle, rng):
    """bf16 logits differ from the fp32 oracle by no more than transformers' own bf16 run does (x2)."""
    hf, path, ours = oracle
    rows = [[("text", 4), ("image", (1, 6, 8)), ("text", 3), ("video", (2, 4, 4)), ("text", 5)]]
    ids, types, mask, images, videos = build_batch(rows, rng, left_pad=False)
    kw, ours_kw = hf_inputs(hf, ids, types, mask, images, videos, rng)
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    with torch.no_grad():
        ref = hf(**kw).logits.numpy()
        kw16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kw.items()}
        hf_err = np.abs(hf_bf16(**kw16).logits.float().numpy() - ref).max()
    out = np.asarray(svlm_jax.forward(svlm_jax.load_pretrained(path, dtype="bfloat16"), ids, **ours_kw))
    assert np.isfinite(out).all()
    err = np.abs(out - ref).max()
    assert err <= 2 * hf_err, f"ours {err:.3g}, transformers' bf16 {hf_err:.3g}; {describe(hf.config)}"


# ---- checkpoints, config.json, svlm info ------------------------------------------------------

@pytest.mark.parametrize("shard", [None, "20KB"])
def test_export_round_trip_bit_exact(oracle, tmp_path, shard):
    from transformers import Qwen3VLForConditionalGeneration

    check_export_round_trip(oracle, tmp_path, shard, Qwen3VLForConditionalGeneration)


def check_export_round_trip(oracle, tmp_path, shard, hf_class):
    """Ours saved (sharded or not) loads in `hf_class` untouched, equal to the oracle bit for bit,
    and back in ours unchanged."""
    hf, _, ours = oracle
    svlm_jax.save_pretrained(ours, tmp_path, **({} if shard is None else {"max_shard_size": shard}))
    if shard:
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    back, info = hf_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref_sd, back_sd = hf.state_dict(), back.state_dict()
    assert ref_sd.keys() == back_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], back_sd[k]), k
    again = svlm_jax.load_pretrained(tmp_path, dtype="float32")
    assert again.config == ours.config
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), ours.params, again.params))


def test_ours_to_transformers_random_params(tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    check_random_params_through_transformers(tmp_path, preset("tiny-qwen3-vl"), Qwen3VLForConditionalGeneration)


def check_random_params_through_transformers(tmp_path, cfg, hf_class):
    """Random params of ours (every leaf) -> HF directory -> `hf_class` -> its own save -> ours, unchanged."""
    params = svlm_jax.init_params(cfg, jax.random.key(np.random.randint(1 << 30)), std=0.5)
    noise = np.random.default_rng()
    params = jax.tree.map(lambda x: x + noise.standard_normal(x.shape, np.float32), params)
    model = Model(config=cfg, params=params)
    svlm_jax.save_pretrained(model, tmp_path / "ours")
    hf, info = hf_class.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.save_pretrained(tmp_path / "hf")
    again = svlm_jax.load_pretrained(tmp_path / "hf", dtype="float32")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, again.params))


def test_config_through_transformers(oracle):
    from transformers import Qwen3VLConfig

    hf, path, ours = oracle
    assert ModelConfig.from_file(path) == ours.config
    back = Qwen3VLConfig(**{k: v for k, v in ours.config.to_dict().items() if k not in ("architectures", "model_type")})
    assert ModelConfig.from_dict(back.to_dict()) == ours.config
    assert back.text_config.head_dim == hf.config.text_config.head_dim


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if "qwen3" in n and not PRESETS[n].text.num_experts))
def test_presets_through_transformers(name):
    from transformers import Qwen3VLConfig

    ours = preset(name)
    hf = Qwen3VLConfig(**{k: v for k, v in ours.to_dict().items() if k not in ("architectures", "model_type")})
    assert ModelConfig.from_dict(hf.to_dict()) == ours


# Qwen3-VL-4B-Instruct's config.json as published on the hub (transformers 4.57 layout).
HUB_QWEN3_4B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
    "text_config": {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
        "initializer_range": 0.02, "intermediate_size": 9728, "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text", "num_attention_heads": 32, "num_hidden_layers": 36,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936},
    "tie_word_embeddings": True, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1024,
        "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096, "model_type": "qwen3_vl",
        "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2560, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652,
}


def test_hub_config_reads_as_preset():
    assert ModelConfig.from_dict(HUB_QWEN3_4B) == preset("qwen3-vl-4b")


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["text_config"].update(attention_bias=True), "text_config.attention_bias=true is not supported"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[5, 24]), "deepstack_visual_indexes .* distinct"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[5, 5]), "deepstack_visual_indexes .* distinct"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes="5"), "deepstack_visual_indexes must be a list"),
    (lambda c: c["vision_config"].update(hidden_act="relu"), "vision_config.hidden_act must be one of"),
    (lambda c: c["vision_config"].update(num_position_embeddings=0), "num_position_embeddings must be a positive"),
    (lambda c: c["text_config"]["rope_scaling"].update(mrope_interleaved="yes"), "mrope_interleaved must be true"),
    (lambda c: c["text_config"].update(head_dim=100), "must sum to head_dim/2 = 50"),
    (lambda c: c["text_config"].update(num_hidden_layers=2), "3 deepstack_visual_indexes feed more LM layers"),
])
def test_bad_configs_named(edit, message):
    cfg = copy.deepcopy(HUB_QWEN3_4B)
    edit(cfg)
    with pytest.raises(ConfigError, match=f"config.json: .*{message}"):
        ModelConfig.from_dict(cfg)


def test_svlm_info(oracle, capsys):
    from svlm_jax import cli

    hf, path, ours = oracle
    assert cli.main(["info", str(path), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert f"model type      {hf.config.model_type}\n" in out
    t = hf.config.text_config
    assert f"head dim {t.head_dim}" in out
    mlp = (f"{t.num_experts} experts of MLP {t.moe_intermediate_size}, {t.num_experts_per_tok} a token"
           if getattr(t, "num_experts", 0) else f"MLP {t.intermediate_size}")
    assert f"{mlp}, vocab" in out
    assert f"parameters      {hf.num_parameters():,} " in out  # transformers counts a tied head once


# ---- a training step ---------------------------------------------------------------------------

def test_train_step_text_rows():
    """One SFT step on text rows of a tiny Qwen3-VL: a finite loss equal to the forward's
    cross-entropy, a finite gradient and changed weights."""
    from svlm_jax.train import step as train

    cfg = preset("tiny-qwen3-vl")
    params = svlm_jax.init_params(cfg, jax.random.key(0), std=0.1)
    spec = train.StepSpec(model=cfg, optim=train.OptimConfig(lr=1e-3, total_steps=10), compute_dtype="float32")
    rng = np.random.default_rng()
    rows = rng.integers(0, cfg.text.vocab_size - 8, (2, 13)).astype(np.int32)
    real = np.ones_like(rows, bool)
    counted = np.ones((2, 12), bool)
    batch = train.text_batch(rows, real, counted)
    state = train.init_state(spec, params)
    logits = np.asarray(svlm_jax.forward(Model(cfg, params), rows[:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    want = -np.take_along_axis(logp, rows[:, 1:, None], -1).mean()
    new_state, metrics = jax.jit(train.train_step, static_argnums=0)(spec, state, batch)
    assert abs(float(metrics["loss"]) - want) <= 1e-4 * want
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params.text.layers,
                           new_state.params.text.layers)
    assert changed.q_norm_lh and changed.k_norm_lh and changed.q_w_ldnh


@pytest.mark.parametrize("oracle", [False], ids=["untied"], indirect=True)  # tying plays no part
def test_embed_refuses_to_drop_deepstack(oracle, rng):
    """`embed` and `vision.encode` cannot carry DeepStack: they refuse rather than cut the model."""
    _, _, ours = oracle
    grid = np.array([[1, 2, 2]])
    rows = jnp.asarray(rng.standard_normal((4, ours.config.vision.patch_dim)), jnp.float32)
    ids = jnp.asarray([[VSTART, IMAGE, VEND]])
    with pytest.raises(ValueError, match="embed_with_deepstack"):
        vlm.embed(ours, ids, rows, vision.vision_layout(ours.config.vision, grid))
    with pytest.raises(ValueError, match="encode_with_deepstack"):
        vision.encode(ours.config.vision, ours.params.vision, rows, vision.vision_layout(ours.config.vision, grid))
    x, deep = jax.jit(vlm.embed_with_deepstack)(ours, ids, rows,
                                                               vision.vision_layout(ours.config.vision, grid))
    assert deep.shape == (len(ours.config.vision.deepstack_visual_indexes),) + x.shape
    assert not np.any(np.asarray(deep)[:, :, [0, 2]])  # zero away from the vision token


def test_frame_grids_rule():
    np.testing.assert_array_equal(rope.frame_grids([[3, 4, 6], [1, 2, 8]]), [[1, 4, 6]] * 3 + [[1, 2, 8]])


# ---- preprocessing: Qwen3-VL's image and video processors ---------------------------------------

# Qwen3-VL-4B-Instruct's preprocessor_config.json and video_preprocessor_config.json (their bounds).
HUB_IMAGE_PREPROCESSOR = {"image_processor_type": "Qwen2VLImageProcessorFast", "patch_size": 16, "merge_size": 2,
                          "temporal_patch_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                          "size": {"longest_edge": 16777216, "shortest_edge": 65536}}
HUB_VIDEO_PREPROCESSOR = {"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 16, "merge_size": 2,
                          "temporal_patch_size": 2, "size": {"longest_edge": 25165824, "shortest_edge": 4096}}


def test_video_preprocessor_defaults_are_transformers():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as hf

    cfg = VisionPreprocessConfig.from_video_preprocessor_config({"video_processor_type": "Qwen3VLVideoProcessor"})
    assert (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size) == (hf.patch_size, hf.temporal_patch_size,
                                                                          hf.merge_size)
    assert (cfg.min_pixels, cfg.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"])
    assert list(cfg.image_mean) == list(hf.image_mean) and list(cfg.image_std) == list(hf.image_std)
    assert cfg.bounds_count_frames
    with pytest.raises(ValueError, match="cap_pixels_per_frame"):
        VisionPreprocessConfig.from_video_preprocessor_config({**HUB_VIDEO_PREPROCESSOR, "cap_pixels_per_frame": True})


def test_video_sizes_match_transformers(rng):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_smart_resize

    for bounds in [HUB_VIDEO_PREPROCESSOR["size"], {"shortest_edge": 100 * 32 * 32, "longest_edge": 2 * 768 * 32 * 32}]:
        cfg = VisionPreprocessConfig.from_video_preprocessor_config({**HUB_VIDEO_PREPROCESSOR, "size": bounds})
        for _ in range(300):
            t, h, w = int(rng.integers(2, 40)), int(rng.integers(8, 3000)), int(rng.integers(8, 3000))
            if max(h, w) / min(h, w) > 150:
                continue
            want = hf_smart_resize(t, h, w, temporal_factor=2, factor=32, min_pixels=cfg.min_pixels,
                                   max_pixels=cfg.max_pixels)
            assert smart_resize(h, w, 32, cfg.min_pixels, cfg.max_pixels, num_frames=t) == want, (t, h, w)


@pytest.mark.parametrize("num_frames,height,width", [(2, 720, 1280), (2, 360, 640), (3, 20, 90), (4, 64, 96),
                                                     (6, 1080, 1920)])
def test_preprocess_video_matches_qwen3_processor(num_frames, height, width, rng):
    """Transformers' Qwen3-VL video pipeline re-run with torch (its smart_resize and patchify, torch's
    uint8 bicubic that torchvision calls, its fused normalisation) against ours."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_smart_resize

    cfg = VisionPreprocessConfig.from_video_preprocessor_config(HUB_VIDEO_PREPROCESSOR)
    frames = _smooth_frames(rng, num_frames, height, width)
    size = hf_smart_resize(num_frames, height, width, temporal_factor=2, factor=32, min_pixels=cfg.min_pixels,
                           max_pixels=cfg.max_pixels)
    videos = _hf_normalize(_hf_resize(torch.from_numpy(frames).permute(0, 3, 1, 2)[None], *size), cfg)
    want, *want_grid = Qwen3VLVideoProcessor.patchify(None, videos, patch_size=16, merge_size=2, temporal_patch_size=2)
    rows, grid = preprocess_video(frames, cfg)
    assert grid == tuple(want_grid) and rows.shape == (math.prod(grid), 3 * 2 * 16 * 16)
    if size == (height, width):  # no resize: exact
        np.testing.assert_array_equal(rows, want[0].numpy())
    else:
        assert_rows_near_torch(rows, want[0].numpy(), cfg)


@pytest.mark.parametrize("height,width", [(480, 640), (300, 57), (1000, 1990)])  # none, both grow, both shrink
def test_preprocess_image_matches_qwen3_image_processor(height, width, rng):
    """Qwen3-VL's image processor is Qwen2-VL's with its own config; HF's PIL backend itself (which
    resizes both sides in one pass: equal to ours where they shrink or grow alike)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hub = HUB_IMAGE_PREPROCESSOR
    cfg = VisionPreprocessConfig.from_preprocessor_config(hub)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    hf = Qwen2VLImageProcessorPil(**{k: v for k, v in hub.items() if k != "image_processor_type"})(
        images=[image], return_tensors="np")
    rows, grid = preprocess_image(image, cfg)
    assert grid == tuple(hf["image_grid_thw"][0])
    np.testing.assert_allclose(rows, hf["pixel_values"], rtol=0, atol=1e-6)


# ---- the stream's time text ---------------------------------------------------------------------

def test_stream_timestamps_are_the_processors(rng):
    """A stream round's time label for Qwen3-VL equals what transformers' Qwen3-VL processor writes
    before the same frames (2 fps, one temporal patch a second), from any start second."""
    import types

    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    from svlm_jax.stream_format import CachePolicy, time_label

    policy, cfg = CachePolicy(), preset("tiny-qwen3-vl")
    stub = types.SimpleNamespace(
        video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2), vision_start_token="<S>",
        video_token="<V>", vision_end_token="<E>",
        _calculate_timestamps=lambda *a: Qwen3VLProcessor._calculate_timestamps(None, *a))
    for start in [0, int(rng.integers(1, 5000)), 99990]:
        seconds = 6
        indices = np.arange(start * policy.fps, (start + seconds) * policy.fps)
        meta = VideoMetadata(total_num_frames=int(indices[-1]) + 1, fps=float(policy.fps), frames_indices=indices)
        text = Qwen3VLProcessor.replace_video_token(stub, {"video_grid_thw": torch.tensor([[seconds, 4, 4]]),
                                                           "video_metadata": [meta]}, 0)
        want = [piece.split("<E>")[-1] for piece in text.split("<S>")[:-1]]
        assert [time_label(s, s + 1.0, policy.stamp_frames(cfg)) for s in range(start, start + seconds)] == want


def test_stream_format_for_qwen3(stream_tokenizer):
    from svlm_jax.stream_format import CachePolicy, StreamFormat

    cfg = preset("tiny-qwen3-vl")
    policy = CachePolicy()
    fmt = StreamFormat.from_tokenizer(stream_tokenizer, stamp_frames=policy.stamp_frames(cfg))
    before, _ = fmt.prompt_ids(41.0, 42.0, None)
    assert stream_tokenizer.decode(before[1:-1]) == "user\n<41.2 seconds>"
    assert fmt.round_slots(16, policy).cap("before") >= len(fmt.prompt_ids(99999.0, 100000.0, None)[0])
    assert policy.stamp_frames(preset("tiny")) == 0  # Qwen2.5-VL keeps "Time=a-b s"
    with pytest.raises(ValueError, match="one temporal patch a second: fps must be 2"):
        CachePolicy(fps=4).check_model(cfg)
