"""PARAM_RULES: every parameter of every variant has its entry, and the entry, not the field's name,
decides the sharding (of parameters and optimizer moments alike), the weight decay and the init."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from svlm_jax.config import tiny
from svlm_jax.model import params
from svlm_jax.train import sharding, step
from svlm_jax.train.checkpoint import abstract_params

VARIANTS = [tiny(kind, tie_word_embeddings=tie) for kind in ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe")
            for tie in (False, True)]
MESH = AbstractMesh((1, 2, 4), sharding.MESH_AXES)  # tiny: 4 query heads, 2 KV heads (not split over 4)


def spec_of(path: str, cfg=VARIANTS[0], mesh=MESH) -> PartitionSpec:
    return sharding.param_spec(path, dict(params.param_leaves(cfg))[path], mesh)


def test_every_parameter_has_a_rule_and_every_rule_a_parameter():
    paths = {path for cfg in VARIANTS for path, _ in params.param_leaves(cfg)}
    assert paths == set(params.PARAM_RULES)


def test_rule_axes_match_the_shapes_and_are_sharding_rules():
    logical_axes = {f.name for f in dataclasses.fields(sharding.ShardingRules)}
    for cfg in VARIANTS:
        for path, shape in params.param_leaves(cfg):
            axes = params.PARAM_RULES[path].axes
            assert len(axes) == len(shape), path
            assert set(axes) <= logical_axes, path
        for path, x in flat(sharding.tree_shardings(abstract_params(cfg, "float32"), MESH)).items():
            assert len(x.spec) in (0, len(dict(params.param_leaves(cfg))[path])), path


# Written out here, not derived from the table: the leaves AdamW decays (matrices and embeddings),
# the norm weights (init 1); every other leaf is a bias (init 0, not decayed).
DECAYED = {"vision.patch_w_pc", "vision.blocks.qkv_w_lc3nh", "vision.blocks.proj_w_lnhc", "vision.blocks.gate_w_lcf",
           "vision.blocks.up_w_lcf", "vision.blocks.down_w_lfc", "vision.merger_fc1_w_ee", "vision.merger_fc2_w_ed",
           "text.embed_vd", "text.layers.q_w_ldnh", "text.layers.k_w_ldkh", "text.layers.v_w_ldkh",
           "text.layers.o_w_lnhd", "text.layers.gate_w_ldf", "text.layers.up_w_ldf", "text.layers.down_w_lfd",
           "text.lm_head_dv", "vision.pos_embed_qc", "vision.deepstack.fc1_w_see", "vision.deepstack.fc2_w_sed",
           "text.layers.router_w_ldx", "text.layers.expert_gate_up_w_lxdg", "text.layers.expert_down_w_lxfd"}
NORM_WEIGHTS = {"vision.blocks.norm1_w_lc", "vision.blocks.norm2_w_lc", "vision.merger_norm_w_c",
                "text.layers.attn_norm_ld", "text.layers.mlp_norm_ld", "text.final_norm_d",
                "vision.deepstack.norm_w_se", "text.layers.q_norm_lh", "text.layers.k_norm_lh"}


def flat(tree) -> dict:
    return {params.dotted_path(path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: f"{c.model_type}-tie{c.text.tie_word_embeddings}")
def test_decay_mask_and_init(cfg):
    p = params.init_params(cfg, jax.random.key(0))
    leaves, decayed = flat(p), flat(step._decayed(p))
    assert set(leaves) == {path for path, _ in params.param_leaves(cfg)}
    assert flat(step._decayed(p.text)) == {path[len("text."):]: d for path, d in decayed.items() if path.startswith("text.")}
    for path, x in leaves.items():
        x = np.asarray(x)
        assert decayed[path] == (path in DECAYED), path
        if path in DECAYED:
            assert 0.015 < x.std() < 0.025 and abs(x.mean()) < 0.01, path
        else:
            assert (x == (1.0 if path in NORM_WEIGHTS else 0.0)).all(), path


def test_specs():
    assert spec_of("text.embed_vd") == PartitionSpec("tensor", "fsdp")
    assert spec_of("text.layers.q_w_ldnh") == PartitionSpec(None, "fsdp", "tensor", None)
    assert spec_of("text.layers.k_w_ldkh") == PartitionSpec(None, "fsdp", None, None)  # 2 KV heads, 4 shards
    assert spec_of("text.layers.k_b_lkh") == PartitionSpec(None, None, None)
    assert spec_of("text.layers.down_w_lfd") == PartitionSpec(None, "tensor", "fsdp")
    assert spec_of("text.final_norm_d") == PartitionSpec("fsdp")
    assert spec_of("text.lm_head_dv") == PartitionSpec("fsdp", "tensor")
    for path, _ in params.param_leaves(VARIANTS[0]):
        if path.startswith("vision."):
            assert spec_of(path) == PartitionSpec(), path


def test_optimizer_moments_are_sharded_like_their_parameters():
    cfg = VARIANTS[0]
    for freeze_vision in (True, False):
        spec = step.StepSpec(cfg, step.OptimConfig(), freeze_vision=freeze_vision)
        shardings = step.state_shardings(spec, abstract_params(cfg, "float32"), MESH)
        trained = jax.tree.leaves(step.trainable(spec, shardings.params))
        for moment in ("mu", "nu"):
            assert jax.tree.leaves(optax.tree.get(shardings.opt_state, moment)) == trained
        assert shardings.step.spec == PartitionSpec()


def test_the_table_not_the_field_name_decides(monkeypatch):
    cfg, path = VARIANTS[0], "text.layers.q_w_ldnh"  # the name's letters say l d n h
    monkeypatch.setitem(params.PARAM_RULES, path,
                        params.ParamRule(("layers", "q_heads", "embed", "head_dim"), init="zeros", decayed=False))
    assert spec_of(path) == PartitionSpec(None, "tensor", "fsdp", None)
    spec = step.StepSpec(cfg, step.OptimConfig())
    shardings = step.state_shardings(spec, abstract_params(cfg, "float32"), MESH)
    assert shardings.params.text.layers.q_w_ldnh.spec == PartitionSpec(None, "tensor", "fsdp", None)
    assert optax.tree.get(shardings.opt_state, "mu").layers.q_w_ldnh.spec == PartitionSpec(None, "tensor", "fsdp", None)
    p = params.init_params(cfg, jax.random.key(0))
    assert not np.asarray(p.text.layers.q_w_ldnh).any()
    assert not step._decayed(p.text).layers.q_w_ldnh
    assert step._decayed(p.text).layers.k_w_ldkh
    monkeypatch.setitem(params.PARAM_RULES, path, params.ParamRule(("layers", "embed", "q_heads"), "normal", True))
    with pytest.raises(ValueError, match=path):
        spec_of(path)


def test_a_parameter_missing_from_the_table_is_an_error_naming_it(monkeypatch):
    cfg, path = VARIANTS[0], "text.layers.q_w_ldnh"
    monkeypatch.delitem(params.PARAM_RULES, path)
    abstract = abstract_params(cfg, "float32")
    for use in (lambda: params.init_params(cfg, jax.random.key(0)), lambda: sharding.tree_shardings(abstract, MESH),
                lambda: step._decayed(abstract.text)):
        with pytest.raises(KeyError, match=path):
            use()
