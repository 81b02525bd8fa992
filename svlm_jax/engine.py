"""Compiled streaming steps over a batch of streams sharing one fixed-shape cache (`cache.py`).

`start_streams` prefills the head of joining streams (system prompt, previous text); `round_step`
runs one second for every active stream: retire what leaves the cache, encode the second's frames,
prefill the round (closing the previous round first), then decode in a `lax.while_loop` until
<|im_end|> or `max_new` tokens. Both are jitted once per `EngineSpec` and donate the cache.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kernels_pallas import api as attention_api
from svlm_jax import sampling
from svlm_jax.cache import CacheLayout, CacheState, begin_round, contiguous_positions, per_row
from svlm_jax.model import rope, text, vision
from svlm_jax.model.params import Model

POS_MODES = ("contiguous", "native")


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    layout: CacheLayout
    sampling: sampling.SamplingConfig
    pos_mode: str
    im_end: int
    video_pad: int
    close_ids: tuple[int, ...]   # " ..." + <|im_end|>
    end_marker: tuple[int, ...]  # " ..."
    tail_ids: tuple[int, ...]    # "\n"
    grid_thw: tuple[int, int, int]  # one round's vision grid (in patches)

    def __post_init__(self):
        if self.pos_mode not in POS_MODES:
            raise ValueError(f"pos_mode must be one of {POS_MODES}, got {self.pos_mode!r}")


@struct.dataclass
class RoundInputs:
    """Host-made text of one round per stream; padded to the layout's capacities."""

    before_bt: jax.Array   # int32 [B, before_cap]
    n_before_b: jax.Array  # int32
    after_bt: jax.Array    # int32 [B, after_cap]
    n_after_b: jax.Array   # int32


@struct.dataclass
class RoundOutput:
    tokens_bm: jax.Array   # int32 [B, max_new] generated (and fed) tokens
    n_gen_b: jax.Array     # int32 how many of them are real
    # Only with collect_logits (tests, debugging): logits [B, P, V] of every prefill query and
    # [B, max_new, V] of every fed token.
    prefill_logits_bqv: jax.Array | None = None
    decode_logits_bmv: jax.Array | None = None


def _rotary_spec(model: Model):
    t = model.config.text
    return attention_api.RotarySpec(theta=t.rope_theta, mrope_section=t.mrope_section)


def slot_positions(spec: EngineSpec, state: CacheState):
    """Positions [B, S, 3] the keys are rotated by: contiguous re-indexing or the native ones."""
    if spec.pos_mode == "native":
        return state.native_bs3
    return jax.vmap(functools.partial(contiguous_positions, spec.layout))(state.valid_bs, state.win_start_b,
                                                                          state.rounds_b)


def _attend_layers(model: Model, state: CacheState, x_bqd, dest_bq, q_pos_bq3, q_segment_bq, q_order_bq,
                   kv_order_bs, k_pos_bs3):
    """Every decoder layer for new tokens: write their k/v (pre-rotary) at `dest`, attend to the
    whole cache, return the final-norm hidden [B, Q, D] and the updated k/v caches."""
    cfg = model.config.text
    angles_bqh = text.text_angles(cfg, q_pos_bq3)
    kv_segment_bs = state.valid_bs.astype(jnp.int32)
    rotary = _rotary_spec(model)
    write = jax.vmap(lambda cache_skh, d, new_qkh: cache_skh.at[d].set(new_qkh.astype(cache_skh.dtype), mode="drop"))

    def layer_fn(x, layer_and_cache):
        layer, k_bskh, v_bskh = layer_and_cache
        q, k, v = text.project_qkv(cfg, layer, x)
        k_bskh, v_bskh = write(k_bskh, dest_bq, k), write(v_bskh, dest_bq, v)
        q = rope.apply_rotary(q, angles_bqh)
        o = attention_api.attention(q, k_bskh, v_bskh, q_segment_bq, kv_segment_bs, q_order_bq, kv_order_bs,
                                    k_positions_bk3=k_pos_bs3, rope=rotary)
        return text.finish_layer(cfg, layer, x, o), (k_bskh, v_bskh)

    x_bqd, (k_lbskh, v_lbskh) = jax.lax.scan(layer_fn, x_bqd, (model.params.text.layers, state.k_lbskh,
                                                                state.v_lbskh))
    hidden = vision.rms_norm(x_bqd, model.params.text.final_norm_d, cfg.rms_norm_eps)
    return hidden, state.replace(k_lbskh=k_lbskh, v_lbskh=v_lbskh)


