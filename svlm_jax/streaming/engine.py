"""Compiled streaming steps over a batch of streams sharing one fixed-shape cache (`cache.py`).

`start_streams` prefills the head of joining streams (system prompt, previous text); `round_step`
runs one second for every active stream: retire what leaves the cache, encode the second's frames,
prefill the round (`stream_format.PREFILL_PARTS`), then decode in a `lax.while_loop` over a named
`DecodeState` until <|im_end|> or `max_new_tokens`. Both are jitted once per `EngineSpec` and
donate the cache.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from kernels_pallas import api as attention_api
from svlm_jax.model import rope, text, vision
from svlm_jax.model.params import Model
from svlm_jax.stream_format import StreamFormat
from svlm_jax.streaming import mesh as stream_mesh
from svlm_jax.streaming import sampling
from svlm_jax.streaming.cache import (CacheLayout, CacheState, begin_round, contiguous_positions, per_row,
                                     rotate_moved_keys)

POS_MODES = ("contiguous", "native")


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Everything static about the compiled steps (a jit static argument)."""

    layout: CacheLayout
    sampling: sampling.SamplingConfig
    pos_mode: str
    im_end: int
    video_pad: int
    close_ids: tuple[int, ...]   # " ..." + <|im_end|>
    end_marker: tuple[int, ...]  # " ..."
    tail_ids: tuple[int, ...]    # "\n"
    grid_thw: tuple[int, int, int]  # one round's vision grid (in patches)
    attention_backend: str = "auto"
    # The device mesh the state lives on (`streaming.mesh`); every step returns it laid out as it came.
    mesh: Mesh | None = None
    # Called on the host with (step m, tokens [B], fed [B]) for every decoded token; None: no callback.
    on_token: Callable | None = None

    def __post_init__(self):
        if self.pos_mode not in POS_MODES:
            raise ValueError(f"pos_mode must be one of {POS_MODES}, got {self.pos_mode!r}")

    @classmethod
    def for_stream(cls, fmt: StreamFormat, layout: CacheLayout, sampling_cfg: sampling.SamplingConfig,
                   grid_thw: tuple[int, int, int], **settings) -> "EngineSpec":
        return cls(layout=layout, sampling=sampling_cfg, im_end=fmt.special.im_end, video_pad=fmt.special.video_pad,
                   close_ids=tuple(fmt.close_ids()), end_marker=fmt.end_marker, tail_ids=tuple(fmt.tail_ids()),
                   grid_thw=grid_thw, **settings)


@struct.dataclass
class RoundInputs:
    """Host-made text of one round per stream; padded to the parts' capacities."""

    before_bt: jax.Array   # int32 [B, before cap]
    n_before_b: jax.Array  # int32
    after_bt: jax.Array    # int32 [B, after cap]
    n_after_b: jax.Array   # int32
    stepping_b: jax.Array  # bool: the stream has a second this round (the others sit it out)
    max_new_b: jax.Array   # int32 tokens it may generate (a question's answer may be longer)


@struct.dataclass
class RoundOutput:
    tokens_bm: jax.Array   # int32 [B, max_new] generated (and fed) tokens
    n_gen_b: jax.Array     # int32 how many of them are real
    content_b: jax.Array   # int32 how many of them are commentary (no " ..." / <|im_end|>)
    # Only with collect_logits (tests, debugging): logits [B, P, V] of every prefill query and
    # [B, max_new, V] of every fed token.
    prefill_logits_bqv: jax.Array | None = None
    decode_logits_bmv: jax.Array | None = None


@struct.dataclass
class NewTokens:
    """Tokens entering the cache in one pass through the layers: embeddings [B, Q, D], their slots,
    positions, segment (1 = real, 0 = padding), causal order (None: decode, one token) and the
    DeepStack features added after the first layers ([S, B, Q, D], zero away from vision tokens;
    None: no vision among them, or a model without DeepStack)."""

    x_bqd: jax.Array
    dest_bq: jax.Array
    positions_bq3: jax.Array
    segment_bq: jax.Array
    order_bq: jax.Array | None = None
    deepstack_sbqd: jax.Array | None = None


