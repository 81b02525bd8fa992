"""The PyTorch baseline of `bench_stream.py`: StreamingVLM's public reference way of streaming,
run on the modules of transformers' `Qwen2_5_VLForConditionalGeneration`.

What it reproduces (facts read off mit-han-lab/streaming-vlm: inference/inference.py,
generate/streaming_cache.py, qwen2_5/language_forward.py and model_forward.py, "shrink" mode):
- the KV cache is a Python list of per-layer tensors, grown by `torch.cat` at every forward;
- when a round leaves, its commentary moves into the previous-text block and the rest of the
  round is dropped, and the previous text is cut to its first `text_sink` and last `text_window`
  tokens, all by `index_select` on every layer's keys and values (the reference uses several
  cat / index_select calls per layer; one per tensor here);
- keys are cached before RoPE: at every forward (each decoded token included) the 3D positions of
  all retained tokens are recomputed (the model's `get_rope_index`) and RoPE is applied to the
  whole cache of every layer.
Vision and text leave together (16 s vision = 16 text rounds, the benchmark's setting). Greedy with
the vision placeholders suppressed (as the session does), exactly `max_new` tokens fed per round
(as the JAX engine with im_end disabled). The tokens come from `svlm_jax.stream_format`, the one
stream format, so both sides process the same tokens.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import rotate_half

from svlm_jax.stream_format import StreamFormat, round_query, truncate_previous

TEXT, VIDEO = 0, 2  # mm_token_type_ids of transformers' get_rope_index


def _rotate(x_bnsh, cos_bsh, sin_bsh):
    return x_bnsh * cos_bsh[:, None] + rotate_half(x_bnsh) * sin_bsh[:, None]


class HFStreamingReference:
    def __init__(self, hf_model, tokenizer, grid_thw, *, rounds=16, text_sink=512, text_window=512, max_new=20):
        self.hf, self.lm = hf_model, hf_model.model.language_model
        self.device = next(hf_model.parameters()).device
        self.grid = torch.tensor([grid_thw], device=self.device)
        merge = hf_model.config.vision_config.spatial_merge_size
        self.n_vision = grid_thw[0] * (grid_thw[1] // merge) * (grid_thw[2] // merge)
        c = hf_model.config
        self.suppress = torch.tensor([c.image_token_id, c.video_token_id, c.vision_start_token_id,
                                      c.vision_end_token_id], device=self.device)
        self.rounds, self.sink, self.window, self.max_new = rounds, text_sink, text_window, max_new
        self.format = StreamFormat.from_tokenizer(tokenizer)
        self.ids: list[int] = []
        self.types: list[int] = []
        n_layers = len(self.lm.layers)
        self.k: list[torch.Tensor | None] = [None] * n_layers  # [1, kv heads, S, head dim], before RoPE
        self.v: list[torch.Tensor | None] = [None] * n_layers
        head, footer = self.format.head_ids(), self.format.footer_ids()
        self.head_len, self.n_prev, self.footer_len = len(head), 0, len(footer)
        self.round_spans: list[dict] = []  # per retained round: length, generated offset and count
        self.round_index = 0
        self.n_blocks = 0  # vision blocks retained
        prefix = head + footer
        with torch.no_grad():
            self._forward(self._embed(prefix, [TEXT] * len(prefix)))

    def kv_bytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)

    def param_bytes(self) -> int:
        return sum(p.nbytes for p in self.hf.parameters())

    @torch.no_grad()
    def step(self, rows_pv, t_start: float, t_end: float) -> dict:
        """One second: evict, encode the frames' patch rows [P, 1176], prefill, decode `max_new`
        tokens. Returns the tokens and the milliseconds of vision, prefill (eviction included) and
        decode."""
        fmt = self.format
        t0 = self._now()
        if len(self.round_spans) == self.rounds:
            self._evict_oldest()
        new = []
        if self.round_spans:  # close the previous round: generation was cut at max_new
            last = self.round_spans[-1]
            closing = [] if self.ids[-1] == fmt.special.im_end else fmt.close_ids()
            closing += fmt.tail_ids()
            last["length"] += len(closing)
            new += closing
        query = round_query(fmt.query, self.round_index, has_previous=False)
        before, after = fmt.prompt_ids(t_start, t_end, query)
        own = before + [fmt.special.video_pad] * self.n_vision + after
        new += own
        types = [TEXT] * (len(new) - self.n_vision - len(after)) + [VIDEO] * self.n_vision + [TEXT] * len(after)
        t1 = self._now()
        feats = self.hf.model.visual(rows_pv.to(self.device, self.hf.dtype), grid_thw=self.grid).pooler_output
        t2 = self._now()
        embeds = self._embed(new, types)
        self.n_blocks += 1
        v0 = len(new) - len(after) - self.n_vision
        embeds[0, v0:v0 + self.n_vision] = feats.to(embeds.dtype)
        token = self._greedy(self._forward(embeds))
        self.round_spans.append({"length": len(own), "gen_off": len(own), "n_gen": 0})
        t3 = self._now()
        generated = []
        for _ in range(self.max_new):
            generated.append(token)
            token = self._greedy(self._forward(self._embed([token], [TEXT])))
        self.round_spans[-1]["length"] += len(generated)
        self.round_spans[-1]["n_gen"] = len(generated)
        self.round_index += 1
        t4 = self._now()
        return {"tokens": generated, "ms_vision": 1e3 * (t2 - t1), "ms_prefill": 1e3 * ((t1 - t0) + (t3 - t2)),
                "ms_decode": 1e3 * (t4 - t3)}

    # ------------------------------------------------------------ internals
    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _greedy(self, logits_v) -> int:
        return int(logits_v.index_fill(0, self.suppress, -torch.inf).argmax())

    def _embed(self, ids, types):
        """Append ids to the retained sequence; their token embeddings [1, n, D]."""
        self.ids += ids
        self.types += types
        return self.lm.embed_tokens(torch.tensor([ids], device=self.device))

    def _evict_oldest(self):
        """The oldest round leaves: its commentary joins the previous text (cut to sink + window),
        everything else of it goes; one index_select per layer for keys and for values."""
        old = self.round_spans.pop(0)
        start = self.head_len + self.n_prev + self.footer_len
        moved = range(start + old["gen_off"], start + old["gen_off"] + old["n_gen"])
        previous = truncate_previous([*range(self.head_len, self.head_len + self.n_prev), *moved], self.sink,
                                     self.window)
        footer = range(self.head_len + self.n_prev, start)
        keep = [*range(self.head_len), *previous, *footer, *range(start + old["length"], len(self.ids))]
        self.n_prev = len(previous)
        self.n_blocks -= 1
        self.ids = [self.ids[i] for i in keep]
        self.types = [self.types[i] for i in keep]
        index = torch.tensor(keep, device=self.device)
        self.k = [torch.index_select(k, 2, index) for k in self.k]
        self.v = [torch.index_select(v, 2, index) for v in self.v]

    def _positions(self):
        """3D positions [3, 1, S] of every retained token, recomputed from scratch."""
        ids = torch.tensor([self.ids], device=self.device)
        types = torch.tensor([self.types], device=self.device)
        grids = self.grid.repeat(self.n_blocks, 1)
        # The reference fixes second_per_grid_t = 2 / FPS = 1 s per temporal patch.
        seconds = torch.ones(self.n_blocks, device=self.device)
        return self.hf.model.get_rope_index(ids, types, video_grid_thw=grids, second_per_grid_ts=seconds)[0]

    def _forward(self, embeds_bnd):
        """The decoder layers over the new tokens (their ids already appended): cat their k/v to the
        cache, re-rotate the whole cache, attend. Returns the logits [V] of the last new token."""
        n = embeds_bnd.shape[1]
        cos, sin = self.lm.rotary_emb(embeds_bnd, self._positions())  # [1, S, head dim]
        mask = None
        if n > 1:  # new query i sees every cached token and the new ones up to itself
            s = len(self.ids)
            mask = torch.arange(s, device=self.device)[None] <= (s - n + torch.arange(n, device=self.device))[:, None]
        x = embeds_bnd
        for li, layer in enumerate(self.lm.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, n, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, n, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, n, -1, attn.head_dim).transpose(1, 2)
            self.k[li] = k if self.k[li] is None else torch.cat([self.k[li], k], dim=2)
            self.v[li] = v if self.v[li] is None else torch.cat([self.v[li], v], dim=2)
            q = _rotate(q, cos[:, -n:], sin[:, -n:])
            keys = _rotate(self.k[li], cos, sin)
            o = F.scaled_dot_product_attention(q, keys, self.v[li], attn_mask=mask, scale=attn.scaling, enable_gqa=True)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.hf.lm_head(self.lm.norm(x[:, -1]))[0]
