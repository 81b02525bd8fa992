"""Attention kernels for svlm-jax, standalone (nothing from the model): one function per operation
with an explicit backend (`api`), their jnp semantics (`reference`), the GPU Pallas kernels
(`decode`, `prefill`, `vision`, `flash_train`, sharing `common`) and jax's TPU splash attention
behind the same operations (`tpu`)."""

from kernels_pallas.api import (BACKENDS, ENV_VAR, TARGET_ENV_VAR, Backend, cached_decode_attention,
                                cached_prefill_attention, causal_attention, pallas_target, resolve_backend,
                                segment_attention)

__all__ = ["BACKENDS", "ENV_VAR", "TARGET_ENV_VAR", "Backend", "cached_decode_attention", "cached_prefill_attention",
           "causal_attention", "pallas_target", "resolve_backend", "segment_attention"]
