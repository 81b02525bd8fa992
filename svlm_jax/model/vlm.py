"""The whole vision-language model: vision features placed at their pad tokens, then the LM.

`forward` takes the inputs transformers' Qwen2(.5)-VL / Qwen3-VL take and returns logits [B, T, V];
the host part (positions, vision layout, checks) is numpy, the rest one jit-compiled function.
Qwen3-VL's DeepStack features go to the same pad tokens, added after the first LM layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from svlm_jax.config import ModelConfig
from svlm_jax.model import rope, text, vision
from svlm_jax.model.params import Model


def video_time_interval(cfg: ModelConfig, second_per_grid_t: float = 1.0) -> float:
    """Temporal position step between the temporal patches of a video (1 for Qwen2-VL)."""
    if cfg.vision.tokens_per_second is None:
        return 1.0
    return cfg.vision.tokens_per_second * float(second_per_grid_t)


def place_vision_features(cfg: ModelConfig, embeds_btd, input_ids_bt, features_md):
    """Overwrite the embeddings of image then video pad tokens (in row-major order) with
    `features_md`, which holds all image features followed by all video features."""
    ids = input_ids_bt.reshape(-1)
    is_image, is_video = ids == cfg.image_token_id, ids == cfg.video_token_id
    image_rank = jnp.cumsum(is_image) - 1
    video_rank = jnp.cumsum(is_video) - 1 + jnp.sum(is_image)
    index = jnp.where(is_image, image_rank, jnp.where(is_video, video_rank, 0))
    flat = embeds_btd.reshape(ids.shape[0], -1)
    flat = jnp.where((is_image | is_video)[:, None], features_md[index].astype(flat.dtype), flat)
    return flat.reshape(embeds_btd.shape)


def embed_with_deepstack(model: Model, input_ids_bt, rows_pv=None, layout: vision.VisionLayout | None = None):
    """Token embeddings with vision features in place [B, T, D], and the DeepStack features for
    `text.decode_hidden` [S, B, T, D] (zero away from vision tokens), None without vision or DeepStack."""
    p = model.params
    x_btd = p.text.embed_vd[input_ids_bt]
    if rows_pv is None:
        return x_btd, None
    features_md, deep_smd = vision.encode_with_deepstack(model.config.vision, p.vision, rows_pv, layout)
    x_btd = place_vision_features(model.config, x_btd, input_ids_bt, features_md)
    if deep_smd is None:
        return x_btd, None
    place = functools.partial(place_vision_features, model.config, jnp.zeros_like(x_btd), input_ids_bt)
    return x_btd, jax.vmap(place)(deep_smd)


def embed(model: Model, input_ids_bt, rows_pv=None, layout: vision.VisionLayout | None = None):
    """Token embeddings with vision features in place: [B, T, D], for a model without DeepStack
    (a Qwen3-VL input with vision needs `embed_with_deepstack`: it is refused here, not cut short)."""
    if rows_pv is not None and model.config.vision.deepstack_visual_indexes:
        raise ValueError("this model adds DeepStack vision features inside the LM: use embed_with_deepstack "
                         "and pass its features to text.decode_hidden")
    return embed_with_deepstack(model, input_ids_bt, rows_pv, layout)[0]


@jax.jit
def _forward_jit(model: Model, input_ids_bt, positions_bt3, segment_bt, rows_pv, layout):
    x_btd, deepstack_sbtd = embed_with_deepstack(model, input_ids_bt, rows_pv, layout)
    hidden = text.decode_hidden(model.config.text, model.params.text, x_btd, positions_bt3, segment_bt, None,
                                deepstack_sbtd=deepstack_sbtd)
    return text.logits(model.params.text, hidden)


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(cfg, params, rows_pv, layout):
    return vision.encode_with_deepstack(cfg, params, rows_pv, layout)[0]


def encode_vision(model: Model, pixel_values, grid_thw):
    """The vision tower alone: patch rows [P, patch_dim] and grids -> merged features [P/4, D]
    (transformers' pooler_output; Qwen3-VL's DeepStack features are not returned)."""
    rows = _check_rows(model.config, pixel_values, grid_thw, "pixel_values")
    return _encode_jit(model.config.vision, model.params.vision, rows, vision.vision_layout(model.config.vision, grid_thw))


def _check_rows(cfg: ModelConfig, rows, grid_thw, name):
    rows = jnp.asarray(rows)
    if grid_thw is None:
        raise ValueError(f"{name} given without its grid_thw")
    expected = vision.num_patches(grid_thw)
    if rows.ndim != 2 or rows.shape != (expected, cfg.vision.patch_dim):
        raise ValueError(f"{name} has shape {tuple(rows.shape)}; its grids {vision.grid_list(grid_thw)} need "
                         f"({expected}, {cfg.vision.patch_dim})")
    return rows


def positions_for(cfg: ModelConfig, input_ids_bt, *, image_grid_thw=None, video_grid_thw=None,
                  second_per_grid_ts=None, attention_mask=None) -> np.ndarray:
    """3D positions [B, T, 3] for a batch, by the one position rule in `rope` (Qwen3-VL: each temporal
    patch of a video is a block of its own; `second_per_grid_ts` plays no part, time being text)."""
    intervals = None
    if video_grid_thw is not None and cfg.frame_blocks:
        video_grid_thw = rope.frame_grids(video_grid_thw)
    elif video_grid_thw is not None:
        n_videos = len(vision.grid_list(video_grid_thw))
        seconds = np.ones(n_videos) if second_per_grid_ts is None else np.asarray(second_per_grid_ts, np.float64)
        if seconds.shape != (n_videos,):
            raise ValueError(f"second_per_grid_ts has {seconds.size} entries for {n_videos} videos")
        intervals = [video_time_interval(cfg, s) for s in seconds]
    return rope.rope_positions(
        input_ids_bt, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        spatial_merge=cfg.vision.spatial_merge_size, image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw, video_time_intervals=intervals, attention_mask_bt=attention_mask,
        resume_rule=cfg.resume_rule)


def forward(model: Model, input_ids, *, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
            video_grid_thw=None, second_per_grid_ts=None, attention_mask=None):
    """Logits [B, T, V] (float32) for a batch, as transformers' Qwen2(.5)-VL / Qwen3-VL compute them.

    input_ids [B, T]; pixel_values / pixel_values_videos: processor rows [P, patch_dim] with their
    grids [n, 3]; second_per_grid_ts [n_videos] (Qwen2.5-VL); attention_mask [B, T] (1 = token,
    0 = padding; padded positions get arbitrary logits).
    """
    cfg = model.config
    ids_bt = np.asarray(input_ids)
    if ids_bt.ndim != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {ids_bt.shape}")
    if ids_bt.min(initial=0) < 0 or ids_bt.max(initial=0) >= cfg.text.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {cfg.text.vocab_size})")
    mask_bt = np.ones(ids_bt.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask_bt.shape != ids_bt.shape:
        raise ValueError(f"attention_mask shape {mask_bt.shape} differs from input_ids shape {ids_bt.shape}")
    rows, grids = [], []
    for name, pix, grid, token in (("pixel_values", pixel_values, image_grid_thw, cfg.image_token_id),
                                   ("pixel_values_videos", pixel_values_videos, video_grid_thw, cfg.video_token_id)):
        n_tokens = int(np.sum((ids_bt == token) & (mask_bt > 0)))
        if pix is None:
            if n_tokens:
                raise ValueError(f"input_ids hold {n_tokens} {name} placeholder tokens but {name} is None")
            continue
        rows.append(_check_rows(cfg, pix, grid, name))
        grids += vision.grid_list(grid)
        n_features = vision.num_patches(grid) // cfg.vision.merge_unit
        if n_tokens != n_features:
            raise ValueError(f"{name}: {n_features} features for {n_tokens} placeholder tokens in input_ids")
    positions = positions_for(cfg, ids_bt, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                              second_per_grid_ts=second_per_grid_ts, attention_mask=mask_bt)
    rows_pv = jnp.concatenate(rows) if rows else None
    layout = vision.vision_layout(cfg.vision, grids) if rows else None
    return _forward_jit(model, jnp.asarray(ids_bt, jnp.int32), jnp.asarray(positions), jnp.asarray(mask_bt),
                        rows_pv, layout)