def _on_mesh(spec: EngineSpec, state: CacheState) -> CacheState:
    """The state pinned to its mesh layout (`streaming.mesh.state_shardings`), so the next step sees
    the shardings this one was compiled for."""
    if spec.mesh is None:
        return state
    n_kv = state.k_layers_csh[0].shape[0] // state.rounds_b.shape[0]
    return jax.lax.with_sharding_constraint(state, stream_mesh.state_shardings(state, spec.mesh, n_kv))


def per_layer(model: Model) -> Model:
    """The model with its text layers as a tuple of one-layer stacks ([1, ...] leaves), as the
    engine wants them: a decode step that slices layer l out of a stacked [L, ...] weight copies
    it (XLA materialises the slice), which triples the weight traffic of every token. A no-op on
    a model that is already split; otherwise a copy of the text layers."""
    layers = model.params.text.layers
    if isinstance(layers, tuple):
        return model
    n_layers = jax.tree.leaves(layers)[0].shape[0]
    split = tuple(jax.tree.map(lambda a, i=i: a[i:i + 1], layers) for i in range(n_layers))
    return model.replace(params=model.params.replace(text=model.params.text.replace(layers=split)))


def _angles_of(model: Model):
    """positions [B, S, 3] -> the text model's rotary angles [B, S, H/2]."""
    return functools.partial(text.text_angles, model.config.text)


def _write_rows(cache_csh, dest_bq, new_bqkh):
    """The new tokens' k or v [B, Q, K, H] written in place at their slots `dest_bq` of the cache
    rows [B*K, S + 1, H] (inactive ones at the scratch slot S). One token a stream (decode): one
    dynamic-update-slice per stream (XLA's scatter would count, and on some backends move, the
    whole layer); a chunk (prefill, once a round): one scatter."""
    b, q, n_kv, _ = new_bqkh.shape
    new_bkqh = new_bqkh.transpose(0, 2, 1, 3).astype(cache_csh.dtype)
    if q == 1:
        for row in range(b):
            cache_csh = jax.lax.dynamic_update_slice(cache_csh, new_bkqh[row], (row * n_kv, dest_bq[row, 0], 0))
        return cache_csh
    rows_bkq = jnp.broadcast_to((jnp.arange(b)[:, None] * n_kv + jnp.arange(n_kv))[:, :, None], (b, n_kv, q))
    slots_bkq = jnp.broadcast_to(dest_bq[:, None, :], (b, n_kv, q))
    return cache_csh.at[rows_bkq, slots_bkq].set(new_bkqh, mode="promise_in_bounds")


def _attend_layers(model: Model, spec: EngineSpec, state: CacheState, new: NewTokens, *, kv_order_bs):
    """Every decoder layer for `new` tokens: write their k (rotated) and v at their slots in the
    layer's cache (in place), attend to the whole cache (and add their DeepStack features after the
    first layers, as `text.decode_hidden` does), return the final-norm hidden [B, Q, D] and the
    state with the updated caches."""
    cfg = model.config.text
    angles_bqf = text.text_angles(cfg, new.positions_bq3)
    scratch = lambda ids_bs: jnp.pad(ids_bs, ((0, 0), (0, 1)))  # the scratch slot: segment 0, never seen
    kv_segment_bs = scratch(state.valid_bs.astype(jnp.int32))
    kv_order_bs = None if kv_order_bs is None else scratch(kv_order_bs)
    # A prefill chunk is causal by order ids; one decode token sees its whole segment.
    attend = attention_api.cached_decode_attention if new.order_bq is None else attention_api.cached_prefill_attention
    x_bqd, k_layers, v_layers = new.x_bqd, [], []
    for index, (layer_1, k_csh, v_csh) in enumerate(zip(model.params.text.layers, state.k_layers_csh,
                                                         state.v_layers_csh)):
        layer = jax.tree.map(lambda a: a[0], layer_1)  # [1, ...] -> [...]: a reshape, no copy
        q, k, v = text.project_qkv(cfg, layer, x_bqd)
        q, k = rope.apply_rotary(q, angles_bqf), rope.apply_rotary(k, angles_bqf)
        k_csh, v_csh = _write_rows(k_csh, new.dest_bq, k), _write_rows(v_csh, new.dest_bq, v)
        o = attend(q, k_csh, v_csh, new.segment_bq, kv_segment_bs, new.order_bq, kv_order_bs,
                   backend=spec.attention_backend)
        x_bqd = text.finish_layer(cfg, layer, x_bqd, o)
        if new.deepstack_sbqd is not None:
            x_bqd = text.add_deepstack(x_bqd, new.deepstack_sbqd, index)
        k_layers.append(k_csh)
        v_layers.append(v_csh)
    hidden = vision.rms_norm(x_bqd, model.params.text.final_norm_d, cfg.rms_norm_eps)
    return hidden, state.replace(k_layers_csh=tuple(k_layers), v_layers_csh=tuple(v_layers))


