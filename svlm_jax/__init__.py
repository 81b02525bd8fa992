"""svlm-jax: StreamingVLM (Qwen2.5-VL / Qwen2-VL) in JAX."""

from svlm_jax.config import ConfigError, ModelConfig, TextConfig, VisionConfig, preset
from svlm_jax.model.params import Model, Params, init_params
from svlm_jax.model.vlm import encode_vision, forward
from svlm_jax.weights import CheckpointError, load_pretrained, save_pretrained

__all__ = [
    "CheckpointError", "ConfigError", "Model", "ModelConfig", "Params", "TextConfig", "VisionConfig",
    "encode_vision", "forward", "init_params", "load_pretrained", "preset", "save_pretrained",
]
