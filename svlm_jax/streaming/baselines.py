"""The paper's baselines over the same engine, for comparison with the streaming cache.

  full             nothing is evicted: every second stays whole in the cache until the memory budget
                   of `full_max_s` seconds of video is spent (then `CacheFullError`)
  sliding          a fresh context every `text_rounds` seconds
  sliding_overlap  every second, the last `text_rounds` seconds are re-encoded and re-prefilled
                   (with the commentary they got) before the new one
"""

from __future__ import annotations

import collections

from svlm_jax.model.params import Model
from svlm_jax.streaming import engine
from svlm_jax.streaming.cache import CacheLayout
from svlm_jax.streaming.session import StreamConfig, StreamingSession

SCHEMES = ("full", "sliding", "sliding_overlap")


class CacheFullError(RuntimeError):
    """The full-attention baseline ran out of its memory budget."""


class BaselineSession(StreamingSession):
    def __init__(self, model: Model, tokenizer, config: StreamConfig = StreamConfig(), *, scheme: str,
                 full_max_s: int = 600, batch: int = 1, preprocess=None, mesh=None):
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if full_max_s < 1:
            raise ValueError(f"full_max_s must be >= 1, got {full_max_s}")
        super().__init__(model, tokenizer, config, batch=batch, preprocess=preprocess, mesh=mesh)
        self.scheme, self.full_max_s = scheme, full_max_s
        self._history = collections.deque(maxlen=max(config.policy.text_rounds - 1, 0))  # sliding_overlap

    def join(self, row: int, previous_text: str = "") -> None:
        if self.scheme != "full" and self.batch > 1:
            raise ValueError(f"scheme {self.scheme!r} runs its streams in lockstep: no joining")
        super().join(row, previous_text)

    def replay_batch(self, seconds, t_starts, t_ends, commentaries) -> None:
        raise ValueError("replay serves the streaming cache (StreamingSession), not the baselines")

    def _cache_layout(self, grid) -> CacheLayout:
        # The baselines keep whole seconds: as many rounds as they ever attend to, vision included.
        rounds = self.full_max_s if self.scheme == "full" else self.config.policy.text_rounds
        return CacheLayout.for_stream(self.format, self.config.policy, self.model.config, grid, rounds=rounds,
                                      vision_rounds=rounds)

    def _before_round(self, seconds) -> None:
        rows = [b for b, sec in enumerate(seconds) if sec is not None]
        if self.scheme == "full" and any(self._context_rounds[b] >= self.full_max_s for b in rows):
            raise CacheFullError(f"full attention ran out of its memory budget of {self.full_max_s} s of video "
                                 f"({self.layout.size} cache slots per stream); raise full_max_s for longer videos")
        if self.scheme == "sliding":
            for b in rows:
                if self._context_rounds[b] == self.config.policy.text_rounds:
                    self._restart(b)
        if self.scheme == "sliding_overlap":
            if len(rows) != self.batch:
                raise ValueError("scheme 'sliding_overlap' needs every stream of the batch in every step")
            for b in rows:
                self._restart(b)
            self._start_pending()
            for past in self._history:
                self._replay(past["rows"], past["t_starts"], past["t_ends"], past["tokens"], past["n_gen"])

    def _after_round(self, rows, t_starts, t_ends, out: engine.RoundOutput) -> None:
        if self.scheme == "sliding_overlap":
            self._history.append(dict(rows=rows, t_starts=list(t_starts), t_ends=list(t_ends),
                                      tokens=out.tokens_bm, n_gen=out.n_gen_b))
