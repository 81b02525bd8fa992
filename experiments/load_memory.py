"""Peak resident memory of `load_pretrained` on a checkpoint written to disk, vs the weights' size.

    python experiments/load_memory.py --preset qwen2.5-vl-3b --dtype bfloat16

Writes a random checkpoint of the preset's shapes (once, to --dir), then loads it in a fresh
process and records that process's peak RSS before and after loading.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_checkpoint(preset_name: str, dtype: str, path: Path):
    import jax

    import svlm_jax
    from svlm_jax.model.params import Model

    cfg = svlm_jax.preset(preset_name)
    params = svlm_jax.init_params(cfg, jax.random.key(0), dtype=dtype)
    svlm_jax.save_pretrained(Model(config=cfg, params=params), path)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_load(path: str, dtype: str) -> dict:
    """Runs in a child process: resident memory after importing jax, then its peak while loading.
    The peak (VmHWM) is reset first: Linux carries it over from the parent across fork and exec.
    Anonymous memory (what the process allocated) and file-backed pages (the memory-mapped
    safetensors, reclaimable page cache) are sampled apart every 5 ms."""
    import threading

    import jax
    import jax.numpy as jnp

    import svlm_jax

    jnp.zeros(1).block_until_ready()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size
    base = _status_bytes("VmRSS")
    base_anon = _status_bytes("RssAnon")
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for field in peaks:
                peaks[field] = max(peaks[field], _status_bytes(field))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    model = svlm_jax.load_pretrained(path, dtype=dtype)
    jax.block_until_ready(model.params)
    done.set()
    sampler.join()
    peak = _status_bytes("VmHWM")
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    return {"rss_before_load_bytes": base, "peak_rss_bytes": peak, "weight_bytes": weight_bytes,
            "anon_before_load_bytes": base_anon, "peak_anon_bytes": peaks["RssAnon"],
            "peak_file_backed_bytes": peaks["RssFile"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-vl-3b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dir", default=None, help="where the random checkpoint is written (default: a temp dir)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure_load(args.child, args.dtype)))
        return
    from experiments.common import write_result

    path = Path(args.dir or tempfile.mkdtemp(prefix="svlm-ckpt-"))
    if not (path / "config.json").exists():
        write_checkpoint(args.preset, args.dtype, path)
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    out = subprocess.run([sys.executable, __file__, "--child", str(path), "--dtype", args.dtype],
                         capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    extra = m["peak_rss_bytes"] - m["rss_before_load_bytes"]
    extra_anon = m["peak_anon_bytes"] - m["anon_before_load_bytes"]
    result = {"preset": args.preset, "dtype": args.dtype, "safetensors_bytes": disk, **m,
              "load_increase_bytes": extra, "increase_over_weights": extra / m["weight_bytes"],
              "anon_increase_bytes": extra_anon, "anon_increase_over_weights": extra_anon / m["weight_bytes"]}
    print(json.dumps(result, indent=2))
    print(f"weights {m['weight_bytes'] / 2**30:.2f} GiB; peak RSS grew by {extra / 2**30:.2f} GiB "
          f"({extra / m['weight_bytes']:.2f}x), allocated memory by {extra_anon / 2**30:.2f} GiB "
          f"({extra_anon / m['weight_bytes']:.2f}x the weights)")
    write_result("load_memory", result)


if __name__ == "__main__":
    main()