def place_tokens(spec: EngineSpec, state: CacheState, tokens_bq, dest_bq, active_bq, angles_of):
    """Write the ids of the active queries at their slots (inactive ones, padding, write nothing)
    and give them positions: contiguous mode recomputes every position and turns the keys that
    moved (`rotate_moved_keys`); native mode continues the stream's own counter from the first new
    token on. `angles_of` is the model's positions -> angles. Returns the state, the destinations
    (`layout.size` for inactive queries), the new tokens' positions [B, Q, 3] and each stream's
    last active query."""
    size = spec.layout.size
    dest_bq = jnp.where(active_bq, dest_bq, size)
    put = jax.vmap(lambda a, d, x: a.at[d].set(x, mode="drop"))
    take = jax.vmap(lambda a, d: a[jnp.minimum(d, size - 1)])
    valid_bs = put(state.valid_bs, dest_bq, jnp.ones_like(active_bq))
    contiguous_bs3 = jax.vmap(functools.partial(contiguous_positions, spec.layout))(
        valid_bs, state.win_start_b, state.rounds_b)
    if spec.pos_mode == "contiguous":
        # Retained keys move only when a round begins (eviction); new tokens come last in order.
        state = rotate_moved_keys(state, contiguous_bs3, angles_of)
    else:
        new_contig_bq3 = take(contiguous_bs3, dest_bq)
        first_active = jnp.argmax(active_bq, axis=1)
        first_bq3 = jnp.take_along_axis(new_contig_bq3, first_active[:, None, None], axis=1)
        new_native_bq3 = new_contig_bq3 - first_bq3 + state.next_native_b[:, None, None]
        state = state.replace(pos_bs3=put(state.pos_bs3, dest_bq, new_native_bq3))
    positions_bq3 = take(state.pos_bs3, dest_bq)
    last_active = active_bq.shape[1] - 1 - jnp.argmax(active_bq[:, ::-1], axis=1)
    last_pos = jnp.take_along_axis(positions_bq3, last_active[:, None, None], axis=1)[:, 0]
    any_active = jnp.any(active_bq, axis=1)
    state = state.replace(token_bs=put(state.token_bs, dest_bq, tokens_bq), valid_bs=valid_bs,
                          next_native_b=jnp.where(any_active, jnp.max(last_pos, axis=-1) + 1, state.next_native_b))
    return state, dest_bq, positions_bq3, last_active


def _prefill(model: Model, spec: EngineSpec, state: CacheState, tokens_bq, dest_bq, active_bq, embeds_bqd,
             deepstack_sbqd=None):
    """`place_tokens`, then the layers over the queries (causal among themselves by order), with
    `deepstack_sbqd` as in `NewTokens`. Returns hidden [B, Q, D], the state and the index of each
    stream's last active query."""
    state, dest_bq, positions_bq3, last_active = place_tokens(spec, state, tokens_bq, dest_bq, active_bq,
                                                              _angles_of(model))
    q_order_bq = jnp.broadcast_to(jnp.arange(1, tokens_bq.shape[1] + 1, dtype=jnp.int32), tokens_bq.shape)
    new = NewTokens(x_bqd=embeds_bqd, dest_bq=dest_bq, positions_bq3=positions_bq3,
                    segment_bq=active_bq.astype(jnp.int32), order_bq=q_order_bq, deepstack_sbqd=deepstack_sbqd)
    kv_order_bs = jax.vmap(lambda a, d, x: a.at[d].set(x, mode="drop"))(jnp.zeros_like(state.token_bs), dest_bq,
                                                                         q_order_bq)
    hidden, state = _attend_layers(model, spec, state, new, kv_order_bs=kv_order_bs)
    return hidden, state, last_active


@functools.partial(jax.jit, static_argnames="spec", donate_argnames="state")
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
    return _on_mesh(spec, _prefill(model, spec, state, prefix_bp, dest, active, embeds)[1])