def _prefill(model: Model, spec: EngineSpec, state: CacheState, tokens_bq, dest_bq, active_bq, embeds_bqd):
    """Write the ids of the active queries at their slots, recompute positions, run the layers.
    Inactive queries (padding) write nothing and see nothing. Returns hidden [B, Q, D], the state,
    the index of each stream's last active query and the positions [B, S, 3] keys rotate by."""
    size = spec.layout.size
    dest_bq = jnp.where(active_bq, dest_bq, size)
    put = jax.vmap(lambda a, d, x: a.at[d].set(x, mode="drop"))
    state = state.replace(token_bs=put(state.token_bs, dest_bq, tokens_bq),
                          valid_bs=put(state.valid_bs, dest_bq, jnp.ones_like(active_bq)))
    contiguous = jax.vmap(functools.partial(contiguous_positions, spec.layout))(
        state.valid_bs, state.win_start_b, state.rounds_b)
    take = jax.vmap(lambda a, d: a[jnp.minimum(d, size - 1)])
    new_contig_bq3 = take(contiguous, dest_bq)
    # Native positions continue the stream's own counter from the first new token on.
    first_active = jnp.argmax(active_bq, axis=1)
    first_bq3 = jnp.take_along_axis(new_contig_bq3, first_active[:, None, None], axis=1)
    new_native_bq3 = new_contig_bq3 - first_bq3 + state.next_native_b[:, None, None]
    state = state.replace(native_bs3=put(state.native_bs3, dest_bq, new_native_bq3))
    last_active = active_bq.shape[1] - 1 - jnp.argmax(active_bq[:, ::-1], axis=1)
    last_native = jnp.take_along_axis(new_native_bq3, last_active[:, None, None], axis=1)[:, 0]
    any_active = jnp.any(active_bq, axis=1)
    state = state.replace(next_native_b=jnp.where(any_active, jnp.max(last_native, axis=-1) + 1, state.next_native_b))
    k_pos_bs3 = contiguous if spec.pos_mode == "contiguous" else state.native_bs3
    q_pos_bq3 = take(k_pos_bs3, dest_bq)
    q_order_bq = jnp.broadcast_to(jnp.arange(1, tokens_bq.shape[1] + 1, dtype=jnp.int32), tokens_bq.shape)
    kv_order_bs = put(jnp.zeros_like(state.token_bs), dest_bq, q_order_bq)
    hidden, state = _attend_layers(model, state, embeds_bqd, dest_bq, q_pos_bq3, active_bq.astype(jnp.int32),
                                   q_order_bq, kv_order_bs, k_pos_bs3)
    return hidden, state, last_active, k_pos_bs3


@functools.partial(jax.jit, static_argnums=1, donate_argnums=2)
def start_streams(model: Model, spec: EngineSpec, state: CacheState, join_b, prefix_bp, prefix_valid_bp,
                  n_sink_b, n_win_b):
    """(Re)start the streams of rows `join_b` with a prefilled head: `prefix_bp` holds the ids of the
    slots before the rounds (head, sink, window from ring index 0, footer) and `prefix_valid_bp`
    which of them are used."""
    lay = spec.layout
    keep = ~join_b
    state = state.replace(
        valid_bs=state.valid_bs & keep[:, None],
        n_sink_b=jnp.where(join_b, n_sink_b, state.n_sink_b), win_start_b=jnp.where(join_b, 0, state.win_start_b),
        n_win_b=jnp.where(join_b, n_win_b, state.n_win_b), rounds_b=jnp.where(join_b, 0, state.rounds_b),
        n_gen_br=jnp.where(join_b[:, None], 0, state.n_gen_br),
        content_br=jnp.where(join_b[:, None], 0, state.content_br),
        next_native_b=jnp.where(join_b, 0, state.next_native_b), active_b=state.active_b | join_b)
    dest = jnp.broadcast_to(jnp.arange(lay.rounds_start, dtype=jnp.int32), prefix_bp.shape)
    active = prefix_valid_bp & join_b[:, None]
    embeds = model.params.text.embed_vd[prefix_bp]
    return _prefill(model, spec, state, prefix_bp, dest, active, embeds)[1]


