"""The SFT step: its loss equals one computed from `svlm_jax.forward` logits (the path checked
against transformers), accumulation equals a big batch, the vision tower stays frozen, the
schedule, and on 8 virtual CPU devices every mesh shape gives the single-device step."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import svlm_jax
from svlm_jax.config import tiny
from svlm_jax.media.preprocess import VisionPreprocessConfig
from svlm_jax.model.params import Model
from svlm_jax.stream_format import QUERY, SYSTEM
from svlm_jax.model import text
from svlm_jax.train import data, sharding, step
from svlm_jax.train.checkpoint import abstract_params

ROOT = Path(__file__).resolve().parents[1]


def model_config(tok):
    sp = tok.special
    return dataclasses.replace(tiny(vocab_size=tok.vocab_size), image_token_id=sp.image_pad,
                               video_token_id=sp.video_pad, vision_start_token_id=sp.vision_start,
                               vision_end_token_id=sp.vision_end)


def random_chunks(tok, cfg, seed: int, n: int):
    """`n` chunks of 2-3 seconds with random frames and commentary."""
    rng = np.random.default_rng(seed)
    fmt = data.training_format(tok, tok.name, system=SYSTEM, query=QUERY)
    spec = data.ChunkSpec(chunk_seconds=3, overlap_seconds=1)
    vocab = ["Red", "passes.", "Blue", "shoots!", "Goal", "Foul"]
    chunks = []
    for i in range(n):
        seconds = 2 + i % 2
        words = tuple((k + 0.1, k + 0.2 + 0.7 * rng.random(), str(rng.choice(vocab)))
                      for k in range(seconds) for _ in range(int(rng.integers(0, 3))))
        sample = data.Sample(None, 0.0, float(seconds), words, previous="Red passes." if i % 3 else "")
        frames = [rng.integers(0, 256, (2, 56, 56, 3), dtype=np.uint8) for _ in range(seconds)]
        chunks.append(data.chunk_from_frames(fmt, cfg, spec, VisionPreprocessConfig(), sample, 0, frames))
    return chunks, data.pad_id(tok)


def make_batch(cfg, chunks, pad_id, grad_accum: int) -> step.Batch:
    bucket = data.Bucket(tokens=max(len(c.ids_t) for c in chunks) + 5, patches=64)
    per = len(chunks) // grad_accum
    micro = [data.pad_chunks(chunks[a * per:(a + 1) * per], bucket, pad_id, max_seconds=3) for a in range(grad_accum)]
    return step.host_batch(cfg, {k: np.stack([m[k] for m in micro]) for k in micro[0]})


def random_params(cfg, seed: int):
    key = jax.random.key(seed)
    params = svlm_jax.init_params(cfg, key, std=0.1)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def spec_for(cfg, remat=True, **optim) -> step.StepSpec:
    return step.StepSpec(cfg, step.OptimConfig(**optim), compute_dtype="float32", remat=remat)


def reference_loss(model, chunks) -> float:
    """Mean next-token cross-entropy over labelled tokens from `svlm_jax.forward` logits, in numpy."""
    total, count = 0.0, 0
    for c in chunks:
        logits = np.asarray(svlm_jax.forward(model, c.ids_t[None], pixel_values_videos=c.rows_pv,
                                             video_grid_thw=c.grids_s3,
                                             second_per_grid_ts=[1.0] * len(c.grids_s3))[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for t in np.flatnonzero(c.labels_t != data.IGNORE):
            total -= logp[t - 1, c.labels_t[t]]
            count += 1
    return total / count


def test_loss_equals_reference_forward(stream_tokenizer):
    cfg = model_config(stream_tokenizer)
    chunks, pad = random_chunks(stream_tokenizer, cfg, seed=int(np.random.default_rng().integers(1000)), n=2)
    params = random_params(cfg, seed=1)
    expected = reference_loss(Model(cfg, params), chunks)
    got = float(jax.jit(step.batch_loss, static_argnums=0)(spec_for(cfg), params, make_batch(cfg, chunks, pad, 1)))
    assert got == pytest.approx(expected, rel=2e-5)


def test_accumulation_equals_big_batch_and_vision_stays_frozen(stream_tokenizer):
    cfg = model_config(stream_tokenizer)
    chunks, pad = random_chunks(stream_tokenizer, cfg, seed=2, n=2)
    params = random_params(cfg, seed=3)
    spec = spec_for(cfg, lr=1e-3, warmup_steps=0, total_steps=10, clip_norm=1e9)
    run = jax.jit(step.train_step, static_argnums=0)
    (s1, m1), (s2, m2) = (run(spec, step.init_state(spec, params), make_batch(cfg, chunks, pad, a)) for a in (1, 2))
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-5)
    assert float(m1["labelled_tokens"]) == sum(int((c.labels_t != data.IGNORE).sum()) for c in chunks)
    # Adam's first moment after one step is (1 - b1) * gradient: the accumulated gradients agree.
    # (Parameters are not compared: Adam's first update g / (|g| + eps) flips on gradients near 0.)
    for a, b in zip(jax.tree.leaves(optax.tree.get(s1.opt_state, "mu")),
                    jax.tree.leaves(optax.tree.get(s2.opt_state, "mu"))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))  # f32 summation order
    for a, b in zip(jax.tree.leaves(s1.params.vision), jax.tree.leaves(params.vision)):
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s1.params.text), jax.tree.leaves(params.text))]
    assert all(changed)
    # no optimizer state for the vision tower: Adam's two moments of the LM, Adam's and the schedule's counts
    n_text = len(jax.tree.leaves(params.text))
    assert len(jax.tree.leaves(s1.opt_state)) == 2 * n_text + 2


def test_vision_lr_is_the_towers_own_adamw_learning_rate(stream_tokenizer):
    """One step with (lr, vision_lr) moves the LM as AdamW at lr and the tower as AdamW at vision_lr."""
    cfg = model_config(stream_tokenizer)
    chunks, pad = random_chunks(stream_tokenizer, cfg, seed=int(np.random.default_rng().integers(1000)), n=1)
    params, batch = random_params(cfg, seed=4), make_batch(cfg, chunks, pad, 1)
    lr, vision_lr = float(np.random.default_rng().uniform(1e-4, 1e-3)), 3e-3
    common = dict(warmup_steps=0, total_steps=10, weight_decay=0.1)

    def one_step(**optim):
        spec = step.StepSpec(cfg, step.OptimConfig(**common, **optim), compute_dtype="float32", freeze_vision=False,
                             remat=False)
        return jax.jit(step.train_step, static_argnums=0)(spec, step.init_state(spec, params), batch)[0].params

    split, text_only, vision_only = one_step(lr=lr, vision_lr=vision_lr), one_step(lr=lr), one_step(lr=vision_lr)
    for got, want in ((split.text, text_only.text), (split.vision, vision_only.vision)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # the two rates really differ: the tower moved by more than it would have at lr
    moved = lambda p: sum(float(np.abs(np.asarray(a) - np.asarray(b)).sum())
                          for a, b in zip(jax.tree.leaves(p.vision), jax.tree.leaves(params.vision)))
    assert moved(split) > 2 * moved(text_only)


def test_schedule_warmup_then_cosine():
    lr = step.schedule(step.OptimConfig(lr=2.0, warmup_steps=2, total_steps=6))
    # warmup 0 -> 2 over 2 steps, then half a cosine over the remaining 4 steps
    assert [float(lr(s)) for s in (0, 1, 2, 4, 6)] == pytest.approx([0.0, 1.0, 2.0, 1.0, 0.0], abs=1e-6)


SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, numpy as np, optax
    sys.path.insert(0, sys.argv[1]); sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
    from svlm_jax.tokenizer import Tokenizer
    from svlm_jax.train import sharding, step
    import test_train_step as t
    tok = Tokenizer.from_pretrained(sys.argv[2])
    cfg = t.model_config(tok)
    chunks, pad = t.random_chunks(tok, cfg, seed=int(sys.argv[3]), n=16)
    params = t.random_params(cfg, seed=5)
    spec = t.spec_for(cfg, remat=False, lr=1e-3, warmup_steps=1, total_steps=4)
    batch = t.make_batch(cfg, chunks, pad, 2)
    out = {}
    for shape in [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 2, 4)]:
        devices = jax.devices()[:int(np.prod(shape))]
        mesh = sharding.make_mesh(*shape, devices=devices)
        shardings = step.state_shardings(spec, params, mesh)
        state = step.sharded_state(spec, params, mesh)
        fn = step.compile_step(spec, mesh, shardings)
        state, m = fn(state, sharding.put_batch(batch, mesh))
        # Adam's first moment after one step is 0.1 * gradient (parameters are not compared:
        # Adam's first update g / (|g| + eps) flips on gradients near 0)
        mu = [np.asarray(x) for x in jax.tree.leaves(optax.tree.get(state.opt_state, "mu"))]
        q_spec = str(state.params.text.layers.q_w_ldnh.sharding.spec)
        losses = [float(m["loss"]), float(fn(state, sharding.put_batch(batch, mesh))[1]["loss"])]
        out[str(shape)] = (losses, q_spec)
        if shape == (1, 1, 1):
            ref = mu
        else:
            out[str(shape)] += (max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(mu, ref)),)
    print(json.dumps(out))
""")


