"""Qwen2-VL / Qwen2.5-VL vision preprocessing in numpy: smart_resize, bicubic resize, normalise, patchify.

Reproduces what the Hugging Face `Qwen2VLImageProcessor` / `Qwen2VLVideoProcessor` (torchvision backend, CPU)
produce for uint8 RGB input:
  1. `smart_resize` picks the output size (both sides multiples of patch_size * merge_size = 28).
  2. Antialiased bicubic resize of uint8 frames, bit-exact with torch's native uint8 kernel that torchvision calls
     on CPU (Keys cubic a = -0.5 with the kernel widened by the scale when shrinking, as in PIL; weights quantised
     to int16, integer accumulation, uint8 result after each of the horizontal and vertical passes).
  3. Fused rescale + normalise in float32: (x - mean*255) / (std*255), as HF's fused path computes it.
  4. Patchify into rows of channel * temporal_patch * patch * patch values ordered
     (grid_t, grid_h/merge, grid_w/merge, merge, merge) with (channel, temporal, patch_h, patch_w) inside a row.
"""

import dataclasses
import math

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionPreprocessConfig:
    """Static preprocessing settings; defaults are those of HF's Qwen2VLImageProcessor."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1.0 / 255.0

    @property
    def resize_factor(self) -> int:
        """Both output sides are multiples of this (28 for Qwen): one merged 2x2 block of 14 px patches."""
        return self.patch_size * self.merge_size

    @property
    def row_size(self) -> int:
        """Values in one patch row: channel * temporal_patch * patch * patch (1176 for Qwen)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_preprocessor_config(cls, config: dict) -> "VisionPreprocessConfig":
        """Reads a Qwen `preprocessor_config.json` dict.

        Pixel bounds come from `size` ({shortest_edge, longest_edge} or {min_pixels, max_pixels}); top-level
        `min_pixels` / `max_pixels` override them, as in HF's processor constructor. Missing keys keep HF's defaults.
        """
        defaults = cls()
        size = config.get("size") or {}
        min_pixels = size.get("shortest_edge", size.get("min_pixels", defaults.min_pixels))
        max_pixels = size.get("longest_edge", size.get("max_pixels", defaults.max_pixels))
        min_pixels = config.get("min_pixels", min_pixels)
        max_pixels = config.get("max_pixels", max_pixels)
        return cls(
            patch_size=int(config.get("patch_size", defaults.patch_size)),
            temporal_patch_size=int(config.get("temporal_patch_size", defaults.temporal_patch_size)),
            merge_size=int(config.get("merge_size", defaults.merge_size)),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            image_mean=tuple(float(v) for v in config.get("image_mean", defaults.image_mean)),
            image_std=tuple(float(v) for v in config.get("image_std", defaults.image_std)),
            rescale_factor=float(config.get("rescale_factor", defaults.rescale_factor)),
        )


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Qwen's output size: both sides multiples of `factor`, pixel count within [min_pixels, max_pixels], aspect
    ratio kept as closely as possible. Raises ValueError for an aspect ratio above 200, as HF does.

    Uses Python's round (half to even) exactly like the HF implementation, so e.g. 42 px rounds to 56 but 14 to 0.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with a = -0.5 (PIL's and torch's antialiased bicubic), float64."""
    a = -0.5
    x = np.abs(x)
    # Same operation order as torch's cubic_convolution1/2 so the double weights round identically.
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _int16_resample_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Source indices [out, taps], int16-quantised weights [out, taps] and their precision in bits.

    Follows torch's HelperInterpCubic::compute_index_ranges_int16_weights (antialias=True, align_corners=False):
    a sample at output pixel i reads source pixels [xmin, xmin + xsize); unused taps get weight 0 and index 0.
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    # C casts truncate toward zero; astype(int64) does the same.
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xsize = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin, 0, taps)
    j = np.arange(taps, dtype=np.int64)[None, :]
    valid = j < xsize[:, None]
    offsets = ((j + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * invscale
    weights = np.where(valid, _keys_cubic(offsets), 0.0)
    # Sequential sum over taps, like the C loop (a pairwise sum could differ in the last bit).
    total = np.zeros(out_size, dtype=np.float64)
    for k in range(taps):
        total = total + weights[:, k]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    weight_max = float(weights.max())
    precision = 0
    while precision < 22 and int(0.5 + weight_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    weights_int = np.where(scaled < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int32)
    indices = np.where(valid, xmin[:, None] + j, 0)
    return indices, weights_int, precision


def _resample_axis(pixels_u8: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """One antialiased bicubic pass along `axis` of a uint8 array; integer arithmetic, rounded and clamped to uint8."""
    indices, weights, precision = _int16_resample_weights(pixels_u8.shape[axis], out_size)
    shape = [1] * pixels_u8.ndim
    shape[axis] = out_size
    acc = np.full(
        pixels_u8.shape[:axis] + (out_size,) + pixels_u8.shape[axis + 1 :], 1 << (precision - 1), dtype=np.int32
    )
    pixels = pixels_u8.astype(np.int32)
    for k in range(indices.shape[1]):
        acc += np.take(pixels, indices[:, k], axis=axis) * weights[:, k].reshape(shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_bicubic(frames_thwc: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize of uint8 frames [..., H, W, C] to [..., height, width, C].

    Bit-exact with torch.nn.functional.interpolate(uint8, mode="bicubic", antialias=True) on CPU, which is what
    torchvision's resize (and so HF's Qwen2-VL processors) run for uint8 tensors on CPU. Width is resampled first,
    then height, each pass ending in uint8; an axis whose size does not change is left untouched.
    """
    if frames_thwc.dtype != np.uint8:
        raise TypeError(f"resize_bicubic expects uint8 frames, got {frames_thwc.dtype}")
    h_axis, w_axis = frames_thwc.ndim - 3, frames_thwc.ndim - 2
    resized = frames_thwc
    if resized.shape[w_axis] != width:
        resized = _resample_axis(resized, w_axis, width)
    if resized.shape[h_axis] != height:
        resized = _resample_axis(resized, h_axis, height)
    return resized


def normalize(frames_thwc: np.ndarray, config: VisionPreprocessConfig) -> np.ndarray:
    """uint8 [..., C] -> float32 (x - mean/rescale) / (std/rescale), HF's fused rescale+normalise in float32."""
    inverse_rescale = np.float32(1.0 / config.rescale_factor)
    mean = np.asarray(config.image_mean, dtype=np.float32) * inverse_rescale
    std = np.asarray(config.image_std, dtype=np.float32) * inverse_rescale
    return (frames_thwc.astype(np.float32) - mean) / std


def patchify(frames_thwc: np.ndarray, config: VisionPreprocessConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalised frames [T, H, W, C] -> (rows [grid_t*grid_h*grid_w, C*tp*p*p], (grid_t, grid_h, grid_w)).

    An odd frame count is padded by repeating the last frame up to a multiple of temporal_patch_size (as HF does).
    H and W must be multiples of patch_size * merge_size.
    """
    num_frames, height, width, channels = frames_thwc.shape
    p, tp, m = config.patch_size, config.temporal_patch_size, config.merge_size
    if height % (p * m) or width % (p * m):
        raise ValueError(f"frame size {height}x{width} is not a multiple of {p * m}")
    if pad := -num_frames % tp:
        frames_thwc = np.concatenate([frames_thwc, np.repeat(frames_thwc[-1:], pad, axis=0)], axis=0)
        num_frames += pad
    grid_t, grid_h, grid_w = num_frames // tp, height // p, width // p
    patches = frames_thwc.reshape(grid_t, tp, grid_h // m, m, p, grid_w // m, m, p, channels)
    # -> (grid_t, merged_row, merged_col, merge_row, merge_col, channel, temporal, patch_row, patch_col)
    patches = patches.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    rows = np.ascontiguousarray(patches).reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
    return rows, (grid_t, grid_h, grid_w)


def resize_for_model(frames_thwc: np.ndarray, config: VisionPreprocessConfig) -> np.ndarray:
    """uint8 frames [..., H, W, 3] resized to the `smart_resize` size for `config` (still uint8)."""
    height, width = smart_resize(
        frames_thwc.shape[-3],
        frames_thwc.shape[-2],
        factor=config.resize_factor,
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
    )
    return resize_bicubic(frames_thwc, height, width)


def preprocess_video(
    frames_thwc: np.ndarray, config: VisionPreprocessConfig
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 RGB frames [T, H, W, 3] -> (rows [N, 1176] float32, (grid_t, grid_h, grid_w)), like HF's video
    processor. A streaming second of 2 frames is one temporal patch: grid_t = 1."""
    if frames_thwc.ndim != 4 or frames_thwc.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got shape {frames_thwc.shape}")
    return patchify(normalize(resize_for_model(frames_thwc, config), config), config)


def preprocess_image(image_hwc: np.ndarray, config: VisionPreprocessConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 RGB image [H, W, 3] -> (rows [N, 1176] float32, (1, grid_h, grid_w)), like HF's image processor:
    the image fills one temporal patch by repetition."""
    if image_hwc.ndim != 3 or image_hwc.shape[-1] != 3:
        raise ValueError(f"expected an image [H, W, 3], got shape {image_hwc.shape}")
    # Resizing is per frame, so resize once and repeat afterwards.
    frame_1hwc = normalize(resize_for_model(image_hwc[None], config), config)
    return patchify(np.repeat(frame_1hwc, config.temporal_patch_size, axis=0), config)
