"""The server's settings: standard library only, so that `svlm serve --help` shows their defaults
without importing the engine."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    max_streams: int = 4
    frame_size: tuple[int, int] = (448, 252)  # (width, height) every frame is resized to
    max_queue_s: int = 8                      # whole seconds a stream may queue before the oldest is dropped
    max_message_bytes: int = 8 * 2**20

    def __post_init__(self):
        if self.max_streams < 1 or self.max_queue_s < 1 or self.max_message_bytes < 1:
            raise ValueError(f"max_streams, max_queue_s and max_message_bytes must be >= 1: {self}")
        if min(self.frame_size) < 1:
            raise ValueError(f"frame sides must be positive, got {self.frame_size}")
