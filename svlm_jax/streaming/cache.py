"""The streaming KV cache: fixed shapes for a stream's whole life, policy as array updates.

Slots of one stream, in storage order (sizes static, `CacheLayout`):
  head    system block + "<|im_start|>previous text\\n"
  sink    the first `text_sink` tokens of text ever put into the previous-text block
  window  ring of the last `text_window` tokens of evicted commentary
  footer  "<|im_end|>\\n" closing the previous-text block
  rounds  ring of `rounds` round slots, each holding a round's parts in `stream_format.ROUND_PARTS`
          order, every part at a fixed offset with room for its longest form
Unused slots are invalid. Keys are stored rotated by the position in `pos_bs3`, one array per
layer (updated in place; a slice of a stacked [L, ...] cache would be copied at every layer) of
rows (stream, kv head) [B*K, S + 1, H]: the layout attention reads with one batch axis and no
transpose. The extra last slot is scratch, never valid: writes of inactive rows land there, so every
write is in bounds.
At every round, contiguous positions are recomputed from the logical order (head, sink, window
oldest-first, footer, rounds oldest-first; slot order inside each) by the M-RoPE rule of
`model.rope` (text +1 per token, a vision block from its start), and only the keys whose position
moved are turned by the difference (`rotate_moved_keys`; rotations compose per frequency). At the
start of round i, the round i - rounds leaves: its commentary (the answer without " ..." and
<|im_end|>) moves into the sink while it has room, then into the window ring; round
i - vision_rounds loses its vision tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from svlm_jax.config import ModelConfig
from svlm_jax.model import rope
from svlm_jax.model.vlm import video_time_interval
from svlm_jax.stream_format import CachePolicy, RoundSlots, StreamFormat


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    head_len: int
    text_sink: int
    text_window: int
    footer_len: int
    rounds: int          # round slots kept (text rounds)
    vision_rounds: int   # rounds whose vision is kept, current included (1..rounds)
    slots: RoundSlots    # one round's parts
    vision_offsets: tuple[tuple[int, int, int], ...]  # (t, row, col) offset of each vision token
    vision_span: int     # how far text resumes after a round's vision block

    def __post_init__(self):
        if not 1 <= self.vision_rounds <= self.rounds:
            raise ValueError(f"vision rounds ({self.vision_rounds}) must be between 1 and text rounds ({self.rounds})")
        if len(self.vision_offsets) != self.slots.cap("vision"):
            raise ValueError("one vision offset per vision token")

    @classmethod
    def for_stream(cls, fmt: StreamFormat, policy: CachePolicy, model_config: ModelConfig,
                   grid_thw: tuple[int, int, int], *, rounds: int | None = None,
                   vision_rounds: int | None = None) -> "CacheLayout":
        """The cache of a stream under `policy` whose seconds have the vision grid `grid_thw`;
        `rounds` / `vision_rounds` override the policy's (the baselines keep whole windows)."""
        merge = model_config.vision.spatial_merge_size
        dt = video_time_interval(model_config, policy.second_per_grid(model_config.vision.temporal_patch_size))
        offsets = rope.vision_block_offsets(grid_thw, merge, dt)
        return cls(
            head_len=len(fmt.head_ids()), text_sink=policy.text_sink, text_window=policy.text_window,
            footer_len=len(fmt.footer_ids()), rounds=rounds or policy.text_rounds,
            vision_rounds=vision_rounds or policy.vision_rounds,
            slots=fmt.round_slots(len(offsets), policy),
            vision_offsets=tuple(tuple(int(v) for v in o) for o in offsets),
            vision_span=rope.vision_span(grid_thw, merge, dt, model_config.resume_rule))

    # storage offsets of the regions
    @property
    def sink_start(self) -> int:
        return self.head_len

    @property
    def window_start(self) -> int:
        return self.head_len + self.text_sink

    @property
    def footer_start(self) -> int:
        return self.window_start + self.text_window

    @property
    def rounds_start(self) -> int:
        return self.footer_start + self.footer_len

    @property
    def size(self) -> int:
        return self.rounds_start + self.rounds * self.slots.size

    def round_slot(self, ring_index):
        """Storage index of the first slot of ring slot `ring_index`."""
        return self.rounds_start + ring_index * self.slots.size


@struct.dataclass
class CacheState:
    """One batch of streams. Axes: B streams, S slots, K kv heads, H head dim, R rounds; C = B*K
    cache rows (row b * K + k: kv head k of stream b), S + 1 stored slots (the last one scratch)."""

    k_layers_csh: tuple[jax.Array, ...]  # per layer: keys rotated by pos_bs3
    v_layers_csh: tuple[jax.Array, ...]  # per layer: values
    token_bs: jax.Array         # int32 token id per slot
    valid_bs: jax.Array         # bool
    pos_bs3: jax.Array          # int32 position each key is rotated by (contiguous, or the native
                                # ever-growing ones of the "native" ablation)
    n_sink_b: jax.Array         # int32 tokens in the sink
    win_start_b: jax.Array      # int32 ring index of the oldest window token
    n_win_b: jax.Array          # int32 tokens in the window
    rounds_b: jax.Array         # int32 rounds started so far
    n_gen_br: jax.Array         # int32 tokens generated (and fed) in each ring slot's round
    content_br: jax.Array       # int32 commentary tokens of each ring slot's round
    next_native_b: jax.Array    # int32 next native position
    active_b: jax.Array         # bool: the batch row holds a stream


