"""A slow, obviously correct streaming reference: Python lists of retained tokens, positions
recomputed from scratch every time, keys and values kept per token (as the real cache reuses
them), attention in numpy. Used to check the fixed-shape cache's policy, for every model family:
the prompt is `stream_format`'s (Qwen3-VL: timestamps as text), a second's vision block is laid
out by the model's position rule (`second_block`), and DeepStack features (Qwen3-VL) are added to
the vision tokens' hidden states after the first layers, as transformers does, before the next
layer computes their keys and values."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from svlm_jax.config import ModelConfig
from svlm_jax.stream_format import QUERY, CachePolicy, StreamFormat, round_query
from svlm_jax.model import rope, text, vision, vlm


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


def second_block(cfg: ModelConfig, grid, fps: int) -> tuple[list[tuple[int, int, int]], int]:
    """One second's vision block as `forward` lays it out (`vlm.positions_for`, the model's one
    position rule, held to transformers; Qwen3-VL: one block per temporal patch): the (t, row, col)
    offset of each of its tokens from the block's start, and the span after which text resumes."""
    n = int(np.prod(grid)) // cfg.vision.merge_unit
    ids = np.array([[cfg.video_token_id] * n + [cfg.vision_end_token_id]])
    seconds = CachePolicy(fps=fps).second_per_grid(cfg.vision.temporal_patch_size)
    pos = vlm.positions_for(cfg, ids, video_grid_thw=np.array([grid]), second_per_grid_ts=[seconds])[0]
    return [tuple(int(v) for v in p) for p in pos[:n]], int(pos[n, 0])


class SlowStream:
    def __init__(self, model, tokenizer, *, text_rounds, vision_rounds, text_sink, text_window, max_new,
                 previous_text="", query=QUERY, fps=2):
        self.model, self.cfg = model, model.config
        stamp_frames = CachePolicy(fps=fps).stamp_frames(self.cfg)
        self.fmt, self.sp = StreamFormat.from_tokenizer(tokenizer, stamp_frames=stamp_frames), tokenizer.special
        self.R, self.V, self.sink, self.window, self.max_new = text_rounds, vision_rounds, text_sink, text_window, max_new
        self.query, self.has_previous, self.fps = query, bool(previous_text), fps
        self.grid = None  # a second's vision grid, and by it the block's offsets and span (first round)
        self.offsets, self.span = None, None
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

    def _angles(self, pos_t3) -> np.ndarray:
        """Rotary angles [T, H/2] from scratch: frequency i turns by the position on its M-RoPE axis
        (the model's split of the frequencies among t, h, w; interleaved for Qwen3-VL)."""
        cfg = self.cfg.text
        axis_f = rope.mrope_axis(cfg.mrope_section, cfg.mrope_interleaved)
        return pos_t3[:, axis_f] * rope.inv_freq(cfg.head_dim, cfg.rope_theta).astype(np.float64)

    def _process(self, context: list[Entry], new: list[Entry], vision_feats=None, deepstack=None) -> np.ndarray:
        """Run new tokens (after `context`, or the whole `context` if `new` is empty: it then
        fills their k/v) through the layers; returns logits of the last one. `vision_feats` [n, D]
        replace the embeddings of the new vision tokens; `deepstack` [S, n, D] (or None) is added to
        their hidden states after layers 0..S-1."""
        cfg, p = self.cfg.text, self.model.params.text
        fresh = new if new else context
        old = [] if not new else context
        pos = self.positions(old + fresh)
        angles = self._angles(pos)
        x = np.asarray(p.embed_vd)[[e.token for e in fresh]]
        vis = [j for j, e in enumerate(fresh) if e.vision is not None and e.token == self.sp.video_pad]
        if vision_feats is not None:
            x[vis] = vision_feats
        x = jnp.asarray(x)[None]
        n_old = len(old)
        ks, vs = [], []
        for l in range(cfg.num_layers):
            layer = jax_tree_index(p.layers, l)
            q, k, v = (np.asarray(a[0]) for a in _project_qkv(cfg, layer, x))
            keys = np.concatenate([np.stack([e.k[l] for e in old]) if old else np.zeros((0,) + k.shape[1:]), k])
            vals = np.concatenate([np.stack([e.v[l] for e in old]) if old else np.zeros((0,) + v.shape[1:]), v])
            ks.append(k)
            vs.append(v)
            q_rot, k_rot = _rotate(q, angles[n_old:]), _rotate(keys, angles)
            out = _causal_attention(q_rot, k_rot, vals, n_old)
            x = _finish_layer(cfg, layer, x, jnp.asarray(out)[None].astype(x.dtype))
            if deepstack is not None and l < len(deepstack):
                x_td = np.array(x[0])
                x_td[vis] += deepstack[l]
                x = jnp.asarray(x_td)[None]
        for j, e in enumerate(fresh):
            e.k = np.stack([k[j] for k in ks])
            e.v = np.stack([v[j] for v in vs])
        hidden = vision.rms_norm(x, p.final_norm_d, cfg.rms_norm_eps)
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
        self._set_grid(tuple(int(v) for v in grid))
        entries = ([Entry(t) for t in before] + [Entry(sp.video_pad, o) for o in self.offsets]
                   + [Entry(t) for t in after])
        rnd = Round(i, entries)
        new += entries
        feats, deepstack = self._encode(rows)
        first_logits = self._process(context, new, feats, deepstack)
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

    def _set_grid(self, grid: tuple[int, int, int]) -> None:
        if self.grid is None:
            self.offsets, self.span = second_block(self.cfg, grid, self.fps)
            self.grid = grid
        if grid != self.grid:
            raise ValueError(f"the grid changed from {self.grid} to {grid}")

    def _encode(self, rows):
        """The vision tower on one second's rows: features [n, D] and DeepStack features [S, n, D]
        (None for a model without DeepStack)."""
        cfg, p = self.cfg.vision, self.model.params.vision
        feats, deep = _encode_jit(cfg, p, jnp.asarray(rows), vision.vision_layout(cfg, [self.grid]))
        return np.asarray(feats), None if deep is None else np.asarray(deep)

    def _greedy(self, logits) -> int:
        """Argmax over the tokens commentary may use (the vision placeholders never are)."""
        c = self.cfg
        allowed = np.array(logits, np.float64)
        allowed[[c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id]] = -np.inf
        return int(np.argmax(allowed))


# The model's own layer pieces, compiled whole (op by op, each new length would compile every op).
_encode_jit = jax.jit(vision.encode_with_deepstack, static_argnums=0)
_project_qkv = jax.jit(text.project_qkv, static_argnums=0)
_finish_layer = jax.jit(text.finish_layer, static_argnums=0)


def jax_tree_index(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _rotate(x_tnh, angles_th2):
    """Rotate-half RoPE as a complex product: dims i and i + H/2 are one complex number, turned by
    angle i (float64)."""
    half = x_tnh.shape[-1] // 2
    z_tnf = (x_tnh[..., :half] + 1j * x_tnh[..., half:]) * np.exp(1j * angles_th2)[:, None]
    return np.concatenate([z_tnf.real, z_tnf.imag], axis=-1)


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
