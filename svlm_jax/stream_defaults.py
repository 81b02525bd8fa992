"""A checkpoint's stream defaults: how `svlm stream`, `svlm serve`, `svlm info`, `svlm demo` and the
Python API stream a checkpoint unless told otherwise, from `stream_config.json` in its directory:

    {"policy": {"vision_window_s": 8, "text_sink": 64, "text_window": 192},  # stream_format.CachePolicy fields
     "min_pixels": 12544, "max_pixels": 12544,   # frame area after resizing (docs/method.md §2)
     "previous_text": "Blue home, Black away.",  # the context a stream starts from
     "query": "Commentate on this match"}        # asked in the first second of a stream without previous text

Every field may be left out. What is left out, and everything for a checkpoint without the file (the
released Qwen and StreamingVLM checkpoints), takes the reference's streaming settings: the paper's cache
policy (`CachePolicy()`), 100 to 768 merged 28-px cells per frame (`STREAM_PREPROCESS`; the pixel bounds
in a checkpoint's preprocessor_config.json are its image processor's, up to 12.8 M pixels a frame, not
streaming's), no previous text and stream_format's query. Mean, std and patch sizes always come from
preprocessor_config.json. The file is read as config.json is: unknown fields are refused and every value
is type-checked, each error naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from svlm_jax.config import _MISSING, NON_NEGATIVE, POSITIVE, ConfigError, _Reader
from svlm_jax.media.preprocess import VisionPreprocessConfig
from svlm_jax.stream_format import QUERY, CachePolicy
from svlm_jax.streaming.session import STREAM_PREPROCESS, StreamConfig

FILE_NAME = "stream_config.json"


def _text(value):
    return value if isinstance(value, str) else _MISSING


_text.expected = "a string"


@dataclasses.dataclass(frozen=True)
class StreamDefaults:
    policy: CachePolicy = CachePolicy()
    min_pixels: int = STREAM_PREPROCESS.min_pixels
    max_pixels: int = STREAM_PREPROCESS.max_pixels
    previous_text: str = ""
    query: str = QUERY

    def __post_init__(self):
        if not 1 <= self.min_pixels <= self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must be at least 1 and at most max_pixels "
                             f"({self.max_pixels})")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "StreamDefaults":
        """The checkpoint's stream_config.json; the reference's settings without one."""
        path = Path(model_dir) / FILE_NAME
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise ConfigError(f"{path} is not valid JSON: {error}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw, *, source: str = FILE_NAME) -> "StreamDefaults":
        r = _Reader(source)
        r.check(isinstance(raw, dict), "expected a JSON object at the top level")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(fields))
        r.check(not unknown, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        policy_raw = r.obj(raw, "policy", "policy")
        policy_fields = [f.name for f in dataclasses.fields(CachePolicy)]
        unknown = sorted(set(policy_raw) - set(policy_fields))
        r.check(not unknown, f"unknown field(s) policy.{', policy.'.join(unknown)}; known: {', '.join(policy_fields)}")
        # Types here; the bounds and how the fields combine are CachePolicy's own checks.
        policy = {key: r.get(policy_raw, key, f"policy.{key}", NON_NEGATIVE) for key in policy_raw}
        values = {key: r.get(raw, key, key, POSITIVE) for key in ("min_pixels", "max_pixels") if key in raw}
        values |= {key: r.get(raw, key, key, _text) for key in ("previous_text", "query") if key in raw}
        try:
            return cls(policy=CachePolicy(**policy), **values)
        except ValueError as error:
            r.fail(str(error))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / FILE_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def stream_config(self, **settings) -> StreamConfig:
        """A StreamConfig with these defaults; `settings` are its other fields (sampling, seed...)."""
        return StreamConfig(policy=self.policy, previous_text=self.previous_text, query=self.query, **settings)

    def preprocess(self, tokenizer) -> VisionPreprocessConfig:
        """The checkpoint's preprocessing (preprocessor_config.json) with these pixel bounds."""
        return with_pixel_bounds(tokenizer.vision_preprocess, self.min_pixels, self.max_pixels)


def with_pixel_bounds(checkpoint: VisionPreprocessConfig | None, min_pixels: int,
                      max_pixels: int) -> VisionPreprocessConfig:
    """A checkpoint's preprocessing (None: Qwen's) with streaming's frame-area bounds."""
    return dataclasses.replace(checkpoint or STREAM_PREPROCESS, min_pixels=min_pixels, max_pixels=max_pixels)