def test_sharded_step_equals_single_device(stream_tokenizer, tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # faster compiles
    seed = str(int(np.random.default_rng().integers(1000)))
    proc = subprocess.run([sys.executable, str(script), str(ROOT), stream_tokenizer.name, seed], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # every array keeps a layout the partitioner can reach without replicating it first
    assert "Involuntary full rematerialization" not in proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ref_losses = out["(1, 1, 1)"][0]
    for shape, (losses, q_spec, max_diff) in ((k, v) for k, v in out.items() if k != "(1, 1, 1)"):
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=shape)
        assert max_diff < 1e-4, (shape, max_diff)  # relative to each leaf's largest gradient
    # q_w [L, D, N, H]: D over fsdp, N over tensor, when those axes have more than one device
    assert out["(2, 2, 2)"][1] == "P(None, 'fsdp', 'tensor', None)"
    assert out["(1, 2, 4)"][1] == "P(None, 'fsdp', 'tensor', None)"


def full_logits_nll_sum(params, hidden_btd, targets_bt):
    """The loss the straightforward way: all [B, T, V] logits at once (the oracle of the chunked one)."""
    logits_btv = text.logits(params, hidden_btd)
    mask_bt = targets_bt != data.IGNORE
    logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
    picked_bt = jnp.take_along_axis(logp_btv, jnp.where(mask_bt, targets_bt, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(mask_bt, picked_bt, 0.0))


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_cross_entropy_equals_full_logits(tie):
    """Value and gradients (hidden states and LM head) for chunks that do and do not divide T."""
    rng = np.random.default_rng()
    cfg = tiny(vocab_size=300, tie_word_embeddings=tie)
    params = random_params(cfg, seed=int(rng.integers(1000))).text
    b, t = 2, 37
    hidden_btd = jnp.asarray(rng.standard_normal((b, t, cfg.text.hidden_size)), jnp.float32)
    targets_bt = jnp.asarray(np.where(rng.random((b, t)) < 0.3, data.IGNORE, rng.integers(0, 300, (b, t))), jnp.int32)
    want, want_grads = jax.value_and_grad(full_logits_nll_sum, argnums=(0, 1))(params, hidden_btd, targets_bt)
    for chunk in (1, 8, 37, 64):
        def chunked(p, h):
            return step.nll_sums(p, h, targets_bt, chunk)[0]
        got, got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(params, hidden_btd)
        assert float(got) == pytest.approx(float(want), rel=1e-5), chunk
        for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()), err_msg=str(chunk))
    assert float(step.nll_sums(params, hidden_btd, targets_bt, 8)[1]) == int((np.asarray(targets_bt) != data.IGNORE).sum())


