"""svlm-jax: StreamingVLM (Qwen2.5-VL / Qwen2-VL) in JAX.

The names below are imported on first use (PEP 562), so that importing a light submodule (the
`svlm` parser, whose --help must not wait for jax) does not import jax.
"""

import importlib

_HOME = {
    "ConfigError": "svlm_jax.config", "ModelConfig": "svlm_jax.config", "TextConfig": "svlm_jax.config",
    "VisionConfig": "svlm_jax.config", "preset": "svlm_jax.config",
    "Model": "svlm_jax.model.params", "Params": "svlm_jax.model.params", "init_params": "svlm_jax.model.params",
    "encode_vision": "svlm_jax.model.vlm", "forward": "svlm_jax.model.vlm",
    "CheckpointError": "svlm_jax.weights", "load_pretrained": "svlm_jax.weights",
    "save_pretrained": "svlm_jax.weights",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'svlm_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted({*globals(), *__all__})
