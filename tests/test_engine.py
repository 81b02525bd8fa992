"""The streaming engine against `forward` over the whole sequence (while nothing is evicted)."""

from __future__ import annotations

import numpy as np
import pytest

import svlm_jax
from svlm_jax import prompt
from svlm_jax.sampling import SamplingConfig
from svlm_jax.session import StreamConfig, StreamingSession

GREEDY = SamplingConfig(temperature=0.0, repetition_penalty=1.0)
GRID = (1, 4, 6)


def random_second(rng):
    return rng.standard_normal((int(np.prod(GRID)), 1176)).astype(np.float32), np.array(GRID)


@pytest.mark.parametrize("pos_mode", ["contiguous", "native"])
def test_logits_equal_forward_before_eviction(stream_model, stream_tokenizer, rng, pos_mode):
    tok = stream_tokenizer
    cfg = StreamConfig(text_rounds=8, vision_window_s=8, text_sink=64, text_window=64, max_new_tokens=6,
                       sampling=GREEDY, pos_mode=pos_mode, previous_text="Red 1 Blue 0.")
    session = StreamingSession(stream_model, tok, cfg)
    ct = session.chat
    enc = tok.encode
    seq = (prompt.system_block(ct, enc) + prompt.previous_header(ct, enc) + enc(cfg.previous_text)
           + prompt.previous_footer(ct))
    expected = []  # (index in seq, logits from the engine) pairs
    rows_all = []
    n_vis = int(np.prod(GRID)) // 4
    prev_gen = None
    for r in range(4):
        rows, grid = random_second(rng)
        rows_all.append(rows)
        session.step_batch([(rows, grid)], [float(r)], [float(r + 1)], collect_logits=True)
        out = session.last_output
        gen = [int(t) for t in np.asarray(out.tokens_bm)[0, :int(out.n_gen_b[0])]]
        before, after = prompt.user_turn(ct, enc, float(r), float(r + 1), cfg.query if r == 0 else None)
        new = []
        if prev_gen is not None:
            if prev_gen[-1] != ct.im_end:
                new += [*ct.end_marker, ct.im_end]
            new += prompt.round_tail(ct)
        new += before + [ct.video_pad] * n_vis + after
        # the engine's prefill queries that were active, in order, are exactly `new`
        pre = np.asarray(out.prefill_logits_bqv)[0]
        lay = session._spec.layout
        close_q = list(range(lay.close_len)) if prev_gen is not None and prev_gen[-1] != ct.im_end else []
        tail_q = list(range(lay.close_len, lay.close_len + lay.tail_len)) if prev_gen is not None else []
        b0 = lay.close_len + lay.tail_len
        qs = (close_q + tail_q + list(range(b0, b0 + len(before)))
              + list(range(b0 + lay.before_cap, b0 + lay.before_cap + n_vis))
              + list(range(b0 + lay.before_cap + n_vis, b0 + lay.before_cap + n_vis + len(after))))
        assert len(qs) == len(new)
        start = len(seq)
        seq += new
        expected += [(start + j, pre[q]) for j, q in enumerate(qs)]
        dec = np.asarray(out.decode_logits_bmv)[0]
        start = len(seq)
        seq += gen
        expected += [(start + m, dec[m]) for m in range(len(gen))]
        prev_gen = gen
    ids = np.array([seq])
    ref = np.asarray(svlm_jax.forward(stream_model, ids, pixel_values_videos=np.concatenate(rows_all),
                                      video_grid_thw=np.array([GRID] * 4), second_per_grid_ts=[1.0] * 4))[0]
    scale = np.abs(ref).max()
    for index, logits in expected:
        assert np.abs(logits - ref[index]).max() <= 1e-4 * scale, f"token {index} of {len(seq)}"