def _round_queries(spec: EngineSpec, state: CacheState, inputs: RoundInputs, forced=None):
    """Ids, destination slots and activity of the round's prefill queries in `PREFILL_PARTS` order
    (the previous round's close and tail if it is still cached, this round's before / vision /
    after), then (`forced` = (tokens [B, max_new], counts [B]), replays only) its known answer."""
    lay, slots = spec.layout, spec.layout.slots
    i = state.rounds_b - 1  # this round (begin_round already counted it)
    prev_ring = (i - 1) % lay.rounds
    start = {"current": lay.round_slot(i % lay.rounds), "previous": lay.round_slot(prev_ring)}
    prev_live = (i >= 1) & (lay.rounds > 1)
    n_gen_prev = jnp.take_along_axis(state.n_gen_br, prev_ring[:, None], axis=1)[:, 0]
    last_prev = jnp.take_along_axis(state.token_bs, (start["previous"] + slots.offset("answer") + n_gen_prev - 1
                                                     )[:, None], axis=1)[:, 0]
    cut = prev_live & (n_gen_prev > 0) & (last_prev != spec.im_end)
    b = i.shape[0]

    def fixed(ids):
        return jnp.broadcast_to(jnp.asarray(np.asarray(ids), jnp.int32), (b, len(ids)))

    def first(n_b, cap):
        return jnp.arange(cap) < n_b[:, None]

    # (ids [B, cap], active [B, cap]) of each prefill part
    parts = {("previous", "close"): (fixed(spec.close_ids), jnp.broadcast_to(cut[:, None], (b, len(spec.close_ids)))),
             ("previous", "tail"): (fixed(spec.tail_ids), jnp.broadcast_to(prev_live[:, None], (b, len(spec.tail_ids)))),
             ("current", "before"): (inputs.before_bt, first(inputs.n_before_b, slots.cap("before"))),
             ("current", "vision"): (fixed([spec.video_pad] * slots.cap("vision")),
                                     jnp.ones((b, slots.cap("vision")), bool)),
             ("current", "after"): (inputs.after_bt, first(inputs.n_after_b, slots.cap("after")))}
    if forced is not None:
        tokens_bm, n_b = forced
        parts[("current", "answer")] = (tokens_bm, first(n_b, slots.cap("answer")))
    tokens, dest, active = [], [], []
    for (which, name), (ids_bn, active_bn) in parts.items():
        tokens.append(ids_bn)
        dest.append(start[which][:, None] + slots.offset(name) + jnp.arange(ids_bn.shape[1]))
        active.append(active_bn)
    active = jnp.concatenate(active, axis=1) & state.active_b[:, None]
    return (jnp.concatenate(tokens, axis=1).astype(jnp.int32), jnp.concatenate(dest, axis=1).astype(jnp.int32),
            active)


def _seen_tokens(state: CacheState, vocab: int):
    """[B, V] which tokens appear among the retained ones (for the repetition penalty)."""
    return jax.vmap(lambda t, v: jnp.zeros((vocab,), bool).at[t].max(v))(state.token_bs, state.valid_bs)


def _begin_and_prefill(model: Model, spec: EngineSpec, state: CacheState, inputs: RoundInputs, rows_bpv,
                       layout: vision.VisionLayout, forced=None):
    """Retire what leaves the cache, encode the frames of all streams in one tower call, prefill
    (a DeepStack tower's features at the vision queries of the first layers, like `vlm.forward`'s)."""
    lay, cfg = spec.layout, model.config

    def begin(row):
        new = begin_round(lay, row)
        return jax.tree.map(lambda a, b: jnp.where(row["active_b"], a, b), new, row)

    state = per_row(begin, state)
    b = rows_bpv.shape[0]
    feats_md, deep_smd = vision.encode_with_deepstack(cfg.vision, model.params.vision,
                                                      rows_bpv.reshape(-1, rows_bpv.shape[-1]), layout,
                                                      attention_backend=spec.attention_backend)
    tokens, dest, active = _round_queries(spec, state, inputs, forced)
    embeds = model.params.text.embed_vd[tokens]
    v0, n_vision = lay.slots.prefill_offset(("current", "vision")), lay.slots.cap("vision")

    def at_vision(x_bqd, features_md):  # the features in the round's vision queries
        return x_bqd.at[:, v0:v0 + n_vision].set(features_md.reshape(b, n_vision, -1).astype(x_bqd.dtype))

    embeds = at_vision(embeds, feats_md)
    deep_sbqd = None if deep_smd is None else jax.vmap(lambda f_md: at_vision(jnp.zeros_like(embeds), f_md))(deep_smd)
    hidden, state, last = _prefill(model, spec, state, tokens, dest, active, embeds, deep_sbqd)
    return state, hidden, dest, last


