"""SFT validation: with `data.eval`, the log holds the held-out samples' loss every `eval_every`
steps and at the end, equal to the mean next-token loss of the checkpointed weights computed from
`svlm_jax.forward` logits (the path checked against transformers) over every held-out chunk."""

from __future__ import annotations

import json

import pytest

from svlm_jax.config import ModelConfig
from svlm_jax.model.params import Model
from svlm_jax.tokenizer import Tokenizer
from svlm_jax.train import data, run
from svlm_jax.train.config import load_config

from conftest import write_synth_sft
from test_train_step import reference_loss
from train_runs import logged, params_of, train_records, write_config


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """12 seconds of another match: three overlapping 6 s chunks (an odd count: the last
    evaluation batch has a row of padding)."""
    samples = write_synth_sft(tmp_path_factory.mktemp("held_out"), first_seed=7)
    first = json.loads(samples.read_text().splitlines()[0])
    first["video_end"] = first["video_start"] + 12
    first["text_stream"] = [w for w in first["text_stream"] if w[1] < first["video_end"]]
    path = samples.with_name("held_out.jsonl")
    path.write_text(json.dumps(first) + "\n")
    return path


def held_out_chunks(cfg, model_cfg: ModelConfig) -> list[data.Chunk]:
    tok = Tokenizer.from_pretrained(cfg.model.tokenizer)
    fmt = data.training_format(tok, cfg.model.tokenizer, system=cfg.data.system, query=cfg.data.query)
    spec = data.ChunkSpec(cfg.data.chunk_seconds, cfg.data.overlap_seconds, cfg.policy)
    samples = data.read_samples(cfg.data.eval)
    plan = data.plan_chunks(fmt, data.pad_id(tok), model_cfg, spec, run.vision_preprocess(cfg, tok, model_cfg), samples,
                            [data.Bucket(*b) for b in cfg.data.buckets])
    return [data.chunk_from_frames(fmt, model_cfg, spec, plan.vision_cfg, samples[r.sample], r.start,
                                   data.read_frames(samples[r.sample], r.start, r.end, cfg.policy.fps))
            for r in plan.refs]


def test_eval_loss_every_n_steps_equals_reference(tmp_path, stream_tokenizer, synth_sft, held_out):
    path = write_config(tmp_path, "e", stream_tokenizer, synth_sft, steps=3, every=2, keep=2)
    path.write_text(path.read_text().replace("[data]\n", f'[data]\neval = "{held_out}"\n')
                    .replace("[train]\n", "[train]\neval_every = 2\n"))
    assert run.main_train(path) == 3
    out = tmp_path / "e"
    evals = [r for r in logged(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 3]  # every 2 steps, and at the end
    assert [r["step"] for r in train_records(out)] == [1, 2, 3]

    cfg = load_config(path)
    model_cfg = ModelConfig.from_file(out / "model")
    chunks = held_out_chunks(cfg, model_cfg)
    assert len(chunks) == 3
    labelled = sum(int((c.labels_t != data.IGNORE).sum()) for c in chunks)
    for record in evals:
        params, _ = params_of(out, record["step"])
        assert record["eval_tokens"] == labelled
        assert record["eval_loss"] == pytest.approx(reference_loss(Model(model_cfg, params), chunks), rel=2e-5)
    assert evals[0]["eval_loss"] != evals[-1]["eval_loss"]  # the weights did change between evaluations
