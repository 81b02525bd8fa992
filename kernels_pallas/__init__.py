"""Attention kernels for svlm-jax, standalone (nothing from the model): one function per operation
with an explicit backend (`api`), their jnp semantics (`reference`) and the Pallas kernels
(`decode`, `prefill`, `vision`, `flash_train`, sharing `common`)."""

from kernels_pallas.api import (BACKENDS, ENV_VAR, Backend, cached_decode_attention,
                                cached_prefill_attention, causal_attention, resolve_backend, segment_attention)

__all__ = ["BACKENDS", "ENV_VAR", "Backend", "cached_decode_attention", "cached_prefill_attention",
           "causal_attention", "resolve_backend", "segment_attention"]
