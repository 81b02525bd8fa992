"""The messages of `svlm serve`'s WebSocket (docs/serve.md): client messages parsed and checked,
frames decoded, seconds assembled from a client's frames."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import numpy as np
from PIL import Image

from svlm_jax.stream_format import CachePolicy

IMAGE_FORMATS = ("JPEG", "PNG")


class ProtocolError(ValueError):
    """A client message the server refuses; its text goes back to the client as an error."""


@dataclasses.dataclass(frozen=True)
class Start:
    previous_text: str | None = None  # None: the server's (the checkpoint's stream defaults)
    query: str | None = None
    fps: int = CachePolicy.fps  # frames per second the client sends
    source: str | None = None   # a path or URL the server reads instead
    live: bool = False          # with `source`: read in real time, drop what the model cannot keep up with


@dataclasses.dataclass(frozen=True)
class Ask:
    text: str


@dataclasses.dataclass(frozen=True)
class Stop:
    pass


ClientMessage = Start | Ask | Stop
_FIELD_TYPES = {"previous_text": str, "query": str, "fps": int, "source": str, "live": bool, "text": str}


def parse_message(text: str) -> ClientMessage:
    """A client's JSON text message as Start, Ask or Stop; ProtocolError names what is wrong."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProtocolError(f"malformed JSON: {error}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError('a text message must be a JSON object with a string "type"')
    name = message.pop("type")
    kind = {"start": Start, "ask": Ask, "stop": Stop}.get(name)
    if kind is None:
        raise ProtocolError(f"unknown message type {name!r}; expected start, ask or stop")
    fields = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(message) - fields)
    if unknown:
        raise ProtocolError(f"unknown field(s) {unknown} in a {name} message; expected {sorted(fields)}")
    for field, value in message.items():
        expected = _FIELD_TYPES[field]
        # bool is an int in Python; neither stands in for the other here.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ProtocolError(f"field {field!r} must be a {expected.__name__}, got {json.dumps(value)}")
    if kind is Ask and "text" not in message:
        raise ProtocolError('an ask message needs a "text"')
    if kind is Ask and not message["text"].strip():
        raise ProtocolError("the question is empty")
    if kind is Start and not 1 <= message.get("fps", 1) <= 60:
        raise ProtocolError(f"fps must be from 1 to 60, got {message['fps']}")
    return kind(**message)


def decode_frame(data: bytes, frame_size_wh: tuple[int, int]) -> np.ndarray:
    """A JPEG or PNG frame as uint8 [H, W, 3], resized to the server's frame size."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in IMAGE_FORMATS:
                raise ProtocolError(f"a frame must be JPEG or PNG, got {image.format}")
            rgb = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, ProtocolError):
            raise
        raise ProtocolError(f"a binary message must be a JPEG or PNG frame ({len(data)} bytes could not be "
                            f"decoded: {error})") from None
    if rgb.size != tuple(frame_size_wh):
        rgb = rgb.resize(tuple(frame_size_wh), Image.Resampling.BILINEAR)
    return np.asarray(rgb, np.uint8)


class SecondAssembler:
    """Groups a client's frames (`client_fps` a second) into seconds of the model's `model_fps`
    frames: the frames on screen at s + j / model_fps, j = 1..model_fps (docs/method.md §2)."""

    def __init__(self, client_fps: int, model_fps: int):
        self.client_fps = client_fps
        self.picks = [math.ceil(j * client_fps / model_fps) - 1 for j in range(1, model_fps + 1)]
        self._frames: list[np.ndarray] = []

    def add(self, frame_hwc: np.ndarray) -> np.ndarray | None:
        """The second's frames uint8 [model_fps, H, W, 3] once its last frame arrived, else None."""
        self._frames.append(frame_hwc)
        if len(self._frames) < self.client_fps:
            return None
        second = np.stack([self._frames[i] for i in self.picks])
        self._frames = []
        return second