@functools.partial(jax.jit, static_argnames=("spec", "collect_logits"), donate_argnames="state")
def round_step(model: Model, spec: EngineSpec, state: CacheState, inputs: RoundInputs, rows_bpv,
               layout: vision.VisionLayout, keys_b, collect_logits: bool = False):
    """One second for every stepping stream; returns the new state and the generated tokens."""
    lay = spec.layout
    joined_b = state.active_b
    state = state.replace(active_b=joined_b & inputs.stepping_b)  # this round, sitting out = inactive
    state, hidden, dest, last = _begin_and_prefill(model, spec, state, inputs, rows_bpv, layout)
    logits_bv = text.logits(model.params.text, jnp.take_along_axis(hidden, last[:, None, None], axis=1))[:, 0]
    last_slot = jnp.take_along_axis(dest, last[:, None], 1)
    seen = _seen_tokens(state, model.config.text.vocab_size)
    first = sampling.next_token(logits_bv, seen, jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys_b), spec.sampling)
    b = first.shape[0]
    start = DecodeState(
        step=jnp.int32(0), token_b=first, done_b=~state.active_b, generated_bm=jnp.zeros((b, lay.slots.cap("answer")),
                                                                                         jnp.int32),
        n_gen_b=jnp.zeros((b,), jnp.int32), cache=state, seen_bv=seen,
        logits_bmv=jnp.zeros((b, lay.slots.cap("answer"), seen.shape[1]) if collect_logits else (), jnp.float32))
    answer_slot_b = lay.round_slot((state.rounds_b - 1) % lay.rounds) + lay.slots.offset("answer")
    answer_pos_b3 = jnp.take_along_axis(state.pos_bs3, last_slot[:, :, None], 1)[:, 0] + 1
    state, out = _decode(model, spec, start, answer_slot_b, answer_pos_b3, inputs.max_new_b, keys_b, collect_logits)
    if collect_logits:
        out = out.replace(prefill_logits_bqv=text.logits(model.params.text, hidden))
    return _on_mesh(spec, state.replace(active_b=joined_b)), out


@functools.partial(jax.jit, static_argnames="spec", donate_argnames="state")
def replay_round(model: Model, spec: EngineSpec, state: CacheState, inputs: RoundInputs, rows_bpv,
                 layout: vision.VisionLayout, tokens_bm, n_gen_b):
    """Re-run a round with its known answer, nothing generated: to warm a stream up from a
    transcript, or to rebuild a context (the sliding-window-with-overlap baseline)."""
    joined_b = state.active_b
    state = state.replace(active_b=joined_b & inputs.stepping_b)
    state = _begin_and_prefill(model, spec, state, inputs, rows_bpv, layout, (tokens_bm, n_gen_b))[0]
    return _on_mesh(spec, _finish_round(spec, state, tokens_bm, n_gen_b, state.next_native_b)[0].replace(
        active_b=joined_b))


@struct.dataclass
class DecodeState:
    """The decode loop's carry."""

    step: jax.Array             # int32 m: tokens fed so far in this round
    token_b: jax.Array          # int32 the token each stream feeds next
    done_b: jax.Array           # bool: the stream fed <|im_end|> or max_new tokens (or is inactive)
    generated_bm: jax.Array     # int32 [B, max_new] the tokens fed
    n_gen_b: jax.Array          # int32 how many tokens each stream fed
    cache: CacheState
    seen_bv: jax.Array          # bool [B, V] tokens in the context (repetition penalty)
    logits_bmv: jax.Array       # float32 [B, max_new, V] with collect_logits, else a scalar