def test_compiled_step_never_holds_the_full_logits():
    """The compiled step of a 256-token row and a 32768-word vocab has no [256, 32768] float32
    buffer with loss_chunk 64 (and has one with 256: the check can fail), and its temporary memory
    (XLA's memory analysis) is smaller by at least the logits less one chunk's."""
    rng = np.random.default_rng(0)
    cfg = tiny(vocab_size=32768)
    t, v = 256, cfg.text.vocab_size
    ids_bt = rng.integers(0, 300, (1, t + 1)).astype(np.int32)
    batch = step.text_batch(ids_bt, np.ones_like(ids_bt, bool), np.ones((1, t), bool))
    params = abstract_params(cfg, "float32")
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    compiled = {}
    for chunk in (64, 256):
        spec = step.StepSpec(cfg, step.OptimConfig(), compute_dtype="float32", loss_chunk=chunk)
        state = jax.eval_shape(functools.partial(step.init_state, spec), params)
        compiled[chunk] = step.compile_step(spec, mesh, step.state_shardings(spec, params, mesh)).lower(
            state, batch).compile()
    full_logits = re.compile(rf"f32\[(?:\d+,)*{t},{v}\]")
    assert not full_logits.search(compiled[64].as_text())
    assert full_logits.search(compiled[256].as_text())
    saved = compiled[256].memory_analysis().temp_size_in_bytes - compiled[64].memory_analysis().temp_size_in_bytes
    assert saved > t * v * 4 * (1 - 64 / t)
