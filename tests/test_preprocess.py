"""Vision preprocessing against Hugging Face's Qwen2-VL processors.

HF's processors need torchvision, which cannot be installed next to the torch here, so the oracle is HF's own
pipeline re-run with torch alone:
- `smart_resize` is HF's function itself, read from the installed transformers source (not imported, because the
  module imports torchvision at the top);
- the resize is torch.nn.functional.interpolate(uint8, bicubic, antialias=True), which is exactly what torchvision's
  `resize` calls for uint8 CPU tensors with bicubic interpolation (torchvision >= 0.16 passes uint8 straight
  through for bicubic on CPU);
- rescale+normalise is HF's fused float32 computation and patchify is HF's view/permute sequence, both copied
  here from transformers 5.x (Qwen2VLImageProcessor.patchify, Qwen2VLVideoProcessor.patchify).
Our resize is Pillow's, whose weights are rounded to other integers than torch's: the resized pixels may differ
from torch's by at most 2 (of 255), on at most 2% of them (`assert_near_torch`); everything else is exact. HF's
PIL-backend image processor (Qwen2VLImageProcessorPil, no torchvision needed) is a second oracle, run as is: our
rows equal its rows, but where one side shrinks and the other grows (it then resizes in the other order).
"""

import ast
import math
import pathlib

import numpy as np
import pytest
import torch

import transformers
from svlm_jax.media.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VisionPreprocessConfig,
    preprocess_image,
    preprocess_video,
    resize_bicubic,
    smart_resize,
)

STREAMING = VisionPreprocessConfig(min_pixels=100 * 28 * 28, max_pixels=768 * 28 * 28)
MAX_LEVELS, MAX_SHARE = 2, 0.02  # Pillow's resize against torch's: most apart, share of values apart


def assert_near_torch(ours_u8: np.ndarray, torch_u8: np.ndarray) -> None:
    difference = np.abs(ours_u8.astype(int) - torch_u8.astype(int))
    assert difference.max() <= MAX_LEVELS and (difference > 0).mean() <= MAX_SHARE, (
        difference.max(), (difference > 0).mean())


def assert_rows_near_torch(rows: np.ndarray, torch_rows: np.ndarray, config: VisionPreprocessConfig) -> None:
    """Normalised rows whose pixels are those of `assert_near_torch`: (rows - oracle) * std / rescale is the
    difference of the resized pixels, a whole number."""
    scale = (np.asarray(config.image_std, np.float64) / config.rescale_factor)[None, :, None]
    levels = (rows.astype(np.float64) - torch_rows).reshape(len(rows), 3, -1) * scale
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert_near_torch(np.round(levels), np.zeros(levels.shape))


def _hf_smart_resize():
    source_path = pathlib.Path(transformers.__file__).parent / "models/qwen2_vl/video_processing_qwen2_vl.py"
    tree = ast.parse(source_path.read_text())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize")
    namespace = {"math": math}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(source_path), "exec"), namespace)
    return namespace["smart_resize"]


