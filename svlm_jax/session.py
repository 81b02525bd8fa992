"""Host side of streaming: a batch of streams over one compiled engine.

    session = StreamingSession(model, tokenizer, StreamConfig(), batch=1)
    text = session.step(frames_thwc, t_start, t_end)   # one second of video -> its commentary

Frames are preprocessed with the Qwen rule; the first second fixes the frame size (and so the
shapes the engine is compiled for). Streams of a batch advance together; `join` (re)starts one
row with its own previous text, `leave` frees it.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from svlm_jax import engine, prompt, sampling
from svlm_jax.cache import CacheLayout, empty_state, logical_order
from svlm_jax.media.preprocess import VisionPreprocessConfig, preprocess_video
from svlm_jax.model import rope, vision
from svlm_jax.config import ModelConfig
from svlm_jax.model.params import Model
from svlm_jax.model.vlm import video_time_interval

# streaming: the StreamingVLM cache. The paper's baselines: full (nothing evicted, until the budget
# of `full_max_s` seconds is spent), sliding (a fresh context every `text_rounds` seconds), and
# sliding_overlap (every second, the last `text_rounds` seconds re-encoded and re-prefilled).
SCHEMES = ("streaming", "full", "sliding", "sliding_overlap")


class CacheFullError(RuntimeError):
    """The full-attention baseline ran out of its memory budget."""
# Streaming bounds of the reference (METHOD.md §2): 100 to 768 merged 28-px cells per frame.
STREAM_PREPROCESS = VisionPreprocessConfig(min_pixels=100 * 28 * 28, max_pixels=768 * 28 * 28)


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """What the cache keeps and how text is generated. Defaults are the paper's."""

    vision_window_s: int = 16   # seconds of vision kept, the current one included
    text_rounds: int = 16       # rounds kept in full (prompt, vision while it lasts, commentary)
    text_sink: int = 512
    text_window: int = 512
    max_new_tokens: int = 20
    sampling: sampling.SamplingConfig = sampling.SamplingConfig()
    pos_mode: str = "contiguous"
    previous_text: str = ""
    query: str = prompt.QUERY  # asked in round 0 of a stream without previous text (prompt.round_query)
    system: str = prompt.SYSTEM
    scheme: str = "streaming"
    full_max_s: int = 600        # scheme "full": the memory budget, in seconds of video
    fps: float = 2.0             # frames per second of input (sets the temporal M-RoPE step)
    seed: int = 0

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.text_rounds < 1 or self.vision_window_s < 0 or self.text_sink < 0 or self.text_window < 0:
            raise ValueError("text_rounds must be >= 1; windows and sink sizes >= 0")
        if self.fps <= 0:
            raise ValueError("fps must be positive")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.pos_mode not in engine.POS_MODES:
            raise ValueError(f"pos_mode must be one of {engine.POS_MODES}, got {self.pos_mode!r}")


def cache_layout(model_config: ModelConfig, chat: prompt.ChatTokens, encode, config: StreamConfig,
                 grid_thw: tuple[int, int, int]) -> CacheLayout:
    """The cache a session builds for these settings and one second's vision grid."""
    merge = model_config.vision.spatial_merge_size
    dt = video_time_interval(model_config, model_config.vision.temporal_patch_size / config.fps)
    offsets = rope.vision_block_positions(0, grid_thw, merge, dt)
    head = prompt.system_block(chat, encode, config.system) + prompt.previous_header(chat, encode)
    # Room for the longest time label a stream can reach (over a day of video), plus slack.
    before_cap = max(len(prompt.user_turn(chat, encode, t, t + 1.0, None)[0]) for t in (0.0, 99999.0)) + 2
    if config.scheme == "full":
        rounds = vision_rounds = config.full_max_s
    elif config.scheme == "streaming":
        rounds, vision_rounds = config.text_rounds, max(1, min(config.vision_window_s, config.text_rounds))
    else:  # the sliding baselines keep whole windows
        rounds = vision_rounds = config.text_rounds
    return CacheLayout(
        head_len=len(head), text_sink=config.text_sink, text_window=config.text_window,
        footer_len=len(prompt.previous_footer(chat)), rounds=rounds, vision_rounds=vision_rounds,
        before_cap=before_cap, n_vision=len(offsets),
        after_cap=len(prompt.user_turn(chat, encode, 0.0, 1.0, config.query)[1]), max_new=config.max_new_tokens,
        close_len=len(chat.end_marker) + 1, tail_len=len(prompt.round_tail(chat)),
        vision_offsets=tuple(tuple(int(v) for v in o) for o in offsets),
        vision_span=rope.vision_span(grid_thw, merge, dt, model_config.resume_rule))


