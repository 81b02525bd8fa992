"""A slow, obviously correct streaming reference: Python lists of retained tokens, positions
recomputed from scratch every time, keys and values kept per token (as the real cache reuses
them), attention in numpy. Used to check the fixed-shape cache's policy."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

import svlm_jax
from svlm_jax.stream_format import QUERY, StreamFormat, round_query
from svlm_jax.model import rope, text


@dataclasses.dataclass
class Entry:
    token: int
    vision: tuple[int, int, int] | None = None  # (t, row, col) offset inside its vision block
    k: np.ndarray | None = None  # [L, K, H] before rotary
    v: np.ndarray | None = None


@dataclasses.dataclass
class Round:
    index: int
    entries: list[Entry]
    vision_alive: bool = True
    generated: list[Entry] = dataclasses.field(default_factory=list)
    closing: list[Entry] = dataclasses.field(default_factory=list)  # " ...<|im_end|>" if cut, "\n"

    def tokens(self) -> list[int]:
        return [e.token for e in self.generated]


class SlowStream:
    def __init__(self, model, tokenizer, *, text_rounds, vision_rounds, text_sink, text_window, max_new,
                 previous_text="", query=QUERY, resume_span):
        self.model, self.cfg = model, model.config
        self.fmt, self.sp = StreamFormat.from_tokenizer(tokenizer), tokenizer.special
        self.R, self.V, self.sink, self.window, self.max_new = text_rounds, vision_rounds, text_sink, text_window, max_new
        self.query, self.has_previous, self.span = query, bool(previous_text), resume_span
        self.head = [Entry(t) for t in self.fmt.head_ids()]
        prev = self.fmt.previous_text_ids(previous_text)
        self.previous = [Entry(t) for t in prev]  # everything ever put into the previous-text block
        self.footer = [Entry(t) for t in self.fmt.footer_ids()]
        self.rounds: list[Round] = []
        self._process(self.retained(), [])  # prefill the head

    def retained(self) -> list[Entry]:
        kept = self.previous
        if len(kept) > self.sink + self.window:
            kept = kept[:self.sink] + (kept[len(kept) - self.window:] if self.window else [])
        out = self.head + kept + self.footer
        for r in self.rounds:
            out += [e for e in r.entries if e.vision is None or r.vision_alive] + r.generated + r.closing
        return out

    def positions(self, entries: list[Entry]) -> np.ndarray:
        """Walk the list: text +1, a vision block from its start s, text resumes at s + span."""
        pos, p, i = [], 0, 0
        while i < len(entries):
            if entries[i].vision is None:
                pos.append((p, p, p))
                p += 1
                i += 1
                continue
            s = p
            while i < len(entries) and entries[i].vision is not None:
                t, r, c = entries[i].vision
                pos.append((s + t, s + r, s + c))
                i += 1
            p = s + self.span
        return np.array(pos, np.int64)

    def _process(self, context: list[Entry], new: list[Entry], vision_feats=None) -> np.ndarray:
        """Run new tokens (after `context`, or the whole `context` if `new` is empty: it then
        fills their k/v) through the layers; returns logits of the last one."""
        cfg, p = self.cfg.text, self.model.params.text
        fresh = new if new else context
        old = [] if not new else context
        pos = self.positions(old + fresh)
        angles = np.asarray(text.text_angles(cfg, jnp.asarray(pos)[None]))[0]
        x = np.asarray(p.embed_vd)[[e.token for e in fresh]]
        if vision_feats is not None:
            vis = [j for j, e in enumerate(fresh) if e.vision is not None and e.token == self.sp.video_pad]
            x[vis] = vision_feats
        x = jnp.asarray(x)[None]
        n_old = len(old)
        ks, vs = [], []
        for l in range(cfg.num_layers):
            layer = jax_tree_index(p.layers, l)
            q, k, v = (np.asarray(a[0]) for a in text.project_qkv(cfg, layer, x))
            keys = np.concatenate([np.stack([e.k[l] for e in old]) if old else np.zeros((0,) + k.shape[1:]), k])
            vals = np.concatenate([np.stack([e.v[l] for e in old]) if old else np.zeros((0,) + v.shape[1:]), v])
            ks.append(k)
            vs.append(v)
            q_rot = np.asarray(rope.apply_rotary(jnp.asarray(q)[None], jnp.asarray(angles[n_old:])[None]))[0]
            k_rot = np.asarray(rope.apply_rotary(jnp.asarray(keys)[None], jnp.asarray(angles)[None]))[0]
            out = _causal_attention(q_rot, k_rot, vals, n_old)
            x = text.finish_layer(cfg, layer, x, jnp.asarray(out)[None].astype(x.dtype))
        for j, e in enumerate(fresh):
            e.k = np.stack([k[j] for k in ks])
            e.v = np.stack([v[j] for v in vs])
        hidden = svlm_jax.model.vision.rms_norm(x, p.final_norm_d, cfg.rms_norm_eps)
        return np.asarray(text.logits(p, hidden))[0, -1]

    def round(self, i: int, rows, grid, t_start, t_end):
        """Round i: evict, prefill, greedy decode. Returns (first-token logits, generated ids)."""
        fmt, sp = self.fmt, self.sp
        if len(self.rounds) == self.R:
            old = self.rounds.pop(0)
            gen = old.tokens()
            n = len(gen)
            if gen and gen[-1] == sp.im_end:
                n -= 1
                m = len(fmt.end_marker)
                if n >= m and gen[n - m:n] == list(fmt.end_marker):
                    n -= m
            self.previous += old.generated[:n]
        for r in self.rounds:
            if i - r.index >= self.V:
                r.vision_alive = False
        context = self.retained()
        new: list[Entry] = []
        if self.rounds:
            prev = self.rounds[-1]
            closing = ([*fmt.end_marker, sp.im_end] if prev.tokens()[-1] != sp.im_end else []) + list(fmt.newline)
            prev.closing = [Entry(t) for t in closing]
            new += prev.closing
        before, after = fmt.prompt_ids(t_start, t_end, round_query(self.query, i, self.has_previous))
        offsets = rope.vision_block_offsets(grid, self.cfg.vision.spatial_merge_size, 1.0)
        entries = ([Entry(t) for t in before] + [Entry(sp.video_pad, tuple(int(v) for v in o)) for o in offsets]
                   + [Entry(t) for t in after])
        rnd = Round(i, entries)
        new += entries
        feats = np.asarray(svlm_jax.encode_vision(self.model, rows, np.array([grid])))
        first_logits = self._process(context, new, feats)
        self.rounds.append(rnd)
        logits, token = first_logits, self._greedy(first_logits)
        while True:
            e = Entry(token)
            context = self.retained()
            rnd.generated.append(e)
            logits = self._process(context, [e])
            if token == sp.im_end or len(rnd.generated) == self.max_new:
                break
            token = self._greedy(logits)
        return first_logits, rnd.tokens()

    def _greedy(self, logits) -> int:
        """Argmax over the tokens commentary may use (the vision placeholders never are)."""
        c = self.cfg
        allowed = np.array(logits, np.float64)
        allowed[[c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id]] = -np.inf
        return int(np.argmax(allowed))


def jax_tree_index(tree, i):
    import jax

    return jax.tree.map(lambda a: a[i], tree)


def _causal_attention(q_qnh, k_knh, v_knh, n_old):
    """New queries see all old keys and new keys up to themselves; GQA by head grouping."""
    nq, n, h = q_qnh.shape
    kheads = k_knh.shape[1]
    g = n // kheads
    k_rep = np.repeat(k_knh, g, axis=1).astype(np.float64)
    v_rep = np.repeat(v_knh, g, axis=1).astype(np.float64)
    logits = np.einsum("qnh,knh->nqk", q_qnh.astype(np.float64), k_rep) / np.sqrt(h)
    visible = np.arange(k_knh.shape[0])[None, :] <= (n_old + np.arange(nq))[:, None]
    logits = np.where(visible[None], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("nqk,knh->qnh", w, v_rep).astype(np.float32)