def _hf_resize(videos_btchw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    batch, frames, channels, old_h, old_w = videos_btchw.shape
    if (height, width) == (old_h, old_w):
        return videos_btchw
    flat = videos_btchw.reshape(-1, channels, old_h, old_w)
    resized = torch.nn.functional.interpolate(
        flat, size=[height, width], mode="bicubic", align_corners=False, antialias=True
    )
    return resized.reshape(batch, frames, channels, height, width)


def _hf_normalize(videos: torch.Tensor, config: VisionPreprocessConfig) -> torch.Tensor:
    mean = torch.tensor(config.image_mean) * (1.0 / config.rescale_factor)
    std = torch.tensor(config.image_std) * (1.0 / config.rescale_factor)
    return videos.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def _hf_video_patchify(videos, patch_size, merge_size, temporal_patch_size):
    batch_size, num_frames, channel, resized_height, resized_width = videos.shape
    if pad := -num_frames % temporal_patch_size:
        repeats = videos[:, -1:].expand(-1, pad, -1, -1, -1)
        videos = torch.cat((videos, repeats), dim=1)
        num_frames += pad
    grid_t = num_frames // temporal_patch_size
    grid_h, grid_w = resized_height // patch_size, resized_width // patch_size
    patches = videos.view(
        batch_size, grid_t, temporal_patch_size, channel,
        grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size,
    )
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    flat = patches.reshape(batch_size, grid_t * grid_h * grid_w, channel * temporal_patch_size * patch_size**2)
    return flat, grid_t, grid_h, grid_w


def _hf_image_patchify(images, patch_size, merge_size, temporal_patch_size):
    batch_size, channel, resized_height, resized_width = images.shape
    grid_h, grid_w = resized_height // patch_size, resized_width // patch_size
    patches = images.reshape(
        batch_size, channel, grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size
    )
    patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)
    flat = (
        patches.unsqueeze(6)
        .expand(-1, -1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
        .reshape(batch_size, grid_h * grid_w, channel * temporal_patch_size * patch_size * patch_size)
    )
    return flat, grid_h, grid_w


def _hf_target_size(height, width, config):
    return _hf_smart_resize()(
        height, width, factor=config.patch_size * config.merge_size,
        min_pixels=config.min_pixels, max_pixels=config.max_pixels,
    )


def hf_video_rows(frames_thwc: np.ndarray, config: VisionPreprocessConfig):
    videos = torch.from_numpy(frames_thwc).permute(0, 3, 1, 2)[None]  # [1, T, C, H, W] uint8
    height, width = _hf_target_size(*frames_thwc.shape[1:3], config)
    videos = _hf_normalize(_hf_resize(videos, height, width), config)
    rows, grid_t, grid_h, grid_w = _hf_video_patchify(
        videos, config.patch_size, config.merge_size, config.temporal_patch_size
    )
    return rows[0].numpy(), (grid_t, grid_h, grid_w)


def hf_image_rows(image_hwc: np.ndarray, config: VisionPreprocessConfig):
    images = torch.from_numpy(image_hwc).permute(2, 0, 1)[None]  # [1, C, H, W] uint8
    height, width = _hf_target_size(*image_hwc.shape[:2], config)
    images = _hf_normalize(_hf_resize(images[:, None], height, width)[:, 0], config)
    rows, grid_h, grid_w = _hf_image_patchify(images, config.patch_size, config.merge_size, config.temporal_patch_size)
    return rows[0].numpy(), (1, grid_h, grid_w)


def _smooth_frames(rng, num_frames, height, width):
    """Random frames with both noise and large smooth structure (so the resize is exercised on both)."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for _ in range(num_frames):
        fx, fy, phase = rng.uniform(0.01, 0.2, 2).tolist() + [rng.uniform(0, 6)]
        wave = 127.5 + 100 * np.sin(fx * xx + fy * yy + phase)
        noise = rng.normal(0, 25, (height, width, 3))
        frames.append(np.clip(wave[..., None] + noise, 0, 255).astype(np.uint8))
    return np.stack(frames)


def test_smart_resize_known_answers():
    # docs/method.md §2: 720p 16:9 with the streaming bounds -> 560x1008 (20x36 merged tokens); 360p -> 13x23 tokens.
    assert smart_resize(720, 1280, 28, 100 * 28 * 28, 768 * 28 * 28) == (560, 1008)
    assert smart_resize(360, 640, 28, 100 * 28 * 28, 768 * 28 * 28) == (364, 644)
    # Tiny input grows to min_pixels; both sides multiples of 28.
    assert smart_resize(10, 10, 28, 56 * 56, 28 * 28 * 1280) == (56, 56)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2001)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(4000, 19)


def test_smart_resize_matches_hf_on_random_sizes():
    hf = _hf_smart_resize()
    rng = np.random.default_rng()
    for _ in range(2000):
        height, width = (int(v) for v in rng.integers(1, 4000, 2))
        min_pixels = int(rng.choice([56 * 56, 100 * 28 * 28, 128 * 28 * 28]))
        max_pixels = int(rng.choice([768 * 28 * 28, 28 * 28 * 1280, 12845056]))
        try:
            expected = hf(height, width, 28, min_pixels, max_pixels)
        except ValueError:
            with pytest.raises(ValueError):
                smart_resize(height, width, 28, min_pixels, max_pixels)
            continue
        got = smart_resize(height, width, 28, min_pixels, max_pixels)
        assert got == expected, (height, width, min_pixels, max_pixels)
        assert got[0] % 28 == 0 and got[1] % 28 == 0


def _torch_resize(frames_thwc: np.ndarray, out_hw) -> np.ndarray:
    return torch.nn.functional.interpolate(
        torch.from_numpy(frames_thwc).permute(0, 3, 1, 2), size=out_hw, mode="bicubic", align_corners=False,
        antialias=True).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    "in_hw,out_hw",
    [((37, 53), (28, 56)), ((720, 1280), (560, 1008)), ((1280, 720), (1008, 560)), ((100, 30), (252, 84)),
     ((64, 64), (64, 28)), ((31, 700), (56, 1260)), ((3, 5), (56, 84)), ((2160, 3840), (588, 1036))],
)
def test_resize_bicubic_near_torch(in_hw, out_hw):
    rng = np.random.default_rng()
    frames = _smooth_frames(rng, 2, *in_hw)
    ours = resize_bicubic(frames, *out_hw)
    assert ours.dtype == np.uint8 and ours.shape == (2, *out_hw, 3)
    assert_near_torch(ours, _torch_resize(frames, out_hw))


def test_resize_bicubic_near_torch_on_noise_of_random_sizes():
    """White noise (the hardest case for rounding) at random sizes, one side shrinking while the other
    grows included: there the order of the passes matters (resizing in Pillow's own order differs by up to 23)."""
    rng = np.random.default_rng()
    for _ in range(60):
        in_hw = tuple(int(v) for v in rng.integers(3, 300, 2))
        out_hw = tuple(int(v) for v in rng.integers(1, 12, 2) * 28)
        frames = rng.integers(0, 256, (1, *in_hw, 3), dtype=np.uint8)
        assert_near_torch(resize_bicubic(frames, *out_hw), _torch_resize(frames, out_hw))


def test_resize_is_a_real_bicubic():
    """Independent sanity check (no torch): a linear ramp stays a linear ramp away from the borders, and a
    constant image stays constant, whatever the scale."""
    ramp = np.tile(np.arange(0, 200, 2, dtype=np.uint8)[None, :, None], (8, 1, 3))  # 8 x 100, value = 2*x
    up = resize_bicubic(ramp, 8, 200).astype(float)[0, :, 0]
    centers = (np.arange(200) + 0.5) * 0.5 - 0.5
    np.testing.assert_allclose(up[10:-10], 2 * centers[10:-10], atol=0.51)
    constant = np.full((30, 50, 3), 77, np.uint8)
    assert (resize_bicubic(constant, 84, 28) == 77).all()


@pytest.mark.parametrize(
    "num_frames,height,width,config",
    [
        (2, 720, 1280, STREAMING),  # 720p landscape: 560x1008
        (2, 1280, 720, STREAMING),  # portrait
        (2, 360, 640, STREAMING),
        (3, 48, 90, STREAMING),  # odd frame count (padded by repeating the last frame); upscaled to min_pixels
        (4, 300, 40, VisionPreprocessConfig()),  # tall and narrow, two temporal patches
        (2, 112, 224, VisionPreprocessConfig()),  # already a multiple of 28: no resize
    ],
)
def test_preprocess_video_matches_hf(num_frames, height, width, config):
    rng = np.random.default_rng()
    frames = _smooth_frames(rng, num_frames, height, width)
    rows, grid_thw = preprocess_video(frames, config)
    expected_rows, expected_grid = hf_video_rows(frames, config)
    assert grid_thw == expected_grid
    assert rows.dtype == np.float32 and rows.shape == (math.prod(grid_thw), 1176)
    assert_rows_near_torch(rows, expected_rows, config)


@pytest.mark.parametrize("height,width", [(480, 640), (57, 333), (900, 200)])
def test_preprocess_image_matches_hf(height, width):
    rng = np.random.default_rng()
    image = _smooth_frames(rng, 1, height, width)[0]
    config = VisionPreprocessConfig()
    rows, grid_thw = preprocess_image(image, config)
    expected_rows, expected_grid = hf_image_rows(image, config)
    assert grid_thw == expected_grid
    assert_rows_near_torch(rows, expected_rows, config)
    # An image is a video of temporal_patch_size identical frames.
    video_rows, video_grid = preprocess_video(np.stack([image, image]), config)
    assert video_grid == grid_thw
    np.testing.assert_array_equal(video_rows, rows)


@pytest.mark.parametrize("height,width", [(900, 200), (720, 1280), (31, 700), (2160, 3840), (100, 30)])
def test_preprocess_image_equals_hf_pil_processor(height, width):
    """HF's PIL-backend Qwen2-VL image processor itself, where both sides shrink or both grow."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config = VisionPreprocessConfig()
    image = np.random.default_rng().integers(0, 256, (height, width, 3), dtype=np.uint8)
    hf = Qwen2VLImageProcessorPil(min_pixels=config.min_pixels, max_pixels=config.max_pixels)(
        images=[image], return_tensors="np")
    rows, grid_thw = preprocess_image(image, config)
    assert grid_thw == tuple(hf["image_grid_thw"][0])
    np.testing.assert_allclose(rows, hf["pixel_values"], rtol=0, atol=1e-6)  # HF rescales, then normalises


def test_row_layout_known_answer():
    """Known answer for the row order, independent of HF's code: with an identity normalisation and a 28x56
    video that needs no resize, every row must be a plain crop of the frames."""
    config = VisionPreprocessConfig(
        min_pixels=28 * 28, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0), rescale_factor=1.0
    )
    t, h, w = 2, 28, 56
    frames = np.random.default_rng().integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    rows, grid = preprocess_video(frames, config)
    assert grid == (1, 2, 4)
    rows = rows.reshape(-1, 3, 2, 14, 14)  # (channel, temporal, patch_h, patch_w) inside a row
    # Row order: merged block (row, col) in raster order, then its 2x2 patches in raster order.
    for row_index, (block_col, sub_r, sub_c) in enumerate(
        [(bc, sr, sc) for bc in range(2) for sr in range(2) for sc in range(2)]
    ):
        y0, x0 = sub_r * 14, (2 * block_col + sub_c) * 14
        expected = frames[:, y0 : y0 + 14, x0 : x0 + 14, :].transpose(3, 0, 1, 2)
        np.testing.assert_array_equal(rows[row_index], expected.astype(np.float32))


def test_normalize_values():
    config = VisionPreprocessConfig()
    frames = np.full((2, 28, 28, 3), 255, np.uint8)
    rows, _ = preprocess_video(frames, config)
    expected = (1.0 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    np.testing.assert_allclose(rows.reshape(-1, 3, 2 * 14 * 14)[0, :, 0], expected, rtol=1e-6)


def test_from_preprocessor_config():
    # As shipped with Qwen2.5-VL-7B-Instruct (top-level min/max pixels).
    qwen25 = {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }
    config = VisionPreprocessConfig.from_preprocessor_config(qwen25)
    assert (config.min_pixels, config.max_pixels) == (3136, 12845056)
    assert config.image_mean == OPENAI_CLIP_MEAN and config.row_size == 1176 and config.resize_factor == 28
    # Newer files: size.shortest_edge / longest_edge; top-level keys win, as in HF's constructor.
    sized = {"size": {"shortest_edge": 100 * 28 * 28, "longest_edge": 768 * 28 * 28}, "rescale_factor": 0.5}
    config = VisionPreprocessConfig.from_preprocessor_config(sized)
    assert (config.min_pixels, config.max_pixels, config.rescale_factor) == (78400, 602112, 0.5)
    both = {"size": {"shortest_edge": 1, "longest_edge": 2}, "min_pixels": 3, "max_pixels": 4}
    config = VisionPreprocessConfig.from_preprocessor_config(both)
    assert (config.min_pixels, config.max_pixels) == (3, 4)
