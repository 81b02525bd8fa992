"""experiments/bench_serve.py's bookkeeping: the per-client correctness checks and the seeds (the
benchmark itself needs a live `svlm serve`: `python experiments/bench_serve.py --smoke`)."""

from __future__ import annotations

from experiments.bench_serve import check_client, pct, pick_seeds, render_client
from svlm_jax.synth import Match, MatchConfig


def record(starts, dropped=None, seconds=4, **kw):
    dropped = dropped or [0] * len(starts)
    com = [{"type": "commentary", "t_start": s, "t_end": s + 1, "text": "", "dropped_s": d, "latency_ms": 5.0}
           for s, d in zip(starts, dropped)]
    return {"seconds": seconds, "row": 0, "commentary": com, "errors": [], "end": True, "other": [],
            "closed_early": None, "vanished_at_s": None, **kw}


def test_seeds_have_distinct_teams():
    seeds = pick_seeds(16)
    assert len({Match(MatchConfig(s)).teams for s in seeds}) == 16


def test_check_client():
    client = render_client(pick_seeds(1)[0], 4)
    assert len(client["jpegs"]) == 8 and client["jpegs"][0][:2] == b"\xff\xd8"
    assert check_client(record([0, 1, 2, 3]), client, None)["ok"]
    assert check_client(record([0, 2, 3], [0, 1, 1]), client, None)["ok"]  # a dropped second, counted
    assert not check_client(record([0, 2, 3]), client, None)["ok"]  # a missing second, not counted
    assert not check_client(record([0, 2, 1, 3]), client, None)["ok"]  # out of order
    assert not check_client(record([0, 1, 2, 3], end=False), client, None)["ok"]
    assert not check_client(record([0, 1, 2, 3], errors=[{"type": "error"}]), client, None)["ok"]
    foreign = next(t for t in ("Red", "Blue", "Yellow") if t not in client["teams"])
    rec = record([0, 1, 2, 3])
    rec["commentary"][1]["text"] = f"{foreign} passes."
    got = check_client(rec, client, {"texts": {0: "", 1: "", 2: "", 3: ""}, "dropped": 0})
    assert got["foreign_team_mentions"] == 1 and got["same_as_reference"] == 0.75
    vanished = record([0, 1], seconds=4, vanished_at_s=2, end=False)
    assert check_client(vanished, client, None)["ok"]


def test_pct():
    assert pct([3, 1, 2, 4], 50) == 2 and pct(list(range(1, 101)), 99) == 99 and pct([], 50) is None
