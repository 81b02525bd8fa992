"""Host side of streaming: a batch of streams over one compiled engine.

    session = StreamingSession(model, tokenizer, StreamConfig(), batch=1)
    text = session.step(frames_thwc, t_start, t_end)   # one second of video -> its commentary

Frames are preprocessed with the Qwen rule; `prepare(height, width)` or else the first second fixes
the frame size (and so the shapes the engine is compiled for: the cache is built then). A round advances the rows given a
second (the others sit it out); `join` (re)starts one row with its own previous text and query,
`leave` frees it. A second can carry a question (`step_batch(questions=)`), answered in its turn. `on_text` receives the
commentary piece by piece while a second is decoded.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from svlm_jax.media.preprocess import VisionPreprocessConfig, preprocess_video
from svlm_jax.config import ModelConfig
from svlm_jax.model import vision
from svlm_jax.model.params import Model
from svlm_jax.stream_format import QUERY, SYSTEM, CachePolicy, StreamFormat, check_special_tokens, round_user_text, \
    truncate_previous
from svlm_jax.streaming import engine
from svlm_jax.streaming import mesh as stream_mesh
from svlm_jax.streaming.cache import CacheLayout, empty_state, logical_order
from svlm_jax.streaming.sampling import SamplingConfig
from svlm_jax.tokenizer import IncrementalDetokenizer

# Streaming bounds of the reference (docs/method.md §2): 100 to 768 merged 28-px cells per frame.
STREAM_PREPROCESS = VisionPreprocessConfig(min_pixels=100 * 28 * 28, max_pixels=768 * 28 * 28)

OnText = Callable[[int, str], None]  # (batch row, next piece of its commentary)


def stream_preprocess(model_config: ModelConfig) -> VisionPreprocessConfig:
    """Streaming's preprocessing for a model without its checkpoint's processor files: the same
    100 to 768 merged cells a frame in the family's processor (Qwen3-VL's video processor bounds
    the pixels of a second's frames together, in merged 32-px cells)."""
    if model_config.model_type != "qwen3_vl":
        return STREAM_PREPROCESS
    base = VisionPreprocessConfig.family_defaults(model_config.model_type)
    cell = base.resize_factor**2 * base.temporal_patch_size
    return dataclasses.replace(base, min_pixels=100 * cell, max_pixels=768 * cell)


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """A stream's cache policy and how its text is generated."""

    policy: CachePolicy = CachePolicy()
    sampling: SamplingConfig | None = None  # None: the checkpoint's generation_config.json
    pos_mode: str = "contiguous"
    previous_text: str = ""
    query: str = QUERY  # asked in round 0 of a stream without previous text (stream_format.round_query)
    system: str = SYSTEM
    attention_backend: str = "auto"  # kernels_pallas backend: auto, pallas, xla, cudnn
    seed: int = 0

    def __post_init__(self):
        if self.pos_mode not in engine.POS_MODES:
            raise ValueError(f"pos_mode must be one of {engine.POS_MODES}, got {self.pos_mode!r}")


@dataclasses.dataclass(frozen=True)
class CachedToken:
    token_id: int
    position: tuple[int, int, int]
    region: str  # head, sink, window, footer, round