def empty_state(layout: CacheLayout, n_layers: int, batch: int, n_kv: int, head_dim: int, dtype) -> CacheState:
    s, r = layout.size, layout.rounds

    def zeros_b():  # distinct buffers: the state is donated field by field
        return jnp.zeros((batch,), jnp.int32)

    return CacheState(
        k_layers_csh=tuple(jnp.zeros((batch * n_kv, s + 1, head_dim), dtype) for _ in range(n_layers)),
        v_layers_csh=tuple(jnp.zeros((batch * n_kv, s + 1, head_dim), dtype) for _ in range(n_layers)),
        token_bs=jnp.zeros((batch, s), jnp.int32), valid_bs=jnp.zeros((batch, s), bool),
        pos_bs3=jnp.zeros((batch, s, 3), jnp.int32),
        n_sink_b=zeros_b(), win_start_b=zeros_b(), n_win_b=zeros_b(), rounds_b=zeros_b(),
        n_gen_br=jnp.zeros((batch, r), jnp.int32), content_br=jnp.zeros((batch, r), jnp.int32),
        next_native_b=zeros_b(), active_b=jnp.zeros((batch,), bool))


# ---------------------------------------------------------------- positions

def logical_order(layout: CacheLayout, win_start, rounds_started):
    """Storage slot of each logical position [S] for one stream (oldest window token and oldest
    round first)."""
    head = np.arange(layout.sink_start + layout.text_sink)
    parts = [jnp.asarray(head)]
    if layout.text_window:
        parts.append(layout.window_start + (win_start + jnp.arange(layout.text_window)) % layout.text_window)
    parts.append(jnp.arange(layout.footer_start, layout.rounds_start))
    ring = (rounds_started + jnp.arange(layout.rounds)) % layout.rounds  # oldest first, current last
    parts.append((layout.round_slot(ring)[:, None] + jnp.arange(layout.slots.size)).reshape(-1))
    return jnp.concatenate(parts)


def _round_masks(layout: CacheLayout):
    """Static per-slot masks over storage: is this slot a vision slot; is it the last vision slot."""
    kind = np.zeros(layout.size, np.int32)
    offsets = np.zeros((layout.size, 3), np.int32)
    for j in range(layout.rounds):
        start = layout.round_slot(j) + layout.slots.offset("vision")
        kind[start:start + layout.slots.cap("vision")] = 1
        kind[start + layout.slots.cap("vision") - 1] = 2
        offsets[start:start + layout.slots.cap("vision")] = np.asarray(layout.vision_offsets, np.int32)
    return kind, offsets


def contiguous_positions(layout: CacheLayout, valid_s, win_start, rounds_started):
    """3D positions [S, 3] of one stream's slots, contiguous in logical order."""
    kind_s, offsets_s3 = _round_masks(layout)
    order = logical_order(layout, win_start, rounds_started)
    valid = valid_s[order]
    kind = jnp.asarray(kind_s)[order]
    step = jnp.where(kind == 0, 1, jnp.where(kind == 2, layout.vision_span, 0))
    pos_l3 = rope.accumulate_positions(jnp.where(valid, step, 0),
                                       jnp.where((kind > 0)[:, None], jnp.asarray(offsets_s3)[order], 0), xp=jnp)
    return jnp.zeros((layout.size, 3), jnp.int32).at[order].set(pos_l3.astype(jnp.int32))


# ---------------------------------------------------------------- eviction

def _copy_slots(state_row: dict, src, dst):
    """Copy keys, values, ids, validity and key positions from slots `src` to `dst` (one stream;
    dst out of range = skipped). A copied key keeps its rotation and the position it belongs to."""
    out = dict(state_row)
    for name in ("token_s", "valid_s", "pos_s3"):
        out[name] = state_row[name].at[dst].set(state_row[name][src], mode="drop")
    for name in ("k_layers_ksh", "v_layers_ksh"):
        out[name] = tuple(a.at[:, dst].set(a[:, src], mode="drop") for a in state_row[name])
    return out


