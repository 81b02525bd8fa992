"""Qwen2-VL / 2.5-VL / 3-VL vision preprocessing: smart_resize, bicubic resize (Pillow), normalise, patchify (numpy).

Reproduces what the Hugging Face `Qwen2VLImageProcessor` / `Qwen2VLVideoProcessor` / `Qwen3VLVideoProcessor`
(torchvision backend, CPU) produce for uint8 RGB input:
  1. `smart_resize` picks the output size (both sides multiples of patch_size * merge_size: 28, 32 for
     Qwen3-VL, whose video processor bounds the pixels of the whole clip).
  2. Antialiased bicubic resize of uint8 frames by Pillow, the filter of torch's native uint8 kernel that
     torchvision calls on CPU (Keys cubic a = -0.5, widened by the scale when shrinking; horizontal pass, then
     vertical, each rounded to uint8), within 2 of it (`resize_bicubic`).
  3. Fused rescale + normalise in float32: (x - mean*255) / (std*255), as HF's fused path computes it.
  4. Patchify into rows of channel * temporal_patch * patch * patch values ordered
     (grid_t, grid_h/merge, grid_w/merge, merge, merge) with (channel, temporal, patch_h, patch_w) inside a row.
"""

import dataclasses
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)  # Qwen3-VL's
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


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
    # Qwen3-VL's video processor: the pixel bounds hold for all frames of a clip together, and frames
    # with a side under `resize_factor` are scaled up first (see `smart_resize`).
    bounds_count_frames: bool = False

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

    def check_model(self, model_config) -> None:
        """ValueError unless these settings cut frames into the patches the model's vision tower takes."""
        v = model_config.vision
        theirs = (self.patch_size, self.temporal_patch_size, self.merge_size)
        ours = (v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
        if theirs != ours:
            raise ValueError(f"the preprocessing's (patch, temporal patch, merge) sizes {theirs} are not the "
                             f"{model_config.model_type} vision tower's {ours} (a checkpoint's "
                             "video_preprocessor_config.json or preprocessor_config.json sets them)")

    def resized_size(self, height: int, width: int, n_frames: int) -> tuple[int, int]:
        """`smart_resize` of frames of this size under these bounds; `n_frames` counts where the
        bounds cover a clip's frames together (Qwen3-VL)."""
        return smart_resize(height, width, factor=self.resize_factor, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels, num_frames=n_frames if self.bounds_count_frames else None,
                            temporal_factor=self.temporal_patch_size)

    @classmethod
    def family_defaults(cls, model_type: str) -> "VisionPreprocessConfig":
        """The processor of a model family with its own defaults, for a checkpoint without processor
        files: Qwen3-VL's video processor, else Qwen2-VL's (Qwen2.5-VL shares it)."""
        if model_type == "qwen3_vl":
            return cls.from_video_preprocessor_config({"video_processor_type": "Qwen3VLVideoProcessor"})
        return cls()

    @classmethod
    def from_video_preprocessor_config(cls, config: dict) -> "VisionPreprocessConfig":
        """Reads a `video_preprocessor_config.json` dict: Qwen2-VL's video processor (its defaults:
        128 to 768 merged tokens a frame) or Qwen3-VL's (`video_processor_type` "Qwen3VLVideoProcessor":
        16 px patches, mean and std 0.5, bounds over all frames)."""
        if config.get("cap_pixels_per_frame"):
            raise ValueError("video preprocessor config: cap_pixels_per_frame=true is not supported")
        qwen3 = config.get("video_processor_type") == "Qwen3VLVideoProcessor"
        patch = 16 if qwen3 else 14
        factor = patch * 2
        defaults = {"patch_size": patch, "image_mean": list(IMAGENET_STANDARD_MEAN if qwen3 else OPENAI_CLIP_MEAN),
                    "image_std": list(IMAGENET_STANDARD_STD if qwen3 else OPENAI_CLIP_STD),
                    "size": {"shortest_edge": 128 * factor * factor, "longest_edge": 768 * factor * factor}}
        base = cls.from_preprocessor_config({**defaults, **config})
        return dataclasses.replace(base, bounds_count_frames=qwen3)


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280,
    *, num_frames: int | None = None, temporal_factor: int = 2,
) -> tuple[int, int]:
    """Qwen's output size: both sides multiples of `factor`, pixel count within [min_pixels, max_pixels], aspect
    ratio kept as closely as possible. Raises ValueError for an aspect ratio above 200, as HF does.

    With `num_frames` (Qwen3-VL's video rule) the pixel count is that of the whole clip, its frames rounded to a
    multiple of `temporal_factor`, and a side under `factor` is first scaled up to it.
    Uses Python's round (half to even) exactly like the HF implementation, so e.g. 42 px rounds to 56 but 14 to 0.
    """
    frames, t_bar = 1, 1
    if num_frames is not None:
        if num_frames < temporal_factor:
            raise ValueError(f"a clip of {num_frames} frames is shorter than the temporal patch ({temporal_factor})")
        if height < factor or width < factor:
            scale = max(factor / height, factor / width)
            height, width = int(height * scale), int(width * scale)
        frames, t_bar = num_frames, round(num_frames / temporal_factor) * temporal_factor
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _resize_frame(frame_hwc: np.ndarray, height: int, width: int) -> np.ndarray:
    """One uint8 RGB frame [H, W, 3] -> [height, width, 3]: width first, then height, as torch does."""
    image = Image.fromarray(frame_hwc)
    if image.width != width:
        image = image.resize((width, image.height), Image.Resampling.BICUBIC)
    if image.height != height:
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image)


@functools.cache
def _frame_threads() -> ThreadPoolExecutor:
    """Pillow lets go of the GIL while it resizes, so the frames of a second resize on all cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ThreadPoolExecutor(max_workers=cores, thread_name_prefix="resize")


# A forked child (a data loader worker) has none of its parent's threads: it starts its own pool.
os.register_at_fork(after_in_child=_frame_threads.cache_clear)


def resize_bicubic(frames_thwc: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize of uint8 RGB frames [..., H, W, 3] to [..., height, width, 3], by Pillow.

    Pillow's antialiased bicubic is the filter torch.nn.functional.interpolate(uint8, mode="bicubic",
    antialias=True) runs on CPU, which torchvision's resize (and so HF's Qwen2-VL processors) call for uint8
    tensors: Keys cubic a = -0.5, widened by the scale when shrinking, width resampled first, then height,
    each pass rounded to uint8. Pillow keeps the weights to 22 bits where torch rounds them to 16-bit
    integers, so a pass can round a value 1 the other way: at most 2 apart after both, on about 1% of the
    values. (HF's PIL-backend image processor resizes with Pillow in one call, which shrinks first: the
    same result when both sides shrink or both grow.) An axis whose size does not change is left untouched.
    """
    if frames_thwc.dtype != np.uint8 or frames_thwc.shape[-1] != 3:
        raise TypeError(f"resize_bicubic expects uint8 RGB frames [..., H, W, 3], got {frames_thwc.dtype} "
                        f"{frames_thwc.shape}")
    frames = frames_thwc.reshape(-1, *frames_thwc.shape[-3:])
    if frames.shape[1:3] == (height, width):
        return frames_thwc
    resized = list(_frame_threads().map(lambda frame: _resize_frame(frame, height, width), frames))
    return np.stack(resized).reshape(*frames_thwc.shape[:-3], height, width, 3)


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
    height, width = config.resized_size(frames_thwc.shape[-3], frames_thwc.shape[-2], frames_thwc.shape[0])
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