class StreamingSession:
    def __init__(self, model: Model, tokenizer, config: StreamConfig = StreamConfig(), *, batch: int = 1,
                 preprocess: VisionPreprocessConfig | None = None, mesh: Mesh | None = None):
        check_special_tokens(tokenizer.special, model.config)
        config.policy.check_model(model.config)
        preprocess = stream_preprocess(model.config) if preprocess is None else preprocess
        preprocess.check_model(model.config)
        self.mesh = mesh
        model = engine.per_layer(model)
        if mesh is not None:
            stream_mesh.check_batch(mesh, batch)
            model = stream_mesh.shard_model(model, mesh)
        self.model, self.tokenizer, self.config, self.batch = model, tokenizer, config, batch
        self.preprocess = preprocess
        self.format = StreamFormat.from_tokenizer(tokenizer, system=config.system, query=config.query,
                                                  stamp_frames=config.policy.stamp_frames(model.config))
        sampling = config.sampling or SamplingConfig.from_generation(tokenizer.generation)
        if sampling.top_k > model.config.text.vocab_size:
            raise ValueError(f"top_k={sampling.top_k} is above the vocabulary size {model.config.text.vocab_size}")
        # Vision placeholders are the frames' slots, never commentary.
        special = self.format.special
        placeholders = (special.image_pad, special.video_pad, special.vision_start, special.vision_end)
        self.sampling = dataclasses.replace(
            sampling, suppress_tokens=tuple(sorted({*sampling.suppress_tokens, *placeholders})))
        self._specs: dict[bool, engine.EngineSpec] = {}  # by: does it call back per token
        self._state = None
        self._vision_layout = None
        self._rounds = np.zeros(batch, np.int64)
        self._pending_join = list(range(batch))
        self._context_rounds = np.zeros(batch, np.int64)  # rounds since the row's context began
        self._previous = [config.previous_text] * batch
        self._queries = [config.query] * batch
        self._text_streams: list[_TextStream] | None = None
        self._token_steps: dict[int, tuple] = {}  # decoded steps that arrived before an earlier one
        self._next_step = 0
        self.last_output: engine.RoundOutput | None = None

    # ------------------------------------------------------------ public API
    def step(self, frames_or_patches, t_start: float, t_end: float, on_text: Callable[[str], None] | None = None
             ) -> str:
        """One second of one stream (batch 1): frames uint8 [n, H, W, 3] or (rows [P, patch_dim], grid)."""
        if self.batch != 1:
            raise ValueError("step() serves batch 1; use step_batch() for several streams")
        row_text = None if on_text is None else (lambda _row, piece: on_text(piece))
        return self.step_batch([frames_or_patches], [t_start], [t_end], on_text=row_text)[0]

    def step_batch(self, seconds, t_starts, t_ends, *, questions=None, collect_logits: bool = False,
                   on_text: OnText | None = None) -> list[str]:
        """One second for the rows given one: lists of frames (or (rows, grid)), None for a row that
        sits this round out (its stream waits, unchanged). `questions[row]` (or None) joins that
        second's user turn and the row's answer is the reply (`policy.max_answer_tokens` at most).
        Returns each row's commentary ("" for rows sitting out); `on_text(row, piece)` gets it piece
        by piece as it is decoded. The engine's full output (tokens; logits with `collect_logits`)
        stays in `last_output`."""
        rows, grid = self._patches(seconds)
        self._ensure_engine(grid)
        for question in questions or ():
            if question is not None:
                self.check_question(question)
        self._before_round(seconds)
        self._start_pending()
        inputs = self._round_inputs(t_starts, t_ends, questions)
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(self.config.seed), r))(jnp.asarray(self._rounds))
        spec = self._spec_for(streaming_text=on_text is not None)
        self._text_streams = None if on_text is None else [
            _TextStream(self.tokenizer, self.format, lambda piece, row=row: on_text(row, piece))
            for row in range(self.batch)]
        self._token_steps, self._next_step = {}, 0
        self._state, out = engine.round_step(self.model, spec, self._state, inputs, rows, self._vision_layout, keys,
                                             collect_logits=collect_logits)
        if on_text is not None:
            jax.effects_barrier()  # every token callback has run
        self.last_output = out
        stepping = np.asarray(inputs.stepping_b)
        self._rounds += stepping
        self._context_rounds += stepping
        tokens, content = np.asarray(out.tokens_bm), np.asarray(out.content_b)
        if self._text_streams is not None:
            for row, stream in enumerate(self._text_streams):
                if seconds[row] is not None:
                    stream.finish(tokens[row, :content[row]])
        self._after_round(rows, t_starts, t_ends, out)
        return [self._text(tokens[b, :content[b]]) if stepping[b] else "" for b in range(self.batch)]

    def replay(self, frames_or_patches, t_start: float, t_end: float, commentary: str,
               question: str | None = None) -> None:
        """Feed one second with known commentary (and the question it answered, if any) instead of
        generating it (batch 1): to warm a stream up from a transcript, or to rebuild exactly the
        context training sees."""
        self.replay_batch([frames_or_patches], [t_start], [t_end], [commentary], questions=[question])

    def replay_batch(self, seconds, t_starts, t_ends, commentaries, *, questions=None) -> None:
        rows, grid = self._patches(seconds)
        self._ensure_engine(grid)
        self._start_pending()
        questions = questions or [None] * self.batch
        tokens = np.zeros((self.batch, self.config.policy.answer_cap), np.int32)
        n_gen = np.zeros(self.batch, np.int32)
        for row, text in enumerate(commentaries):
            if text is None:
                continue
            if questions[row] is not None:
                self.check_question(questions[row])
            limit = self.config.policy.answer_cap if questions[row] is not None else self.config.policy.max_new_tokens
            ids = self.format.answer_ids(self.format.commentary_ids(text.split()))
            if len(ids) > limit:
                raise ValueError(f"commentary of {len(ids)} tokens does not fit the {limit} tokens of its answer")
            tokens[row, :len(ids)], n_gen[row] = ids, len(ids)
        stepping = np.asarray([t is not None for t in t_starts])
        self._replay(rows, t_starts, t_ends, jnp.asarray(tokens), jnp.asarray(n_gen), questions)
        self._rounds += stepping

    def join(self, row: int, previous_text: str = "", query: str | None = None) -> None:
        """(Re)start the stream of batch row `row` with its own previous text and query (None: the
        config's)."""
        query = self.config.query if query is None else query
        turn = lambda q: len(self.format.prompt_ids(0.0, 1.0, q)[1])
        if turn(query) > turn(self.config.query):  # the cache's user turn is sized for the config's query
            raise ValueError(f"the query {query!r} is longer than the stream config's {self.config.query!r}, "
                             "which sets the cache's room for it")
        self._previous[row] = previous_text
        self._queries[row] = query
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
        spec = self._specs[False]
        lay, st = spec.layout, self._state
        valid, tokens = np.asarray(st.valid_bs[row]), np.asarray(st.token_bs[row])
        order = np.asarray(logical_order(lay, st.win_start_b[row], st.rounds_b[row]))
        positions = np.asarray(st.pos_bs3[row])
        bounds = [(lay.sink_start, "head"), (lay.window_start, "sink"), (lay.footer_start, "window"),
                  (lay.rounds_start, "footer"), (lay.size, "round")]
        out = []
        for s in order:
            if valid[s]:
                region = next(name for end, name in bounds if s < end)
                out.append(CachedToken(int(tokens[s]), tuple(int(p) for p in positions[s]), region))
        return out

    def prepare(self, frame_height: int, frame_width: int) -> CacheLayout:
        """Build the cache and the engine for frames of this size now instead of at the first second
        (which must then bring frames of the same size). Returns the cache's layout."""
        n = self.config.policy.fps
        _, grid = preprocess_video(np.zeros((n, frame_height, frame_width, 3), np.uint8), self.preprocess)
        self._ensure_engine(tuple(int(x) for x in grid))
        return self.layout

    @property
    def layout(self) -> CacheLayout | None:
        """The cache's layout, once `prepare` or the first second has fixed the frame grid."""
        return self._specs[False].layout if self._specs else None

    # ------------------------------------------------------------ what the baselines change
    def _cache_layout(self, grid) -> CacheLayout:
        return CacheLayout.for_stream(self.format, self.config.policy, self.model.config, grid)

    def _before_round(self, seconds) -> None:
        """Called before every generated round (the baselines restart contexts or refuse here)."""

    def _after_round(self, rows, t_starts, t_ends, out: engine.RoundOutput) -> None:
        """Called after every generated round."""

    # ------------------------------------------------------------ internals
    def _replay(self, rows, t_starts, t_ends, tokens_bm, n_gen_b, questions=None) -> None:
        """A round with known answers into the rows' contexts."""
        inputs = self._round_inputs(t_starts, t_ends, questions)
        self._context_rounds += np.asarray(inputs.stepping_b)
        self._state = engine.replay_round(self.model, self._specs[False], self._state, inputs, rows,
                                          self._vision_layout, tokens_bm, n_gen_b)

    def _restart(self, row: int):
        self._context_rounds[row] = 0
        if row not in self._pending_join:
            self._pending_join.append(row)

    def _patches(self, seconds):
        rows, grid = [], None
        for sec in seconds:
            if sec is None:
                rows.append(None)
                continue
            if isinstance(sec, tuple):
                r, g = np.asarray(sec[0], np.float32), tuple(int(x) for x in np.asarray(sec[1]).reshape(-1))
                width = self.model.config.vision.patch_dim
                if r.ndim != 2 or r.shape[1] != width:
                    raise ValueError(f"patch rows of shape {r.shape}: this model's rows are {width} wide")
            else:
                r, g = preprocess_video(np.asarray(sec), self.preprocess)
                g = tuple(int(x) for x in g)
            if grid is not None and g != grid:
                raise ValueError(f"all streams of a batch need the same frame grid: {g} vs {grid}")
            grid = g
            rows.append(r)
        if grid is None:
            raise ValueError("no stream in the batch has frames")
        if self._specs and grid != self._specs[False].grid_thw:
            raise ValueError(f"frame grid changed from {self._specs[False].grid_thw} to {grid} mid-stream; "
                             "resize frames to a fixed size")
        filler = np.zeros_like(next(r for r in rows if r is not None))
        return jnp.asarray(np.stack([filler if r is None else r for r in rows])), grid

    def _ensure_engine(self, grid):
        """Build the cache and the engine's spec for the frame grid of the first second."""
        if self._specs:
            return
        layout = self._cache_layout(grid)
        self._specs[False] = engine.EngineSpec.for_stream(
            self.format, layout, self.sampling, grid, pos_mode=self.config.pos_mode,
            attention_backend=self.config.attention_backend, mesh=self.mesh)
        t = self.model.config.text
        self._state = empty_state(layout, t.num_layers, self.batch, t.num_kv_heads, t.head_dim,
                                  self.model.params.text.embed_vd.dtype)
        if self.mesh is not None:
            self._state = stream_mesh.place_state(self._state, self.mesh, t.num_kv_heads)
        self._vision_layout = vision.vision_layout(self.model.config.vision, [grid] * self.batch)

    def _spec_for(self, streaming_text: bool) -> engine.EngineSpec:
        """The spec without a per-token host callback, or (compiled on first use) with one."""
        if streaming_text not in self._specs:
            self._specs[True] = dataclasses.replace(self._specs[False], on_token=self._on_token)
        return self._specs[streaming_text]

    def _on_token(self, step, tokens_b, fed_b) -> None:
        """Host callback of the decode loop: every fed token of every row. On a mesh the callbacks
        are unordered (ordered ones serve one device only): steps are put back in order here."""
        if self._text_streams is None:
            return
        self._token_steps[int(step)] = (tokens_b, fed_b)
        while self._next_step in self._token_steps:
            tokens_b, fed_b = self._token_steps.pop(self._next_step)
            self._next_step += 1
            for row, stream in enumerate(self._text_streams):
                if fed_b[row]:
                    stream.push(int(tokens_b[row]))

    def _start_pending(self):
        if not self._pending_join:
            return
        lay, fmt = self._specs[False].layout, self.format
        head, footer = fmt.head_ids(), fmt.footer_ids()
        prefix = np.zeros((self.batch, lay.rounds_start), np.int32)
        valid = np.zeros_like(prefix, bool)
        n_sink, n_win = np.zeros(self.batch, np.int32), np.zeros(self.batch, np.int32)
        for row in self._pending_join:
            kept = truncate_previous(fmt.previous_text_ids(self._previous[row]), lay.text_sink, lay.text_window)
            sink, window = kept[:lay.text_sink], kept[lay.text_sink:]
            for start, ids in ((0, head), (lay.sink_start, sink), (lay.window_start, window),
                               (lay.footer_start, footer)):
                prefix[row, start:start + len(ids)] = ids
                valid[row, start:start + len(ids)] = True
            n_sink[row], n_win[row] = len(sink), len(window)
        join = np.zeros(self.batch, bool)
        join[self._pending_join] = True
        self._state = engine.start_streams(self.model, self._specs[False], self._state, jnp.asarray(join),
                                           jnp.asarray(prefix), jnp.asarray(valid), jnp.asarray(n_sink),
                                           jnp.asarray(n_win))
        self._pending_join = []

    def _round_inputs(self, t_starts, t_ends, questions=None) -> engine.RoundInputs:
        """The round's user turns (rows with t_start None sit out), padded to the slots' capacities."""
        slots, policy = self._specs[False].layout.slots, self.config.policy
        before = np.zeros((self.batch, slots.cap("before")), np.int32)
        after = np.zeros((self.batch, slots.cap("after")), np.int32)
        n_before, n_after = np.zeros(self.batch, np.int32), np.zeros(self.batch, np.int32)
        max_new = np.full(self.batch, policy.max_new_tokens, np.int32)
        for row in range(self.batch):
            if t_starts[row] is None:
                continue
            question = None if questions is None else questions[row]
            if question is not None:
                max_new[row] = policy.answer_cap
            text = round_user_text(self._queries[row], int(self._context_rounds[row]), bool(self._previous[row]),
                                   [question] if question is not None else [])
            b, a = self.format.prompt_ids(t_starts[row], t_ends[row], text)
            if len(b) > slots.cap("before"):
                raise ValueError(f"the time label of {t_starts[row]}-{t_ends[row]} s is too long")
            if len(a) > slots.cap("after"):
                raise ValueError(f"row {row}: the user turn {text!r} has {len(a)} tokens after the frames; the cache "
                                 f"keeps {slots.cap('after')} (a longer query or question needs max_question_tokens)")
            before[row, :len(b)], after[row, :len(a)] = b, a
            n_before[row], n_after[row] = len(b), len(a)
        return engine.RoundInputs(before_bt=jnp.asarray(before), n_before_b=jnp.asarray(n_before),
                                  after_bt=jnp.asarray(after), n_after_b=jnp.asarray(n_after),
                                  stepping_b=jnp.asarray([t is not None for t in t_starts]),
                                  max_new_b=jnp.asarray(max_new))

    def check_question(self, question: str) -> None:
        """ValueError unless `question` fits a second's user turn (after a space, beside the query)."""
        if not question.strip():
            raise ValueError("the question is empty")
        limit = self.config.policy.max_question_tokens
        n_tokens = len(self.format.encode(" " + question))
        if n_tokens > limit:
            raise ValueError(f"the question has {n_tokens} tokens; this stream takes at most {limit} "
                             "(max_question_tokens)")

    def _text(self, content_ids) -> str:
        """Commentary text of an answer's commentary ids (`engine.content_length` of them)."""
        return self.tokenizer.decode([int(i) for i in content_ids], skip_special_tokens=True).strip()


class _TextStream:
    """One row's commentary while it is decoded: text goes out as soon as it is complete and can
    no longer turn out to be the closing " ...<|im_end|>"; `finish` emits the rest of the commentary."""

    def __init__(self, tokenizer, fmt: StreamFormat, emit: Callable[[str], None]):
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._close = [*fmt.end_marker, fmt.special.im_end]
        self._emit = emit
        self._ids: list[int] = []
        self._sent = 0  # ids already given to the detokenizer

    def push(self, token_id: int) -> None:
        self._ids.append(token_id)
        held = next(n for n in range(min(len(self._ids), len(self._close)), -1, -1)
                    if self._ids[len(self._ids) - n:] == self._close[:n])
        self._send(len(self._ids) - held)

    def finish(self, content_ids) -> None:
        self._ids = [int(i) for i in content_ids]
        self._send(len(self._ids))
        piece = self._detokenizer.flush()
        if piece:
            self._emit(piece)

    def _send(self, upto: int) -> None:
        for token_id in self._ids[self._sent:upto]:
            piece = self._detokenizer.push(token_id)
            if piece:
                self._emit(piece)
        self._sent = max(self._sent, upto)