def _round_queries(spec: EngineSpec, state: CacheState, inputs: RoundInputs, forced=None):
    """Ids, destination slots and activity of the round's prefill queries: close and tail of the
    previous round (if it is still cached), then this round's before / vision / after tokens, then
    (`forced` = (tokens [B, max_new], counts [B]), replays only) its known commentary."""
    lay = spec.layout
    i = state.rounds_b - 1  # this round (begin_round already counted it)
    cur = lay.round_slot(i % lay.rounds)
    prev_ring = (i - 1) % lay.rounds
    prev = lay.round_slot(prev_ring)
    prev_live = (i >= 1) & (lay.rounds > 1)
    n_gen_prev = jnp.take_along_axis(state.n_gen_br, prev_ring[:, None], axis=1)[:, 0]
    last_prev = jnp.take_along_axis(state.token_bs, (prev + lay.gen_off + n_gen_prev - 1)[:, None], axis=1)[:, 0]
    cut = prev_live & (n_gen_prev > 0) & (last_prev != spec.im_end)
    b = i.shape[0]

    def block(ids, dst_start, active):
        n = ids.shape[-1]
        return (jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (b, n)),
                dst_start[:, None] + jnp.arange(n), jnp.broadcast_to(active, (b, n)))

    parts = [
        block(np.asarray(spec.close_ids), prev + lay.close_off, cut[:, None]),
        block(np.asarray(spec.tail_ids), prev + lay.tail_off, prev_live[:, None]),
        (inputs.before_bt, cur[:, None] + jnp.arange(lay.before_cap),
         jnp.arange(lay.before_cap) < inputs.n_before_b[:, None]),
        block(np.full(lay.n_vision, spec.video_pad), cur + lay.vision_off, jnp.ones((b, 1), bool)),
        (inputs.after_bt, cur[:, None] + lay.after_off + jnp.arange(lay.after_cap),
         jnp.arange(lay.after_cap) < inputs.n_after_b[:, None]),
    ]
    if forced is not None:
        tokens_bm, n_bm = forced
        parts.append((tokens_bm, cur[:, None] + lay.gen_off + jnp.arange(lay.max_new),
                      jnp.arange(lay.max_new) < n_bm[:, None]))
    tokens, dest, active = (jnp.concatenate([p[k] for p in parts], axis=1) for k in range(3))
    active = active & state.active_b[:, None]
    return tokens.astype(jnp.int32), dest.astype(jnp.int32), active


def _seen_tokens(state: CacheState, vocab: int):
    """[B, V] which tokens appear among the retained ones (for the repetition penalty)."""
    return jax.vmap(lambda t, v: jnp.zeros((vocab,), bool).at[t].max(v))(state.token_bs, state.valid_bs)


def _begin_and_prefill(model: Model, spec: EngineSpec, state: CacheState, inputs: RoundInputs, rows_bpv,
                       layout: vision.VisionLayout, forced=None):
    """Retire what leaves the cache, encode the frames of all streams in one tower call, prefill."""
    lay, cfg = spec.layout, model.config

    def begin(row):
        new = begin_round(lay, row)
        return jax.tree.map(lambda a, b: jnp.where(row["active_b"], a, b), new, row)

    state = per_row(begin, state)
    b = rows_bpv.shape[0]
    feats = vision.encode(cfg.vision, model.params.vision, rows_bpv.reshape(-1, rows_bpv.shape[-1]), layout)
    tokens, dest, active = _round_queries(spec, state, inputs, forced)
    embeds = model.params.text.embed_vd[tokens]
    v0 = lay.close_len + lay.tail_len + lay.before_cap
    embeds = embeds.at[:, v0:v0 + lay.n_vision].set(feats.reshape(b, lay.n_vision, -1).astype(embeds.dtype))
    hidden, state, last, k_pos_bs3 = _prefill(model, spec, state, tokens, dest, active, embeds)
    return state, hidden, dest, last, k_pos_bs3


@functools.partial(jax.jit, static_argnums=(1, 7), donate_argnums=2)
def round_step(model: Model, spec: EngineSpec, state: CacheState, inputs: RoundInputs, rows_bpv,
               layout: vision.VisionLayout, keys_b, collect_logits: bool = False):
    """One second for every active stream; returns the new state and the generated tokens."""
    lay = spec.layout
    state, hidden, dest, last, k_pos_bs3 = _begin_and_prefill(model, spec, state, inputs, rows_bpv, layout)
    logits_bv = text.logits(model.params.text, jnp.take_along_axis(hidden, last[:, None, None], axis=1))[:, 0]
    last_slot = jnp.take_along_axis(dest, last[:, None], 1)
    gen_pos_b3 = jnp.take_along_axis(k_pos_bs3, last_slot[:, :, None], 1)[:, 0] + 1
    seen = _seen_tokens(state, model.config.text.vocab_size)
    first = sampling.next_token(logits_bv, seen, jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys_b), spec.sampling)
    cur = lay.round_slot((state.rounds_b - 1) % lay.rounds) + lay.gen_off
    state, out = _decode(model, spec, state, first, cur, gen_pos_b3, k_pos_bs3, seen, keys_b, collect_logits)
    if collect_logits:
        out = out.replace(prefill_logits_bqv=text.logits(model.params.text, hidden))
    return state, out


@functools.partial(jax.jit, static_argnums=1, donate_argnums=2)
def replay_round(model: Model, spec: EngineSpec, state: CacheState, inputs: RoundInputs, rows_bpv,
                 layout: vision.VisionLayout, tokens_bm, n_gen_b):
    """Re-run a past round with its known commentary, nothing generated (the sliding-window-with-
    overlap baseline rebuilds its context this way every second)."""
    state = _begin_and_prefill(model, spec, state, inputs, rows_bpv, layout, (tokens_bm, n_gen_b))[0]
    return _finish_round(spec, state, tokens_bm, n_gen_b, state.next_native_b)


