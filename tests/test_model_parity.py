"""Logits and vision features against transformers' PyTorch Qwen2.5-VL / Qwen2-VL (float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import svlm_jax
from tests.conftest import IMAGE, VEND, VIDEO, VSTART

TEXT_VOCAB = 380  # random text ids stay clear of the special tokens


def build_row(parts, rng):
    """parts: ("text", n) | ("image", grid) | ("video", grid) -> ids, token types, image grids, video grids."""
    ids, types, images, videos = [], [], [], []
    for kind, arg in parts:
        if kind == "text":
            ids += rng.integers(0, TEXT_VOCAB, arg).tolist()
            types += [0] * arg
        else:
            n = int(np.prod(arg)) // 4
            pad, kind_id = (IMAGE, 1) if kind == "image" else (VIDEO, 2)
            ids += [VSTART] + [pad] * n + [VEND]
            types += [0] + [kind_id] * n + [0]
            (images if kind == "image" else videos).append(list(arg))
    return ids, types, images, videos


def build_batch(rows_parts, rng, *, left_pad: bool, row_builder=build_row):
    rows = [row_builder(p, rng) for p in rows_parts]
    T = max(len(r[0]) for r in rows)
    ids = np.zeros((len(rows), T), np.int64)
    types, mask = np.zeros_like(ids), np.zeros_like(ids)
    images, videos = [], []
    for b, (row_ids, row_types, im, vi) in enumerate(rows):
        sl = slice(T - len(row_ids), T) if left_pad else slice(0, len(row_ids))
        ids[b, sl], types[b, sl], mask[b, sl] = row_ids, row_types, 1
        images += im
        videos += vi
    return ids, types, mask, images, videos


def run_both(hf_checkpoint, ours, ids, types, mask, images, videos, rng, seconds=None):
    model_type, hf, _ = hf_checkpoint
    n_img = sum(int(np.prod(g)) for g in images)
    n_vid = sum(int(np.prod(g)) for g in videos)
    pix = rng.standard_normal((n_img, 1176)).astype(np.float32) if images else None
    pixv = rng.standard_normal((n_vid, 1176)).astype(np.float32) if videos else None
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), mm_token_type_ids=torch.tensor(types))
    if images:
        kw.update(pixel_values=torch.tensor(pix), image_grid_thw=torch.tensor(images))
    if videos:
        kw.update(pixel_values_videos=torch.tensor(pixv), video_grid_thw=torch.tensor(videos))
        if model_type == "qwen2_5_vl" and seconds is not None:
            kw["second_per_grid_ts"] = torch.tensor(seconds)
    if not images and not videos:  # text only: transformers ignores padding in positions unless told
        kw["position_ids"] = hf.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"],
                                                     attention_mask=kw["attention_mask"])[0]
    with torch.no_grad():
        ref = hf(**kw).logits.numpy()
    out = np.asarray(svlm_jax.forward(
        ours, ids, attention_mask=mask,
        pixel_values=pix, image_grid_thw=np.array(images) if images else None,
        pixel_values_videos=pixv, video_grid_thw=np.array(videos) if videos else None,
        second_per_grid_ts=seconds if model_type == "qwen2_5_vl" else None))
    valid = mask.astype(bool)
    err = np.abs(out[valid] - ref[valid]).max()
    scale = np.abs(ref[valid]).max()
    assert err <= 1e-4 * scale, f"max |diff| {err:.3g} vs max |logit| {scale:.3g}"


def test_text_only(hf_checkpoint, ours_f32, rng):
    ids, types, mask, _, _ = build_batch([[("text", 23)], [("text", 23)]], rng, left_pad=False)
    run_both(hf_checkpoint, ours_f32, ids, types, mask, [], [], rng)


def test_images_odd_grids(hf_checkpoint, ours_f32, rng):
    # Merged grids 5x7 and 3x2: sides not multiples of the 4x4 attention window.
    parts = [("text", 5), ("image", (1, 10, 14)), ("text", 3), ("image", (1, 6, 4)), ("text", 4)]
    ids, types, mask, images, _ = build_batch([parts], rng, left_pad=False)
    run_both(hf_checkpoint, ours_f32, ids, types, mask, images, [], rng)


def test_videos_several_with_time(hf_checkpoint, ours_f32, rng):
    parts = [("text", 4), ("video", (2, 10, 14)), ("text", 2), ("video", (3, 6, 8)), ("text", 5)]
    ids, types, mask, _, videos = build_batch([parts], rng, left_pad=False)
    run_both(hf_checkpoint, ours_f32, ids, types, mask, [], videos, rng, seconds=[0.5, 1.5])


@pytest.mark.parametrize("left_pad", [True, False])
def test_padded_mixed_batch(hf_checkpoint, ours_f32, rng, left_pad):
    rows = [[("text", 3), ("image", (1, 6, 10)), ("text", 9)],
            [("text", 2), ("video", (2, 4, 6)), ("text", 3), ("image", (1, 4, 4)), ("text", 1)],
            [("text", 11)]]
    ids, types, mask, images, videos = build_batch(rows, rng, left_pad=left_pad)
    run_both(hf_checkpoint, ours_f32, ids, types, mask, images, videos, rng, seconds=[1.0])


def test_text_only_left_padding(hf_checkpoint, ours_f32, rng):
    ids, types, mask, _, _ = build_batch([[("text", 7)], [("text", 16)]], rng, left_pad=True)
    run_both(hf_checkpoint, ours_f32, ids, types, mask, [], [], rng)


def test_vision_tower_alone(hf_checkpoint, ours_f32, rng):
    _, hf, _ = hf_checkpoint
    grids = np.array([[2, 10, 14], [1, 6, 4], [1, 16, 18]])
    pix = rng.standard_normal((int(np.prod(grids, axis=1).sum()), 1176)).astype(np.float32)
    with torch.no_grad():
        ref = hf.model.visual(torch.tensor(pix), grid_thw=torch.tensor(grids)).pooler_output.numpy()
    out = np.asarray(svlm_jax.encode_vision(ours_f32, pix, grids))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
