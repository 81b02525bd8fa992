"""Static model configuration: frozen dataclasses read from / written to a HF `config.json`.

Both the legacy hub layout (text keys at the top level, `rope_scaling`) and the transformers 5
layout (`text_config`, `rope_parameters`) are read; transformers 5's layout is written.

Three families share one code path: Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense, and its MoE variant,
HF model_type "qwen3_vl_moe"). `model_type` names the family; what differs is spelled out as fields
that the model code reads (the vision tower's `kind`, activation, learned position table and
DeepStack levels; the text layers' q/k/v bias, q/k norm, M-RoPE layout and experts), each set once
per family by `_from_hf` and the presets.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from svlm_jax.model.rope import RESUME_RULES

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
# HF model_types read as a family: Qwen3-VL-MoE is Qwen3-VL (same vision tower, processor and
# streaming) whose text layers are sparse (`TextConfig.num_experts`).
HF_MODEL_TYPES = {**{t: t for t in SUPPORTED_MODEL_TYPES}, "qwen3_vl_moe": "qwen3_vl"}
# Activations of the vision MLP (HF's `hidden_act` names); the gated MLP of Qwen2.5-VL uses silu.
VISION_ACTIVATIONS = ("silu", "quick_gelu", "gelu_pytorch_tanh", "gelu")
_DEFAULT_VISION_ACTIVATION = {"qwen2_5_vl": "silu", "qwen2_vl": "quick_gelu", "qwen3_vl": "gelu_pytorch_tanh"}
# What makes a text model Qwen3's: its layers and M-RoPE layout (`_from_hf` and the presets).
QWEN3_TEXT_LAYERS = dict(qkv_bias=False, qk_norm=True, mrope_interleaved=True)


class ConfigError(ValueError):
    """A config.json that cannot describe a supported model."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower. `kind` selects Qwen2.5-VL (RMSNorm, SwiGLU, window attention), Qwen2-VL
    (LayerNorm, fc1-act-fc2 MLP, full attention per frame) or Qwen3-VL (Qwen2-VL's blocks with a
    patch bias, a learned position table resampled to each grid and DeepStack mergers)."""

    kind: str
    depth: int
    hidden_size: int  # channels inside the tower (HF: hidden_size for 2.5, embed_dim for 2)
    num_heads: int
    intermediate_size: int
    out_hidden_size: int  # width of the merger output = the LM hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int | None = 112  # pixels; None: no window attention (Qwen2-VL)
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: float | None = 2.0  # Qwen2.5-VL video time scale; None for Qwen2-VL
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    hidden_act: str | None = None  # the MLP's activation; None: the kind's (silu, quick_gelu, gelu_pytorch_tanh)
    # Qwen3-VL: rows of the learned position table (a square grid, bilinearly resampled to each
    # image's patch grid); None: no learned positions.
    num_position_embeddings: int | None = None
    # Qwen3-VL: blocks whose output feeds a DeepStack merger (block deepstack_visual_indexes[k] feeds
    # merger k); the j-th of these blocks in depth order is added to the LM's hidden states after LM
    # layer j, at the vision tokens.
    deepstack_visual_indexes: tuple[int, ...] = ()

    def __post_init__(self):
        _check(self.kind in _DEFAULT_VISION_ACTIVATION,
               f"vision kind {self.kind!r} is not one of {', '.join(_DEFAULT_VISION_ACTIVATION)}")
        if self.hidden_act is None:
            object.__setattr__(self, "hidden_act", _DEFAULT_VISION_ACTIVATION[self.kind])
        _check(self.hidden_act in VISION_ACTIVATIONS,
               f"vision hidden_act {self.hidden_act!r} is not supported; supported: {', '.join(VISION_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_bias(self) -> bool:
        """Whether the patch embedding has a bias (Qwen3-VL's Conv3d does)."""
        return self.kind == "qwen3_vl"

    @property
    def position_grid_side(self) -> int:
        """Side of the square learned position grid (48 for 2304 rows); 0 without one."""
        return math.isqrt(self.num_position_embeddings) if self.num_position_embeddings else 0

    @property
    def patch_dim(self) -> int:
        """Values in one patch row: channels x temporal x patch x patch (1176 for Qwen)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def windowed(self) -> bool:
        return self.window_size is not None

    @property
    def window_merged(self) -> int:
        """Side of an attention window in merged tokens (4 for 112 px)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    def full_attention_layers(self) -> tuple[bool, ...]:
        return tuple((not self.windowed) or (i in self.fullatt_block_indexes) for i in range(self.depth))


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The language model: Qwen2 layers (q/k/v bias), or Qwen3 layers (`qk_norm`: RMSNorm of each
    query and key head before rotary, no bias) with M-RoPE frequencies interleaved over t, h, w.
    With `num_experts` (Qwen3-VL-MoE) every layer's MLP is a sparse mixture of that many SwiGLU
    experts of width `moe_intermediate_size`, `num_experts_per_tok` of them per token (the layers are
    stacked and scanned, so a mix of dense and sparse layers is not supported)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # None: hidden_size // num_heads (Qwen3 gives it explicitly)
    qkv_bias: bool = True
    qk_norm: bool = False
    mrope_interleaved: bool = False  # see rope.mrope_axis
    num_experts: int = 0  # 0: a dense SwiGLU MLP of width intermediate_size in every layer
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0

    def __post_init__(self):
        if self.head_dim is None:
            _check(self.hidden_size % self.num_heads == 0,
                   "text hidden_size must be divisible by num_attention_heads (or head_dim given)")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_experts:
            _check(1 <= self.num_experts_per_tok <= self.num_experts,
                   f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and num_experts "
                   f"({self.num_experts})")
            _check(self.moe_intermediate_size >= 1, "moe_intermediate_size must be a positive integer")
        else:
            _check(self.num_experts_per_tok == self.moe_intermediate_size == 0,
                   "num_experts_per_tok and moe_intermediate_size need num_experts")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    # How text resumes after a vision block (see model/rope.py); identical for one-frame-pair seconds.
    resume_rule: str = "max_hw"

    def __post_init__(self):
        _check(self.model_type in SUPPORTED_MODEL_TYPES,
               f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        _check(self.resume_rule in RESUME_RULES, f"resume_rule must be one of {RESUME_RULES}")
        t, v = self.text, self.vision
        _check(v.kind == self.model_type, f"vision kind {v.kind!r} does not match model_type {self.model_type!r}")
        _check(not t.num_experts or self.model_type == "qwen3_vl",
               f"experts (num_experts {t.num_experts}) are supported for Qwen3-VL only, not {self.model_type}")
        _check(t.num_heads % t.num_kv_heads == 0, "num_attention_heads must be a multiple of num_key_value_heads")
        _check(2 * sum(t.mrope_section) == t.head_dim,
               f"mrope_section {list(t.mrope_section)} must sum to head_dim/2 = {t.head_dim // 2}")
        _check(v.hidden_size % v.num_heads == 0, "vision hidden size must be divisible by its num_heads")
        _check(v.head_dim % 4 == 0, "vision head_dim must be divisible by 4 (2D rotary over h and w)")
        _check(v.out_hidden_size == t.hidden_size,
               f"vision out_hidden_size ({v.out_hidden_size}) must equal the text hidden_size ({t.hidden_size})")
        _check(all(0 <= i < v.depth for i in v.fullatt_block_indexes),
               f"fullatt_block_indexes {list(v.fullatt_block_indexes)} out of range for depth {v.depth}")
        if v.windowed:
            _check(v.window_size % (v.spatial_merge_size * v.patch_size) == 0,
                   "vision window_size must be a multiple of spatial_merge_size * patch_size")
        ds = v.deepstack_visual_indexes
        _check(all(0 <= i < v.depth for i in ds) and len(set(ds)) == len(ds),
               f"deepstack_visual_indexes {list(ds)} must be distinct blocks of the {v.depth}-block vision tower")
        _check(len(ds) <= t.num_layers,
               f"{len(ds)} deepstack_visual_indexes feed more LM layers than the {t.num_layers} there are")
        ids = (self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id)
        _check(all(0 <= i < t.vocab_size for i in ids), f"special token ids {ids} must lie inside vocab_size {t.vocab_size}")

    @classmethod
    def from_dict(cls, cfg: dict, *, source: str = "config.json") -> "ModelConfig":
        """From a parsed config.json; `source` names the file in error messages."""
        return _from_hf(cfg, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (JSON expected): {e}") from None
        if not text.strip():
            raise ConfigError(f"{path} is empty (a JSON object expected)")
        try:
            cfg = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return _from_hf(cfg, str(path))

    def to_dict(self) -> dict:
        return _to_hf(self)

    @property
    def hf_model_type(self) -> str:
        """transformers' model_type: the family's, "qwen3_vl_moe" for Qwen3-VL with experts."""
        return "qwen3_vl_moe" if self.text.num_experts else self.model_type

    @property
    def frame_blocks(self) -> bool:
        """Whether each temporal patch of a video is a vision block of its own, its time given as text
        before it (Qwen3-VL: "<t seconds>"); else a video is one block, its time on the M-RoPE t axis."""
        return self.model_type == "qwen3_vl"


def _check(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


# ---- reading config.json: every value is type-checked where it is read --------------------------

_MISSING = object()
_INT_MAX = 2**31 - 1  # token ids and sizes are int32 on device


def _shown(value) -> str:
    """A value as JSON spells it (null, true, "4"), cut short."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()


def _int(lo: int):
    def convert(value):
        if _is_int(value) and lo <= value <= _INT_MAX:
            return int(value)
        return _MISSING
    convert.expected = ("a positive integer" if lo == 1 else "a non-negative integer" if lo == 0
                        else f"an integer >= {lo}")
    return convert


def _positive_number(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return _MISSING


_positive_number.expected = "a positive number"


def _bool(value):
    return value if isinstance(value, bool) else _MISSING


_bool.expected = "true or false"


def _int_list(lo: int, length: int | None = None):
    item = _int(lo)

    def convert(value):
        if not isinstance(value, list) or length is not None and len(value) != length:
            return _MISSING
        items = [item(v) for v in value]
        return _MISSING if any(v is _MISSING for v in items) else tuple(items)
    convert.expected = (f"a list of {length} " if length else "a list of ") + item.expected.replace(
        "a ", "", 1).replace("an ", "", 1) + "s"
    return convert


POSITIVE, NON_NEGATIVE = _int(1), _int(0)


class _Reader:
    """Typed reads from one config.json; every error names the file, the field's path and what was expected."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, message: str):
        raise ConfigError(f"{self.source}: {message}")

    def check(self, cond: bool, message: str):
        if not cond:
            self.fail(message)

    def build(self, cls, **fields):
        """cls(**fields), its validation errors naming this file."""
        try:
            return cls(**fields)
        except ConfigError as e:
            self.fail(str(e))

    def get(self, d: dict, key: str, path: str, convert, default=_MISSING, *, where: str = "", null_is_default=False):
        if key not in d or (null_is_default and d[key] is None and default is not _MISSING):
            if default is _MISSING:
                self.fail(f"missing key {key!r} in {where or 'the top level'}")
            return default
        value = convert(d[key])
        if value is _MISSING:
            too_big = _is_int(d[key]) and d[key] > _INT_MAX
            self.fail(f"{path} must be {convert.expected}{f' no larger than {_INT_MAX}' if too_big else ''}, "
                      f"got {_shown(d[key])}")
        return value

    def obj(self, d: dict, key: str, path: str, *, required=False) -> dict:
        """A nested object; absent or null reads as {} unless required."""
        if key not in d:
            if required:
                self.fail(f"missing key {key!r} in the top level")
            return {}
        value = d[key]
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            self.fail(f"{path} must be an object, got {_shown(value)}")
        return value


def _from_hf(cfg: dict, source: str = "config.json") -> ModelConfig:
    r = _Reader(source)
    if not isinstance(cfg, dict):
        r.fail(f"expected a JSON object at the top level, got {_shown(cfg)}")
    hf_type = cfg.get("model_type")
    shown_type = repr(hf_type) if isinstance(hf_type, str) else _shown(hf_type)
    r.check(isinstance(hf_type, str) and hf_type in HF_MODEL_TYPES,
            f"model_type {shown_type} is not supported; supported: {', '.join(HF_MODEL_TYPES)}")
    model_type = HF_MODEL_TYPES[hf_type]
    # transformers 5 nests text keys in text_config; the hub's original files keep them at the top.
    text_cfg = r.obj(cfg, "text_config", "text_config")
    text = {**{k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}, **text_cfg}

    def tp(key: str) -> str:  # where a text key was read from
        return f"text_config.{key}" if key in text_cfg else key

    vis = r.obj(cfg, "vision_config", "vision_config", required=True)
    qwen3 = model_type == "qwen3_vl"
    rope = dict(r.obj(text, "rope_parameters", tp("rope_parameters")))
    legacy_rope = r.obj(text, "rope_scaling", tp("rope_scaling"))
    rope_path = tp("rope_parameters") if "mrope_section" in rope else tp("rope_scaling")
    mrope = r.get({**legacy_rope, **rope}, "mrope_section", f"{rope_path}.mrope_section", _int_list(0, 3),
                  (24, 20, 20) if qwen3 else (16, 24, 24))
    if qwen3:  # typed, but transformers' Qwen3-VL interleaves whatever this flag says, and so do we
        r.get({**legacy_rope, **rope}, "mrope_interleaved", f"{rope_path}.mrope_interleaved", _bool, True)
    if "rope_theta" in rope:
        rope_theta = r.get(rope, "rope_theta", f"{tp('rope_parameters')}.rope_theta", _positive_number)
    else:
        rope_theta = r.get(text, "rope_theta", tp("rope_theta"), _positive_number,
                           500_000.0 if qwen3 else 1_000_000.0)
    rope_type = rope.get("rope_type", legacy_rope.get("rope_type", legacy_rope.get("type", "default")))
    r.check(rope_type in ("default", "mrope"), f"rope type {rope_type!r} is not supported (only default M-RoPE)")
    sliding = r.get(text, "use_sliding_window", tp("use_sliding_window"), _bool, False, null_is_default=True)
    r.check(not sliding, "use_sliding_window=true is not supported")
    tie_src, tie_path = (cfg, "tie_word_embeddings") if "tie_word_embeddings" in cfg else (
        text, tp("tie_word_embeddings"))
    tie = r.get(tie_src, "tie_word_embeddings", tie_path, _bool, False, null_is_default=True)

    def tget(key, convert=POSITIVE, default=_MISSING, **kw):
        return r.get(text, key, tp(key), convert, default, where="text_config", **kw)

    num_heads = tget("num_attention_heads")
    qwen3_layers = {}
    if qwen3:
        bias = tget("attention_bias", _bool, False, null_is_default=True)
        r.check(not bias, f"{tp('attention_bias')}=true is not supported for Qwen3-VL")
        qwen3_layers = dict(head_dim=tget("head_dim", default=128, null_is_default=True), **QWEN3_TEXT_LAYERS)
    if hf_type == "qwen3_vl_moe":
        qwen3_layers.update(_experts(r, text, tp))
    t = r.build(
        TextConfig,
        vocab_size=tget("vocab_size"),
        hidden_size=tget("hidden_size"),
        intermediate_size=tget("intermediate_size"),
        num_layers=tget("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=tget("num_key_value_heads", default=num_heads, null_is_default=True),
        rms_norm_eps=tget("rms_norm_eps", _positive_number, 1e-6),
        rope_theta=rope_theta,
        mrope_section=mrope,
        tie_word_embeddings=tie,
        **qwen3_layers,
    )

    def vget(key, convert=POSITIVE, default=_MISSING, **kw):
        return r.get(vis, key, f"vision_config.{key}", convert, default, where="vision_config", **kw)

    vrope = r.obj(vis, "rope_parameters", "vision_config.rope_parameters")
    vision_theta = r.get(vrope, "rope_theta", "vision_config.rope_parameters.rope_theta", _positive_number, 10000.0)
    channels_key = "in_channels" if "in_channels" in vis or "in_chans" not in vis else "in_chans"
    common = dict(
        depth=vget("depth"),
        num_heads=vget("num_heads"),
        patch_size=vget("patch_size", default=16 if qwen3 else 14),
        temporal_patch_size=vget("temporal_patch_size", default=2),
        spatial_merge_size=vget("spatial_merge_size", default=2),
        in_channels=vget(channels_key, default=3),
        rope_theta=vision_theta,
    )

    def widths():  # Qwen2.5-VL's and Qwen3-VL's names (Qwen2-VL has embed_dim and mlp_ratio)
        return dict(hidden_size=vget("hidden_size"), intermediate_size=vget("intermediate_size"),
                    out_hidden_size=vget("out_hidden_size", default=t.hidden_size))

    if model_type == "qwen2_5_vl":
        r.check(vis.get("hidden_act", "silu") == "silu", "Qwen2.5-VL vision hidden_act must be silu")
        v = r.build(
            VisionConfig,
            kind="qwen2_5_vl", **common, **widths(),
            window_size=vget("window_size", default=112),
            fullatt_block_indexes=vget("fullatt_block_indexes", _int_list(0), ()),
            tokens_per_second=vget("tokens_per_second", _positive_number, 2.0),
        )
    elif qwen3:
        act = vis.get("hidden_act", "gelu_pytorch_tanh")
        r.check(act in VISION_ACTIVATIONS, f"vision_config.hidden_act must be one of "
                                           f"{', '.join(VISION_ACTIVATIONS)}, got {_shown(act)}")
        v = r.build(
            VisionConfig,
            kind="qwen3_vl", **common, **widths(),
            window_size=None,
            tokens_per_second=None,
            hidden_act=act,
            num_position_embeddings=vget("num_position_embeddings", default=2304),
            deepstack_visual_indexes=vget("deepstack_visual_indexes", _int_list(0), (8, 16, 24)),
        )
    else:
        r.check(vis.get("hidden_act", "quick_gelu") == "quick_gelu", "Qwen2-VL vision hidden_act must be quick_gelu")
        embed_dim = vget("embed_dim")
        intermediate = int(embed_dim * vget("mlp_ratio", _positive_number, 4))
        r.check(intermediate >= 1, f"vision_config.embed_dim x vision_config.mlp_ratio must be >= 1, got {intermediate}")
        v = r.build(
            VisionConfig,
            kind="qwen2_vl", **common,
            hidden_size=embed_dim,
            intermediate_size=intermediate,
            out_hidden_size=vget("hidden_size", default=t.hidden_size),
            window_size=None,
            tokens_per_second=None,
        )

    def token(key, default=_MISSING):
        return r.get(cfg, key, key, NON_NEGATIVE, default)

    ids = dict(image_token_id=token("image_token_id"), video_token_id=token("video_token_id"),
               vision_start_token_id=token("vision_start_token_id", 151652),
               vision_end_token_id=token("vision_end_token_id", 151653))
    return r.build(ModelConfig, model_type=model_type, vision=v, text=t, **ids)


def _experts(r: _Reader, text: dict, tp) -> dict:
    """Qwen3-VL-MoE's expert fields of TextConfig (defaults: transformers' Qwen3VLMoeTextConfig's)."""
    def tget(key, convert=POSITIVE, default=_MISSING):
        return r.get(text, key, tp(key), convert, default, where="text_config")

    # transformers 5 writes num_experts under its attribute name
    count_key = "num_local_experts" if "num_local_experts" in text and "num_experts" not in text else "num_experts"
    experts = dict(num_experts=tget(count_key, default=60), num_experts_per_tok=tget("num_experts_per_tok", default=4),
                   moe_intermediate_size=tget("moe_intermediate_size", default=1408))
    r.check(tget("decoder_sparse_step", default=1) == 1,
            f"{tp('decoder_sparse_step')} must be 1: only models whose every text layer is sparse are supported "
            "(the layers are stacked and scanned)")
    dense = tget("mlp_only_layers", _int_list(0), ())
    r.check(not dense, f"{tp('mlp_only_layers')} must be empty: only models whose every text layer is sparse are "
                       f"supported (the layers are stacked and scanned), got {list(dense)}")
    # transformers' router renormalises the top-k weights whatever this says: a false is not followed
    r.check(tget("norm_topk_prob", _bool, True), f"{tp('norm_topk_prob')}=false is not supported (transformers' "
                                                 "Qwen3-VL-MoE router always renormalises the top-k weights)")
    return experts


def _to_hf(c: ModelConfig) -> dict:
    t, v = c.text, c.vision
    arch = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
            "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}
    text = {
        "model_type": f"{c.hf_model_type}_text",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads, "hidden_act": "silu", "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": 128000, "use_sliding_window": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                            "mrope_section": list(t.mrope_section)},
    }
    if c.model_type == "qwen3_vl":
        text.update(head_dim=t.head_dim, attention_bias=False)
        text["rope_parameters"]["mrope_interleaved"] = True
    if t.num_experts:  # the hub's spelling; every layer sparse
        text.update(num_experts=t.num_experts,
                    num_experts_per_tok=t.num_experts_per_tok, moe_intermediate_size=t.moe_intermediate_size,
                    decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    common = {"depth": v.depth, "num_heads": v.num_heads, "patch_size": v.patch_size,
              "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
              "in_channels": v.in_channels,
              "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}}
    if c.model_type == "qwen2_5_vl":
        vision = {**common, "model_type": "qwen2_5_vl_vision", "hidden_size": v.hidden_size,
                  "intermediate_size": v.intermediate_size, "out_hidden_size": v.out_hidden_size,
                  "hidden_act": "silu", "window_size": v.window_size,
                  "fullatt_block_indexes": list(v.fullatt_block_indexes),
                  "tokens_per_second": _number(v.tokens_per_second)}
    elif c.model_type == "qwen3_vl":
        vision = {**common, "model_type": f"{c.hf_model_type}_vision", "hidden_size": v.hidden_size,
                  "intermediate_size": v.intermediate_size, "out_hidden_size": v.out_hidden_size,
                  "hidden_act": v.hidden_act, "num_position_embeddings": v.num_position_embeddings,
                  "deepstack_visual_indexes": list(v.deepstack_visual_indexes)}
    else:
        vision = {**common, "model_type": "qwen2_vl_vision", "embed_dim": v.hidden_size,
                  "mlp_ratio": _number(v.intermediate_size / v.hidden_size), "hidden_size": v.out_hidden_size,
                  "hidden_act": "quick_gelu"}
    return {
        "architectures": [arch[c.hf_model_type]], "model_type": c.hf_model_type,
        "text_config": text, "vision_config": vision,
        "tie_word_embeddings": t.tie_word_embeddings,
        "image_token_id": c.image_token_id, "video_token_id": c.video_token_id,
        "vision_start_token_id": c.vision_start_token_id, "vision_end_token_id": c.vision_end_token_id,
    }


def _number(x: float) -> int | float:
    """Integral floats as ints: transformers' config classes type-check these fields."""
    return int(x) if float(x).is_integer() else x


def _qwen25(hidden, inter, layers, heads, kv, vocab, tie, vis_inter) -> ModelConfig:
    return ModelConfig(
        model_type="qwen2_5_vl",
        vision=VisionConfig(kind="qwen2_5_vl", depth=32, hidden_size=1280, num_heads=16,
                            intermediate_size=vis_inter, out_hidden_size=hidden,
                            fullatt_block_indexes=(7, 15, 23, 31)),
        text=TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                        num_heads=heads, num_kv_heads=kv, tie_word_embeddings=tie),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def _qwen2(hidden, inter, layers, heads, kv, vocab, tie) -> ModelConfig:
    return ModelConfig(
        model_type="qwen2_vl",
        vision=VisionConfig(kind="qwen2_vl", depth=32, hidden_size=1280, num_heads=16, intermediate_size=5120,
                            out_hidden_size=hidden, window_size=None, tokens_per_second=None),
        text=TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                        num_heads=heads, num_kv_heads=kv, tie_word_embeddings=tie),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def _qwen3(hidden, inter, layers, heads, kv, tie, vision_depth, vision_hidden, vision_inter, deepstack,
           experts: tuple[int, int, int] = (0, 0, 0)) -> ModelConfig:
    """experts: (num_experts, num_experts_per_tok, moe_intermediate_size) of a Qwen3-VL-MoE."""
    n_experts, top_k, moe_inter = experts
    return ModelConfig(
        model_type="qwen3_vl",
        vision=VisionConfig(kind="qwen3_vl", depth=vision_depth, hidden_size=vision_hidden, num_heads=16,
                            intermediate_size=vision_inter, out_hidden_size=hidden, patch_size=16,
                            window_size=None, tokens_per_second=None, num_position_embeddings=2304,
                            deepstack_visual_indexes=deepstack),
        text=TextConfig(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                        num_heads=heads, num_kv_heads=kv, head_dim=128, rope_theta=5_000_000.0,
                        mrope_section=(24, 20, 20), tie_word_embeddings=tie, num_experts=n_experts,
                        num_experts_per_tok=top_k, moe_intermediate_size=moe_inter, **QWEN3_TEXT_LAYERS),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def tiny(model_type: str = "qwen2_5_vl", *, vocab_size: int = 512, tie_word_embeddings: bool = False) -> ModelConfig:
    """A few-hundred-kB model for tests and the bundled demo; special tokens at the top of the vocab.
    `model_type` is a HF one ("qwen3_vl_moe": Qwen3-VL with 6 experts, 2 a token)."""
    text_family = {}
    if model_type == "qwen3_vl_moe":  # expert widths unlike hidden_size: the expert layouts stay unambiguous
        text_family = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24)
    model_type = HF_MODEL_TYPES[model_type]
    if model_type == "qwen2_5_vl":
        vision = VisionConfig(kind="qwen2_5_vl", depth=4, hidden_size=32, num_heads=2, intermediate_size=48,
                              out_hidden_size=64, fullatt_block_indexes=(1, 3))
    elif model_type == "qwen3_vl":
        vision = VisionConfig(kind="qwen3_vl", depth=3, hidden_size=32, num_heads=2, intermediate_size=64,
                              out_hidden_size=64, patch_size=16, window_size=None, tokens_per_second=None,
                              num_position_embeddings=64, deepstack_visual_indexes=(0, 1))
        text_family.update(head_dim=16, **QWEN3_TEXT_LAYERS)
    else:
        vision = VisionConfig(kind="qwen2_vl", depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                              out_hidden_size=64, window_size=None, tokens_per_second=None)
    return ModelConfig(
        model_type=model_type, vision=vision,
        text=TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, mrope_section=(2, 3, 3),
                        tie_word_embeddings=tie_word_embeddings, **text_family),
        image_token_id=vocab_size - 3, video_token_id=vocab_size - 2,
        vision_start_token_id=vocab_size - 5, vision_end_token_id=vocab_size - 4)


PRESETS = {
    "qwen2.5-vl-3b": _qwen25(2048, 11008, 36, 16, 2, 151936, True, 3420),
    "qwen2.5-vl-7b": _qwen25(3584, 18944, 28, 28, 4, 152064, False, 3420),
    "qwen2.5-vl-32b": _qwen25(5120, 27648, 64, 40, 8, 152064, False, 3456),
    "qwen2.5-vl-72b": _qwen25(8192, 29568, 80, 64, 8, 152064, False, 3456),
    "qwen2-vl-2b": _qwen2(1536, 8960, 28, 12, 2, 151936, True),
    "qwen2-vl-7b": _qwen2(3584, 18944, 28, 28, 4, 152064, False),
    "qwen3-vl-2b": _qwen3(2048, 6144, 28, 16, 8, True, 24, 1024, 4096, (5, 11, 17)),
    "qwen3-vl-4b": _qwen3(2560, 9728, 36, 32, 8, True, 24, 1024, 4096, (5, 11, 17)),
    "qwen3-vl-8b": _qwen3(4096, 12288, 36, 32, 8, False, 27, 1152, 4304, (8, 16, 24)),
    "qwen3-vl-32b": _qwen3(5120, 25600, 64, 64, 8, False, 27, 1152, 4304, (8, 16, 24)),
    "qwen3-vl-30b-a3b": _qwen3(2048, 6144, 48, 32, 4, False, 27, 1152, 4304, (8, 16, 24), experts=(128, 8, 768)),
    "qwen3-vl-235b-a22b": _qwen3(4096, 12288, 94, 64, 4, False, 27, 1152, 4304, (8, 16, 24),
                                 experts=(128, 8, 1536)),
    "tiny": tiny("qwen2_5_vl"),
    "tiny-qwen2-vl": tiny("qwen2_vl"),
    "tiny-qwen3-vl": tiny("qwen3_vl"),
    "tiny-qwen3-vl-moe": tiny("qwen3_vl_moe"),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
