"""Sampling against transformers' logits processors (the oracle) on fresh random logits."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from svlm_jax.streaming.sampling import SamplingConfig, apply_repetition_penalty, filter_logits, next_token


def test_repetition_penalty_matches_transformers(rng):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = rng.standard_normal((3, 50)).astype(np.float32) * 3
    context = rng.integers(0, 50, (3, 12))
    seen = np.zeros((3, 50), bool)
    np.put_along_axis(seen, context, True, axis=1)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(context), torch.tensor(logits)).numpy()
    np.testing.assert_allclose(np.asarray(apply_repetition_penalty(logits, seen, 1.3)), ref, rtol=1e-6)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.8), (7, 1.0), (7, 0.5)])
def test_filters_match_transformers(rng, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = rng.standard_normal((4, 64)).astype(np.float32) * 2
    ref = torch.tensor(logits)
    ref = TemperatureLogitsWarper(0.7)(None, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = np.asarray(filter_logits(logits, SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p)))
    assert np.array_equal(np.isfinite(ours), np.isfinite(ref.numpy()))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref.numpy()[np.isfinite(ours)], rtol=1e-6)


def test_greedy_suppressed_and_sampled_tokens(rng):
    logits = rng.standard_normal((5, 30)).astype(np.float32)
    seen = np.zeros((5, 30), bool)
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 5)
    best = logits.argmax(-1)
    greedy = SamplingConfig(temperature=0.0, repetition_penalty=1.0, suppress_tokens=(int(best[0]),))
    masked = logits.copy()
    masked[:, best[0]] = -np.inf
    assert np.array_equal(np.asarray(next_token(logits, seen, keys, greedy)), masked.argmax(-1))
    # With top_k=1 sampling is greedy; with top_p tiny too.
    assert np.array_equal(np.asarray(next_token(logits, seen, keys, SamplingConfig(top_k=1, repetition_penalty=1.0))),
                          best)
    assert np.array_equal(np.asarray(next_token(logits, seen, keys, SamplingConfig(top_p=1e-6, repetition_penalty=1.0))),
                          best)
