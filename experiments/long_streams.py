"""Demo models over long streams of several held-out matches: accuracy per 300 s segment for each
(model, vision window), the demo's cache otherwise.

    python -m experiments.long_streams --seconds 1200 --seeds 1001 1003 1004 --vision 16 8
    python -m experiments.long_streams --seconds 1200 --seeds 1001 1004 2001 2002 \
        --model non_overlapped=runs/no_overlap_model --out experiments/results/long_streams_sft.json

The choice (experiments/README.md) of the demo's 8 s vision window and its SFT comparison beyond seed 1000's
hour (experiments/ablations.py) come from these runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.ablations import OURS, stream_variant, summarize, with_policy
from experiments.common import RESULTS, config_record, write_result
from svlm_jax import demo
from svlm_jax.synth import LONG_MEMORY_S

KEYS = ("accuracy", "event_accuracy", "score_accuracy", "memory_accuracy", "score_consistency")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=1200, help="stream length per match")
    ap.add_argument("--seeds", type=int, nargs="+", required=True, help="held-out matches (not training seeds)")
    ap.add_argument("--vision", type=int, nargs="+", default=[OURS.policy.vision_window_s], help="vision windows, s")
    ap.add_argument("--model", nargs="*", default=[], metavar="NAME=DIR", help="models besides the bundled one")
    ap.add_argument("--segment-s", type=int, default=300)
    ap.add_argument("--out", default=str(RESULTS / "long_streams.json"))
    args = ap.parse_args(argv)

    models = {"bundled": demo.load_model()}
    for spec in args.model:
        name, _, model_dir = spec.partition("=")
        if not model_dir:
            ap.error(f"--model takes NAME=DIR, got {spec!r}")
        models[name] = demo.load_model(Path(model_dir))
    runs = []
    for seed in args.seeds:
        for name, (model, tokenizer) in models.items():
            for vision in args.vision:
                config = with_policy(OURS, vision_window_s=vision)
                s = summarize(stream_variant(model, tokenizer, "streaming", config, seed, args.seconds, float("inf")),
                              args.segment_s, LONG_MEMORY_S)
                runs.append({"seed": seed, "model": name, "vision_window_s": vision, **{k: s[k] for k in KEYS},
                             "segments": [{k: g[k] for k in ("start_s", "end_s", *KEYS)} for g in s["segments"]]})
                print(json.dumps({k: runs[-1][k] for k in ("seed", "model", "vision_window_s", *KEYS)}), flush=True)
    config = {"seconds": args.seconds, "seeds": args.seeds, "vision": args.vision, "segment_s": args.segment_s,
              "models": {"bundled": str(demo.DEMO_MODEL_DIR), **dict(s.partition("=")[::2] for s in args.model)},
              "stream": config_record("streaming", OURS), "long_memory_s": LONG_MEMORY_S}
    print(f"wrote {write_result('long_streams', {'config': config, 'runs': runs}, args.out)}")


if __name__ == "__main__":
    main()