def _decode(model: Model, spec: EngineSpec, state: CacheState, first_b, gen_slot_b, gen_pos_b3, k_pos_bs3, seen_bv,
            keys_b, collect_logits: bool):
    """Feed tokens one at a time (the first from the prefill) until each stream has fed <|im_end|>
    or `max_new` tokens; generated slots get positions gen_pos + m."""
    lay = spec.layout
    b = first_b.shape[0]
    size = lay.size

    def cond(carry):
        m, _, done, *_ = carry
        return (m < lay.max_new) & ~jnp.all(done)

    def body(carry):
        m, tok, done, gen, n_gen, st, seen, k_pos, logits_bmv = carry
        feed = ~done
        dest = jnp.where(feed, gen_slot_b + m, size)[:, None]
        pos = (gen_pos_b3 + m)[:, None]
        put = jax.vmap(lambda a, d, x: a.at[d].set(x, mode="drop"))
        st = st.replace(token_bs=put(st.token_bs, dest, tok[:, None]),
                        valid_bs=put(st.valid_bs, dest, feed[:, None]),
                        native_bs3=put(st.native_bs3, dest, pos))
        k_pos = put(k_pos, dest, pos)
        x = model.params.text.embed_vd[tok][:, None]
        hidden, st = _attend_layers(model, st, x, dest, pos, feed[:, None].astype(jnp.int32), None, None, k_pos)
        seen = seen | (jax.nn.one_hot(tok, seen.shape[1], dtype=bool) & feed[:, None])
        logits = text.logits(model.params.text, hidden)[:, 0]
        nxt = sampling.next_token(logits, seen, jax.vmap(lambda k: jax.random.fold_in(k, m + 1))(keys_b), spec.sampling)
        gen = gen.at[:, m].set(jnp.where(feed, tok, 0))
        if collect_logits:
            logits_bmv = logits_bmv.at[:, m].set(logits)
        done = done | (feed & ((tok == spec.im_end) | (m == lay.max_new - 1)))
        return m + 1, jnp.where(feed, nxt, tok), done, gen, n_gen + feed, st, seen, k_pos, logits_bmv

    zeros_b = jnp.zeros((b,), jnp.int32)
    logits_bmv = jnp.zeros((b, lay.max_new, seen_bv.shape[1]) if collect_logits else (), jnp.float32)
    init = (jnp.int32(0), first_b, ~state.active_b, jnp.zeros((b, lay.max_new), jnp.int32), zeros_b, state,
            seen_bv, k_pos_bs3, logits_bmv)
    _, _, _, gen, n_gen, state, _, _, logits_bmv = jax.lax.while_loop(cond, body, init)
    state = _finish_round(spec, state, gen, n_gen, gen_pos_b3[:, 0] + n_gen)
    return state, RoundOutput(tokens_bm=gen, n_gen_b=n_gen,
                              decode_logits_bmv=logits_bmv if collect_logits else None)


def _finish_round(spec: EngineSpec, state: CacheState, gen_bm, n_gen_b, next_native_b):
    """Record the round's generated count and commentary length (what will move to the previous
    text when it leaves) and where native positions continue."""
    ring = (state.rounds_b - 1) % spec.layout.rounds
    rows = jnp.arange(gen_bm.shape[0])
    active = state.active_b
    content = content_length(gen_bm, n_gen_b, spec.im_end, spec.end_marker)
    return state.replace(
        n_gen_br=state.n_gen_br.at[rows, ring].set(jnp.where(active, n_gen_b, state.n_gen_br[rows, ring])),
        content_br=state.content_br.at[rows, ring].set(jnp.where(active, content, state.content_br[rows, ring])),
        next_native_b=jnp.where(active, next_native_b, state.next_native_b))


def content_length(gen_bm, n_gen_b, im_end: int, end_marker: tuple[int, ...]):
    """Commentary tokens of each stream's round: generated tokens less a final <|im_end|> and the
    " ..." before it."""
    idx = jnp.maximum(n_gen_b - 1, 0)
    ended = (n_gen_b > 0) & (jnp.take_along_axis(gen_bm, idx[:, None], 1)[:, 0] == im_end)
    content = jnp.where(ended, n_gen_b - 1, n_gen_b)
    m = len(end_marker)
    if m:
        start = content - m
        window = jax.vmap(lambda g, s: jax.lax.dynamic_slice(jnp.pad(g, (m, 0)), (s + m,), (m,)))(gen_bm, start)
        has_marker = ended & (start >= 0) & jnp.all(window == jnp.asarray(end_marker), axis=1)
        content = jnp.where(has_marker, start, content)
    return content
