"""Config reading/writing against transformers' config classes and the hub's original files."""

from __future__ import annotations

import numpy as np
import pytest

from svlm_jax.config import PRESETS, ConfigError, ModelConfig, preset
from svlm_jax.model import rope

# Qwen2.5-VL-7B-Instruct's config.json as published on the hub (original, pre-transformers-5 layout).
HUB_QWEN25_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
    "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
    "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}


def test_hub_layout_reads_as_preset():
    assert ModelConfig.from_dict(HUB_QWEN25_7B) == preset("qwen2.5-vl-7b")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_through_transformers(name):
    """Our written config is accepted by transformers' class, whose values we read back unchanged."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig, Qwen3VLMoeConfig

    ours = preset(name)
    cls = {"qwen2_5_vl": Qwen2_5_VLConfig, "qwen2_vl": Qwen2VLConfig, "qwen3_vl": Qwen3VLConfig,
           "qwen3_vl_moe": Qwen3VLMoeConfig}[ours.hf_model_type]
    hf = cls(**{k: v for k, v in ours.to_dict().items() if k not in ("architectures", "model_type")})
    assert hf.text_config.hidden_size == ours.text.hidden_size
    assert hf.text_config.num_key_value_heads == ours.text.num_kv_heads
    assert ModelConfig.from_dict(hf.to_dict()) == ours


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("vocab_size"), "missing key 'vocab_size'"),
    (lambda c: c.pop("vision_config"), "missing key 'vision_config'"),
    (lambda c: c.update(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 25]}), "must sum to head_dim/2"),
    (lambda c: c["vision_config"].update(out_hidden_size=2048), "must equal the text hidden_size"),
    (lambda c: c.update(num_key_value_heads=5), "multiple of num_key_value_heads"),
    (lambda c: c.update(use_sliding_window=True), "use_sliding_window"),
    (lambda c: c.update(rope_scaling={"type": "yarn", "factor": 4.0}), "rope type 'yarn' is not supported"),
    (lambda c: c.update(model_type="qwen3_5_moe"), "'qwen3_5_moe' is not supported"),
])
def test_bad_configs(edit, message):
    import copy

    cfg = copy.deepcopy(HUB_QWEN25_7B)
    edit(cfg)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(cfg)


def test_original_qwen_resume_rule_known_answer():
    # A 3-patch video of a 4x6 merged grid with dt = 4 after 2 text tokens, then one text token.
    # Temporal positions 2, 6, 10; original rule resumes at 2 + max(8, 3, 5) + 1 = 11,
    # transformers 5 at 2 + max(4, 6) = 8.
    ids = np.array([[1, 1] + [7] * 72 + [1]])
    kw = dict(image_token_id=6, video_token_id=7, spatial_merge=2, video_grid_thw=[[3, 8, 12]],
              video_time_intervals=[4.0])
    qwen = rope.rope_positions(ids, resume_rule="qwen", **kw)
    hf5 = rope.rope_positions(ids, resume_rule="max_hw", **kw)
    assert qwen[0, -1].tolist() == [11, 11, 11] and hf5[0, -1].tolist() == [8, 8, 8]
    assert sorted(set(qwen[0, 2:74, 0].tolist())) == [2, 6, 10]
    assert qwen[0, 2 + 24 + 7].tolist() == [6, 3, 3]  # second temporal patch, row 1, col 1
