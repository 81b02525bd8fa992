"""Peak host memory of loading a checkpoint written to disk, against the weights' size: the whole
model into one process (`load_pretrained`), or straight into a mesh over several processes
(`sharded_load.load_sharded`, each process reading only its devices' parts).

    python experiments/load_memory.py --preset qwen2.5-vl-3b --dtype bfloat16
    python experiments/load_memory.py --preset qwen2.5-vl-3b --dtype bfloat16 --processes 2

Writes a random checkpoint of the preset's shapes (once, to --dir), then loads it in fresh
processes (with --processes N: N processes on localhost joined by jax.distributed, one CPU device
each, the parameters split over an fsdp=N mesh by the training sharding rules) and records each
one's memory before and at its peak while loading.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
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


def measure_load(path: str, dtype: str, processes: int = 1, process_id: int = 0, port: int = 0) -> dict:
    """Runs in a child process: resident memory after starting jax (and importing the loaders), then
    its peak while loading.
    The peak (VmHWM) is reset first: Linux carries it over from the parent across fork and exec.
    Anonymous memory (what the process allocated: on CPUs the device arrays too) and file-backed
    pages (the memory-mapped safetensors, reclaimable page cache) are sampled apart every 5 ms.
    With processes > 1 the model is loaded sharded (see the module docstring)."""
    import threading

    import jax
    import jax.numpy as jnp

    import svlm_jax
    from svlm_jax import distributed
    from svlm_jax.sharded_load import load_sharded
    from svlm_jax.train import sharding
    from svlm_jax.train.checkpoint import abstract_params

    distributed.initialize(distributed.Launch(f"localhost:{port}", processes, process_id) if processes > 1
                           else distributed.Launch())
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

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        if processes > 1:
            like = abstract_params(svlm_jax.ModelConfig.from_file(path), dtype)
            model = load_sharded(path, sharding.tree_shardings(like, sharding.make_mesh(1, processes, 1)), dtype)
        else:
            model = svlm_jax.load_pretrained(path, dtype=dtype)
        jax.block_until_ready(model.params)
    finally:
        done.set()
        sampler.join()
    peak = _status_bytes("VmHWM")
    leaves = jax.tree.leaves(model.params)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    held = sum(s.data.size * s.data.dtype.itemsize for x in leaves for s in x.addressable_shards)
    return {"rss_before_load_bytes": base, "peak_rss_bytes": peak, "weight_bytes": weight_bytes,
            "held_bytes": held, "anon_before_load_bytes": base_anon, "peak_anon_bytes": peaks["RssAnon"],
            "peak_file_backed_bytes": peaks["RssFile"],
            "load_increase_bytes": peak - base, "anon_increase_bytes": peaks["RssAnon"] - base_anon}


def measure(path: str | Path, dtype: str, processes: int = 1) -> list[dict]:
    """`measure_load` in `processes` fresh processes (joined on a free localhost port), one record each."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}  # one device each
    children = [subprocess.Popen([sys.executable, __file__, "--child", str(path), "--dtype", dtype,
                                  "--processes", str(processes), "--process-id", str(i), "--port", str(port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                for i in range(processes)]
    records = []
    for child in children:
        out, err = child.communicate(timeout=1800)
        if child.returncode:
            raise RuntimeError(f"a measuring process failed:\n{err[-3000:]}")
        records.append(json.loads(out.strip().splitlines()[-1]))
    return records


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-vl-3b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--processes", type=int, default=1, help="load sharded over this many processes")
    ap.add_argument("--dir", default=None, help="where the random checkpoint is written (default: a temp dir)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure_load(args.child, args.dtype, args.processes, args.process_id, args.port)))
        return
    from experiments.common import write_result

    path = Path(args.dir or tempfile.mkdtemp(prefix="svlm-ckpt-"))
    if not (path / "config.json").exists():
        write_checkpoint(args.preset, args.dtype, path)
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    records = measure(path, args.dtype, args.processes)
    for i, m in enumerate(records):
        m["increase_over_weights"] = m["load_increase_bytes"] / m["weight_bytes"]
        m["anon_increase_over_weights"] = m["anon_increase_bytes"] / m["weight_bytes"]
        print(f"process {i}: weights {m['weight_bytes'] / 2**30:.2f} GiB, {m['held_bytes'] / 2**30:.2f} GiB held here; "
              f"peak RSS grew by {m['load_increase_bytes'] / 2**30:.2f} GiB ({m['increase_over_weights']:.2f}x the "
              f"weights), allocated memory by {m['anon_increase_bytes'] / 2**30:.2f} GiB "
              f"({m['anon_increase_over_weights']:.2f}x)")
    result = {"preset": args.preset, "dtype": args.dtype, "safetensors_bytes": disk, "processes": args.processes,
              **(records[0] if args.processes == 1 else {"per_process": records})}
    print(json.dumps(result, indent=2))
    write_result("load_memory" if args.processes == 1 else f"load_memory_{args.processes}_processes", result)


if __name__ == "__main__":
    main()
