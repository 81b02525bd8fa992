"""Streaming inference: the fixed-shape cache (`cache`), its compiled steps (`engine`), next-token
choice (`sampling`), the host session (`session`) and the paper's baselines (`baselines`).
`CachePolicy` is re-exported from `svlm_jax.stream_format`, where the stream's format is defined."""

from svlm_jax.stream_format import CachePolicy
from svlm_jax.streaming.baselines import BaselineSession, CacheFullError
from svlm_jax.streaming.sampling import SamplingConfig
from svlm_jax.streaming.session import StreamConfig, StreamingSession

__all__ = ["BaselineSession", "CacheFullError", "CachePolicy", "SamplingConfig", "StreamConfig", "StreamingSession"]
