"""Next-token choice in transformers' order: repetition penalty, temperature, top-k, top-p, sample."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from svlm_jax.tokenizer import GenerationDefaults


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters; `suppress_tokens`
    are never chosen (as transformers' option of that name)."""

    temperature: float = 0.9
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    suppress_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(f"invalid sampling settings {self}")

    @classmethod
    def from_generation(cls, generation: GenerationDefaults) -> "SamplingConfig":
        """The checkpoint's generation_config.json defaults (greedy unless do_sample, as transformers)."""
        if not generation.do_sample:
            return cls(temperature=0.0, repetition_penalty=generation.repetition_penalty)
        return cls(temperature=generation.temperature, top_k=generation.top_k, top_p=generation.top_p,
                   repetition_penalty=generation.repetition_penalty)


def apply_repetition_penalty(logits_bv, seen_bv, penalty: float):
    """HF's rule: logits of tokens seen in the context are divided (if > 0) or multiplied by `penalty`."""
    if penalty == 1.0:
        return logits_bv
    penalised = jnp.where(logits_bv > 0, logits_bv / penalty, logits_bv * penalty)
    return jnp.where(seen_bv, penalised, logits_bv)


def filter_logits(logits_bv, cfg: SamplingConfig):
    """Temperature, then top-k, then top-p (nucleus), masking the rest with -inf."""
    logits_bv = logits_bv / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits_bv, cfg.top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
    if cfg.top_p < 1.0:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_bv, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < cfg.top_p, sorted_bv, jnp.inf)  # the top token always stays
        cutoff = jnp.min(kept, axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv < cutoff, -jnp.inf, logits_bv)
    return logits_bv


def next_token(logits_bv, seen_bv, keys_b, cfg: SamplingConfig):
    """Token ids [B] from float32 logits [B, V]; `keys_b` one PRNG key per stream."""
    logits_bv = jnp.asarray(logits_bv)
    if cfg.suppress_tokens:
        logits_bv = logits_bv.at[:, jnp.asarray(cfg.suppress_tokens)].set(-jnp.inf)
    logits_bv = apply_repetition_penalty(logits_bv, seen_bv, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = filter_logits(logits_bv, cfg)
    return jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys_b, logits_bv).astype(jnp.int32)
