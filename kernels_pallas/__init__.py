"""Attention kernels for svlm-jax: one dispatch per operation (`api`), jnp semantics (`reference`)."""

from kernels_pallas.api import attention

__all__ = ["attention"]