def decode_token(model: Model, spec: EngineSpec, cache: CacheState, token_b, slot_b, pos_b3, feed_b):
    """Feed one token per stream (rows with feed_b False write nothing): it takes slot `slot_b`
    at position `pos_b3` [B, 3]. Returns the next-token logits [B, V] (float32) and the cache."""
    put = jax.vmap(lambda a, d, x: a.at[d].set(x, mode="drop"))
    dest = jnp.where(feed_b, slot_b, spec.layout.size)[:, None]
    pos = pos_b3[:, None]
    cache = cache.replace(token_bs=put(cache.token_bs, dest, token_b[:, None]),
                          valid_bs=put(cache.valid_bs, dest, feed_b[:, None]),
                          pos_bs3=put(cache.pos_bs3, dest, pos))
    new = NewTokens(x_bqd=model.params.text.embed_vd[token_b][:, None], dest_bq=dest, positions_bq3=pos,
                    segment_bq=feed_b[:, None].astype(jnp.int32))
    hidden, cache = _attend_layers(model, spec, cache, new, kv_order_bs=None)
    return text.logits(model.params.text, hidden)[:, 0], cache


def _decode(model: Model, spec: EngineSpec, start: DecodeState, answer_slot_b, answer_pos_b3, max_new_b, keys_b,
            collect_logits: bool):
    """Feed tokens one at a time (the first from the prefill) until each stream has fed <|im_end|>
    or its `max_new_b` tokens; the m-th fed token sits at slot answer_slot + m, position answer_pos + m."""
    max_new = spec.layout.slots.cap("answer")

    def cond(d: DecodeState):
        return (d.step < max_new) & ~jnp.all(d.done_b)

    def body(d: DecodeState) -> DecodeState:
        m, tok, feed = d.step, d.token_b, ~d.done_b
        if spec.on_token is not None:
            # Ordered effects serve one device only; on a mesh the session re-orders by step.
            jax.debug.callback(spec.on_token, m, tok, feed, ordered=spec.mesh is None)
        logits, cache = decode_token(model, spec, d.cache, tok, answer_slot_b + m, answer_pos_b3 + m, feed)
        seen = d.seen_bv | (jax.nn.one_hot(tok, d.seen_bv.shape[1], dtype=bool) & feed[:, None])
        nxt = sampling.next_token(logits, seen, jax.vmap(lambda k: jax.random.fold_in(k, m + 1))(keys_b), spec.sampling)
        return DecodeState(
            step=m + 1, token_b=jnp.where(feed, nxt, tok),
            done_b=d.done_b | (feed & ((tok == spec.im_end) | (m == max_new_b - 1))),
            generated_bm=d.generated_bm.at[:, m].set(jnp.where(feed, tok, 0)), n_gen_b=d.n_gen_b + feed,
            cache=cache, seen_bv=seen,
            logits_bmv=d.logits_bmv.at[:, m].set(logits) if collect_logits else d.logits_bmv)

    end = jax.lax.while_loop(cond, body, start)
    state, content = _finish_round(spec, end.cache, end.generated_bm, end.n_gen_b, answer_pos_b3[:, 0] + end.n_gen_b)
    return state, RoundOutput(tokens_bm=end.generated_bm, n_gen_b=end.n_gen_b, content_b=content,
                              decode_logits_bmv=end.logits_bmv if collect_logits else None)


def _finish_round(spec: EngineSpec, state: CacheState, gen_bm, n_gen_b, next_native_b):
    """Record the round's generated count and commentary length (what will move to the previous
    text when it leaves) and where native positions continue; returns the state and the lengths."""
    ring = (state.rounds_b - 1) % spec.layout.rounds
    rows = jnp.arange(gen_bm.shape[0])
    active = state.active_b
    content = content_length(gen_bm, n_gen_b, spec.im_end, spec.end_marker)
    return state.replace(
        n_gen_br=state.n_gen_br.at[rows, ring].set(jnp.where(active, n_gen_b, state.n_gen_br[rows, ring])),
        content_br=state.content_br.at[rows, ring].set(jnp.where(active, content, state.content_br[rows, ring])),
        next_native_b=jnp.where(active, next_native_b, state.next_native_b)), content


def content_length(gen_bm, n_gen_b, im_end: int, end_marker: tuple[int, ...]):
    """Commentary tokens of each stream's answer: generated tokens less a final <|im_end|> and the
    " ..." before it. The one definition of where commentary ends (the host decodes this many)."""
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
