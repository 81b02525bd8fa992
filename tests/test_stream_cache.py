"""The streaming cache's keys: stored rotated, and turned by the difference when their position moves.

Oracle: the values of every slot are the raw (unrotated) keys; they move with the keys through every
eviction and copy but are never rotated, so at every round the stored keys must equal the values
rotated from scratch by the slot's current position. Rotations are checked against complex
arithmetic in float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from svlm_jax.model import rope
from svlm_jax.stream_format import ROUND_PARTS, RoundSlots
from svlm_jax.streaming import engine
from svlm_jax.streaming.cache import CacheLayout, begin_round, empty_state, per_row
from svlm_jax.streaming.sampling import SamplingConfig

HEAD_DIM, THETA, SECTION = 16, 1e4, (2, 3, 3)
GRID = (1, 4, 4)  # 4 merged vision tokens a round


def test_rotate_half_is_a_complex_rotation_of_half_pairs():
    """Rotate-half M-RoPE as complex numbers: dims (i, i + H/2) turn by position[axis(i)] * inv_freq[i]."""
    rng = np.random.default_rng()
    k_bkmh = rng.standard_normal((2, 5, 3, HEAD_DIM)).astype(np.float32)
    positions_bk3 = rng.integers(-50, 3000, (2, 5, 3))
    axis_f = np.repeat([0, 1, 2], SECTION)
    # Angles as HF forms them (float32 frequencies and product); the rotation itself in float64.
    angles_bkf = positions_bk3[..., axis_f].astype(np.float32) * rope.inv_freq(HEAD_DIM, THETA)
    half = HEAD_DIM // 2
    pairs_bkmf = (k_bkmh[..., :half] + 1j * k_bkmh[..., half:]) * np.exp(1j * angles_bkf.astype(np.float64))[:, :, None]
    expected_bkmh = np.concatenate([pairs_bkmf.real, pairs_bkmf.imag], axis=-1)
    angles = rope.mrope_angles(jnp.asarray(positions_bk3, jnp.int32), rope.inv_freq(HEAD_DIM, THETA), SECTION)
    np.testing.assert_allclose(np.asarray(rope.apply_rotary(jnp.asarray(k_bkmh), angles)), expected_bkmh,
                               atol=1e-5, rtol=1e-5)


def _spec(rounds: int, vision_rounds: int, sink: int, window: int) -> engine.EngineSpec:
    offsets = rope.vision_block_offsets(GRID, 2, 1.0)
    caps = {"before": 3, "vision": len(offsets), "after": 2, "answer": 6, "close": 1, "tail": 1}
    layout = CacheLayout(head_len=4, text_sink=sink, text_window=window, footer_len=2, rounds=rounds,
                         vision_rounds=vision_rounds, slots=RoundSlots(tuple(caps[p] for p in ROUND_PARTS)),
                         vision_offsets=tuple(tuple(int(v) for v in o) for o in offsets),
                         vision_span=rope.vision_span(GRID, 2, 1.0, "max_hw"))
    return engine.EngineSpec(layout=layout, sampling=SamplingConfig(), pos_mode="contiguous", im_end=0,
                             video_pad=1, close_ids=(2,), end_marker=(), tail_ids=(3,), grid_thw=GRID)


def _angles(positions_bs3):
    return rope.mrope_angles(positions_bs3, rope.inv_freq(HEAD_DIM, THETA), SECTION)


@functools.partial(jax.jit, static_argnames="spec")
def _one_round(spec: engine.EngineSpec, state, key):
    """A round with random lengths: begin it (eviction), place its before / vision / after / answer
    tokens, store rotated keys and raw values, record a random commentary length. Returns the state
    and the largest |stored key - value rotated from scratch| over valid slots."""
    lay, slots = spec.layout, spec.layout.slots
    state = per_row(functools.partial(begin_round, lay), state)
    ring = (state.rounds_b - 1) % lay.rounds
    start_b = lay.round_slot(ring)
    keys = jax.random.split(key, 3)
    b = state.rounds_b.shape[0]
    n_answer = jax.random.randint(keys[0], (b,), 0, slots.cap("answer") + 1)
    counts = {"before": jax.random.randint(keys[1], (b,), 1, slots.cap("before") + 1),
              "vision": jnp.full((b,), slots.cap("vision")), "after": jnp.full((b,), slots.cap("after")),
              "answer": n_answer}
    dest, active = [], []
    for part, n_b in counts.items():
        dest.append(start_b[:, None] + slots.offset(part) + jnp.arange(slots.cap(part)))
        active.append(jnp.arange(slots.cap(part)) < n_b[:, None])
    dest, active = jnp.concatenate(dest, 1), jnp.concatenate(active, 1)
    tokens = jnp.full(dest.shape, 5, jnp.int32)
    state, dest, positions_bq3, _ = engine.place_tokens(spec, state, tokens, dest, active, _angles)
    n_kv = state.k_layers_csh[0].shape[0] // b
    raw_bqkh = jax.random.normal(keys[2], dest.shape + (n_kv, HEAD_DIM))

    def write(cache_csh, x_bqkh):  # the stream's rows viewed [B, K, S + 1, H]; inactive -> scratch
        cache_bksh = cache_csh.reshape(b, n_kv, -1, HEAD_DIM)
        cache_bksh = jax.vmap(lambda a_ksh, d, x_qkh: a_ksh.at[:, d].set(x_qkh.transpose(1, 0, 2)))(
            cache_bksh, dest, x_bqkh)
        return cache_bksh.reshape(cache_csh.shape)

    state = state.replace(
        k_layers_csh=(write(state.k_layers_csh[0], rope.apply_rotary(raw_bqkh, _angles(positions_bq3))),),
        v_layers_csh=(write(state.v_layers_csh[0], raw_bqkh),),
        content_br=state.content_br.at[jnp.arange(b), ring].set(jax.random.randint(keys[0], (b,), 0, n_answer + 1)))
    k_bksh, v_bksh = (a[0].reshape(b, n_kv, -1, HEAD_DIM)[:, :, :lay.size] for a in (state.k_layers_csh,
                                                                                   state.v_layers_csh))
    from_scratch = rope.rotate_by_angles(v_bksh, _angles(state.pos_bs3)[:, None])
    error = jnp.where(state.valid_bs[:, None, :, None], jnp.abs(k_bksh - from_scratch), 0)
    return state, jnp.max(error), jnp.max(jnp.where(state.valid_bs[:, :, None], state.pos_bs3, 0))


def test_moved_keys_equal_rotation_from_scratch_over_thousands_of_rounds():
    spec = _spec(rounds=4, vision_rounds=2, sink=5, window=7)
    lay = spec.layout
    state = empty_state(lay, n_layers=1, batch=2, n_kv=2, head_dim=HEAD_DIM, dtype=jnp.float32)
    state = state.replace(active_b=jnp.ones((2,), bool))
    state, _, _, _ = engine.place_tokens(spec, state, jnp.full((2, lay.rounds_start), 7, jnp.int32),
                                         jnp.broadcast_to(jnp.arange(lay.rounds_start), (2, lay.rounds_start)),
                                         jnp.broadcast_to(jnp.arange(lay.rounds_start) < lay.head_len, (2, lay.rounds_start)),
                                         _angles)
    # Every logical position counted once, vision blocks by their span: no position can exceed it.
    bound = lay.size - lay.rounds * lay.slots.cap("vision") + lay.rounds * lay.vision_span
    errors, top_positions = [], []
    for i, key in enumerate(jax.random.split(jax.random.key(np.random.default_rng().integers(2**31)), 3000)):
        state, error, top = _one_round(spec, state, key)
        errors.append(error)
        top_positions.append(top)
    errors, top_positions = np.asarray(errors), np.asarray(top_positions)
    assert errors.max() < 1e-5, f"largest error {errors.max():.2e} (round {errors.argmax()})"
    assert top_positions.max() <= bound
    # The sink and the window were filled and the window ring wrapped many times.
    assert int(state.n_sink_b.min()) == lay.text_sink and int(state.n_win_b.min()) == lay.text_window