def move_to_previous_text(layout: CacheLayout, row: dict, src_start, count):
    """Append `count` tokens starting at storage slot `src_start` to the previous-text block: the sink
    while it has room, then the window ring (its oldest tokens overwritten)."""
    m = jnp.arange(layout.slots.cap("answer"))
    n_sink, win_start, n_win = row["n_sink_b"], row["win_start_b"], row["n_win_b"]
    room = layout.text_sink - n_sink
    to_sink = m < jnp.minimum(room, count)
    ring_index = m - room  # order of the token among those going to the ring
    n_ring = jnp.maximum(count - room, 0)
    dst = jnp.full(m.shape, layout.size)
    dst = jnp.where(to_sink, layout.sink_start + n_sink + m, dst)
    if layout.text_window:
        # Only the last text_window tokens bound for the ring can survive this move.
        to_ring = (m < count) & (ring_index >= 0) & (ring_index >= n_ring - layout.text_window)
        ring_slot = (win_start + n_win + ring_index) % layout.text_window
        dst = jnp.where(to_ring, layout.window_start + ring_slot, dst)
        overflow = jnp.maximum(n_win + n_ring - layout.text_window, 0)
        row["win_start_b"] = (win_start + overflow) % layout.text_window
        row["n_win_b"] = jnp.minimum(n_win + n_ring, layout.text_window)
    row["n_sink_b"] = n_sink + jnp.minimum(jnp.maximum(room, 0), count)
    return _copy_slots(row, src_start + m, dst)


def begin_round(layout: CacheLayout, row: dict) -> dict:
    """Start round i = rounds_started for one active stream: retire round i - rounds (move its
    commentary, free its slot) and drop the vision of round i - vision_rounds."""
    i = row["rounds_b"]
    ring = i % layout.rounds
    leaving = i >= layout.rounds
    start = layout.round_slot(ring)
    count = jnp.where(leaving, row["content_br"][ring], 0)
    row = move_to_previous_text(layout, row, start + layout.slots.offset("answer"), count)
    in_slot = jnp.arange(layout.size) - start
    row["valid_s"] = row["valid_s"] & ~((in_slot >= 0) & (in_slot < layout.slots.size))
    if layout.vision_rounds < layout.rounds:
        old = (i - layout.vision_rounds) % layout.rounds
        v_start = layout.round_slot(old) + layout.slots.offset("vision")
        in_vis = jnp.arange(layout.size) - v_start
        row["valid_s"] = row["valid_s"] & ~((in_vis >= 0) & (in_vis < layout.slots.cap("vision")))
    row["n_gen_br"] = row["n_gen_br"].at[ring].set(0)
    row["content_br"] = row["content_br"].at[ring].set(0)
    row["rounds_b"] = i + 1
    return row


# Names of the per-slot fields in one stream's row (the batch axis dropped); the others keep theirs.
ROW_NAMES = {"k_layers_csh": "k_layers_ksh", "v_layers_csh": "v_layers_ksh", "token_bs": "token_s",
             "valid_bs": "valid_s", "pos_bs3": "pos_s3"}
CACHE_ROWS = ("k_layers_csh", "v_layers_csh")


def per_row(fn, state: CacheState, *args):
    """Apply `fn(row_dict, *row_args)` to every stream (vmapped over the streams: the cache rows
    [B*K, ...] are seen as [B, K, ...]) and write the results back."""
    b = state.rounds_b.shape[0]
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    for name in CACHE_ROWS:
        fields[name] = tuple(a.reshape(b, -1, *a.shape[1:]) for a in fields[name])
    out = jax.vmap(fn)({ROW_NAMES.get(n, n): v for n, v in fields.items()}, *args)
    fields = {n: out[ROW_NAMES.get(n, n)] for n in fields}
    for name in CACHE_ROWS:
        fields[name] = tuple(a.reshape(-1, *a.shape[2:]) for a in fields[name])
    return CacheState(**fields)


def rotate_moved_keys(state: CacheState, new_pos_bs3, angles_of) -> CacheState:
    """Record the positions `new_pos_bs3` [B, S, 3] of every slot, turning the keys of the valid
    slots whose position changed by the change: rotary rotations compose per frequency, so
    R(p') k = R(p' - p) R(p) k. `angles_of(positions_bs3)` gives the model's angles [B, S, H/2]."""
    delta_bs3 = new_pos_bs3 - state.pos_bs3
    n_kv = state.k_layers_csh[0].shape[0] // delta_bs3.shape[0]
    per_cache_row = lambda x_bs: jnp.repeat(jnp.pad(x_bs, [(0, 0), (0, 1)] + [(0, 0)] * (x_bs.ndim - 2)), n_kv, 0)
    moved_cs1 = per_cache_row(state.valid_bs & jnp.any(delta_bs3 != 0, axis=-1))[:, :, None]
    angles_csf = per_cache_row(angles_of(delta_bs3))

    def turn(k_csh):
        return jnp.where(moved_cs1, rope.rotate_by_angles(k_csh, angles_csf), k_csh)

    return state.replace(k_layers_csh=tuple(turn(k) for k in state.k_layers_csh), pos_bs3=new_pos_bs3)
