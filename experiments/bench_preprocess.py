"""Decoding and preprocessing a 4K second (issue 28: two 3840x2160 frames in at most 100 ms on 2 cores).

A 4K clip is written once (H.264, a moving pattern with fine grain, so its bit rate is a real
camera's, not a flat test card's), then each of its seconds is timed through what `svlm stream`
runs: `VideoReader` (decoding and conversion to RGB) and `preprocess_video` at the streaming bounds
(Pillow's resize to 1036x588, normalisation, patchify). The same frames also go through the numpy
resize this replaced (preprocess.py at OLD_COMMIT, read from git) and through torch's kernel, which
HF's processors run: their times, and how far the new resize is from torch's pixels.

    python -m experiments.bench_preprocess     # writes experiments/results/bench_preprocess_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import av
import numpy as np
import PIL

from experiments.common import write_result
from svlm_jax.media import preprocess
from svlm_jax.media.video import VideoReader
from svlm_jax.streaming.session import STREAM_PREPROCESS

OLD_COMMIT = "0e9f19de1687ab2b46ffb30bc5981a8c0102d6e3"  # the last preprocess.py with the numpy resize
REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 3840, 2160


def old_preprocess() -> types.ModuleType:
    """svlm_jax/media/preprocess.py as it was at OLD_COMMIT."""
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:svlm_jax/media/preprocess.py"], capture_output=True,
                            text=True, check=True, cwd=REPO).stdout
    module = sys.modules["preprocess_numpy"] = types.ModuleType("preprocess_numpy")  # dataclasses look it up
    exec(compile(source, f"{OLD_COMMIT[:8]}:preprocess.py", "exec"), module.__dict__)
    return module


def write_clip(path: Path, seconds: int, fps: int) -> None:
    """A 4K H.264 clip: large soft shapes drifting under fine static grain."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:HEIGHT, :WIDTH].astype(np.float32)
    grain = rng.normal(0, 6, (HEIGHT, WIDTH, 3)).astype(np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(seconds * fps):
            t = index / fps
            wave = np.stack([np.sin(x / 170 + t), np.sin(y / 110 - 0.7 * t), np.sin((x + y) / 260 + 1.3 * t)], -1)
            frame = np.clip(128 + 90 * wave + grain, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def timed(function, *args):
    """(wall seconds, CPU seconds of all the process's threads, result). On a machine other work also
    loads, the CPU time is what the step costs; the wall time is what it took there."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def torch_resize(frames_thwc: np.ndarray, height: int, width: int) -> np.ndarray:
    import torch

    return torch.nn.functional.interpolate(torch.from_numpy(frames_thwc).permute(0, 3, 1, 2), size=(height, width),
                                           mode="bicubic", align_corners=False, antialias=True).permute(0, 2, 3, 1).numpy()


def measure(path: Path, fps: int, old: types.ModuleType) -> dict:
    """Wall (median, fastest) and CPU seconds (median) per second of video of each stage, over the
    clip's seconds."""
    config = STREAM_PREPROCESS
    old_config = old.VisionPreprocessConfig(min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    height, width = preprocess.smart_resize(HEIGHT, WIDTH, config.resize_factor, config.min_pixels,
                                            config.max_pixels)
    stages = {"decode": [], "preprocess": [], "preprocess_numpy": [], "resize_torch": []}
    levels, share = 0, []
    with VideoReader(path, fps=2) as reader:
        seconds = iter(reader)
        while True:
            *decode_times, second = timed(next, seconds, None)
            if second is None:
                break
            frames = second.frames_thwc
            stages["decode"].append(decode_times)
            stages["preprocess"].append(timed(preprocess.preprocess_video, frames, config)[:2])
            stages["preprocess_numpy"].append(timed(old.preprocess_video, frames, old_config)[:2])
            *torch_times, reference = timed(torch_resize, frames, height, width)
            stages["resize_torch"].append(torch_times)
            apart = np.abs(preprocess.resize_bicubic(frames, height, width).astype(int) - reference.astype(int))
            levels, share = max(levels, int(apart.max())), share + [float((apart > 0).mean())]
    median = {}
    for name, times in stages.items():
        median[f"{name}_s"] = statistics.median(wall for wall, _ in times)
        median[f"{name}_fastest_s"] = min(wall for wall, _ in times)  # the least disturbed by other work
        median[f"{name}_cpu_s"] = statistics.median(cpu for _, cpu in times)
    return {"source_fps": fps, "seconds": len(stages["decode"]), "clip_bytes": path.stat().st_size, **median,
            "decode_and_preprocess_s": median["decode_s"] + median["preprocess_s"],
            "decode_and_preprocess_fastest_s": median["decode_fastest_s"] + median["preprocess_fastest_s"],
            "decode_and_preprocess_cpu_s": median["decode_cpu_s"] + median["preprocess_cpu_s"],
            "decode_and_preprocess_numpy_s": median["decode_s"] + median["preprocess_numpy_s"],
            "preprocess_speedup": median["preprocess_numpy_s"] / median["preprocess_s"],
            "preprocess_cpu_speedup": median["preprocess_numpy_cpu_s"] / median["preprocess_cpu_s"],
            "resized_to": [width, height], "max_levels_from_torch": levels,
            "share_of_values_apart_from_torch": max(share)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="length of the clip")
    parser.add_argument("--source-fps", type=int, nargs="+", default=[2, 30],
                        help="frame rates of the clips: 2 is the frames the model takes, 30 a camera's")
    parser.add_argument("--cores", type=int, default=2, help="cores the process may run on")
    parser.add_argument("--out", help="result file (default: experiments/results/bench_preprocess_<device>.json)")
    args = parser.parse_args()
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
    old = old_preprocess()
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for fps in args.source_fps:
            clip = Path(folder) / f"4k_{fps}fps.mp4"
            write_clip(clip, args.seconds, fps)
            runs.append(measure(clip, fps, old))
            print(runs[-1], flush=True)
    result = {"goal": "a 4K second (2 frames 3840x2160) decoded and preprocessed in <= 0.1 s on 2 cores",
              "cores": sorted(os.sched_getaffinity(0)), "machine_cores": os.cpu_count(),
              "load_average_before_after": [list(load_before), list(os.getloadavg())],
              "old_resize": f"numpy, svlm_jax/media/preprocess.py at {OLD_COMMIT}",
              "new_resize": "Pillow " + PIL.__version__, "stream_bounds": [STREAM_PREPROCESS.min_pixels,
                                                                                    STREAM_PREPROCESS.max_pixels],
              "runs": runs}
    print(f"wrote {write_result('bench_preprocess', result, args.out)}")


if __name__ == "__main__":
    main()