@dataclasses.dataclass(frozen=True)
class CachedToken:
    token_id: int
    position: tuple[int, int, int]
    region: str  # head, sink, window, footer, round


class StreamingSession:
    def __init__(self, model: Model, tokenizer, config: StreamConfig = StreamConfig(), *, batch: int = 1,
                 preprocess: VisionPreprocessConfig = STREAM_PREPROCESS):
        self.model, self.tokenizer, self.config, self.batch = model, tokenizer, config, batch
        self.preprocess = preprocess
        self.chat = prompt.ChatTokens.from_tokenizer(tokenizer.token_id, tokenizer.encode)
        self._spec: engine.EngineSpec | None = None
        self._state = None
        self._vision_layout = None
        self._rounds = np.zeros(batch, np.int64)
        self._pending_join = list(range(batch))
        self._context_rounds = np.zeros(batch, np.int64)  # rounds since the row's context began
        self._history = collections.deque(maxlen=max(config.text_rounds - 1, 0))  # sliding_overlap
        self.last_output: engine.RoundOutput | None = None
        self._previous = [config.previous_text] * batch

    # ------------------------------------------------------------ public API
    def step(self, frames_or_patches, t_start: float, t_end: float) -> str:
        """One second of one stream (batch 1): frames uint8 [n, H, W, 3] or (rows [P, 1176], grid)."""
        if self.batch != 1:
            raise ValueError("step() serves batch 1; use step_batch() for several streams")
        return self.step_batch([frames_or_patches], [t_start], [t_end])[0]

    def step_batch(self, seconds, t_starts, t_ends, *, collect_logits: bool = False) -> list[str]:
        """One second for every row: lists of frames (or (rows, grid), or None for an inactive row).
        The engine's full output (tokens; logits with `collect_logits`) stays in `last_output`."""
        rows, grid = self._patches(seconds)
        self._ensure_engine(grid)
        self._apply_scheme(seconds)
        self._start_pending()
        if self.config.scheme == "sliding_overlap":
            for past in self._history:
                inputs = self._round_inputs(past["t_starts"], past["t_ends"])
                self._state = engine.replay_round(self.model, self._spec, self._state, inputs, past["rows"],
                                                  self._vision_layout, past["tokens"], past["n_gen"])
                self._context_rounds += 1
        inputs = self._round_inputs(t_starts, t_ends)
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(self.config.seed), r))(jnp.asarray(self._rounds))
        self._state, out = engine.round_step(self.model, self._spec, self._state, inputs, rows,
                                             self._vision_layout, keys, collect_logits)
        self.last_output = out
        self._rounds += 1
        self._context_rounds += 1
        if self.config.scheme == "sliding_overlap":
            self._history.append(dict(rows=rows, t_starts=list(t_starts), t_ends=list(t_ends),
                                      tokens=out.tokens_bm, n_gen=out.n_gen_b))
        tokens, n_gen = np.asarray(out.tokens_bm), np.asarray(out.n_gen_b)
        return [self._text(tokens[b, :n_gen[b]]) for b in range(self.batch)]

    def replay(self, frames_or_patches, t_start: float, t_end: float, commentary: str) -> None:
        """Feed one second with known commentary instead of generating it (batch 1): to warm a
        stream up from a transcript, or to rebuild exactly the context training sees."""
        self.replay_batch([frames_or_patches], [t_start], [t_end], [commentary])

    def replay_batch(self, seconds, t_starts, t_ends, commentaries) -> None:
        rows, grid = self._patches(seconds)
        self._ensure_engine(grid)
        if self.config.scheme != "streaming":
            raise ValueError("replay serves the streaming scheme")
        self._start_pending()
        lay, ct = self._spec.layout, self.chat
        tokens = np.zeros((self.batch, lay.max_new), np.int32)
        n_gen = np.zeros(self.batch, np.int32)
        for row, text in enumerate(commentaries):
            if text is None:
                continue
            ids = prompt.assistant_turn(ct, prompt.commentary_ids(self.tokenizer.encode, text.split()))
            if len(ids) > lay.max_new:
                raise ValueError(f"commentary of {len(ids)} tokens does not fit max_new_tokens={lay.max_new}")
            tokens[row, :len(ids)], n_gen[row] = ids, len(ids)
        inputs = self._round_inputs(t_starts, t_ends)
        self._state = engine.replay_round(self.model, self._spec, self._state, inputs, rows, self._vision_layout,
                                          jnp.asarray(tokens), jnp.asarray(n_gen))
        self._rounds += 1
        self._context_rounds += 1

    def join(self, row: int, previous_text: str = "") -> None:
        """(Re)start the stream of batch row `row` with its own previous text."""
        if self.config.scheme in ("sliding", "sliding_overlap") and self.batch > 1:
            raise ValueError(f"scheme {self.config.scheme!r} runs its streams in lockstep: no joining")
        self._previous[row] = previous_text
        self._rounds[row] = 0
        self._restart(row)

    def leave(self, row: int) -> None:
        if self._state is not None:
            self._state = self._state.replace(active_b=self._state.active_b.at[row].set(False))
        if row in self._pending_join:
            self._pending_join.remove(row)

    def cache_view(self, row: int = 0) -> list[CachedToken]:
        """The retained tokens of one stream in logical order with their 3D positions."""
        if self._state is None:
            return []
        lay = self._spec.layout
        st = self._state
        valid, tokens = np.asarray(st.valid_bs[row]), np.asarray(st.token_bs[row])
        order = np.asarray(logical_order(lay, st.win_start_b[row], st.rounds_b[row]))
        positions = np.asarray(engine.slot_positions(self._spec, st))[row]
        bounds = [(lay.sink_start, "head"), (lay.window_start, "sink"), (lay.footer_start, "window"),
                  (lay.rounds_start, "footer"), (lay.size, "round")]
        out = []
        for s in order:
            if valid[s]:
                region = next(name for end, name in bounds if s < end)
                out.append(CachedToken(int(tokens[s]), tuple(int(p) for p in positions[s]), region))
        return out

    # ------------------------------------------------------------ internals
    def _restart(self, row: int):
        self._context_rounds[row] = 0
        if row not in self._pending_join:
            self._pending_join.append(row)

    def _apply_scheme(self, seconds):
        """Baseline schemes act before a round: refuse past the budget, or restart contexts."""
        sc, rows = self.config, [b for b, sec in enumerate(seconds) if sec is not None]
        if sc.scheme == "full" and any(self._context_rounds[b] >= self._spec.layout.rounds for b in rows):
            raise CacheFullError(f"full attention ran out of its memory budget of {sc.full_max_s} s of video "
                                 f"({self._spec.layout.size} cache slots per stream)")
        if sc.scheme == "sliding":
            for b in rows:
                if self._context_rounds[b] == sc.text_rounds:
                    self._restart(b)
        if sc.scheme == "sliding_overlap":
            if len(rows) != self.batch:
                raise ValueError("scheme 'sliding_overlap' needs every stream of the batch in every step")
            for b in rows:
                self._restart(b)

    def _patches(self, seconds):
        rows, grid = [], None
        for sec in seconds:
            if sec is None:
                rows.append(None)
                continue
            if isinstance(sec, tuple):
                r, g = np.asarray(sec[0], np.float32), tuple(int(x) for x in np.asarray(sec[1]).reshape(-1))
            else:
                r, g = preprocess_video(np.asarray(sec), self.preprocess)
                g = tuple(int(x) for x in g)
            if grid is not None and g != grid:
                raise ValueError(f"all streams of a batch need the same frame grid: {g} vs {grid}")
            grid = g
            rows.append(r)
        if grid is None:
            raise ValueError("no stream in the batch has frames")
        if self._spec is not None and grid != self._spec.grid_thw:
            raise ValueError(f"frame grid changed from {self._spec.grid_thw} to {grid} mid-stream; "
                             "resize frames to a fixed size")
        filler = np.zeros_like(next(r for r in rows if r is not None))
        return jnp.asarray(np.stack([filler if r is None else r for r in rows])), grid

    def _ensure_engine(self, grid):
        if self._spec is not None:
            return
        cfg, ct = self.model.config, self.chat
        layout = cache_layout(cfg, ct, self.tokenizer.encode, self.config, grid)
        # Vision placeholders are the frames' slots, never commentary.
        placeholders = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
        sampling_cfg = dataclasses.replace(
            self.config.sampling, suppress_tokens=tuple(sorted({*self.config.sampling.suppress_tokens, *placeholders})))
        self._spec = engine.EngineSpec(
            layout=layout, sampling=sampling_cfg, pos_mode=self.config.pos_mode, im_end=ct.im_end,
            video_pad=ct.video_pad, close_ids=(*ct.end_marker, ct.im_end), end_marker=ct.end_marker,
            tail_ids=tuple(prompt.round_tail(ct)), grid_thw=grid)
        t = cfg.text
        self._state = empty_state(layout, t.num_layers, self.batch, t.num_kv_heads, t.head_dim,
                                  self.model.params.text.embed_vd.dtype)
        self._vision_layout = vision.vision_layout(cfg.vision, [grid] * self.batch)
        self._head = prompt.system_block(ct, self.tokenizer.encode, self.config.system) + \
            prompt.previous_header(ct, self.tokenizer.encode)

    def _start_pending(self):
        if not self._pending_join:
            return
        lay, ct = self._spec.layout, self.chat
        prefix = np.zeros((self.batch, lay.rounds_start), np.int32)
        valid = np.zeros_like(prefix, bool)
        n_sink, n_win = np.zeros(self.batch, np.int32), np.zeros(self.batch, np.int32)
        for row in self._pending_join:
            prev = prompt.previous_text_ids(self.tokenizer.encode, self._previous[row])
            kept = prompt.truncate_previous(prev, lay.text_sink, lay.text_window)
            sink, window = kept[:lay.text_sink], kept[lay.text_sink:]
            prefix[row, :lay.head_len] = self._head
            prefix[row, lay.sink_start:lay.sink_start + len(sink)] = sink
            prefix[row, lay.window_start:lay.window_start + len(window)] = window
            prefix[row, lay.footer_start:lay.rounds_start] = prompt.previous_footer(ct)
            valid[row, :lay.head_len] = True
            valid[row, lay.sink_start:lay.sink_start + len(sink)] = True
            valid[row, lay.window_start:lay.window_start + len(window)] = True
            valid[row, lay.footer_start:lay.rounds_start] = True
            n_sink[row], n_win[row] = len(sink), len(window)
        join = np.zeros(self.batch, bool)
        join[self._pending_join] = True
        self._state = engine.start_streams(self.model, self._spec, self._state, jnp.asarray(join), jnp.asarray(prefix),
                                           jnp.asarray(valid), jnp.asarray(n_sink), jnp.asarray(n_win))
        self._pending_join = []

    def _round_inputs(self, t_starts, t_ends) -> engine.RoundInputs:
        lay, ct, enc = self._spec.layout, self.chat, self.tokenizer.encode
        before = np.zeros((self.batch, lay.before_cap), np.int32)
        after = np.zeros((self.batch, lay.after_cap), np.int32)
        n_before, n_after = np.zeros(self.batch, np.int32), np.zeros(self.batch, np.int32)
        for row in range(self.batch):
            if t_starts[row] is None:
                continue
            query = prompt.round_query(self.config.query, int(self._context_rounds[row]), bool(self._previous[row]))
            b, a = prompt.user_turn(ct, enc, t_starts[row], t_ends[row], query)
            if len(b) > lay.before_cap:
                raise ValueError(f"time label {prompt.time_label(t_starts[row], t_ends[row])} is too long")
            before[row, :len(b)], after[row, :len(a)] = b, a
            n_before[row], n_after[row] = len(b), len(a)
        return engine.RoundInputs(before_bt=jnp.asarray(before), n_before_b=jnp.asarray(n_before),
                                  after_bt=jnp.asarray(after), n_after_b=jnp.asarray(n_after))

    def _text(self, ids) -> str:
        """Commentary text of generated ids: without the closing <|im_end|> and " ..." marker."""
        ids = [int(i) for i in ids]
        if ids and ids[-1] == self.chat.im_end:
            ids = ids[:-1]
            marker = list(self.chat.end_marker)
            if marker and ids[len(ids) - len(marker):] == marker:
                ids = ids[:len(ids) - len(marker)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
