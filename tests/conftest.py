"""Shared fixtures: tiny random HF Qwen2.5-VL / Qwen2-VL checkpoints written to disk (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

VOCAB = 400
IMAGE, VIDEO, VSTART, VEND = 390, 391, 388, 389


def hf_config(model_type: str, *, tie: bool = False):
    """A tiny transformers config built with transformers' own classes (independent of ours)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=None, eos_token_id=None)
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
               vision_end_token_id=VEND, tie_word_embeddings=tie)
    if model_type == "qwen2_5_vl":
        vision = dict(depth=3, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1], tokens_per_second=2, window_size=112)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    vision = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)


def perturbed_hf_model(model_type: str, seed: int, *, tie: bool = False):
    """A random HF model in eval mode, every parameter (norms and biases too) perturbed."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2_5_VLForConditionalGeneration if model_type == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(hf_config(model_type, tie=tie)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session", params=["qwen2_5_vl", "qwen2_vl"])
def hf_checkpoint(request, tmp_path_factory):
    """(model_type, HF torch model, directory it was saved to)."""
    model = perturbed_hf_model(request.param, seed=hash(request.param) % 1000)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


@pytest.fixture(scope="session")
def ours_f32(hf_checkpoint):
    import svlm_jax

    return svlm_jax.load_pretrained(hf_checkpoint[2], dtype="float32")


@pytest.fixture
def rng():
    return np.random.default_rng()


STREAM_CORPUS = ["Red passes. Blue shoots! Goal for Red! Score 1 to 0. Foul by Blue. Score 1 to 0.",
                 "Time=12.0-13.0s user assistant system previous text You are a helpful assistant.",
                 "Commentate on this match ... Saved by Blue. Wide from Red. Yellow wins the ball."]


@pytest.fixture(scope="session")
def stream_tokenizer_dir(tmp_path_factory):
    """A directory with a tiny byte-level BPE with Qwen's special tokens, trained here."""
    from svlm_jax.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(STREAM_CORPUS * 10, 400, path)
    return path


@pytest.fixture(scope="session")
def stream_tokenizer(stream_tokenizer_dir):
    from svlm_jax.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(stream_tokenizer_dir)


def random_stream_model(tokenizer, *, seed: int = 0, model_type: str = "qwen2_5_vl"):
    """A tiny random model (every weight perturbed) whose special ids are the tokenizer's."""
    import dataclasses

    import jax

    import svlm_jax
    from svlm_jax.config import tiny
    from svlm_jax.model.params import Model

    sp = tokenizer.special
    cfg = dataclasses.replace(tiny(model_type, vocab_size=tokenizer.vocab_size), image_token_id=sp.image_pad,
                              video_token_id=sp.video_pad, vision_start_token_id=sp.vision_start,
                              vision_end_token_id=sp.vision_end)
    params = svlm_jax.init_params(cfg, jax.random.key(seed), std=0.1)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), params)
    return Model(config=cfg, params=params)


@pytest.fixture(scope="session")
def stream_model(stream_tokenizer):
    return random_stream_model(stream_tokenizer)


def write_synth_sft(path, first_seed: int = 0):
    """A one-minute synthetic match at 56x56 as 30 s SFT samples; returns the JSONL path."""
    from svlm_jax.synth import DatasetConfig, RenderConfig, write_dataset

    return write_dataset(path, DatasetConfig(streams=1, minutes=1, clip_seconds=30, first_seed=first_seed,
                                             render=RenderConfig(height=56, width=56)))


@pytest.fixture(scope="session")
def synth_sft(tmp_path_factory):
    """Training samples of a synthetic match (tiny training runs)."""
    return write_synth_sft(tmp_path_factory.mktemp("sft"))


def end_prone(model, tokenizer, config, random_second):
    """A random model rarely says <|im_end|>: point its head row at the embedding of the token greedy
    decoding repeats most after an answer's first token (found by streaming 12 seconds
    `random_second(rng)` with the greedy StreamConfig `config`), scaled so that about half of the
    rounds end with it and the others are cut at max_new_tokens."""
    import collections

    import jax.numpy as jnp

    from svlm_jax.streaming import StreamingSession

    def rounds_of(m, n=12):
        session = StreamingSession(m, tokenizer, config)
        rng = np.random.default_rng(0)
        for i in range(n):
            session.step_batch([random_second(rng)], [float(i)], [float(i + 1)])
            out = session.last_output
            yield np.asarray(out.tokens_bm)[0, :int(out.n_gen_b[0])].tolist()

    counts = collections.Counter(t for gen in rounds_of(model) for t in gen[1:])
    p = model.params.text
    direction = p.embed_vd[counts.most_common(1)[0][0]] * p.final_norm_d
    unit = jnp.linalg.norm(p.lm_head_dv, axis=0).mean() / jnp.linalg.norm(direction)
    best = None
    for scale in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0):  # a Qwen3 head needs the upper end
        head = p.lm_head_dv.at[:, tokenizer.special.im_end].set(scale * unit * direction)
        candidate = model.replace(params=model.params.replace(text=p.replace(lm_head_dv=head)))
        ended = np.mean([gen[-1] == tokenizer.special.im_end for gen in rounds_of(candidate)])
        if best is None or abs(ended - 0.5) < best[0]:
            best = (abs(ended - 0.5), candidate)
    return best[1]
