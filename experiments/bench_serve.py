"""`svlm serve` under load: 1, 4 and 16 concurrent WebSocket clients streaming synthetic matches in
real time to one server of the bundled demo model, with latency, real-time factor, dropped seconds,
the server's memory, and per-client correctness; a soak mode adds memory flatness over 10 minutes,
a client that vanishes mid-stream and misbehaving clients.

    PYTHONPATH=. python experiments/bench_serve.py            # 1/4/16 clients x 120 s (~7 min on 2 CPU cores)
    PYTHONPATH=. python experiments/bench_serve.py --soak     # 16 clients x 600 s, vanish + bad clients
    PYTHONPATH=. python experiments/bench_serve.py --smoke    # 1 and 2 clients x 10 s + a 20 s mini-soak, /tmp
    PYTHONPATH=. python experiments/bench_serve.py --clients 1 2 --seconds 30 --out /tmp/x.json
    PYTHONPATH=. python experiments/bench_serve.py --server-per-case --server-arg=--dtype=bfloat16 \
        --out /tmp/bench_serve_bf16.json   # a server of --max-streams = clients per case, other options

One server for the whole invocation, `svlm serve --model svlm_jax/assets/demo_model --frame-size
112x112 --max-streams N --port P` (N: the most clients of any case), run as a subprocess; the
benchmark waits for its /health. Client i streams match seed SEEDS[i] (the first seeds from 1000
whose (home, away) pair no earlier client has, so every client's previous_text, the match intro,
is distinct), its frames rendered by `svlm_jax.synth.stream_seconds` and JPEG-encoded (Pillow)
before the clients start. Each client sends 2 frames a second paced by the wall clock (frame k at
offset + (k + 1) / 2 s; client i's offset is i / N s so that clients are not in lock step, as live
clients would not be), then `stop`, and reads until `end`. How each number is measured is in
METHOD (also written into the JSON).

Writes experiments/results/bench_serve.json (--soak: bench_serve_soak.json) and a .png beside it
(or --out; --smoke: /tmp/bench_serve_smoke.json).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "svlm_jax" / "assets" / "demo_model"
FPS = 2
# `svlm serve` run with this interpreter; SVLM_BENCH_SERVER (a python file taking the same arguments) replaces it
SERVER = ([sys.executable, os.environ["SVLM_BENCH_SERVER"]] if os.environ.get("SVLM_BENCH_SERVER")
          else [sys.executable, "-m", "svlm_jax.cli"])
METHOD = {
    "pacing": "client i sends frame k of its match at t0 + i/N + (k+1)/fps (fps 2): second s's last frame at "
              "t0 + i/N + s + 1; all clients of a case start together; then stop, then read until end",
    "server_latency_ms": "the commentary message's latency_ms (server: the second's last frame arriving -> the message)",
    "client_latency_ms": "client clock: ws.send of the second's last frame returned -> its commentary message received",
    "percentiles": "p50/p99 over every commentary of every client of the case (nearest-rank)",
    "real_time_factor": "per client, wall seconds from its video's time 0 (half a second before its first frame "
                        "was sent) to its last commentary, divided by "
                        "the seconds of video it streamed: 1 + (last latency)/S when the server keeps up; the "
                        "case reports the worst client. Dropped seconds are not in it: see dropped_s",
    "work_per_second_s": "median gap between consecutive commentaries of a client while it was backlogged "
                         "(lag_s >= 1: the server had its next second queued): seconds of server work per second "
                         "of video of that stream; below 1 keeps up. null when never backlogged",
    "dropped_s": "each client's final dropped_s (the last commentary's); the case sums them",
    "rss": "psutil RSS of the server process and its children, at the start and end of each case, and the "
           "largest of samples every 2 s (soak: every 10 s)",
    "correctness": "per client: a ready with a row (distinct among concurrent clients), commentaries with "
                   "t_end = t_start + 1, t_start strictly increasing from 0 within [0, S), commentaries + final "
                   "dropped_s = S (with no drop: exactly 0..S-1), dropped_s never decreasing, end after the "
                   "last commentary, no error",
    "cross_talk": "each client's previous_text is its match's intro (distinct team pairs across clients): "
                  "foreign_team_mentions counts team names in its commentary that are not its match's teams "
                  "(a stream answering from another stream's cache would name other teams; the model itself "
                  "rarely does); same_as_reference: the fraction of seconds whose text equals the same seed's text "
                  "in the first case that streamed it (greedy: batch rows are independent), null when either run "
                  "dropped a second; accuracy: synth score_commentary against the match's ground truth",
}


# ---------------------------------------------------------------- frames

def pick_seeds(n: int, first: int = 1000) -> list[int]:
    """The first seeds from `first` whose (home, away) teams differ from every earlier pick's."""
    from svlm_jax.synth import Match, MatchConfig

    seeds, pairs = [], set()
    for seed in itertools.count(first):
        teams = Match(MatchConfig(seed)).teams
        if teams not in pairs:
            pairs.add(teams)
            seeds.append(seed)
            if len(seeds) == n:
                return seeds


def render_client(seed: int, seconds: int, quality: int = 90) -> dict:
    """Match `seed`'s first `seconds`: JPEG frames (FPS a second), truths, teams and intro."""
    from PIL import Image

    from svlm_jax.synth import Match, MatchConfig, RenderConfig, match_intro, stream_seconds

    jpegs, truths = [], []
    for item in itertools.islice(stream_seconds(MatchConfig(seed), RenderConfig()), seconds):
        assert item.frames.shape[0] == FPS, item.frames.shape
        for frame in item.frames:
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
            jpegs.append(buf.getvalue())
        truths.append(item.truth)
    teams = Match(MatchConfig(seed)).teams
    return {"seed": seed, "teams": teams, "previous_text": match_intro(teams), "jpegs": jpegs, "truths": truths}


def valid_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((112, 112, 3), 90, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


# ---------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`svlm serve` as a subprocess (python -m svlm_jax.cli serve ...), its log in a file."""

    def __init__(self, max_streams: int, port: int, log: Path, extra: list[str]):
        self.port, self.log_path, self.extra = port, log, extra
        self.command = [*SERVER, "serve", "--model", str(DEMO_MODEL),
                        "--frame-size", "112x112", "--max-streams", str(max_streams), "--port", str(port), *extra]
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        import psutil
        self.ps = psutil.Process(self.proc.pid)
        self.base = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/v1/stream"

    def wait_ready(self, timeout_s: float) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.health()
                return time.perf_counter() - t0
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"server not healthy after {timeout_s} s:\n{self.log_tail()}")

    def health(self) -> dict:
        with urllib.request.urlopen(self.base + "/health", timeout=10) as r:
            return json.loads(r.read())

    def rss(self) -> int:
        import psutil
        total = 0
        for p in [self.ps, *self.ps.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


async def ahealth(server: Server) -> dict:
    return await asyncio.to_thread(server.health)


def connect(url: str):
    from websockets.asyncio.client import connect as ws_connect
    return ws_connect(url, compression=None, proxy=None, max_size=None, open_timeout=30)


# ---------------------------------------------------------------- one streaming client

async def stream_client(url: str, client: dict, seconds: int, t0: float, offset: float,
                        vanish_after_s: int | None = None, on_ready=None) -> dict:
    """Streams `seconds` of the client's frames paced in real time; returns what came back."""
    rec = {"seed": client["seed"], "teams": list(client["teams"]), "seconds": seconds, "row": None,
           "commentary": [], "errors": [], "end": False, "other": [], "closed_early": None,
           "vanished_at_s": None, "max_send_lag_ms": 0.0}
    sent_last = {}  # second -> perf_counter when its last frame's send returned
    first_send = None
    try:
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "previous_text": client["previous_text"], "fps": FPS}))
            ready = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if ready.get("type") != "ready":
                rec["errors"].append(ready)
                return rec
            rec["row"], rec["ready"] = ready.get("row"), ready
            if on_ready:
                on_ready()

            async def send():
                nonlocal first_send
                for k in range(FPS * seconds):
                    s = k // FPS
                    if vanish_after_s is not None and s == vanish_after_s:
                        rec["vanished_at_s"] = s
                        ws.transport.abort()  # gone: no stop, no close handshake
                        return
                    target = t0 + offset + (k + 1) / FPS
                    delay = target - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    rec["max_send_lag_ms"] = max(rec["max_send_lag_ms"], 1e3 * (time.perf_counter() - target))
                    await ws.send(client["jpegs"][k])
                    now = time.perf_counter()
                    first_send = first_send or now
                    if k % FPS == FPS - 1:
                        sent_last[s] = now
                await ws.send(json.dumps({"type": "stop"}))

            sender = asyncio.create_task(send())
            try:
                while True:
                    timeout = None if not sender.done() else 120.0
                    msg = await asyncio.wait_for(ws.recv(), timeout)
                    now = time.perf_counter()
                    if isinstance(msg, bytes):
                        rec["other"].append(f"<{len(msg)} bytes>")
                        continue
                    m = json.loads(msg)
                    kind = m.get("type")
                    if kind == "commentary":
                        ts = m.get("t_start")
                        s = int(round(ts)) if isinstance(ts, (int, float)) else None
                        client_ms = 1e3 * (now - sent_last[s]) if s in sent_last else None
                        rec["commentary"].append({**m, "client_latency_ms": client_ms, "t_recv": now - t0})
                    elif kind == "end":
                        rec["end"] = True
                        rec["t_end_recv"] = now - t0
                        break
                    elif kind == "error":
                        rec["errors"].append(m)
                    else:
                        rec["other"].append(m)
            except asyncio.TimeoutError:
                rec["closed_early"] = "no end within 120 s of stop"
            except Exception as e:  # noqa: BLE001: the connection closed (or vanished on purpose)
                if rec["vanished_at_s"] is None:
                    rec["closed_early"] = f"{type(e).__name__}: {e}"
            finally:
                if not sender.done():
                    sender.cancel()
                elif sender.exception() and rec["vanished_at_s"] is None:
                    rec["closed_early"] = f"sender: {sender.exception()!r}"
    except Exception as e:  # noqa: BLE001
        if rec["vanished_at_s"] is None:
            rec["closed_early"] = f"{type(e).__name__}: {e}"
    rec["first_send"] = None if first_send is None else first_send - t0
    return rec


# ---------------------------------------------------------------- checks

def check_client(rec: dict, client: dict, reference: dict | None) -> dict:
    """Correctness of one client's stream (METHOD["correctness"], ["cross_talk"])."""
    from svlm_jax.synth import score_commentary

    from svlm_jax.synth.world import TEAM_NAMES

    S = rec["seconds"] if rec["vanished_at_s"] is None else rec["vanished_at_s"]
    com = rec["commentary"]
    starts = [c.get("t_start") for c in com]
    drops = [c.get("dropped_s", 0) or 0 for c in com]
    final_dropped = drops[-1] if drops else 0
    problems = []
    if rec["row"] is None:
        problems.append("no ready")
    if any(not isinstance(t, (int, float)) or float(t) != int(t) for t in starts):
        problems.append(f"non-integer t_start {starts[:5]}")
    else:
        starts = [int(t) for t in starts]
        if any(b <= a for a, b in zip(starts, starts[1:])):
            problems.append("t_start not strictly increasing")
        if starts and starts[0] != 0 and final_dropped == 0:
            problems.append(f"first t_start {starts[0]}")
        if any(not 0 <= t < rec["seconds"] for t in starts):
            problems.append("t_start out of range")
    if any(c.get("t_end") != c.get("t_start", 0) + 1 for c in com):
        problems.append("t_end != t_start + 1")
    if any(b < a for a, b in zip(drops, drops[1:])):
        problems.append("dropped_s decreased")
    if rec["vanished_at_s"] is None:
        if len(com) + final_dropped != S:
            problems.append(f"{len(com)} commentaries + {final_dropped} dropped != {S} seconds")
        if final_dropped == 0 and starts != list(range(S)):
            problems.append("no drop but t_start != 0..S-1")
        if not rec["end"]:
            problems.append(f"no end ({rec['closed_early']})")
    if rec["errors"]:
        problems.append(f"errors: {rec['errors'][:3]}")
    if rec["other"]:
        problems.append(f"unexpected messages: {rec['other'][:3]}")
    own = set(client["teams"])
    foreign = sum(1 for c in com for w in re.findall(r"[A-Za-z]+", c.get("text", ""))
                  if w in TEAM_NAMES and w not in own)
    texts = {int(c["t_start"]): c.get("text", "") for c in com if isinstance(c.get("t_start"), (int, float))}
    scored = [s for s in range(S) if s in texts]
    accuracy = None
    if scored:
        scores = score_commentary([texts[s] for s in scored], [client["truths"][s] for s in scored])
        accuracy = sum(x.correct for x in scores) / len(scores)
    same = None
    if reference is not None and final_dropped == 0 and reference["dropped"] == 0:
        common = [s for s in texts if s in reference["texts"]]
        same = sum(texts[s] == reference["texts"][s] for s in common) / len(common) if common else None
    return {"ok": not problems, "problems": problems, "commentaries": len(com), "dropped_s": final_dropped,
            "foreign_team_mentions": foreign, "accuracy": accuracy, "same_as_reference": same,
            "texts": texts}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(np.ceil(q / 100 * len(v))) - 1))]


def work_per_second(com: list[dict]) -> float | None:
    gaps = [b["t_recv"] - a["t_recv"] for a, b in zip(com, com[1:]) if (a.get("lag_s") or 0) >= 1]
    return statistics.median(gaps) if gaps else None


# ---------------------------------------------------------------- misbehaving clients

async def recv_until(ws, want, timeout: float) -> list[dict]:
    """Messages until one whose type is in `want` (or timeout / close); all of them, in order."""
    got, deadline = [], time.perf_counter() + timeout
    try:
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                got.append({"type": "<timeout>"})
                return got
            msg = await asyncio.wait_for(ws.recv(), left)
            m = json.loads(msg) if isinstance(msg, str) else {"type": f"<{len(msg)} bytes>"}
            got.append(m)
            if m.get("type") in want:
                return got
    except asyncio.TimeoutError:
        got.append({"type": "<timeout>"})
    except Exception as e:  # noqa: BLE001
        got.append({"type": "<closed>", "detail": f"{type(e).__name__}: {e}"})
    return got


async def misbehaving_check(url: str, name: str, max_message_bytes: int, wait_for_row_s: float = 90.0) -> dict:
    """One bad client (`misbehaving_once`), tried again while the server answers that every row is
    taken (a row whose client left is free only once the engine thread has seen it go)."""
    t0, refused = time.perf_counter(), 0
    while True:
        out = await misbehaving_once(url, name, max_message_bytes)
        full = any(m.get("type") == "error" and "taken" in str(m.get("message")) for m in out["messages"])
        if not full or time.perf_counter() - t0 > wait_for_row_s:
            break
        refused += 1
        await asyncio.sleep(1.0)
    out["refused_all_rows_taken"], out["waited_for_row_s"] = refused, round(time.perf_counter() - t0, 2)
    return out


async def misbehaving_once(url: str, name: str, max_message_bytes: int) -> dict:
    """One bad client: `name`'s bad message must get an error; then the same connection must still
    stream (one second of valid frames and stop -> commentary for t_start 0 and end)."""
    jpeg = valid_jpeg()
    out = {"check": name, "got_error": False, "error_message": None, "connection_goes_on": None, "messages": []}
    try:
        async with connect(url) as ws:
            start = json.dumps({"type": "start", "previous_text": f"misbehaving client {name}."})
            if name == "frame_before_start":
                await ws.send(jpeg)
                got = await recv_until(ws, {"error"}, 15)
                out["messages"] += got
                await ws.send(start)
                out["messages"] += await recv_until(ws, {"ready", "error"}, 30)
            else:
                await ws.send(start)
                out["messages"] += await recv_until(ws, {"ready", "error"}, 30)
                if out["messages"][-1].get("type") != "ready":
                    out["messages"].append({"type": "<no ready>"})
                    return out
                if name == "malformed_json":
                    await ws.send('{"type": "ask", "text": ')
                elif name == "not_an_image":
                    await ws.send(b"this is not an image " * 50)
                elif name == "oversized":
                    await ws.send(b"\xff\xd8" + os.urandom(max_message_bytes + 1 - 2))
                elif name == "oversized_5x":
                    await ws.send(b"\xff\xd8" + os.urandom(5 * max_message_bytes - 2))
                elif name == "unknown_type":
                    await ws.send(json.dumps({"type": "bogus"}))
                if name == "frame_after_stop":
                    await ws.send(jpeg)
                    await ws.send(jpeg)
                    await ws.send(json.dumps({"type": "stop"}))
                    await ws.send(jpeg)
                    got = await recv_until(ws, {"end"}, 60)
                    out["messages"] += got
                    if not any(m.get("type") == "error" for m in got) and got[-1].get("type") == "end":
                        try:  # an error may also come after end
                            await ws.send(jpeg)
                            out["messages"] += await recv_until(ws, {"error"}, 10)
                        except Exception as e:  # noqa: BLE001
                            out["messages"].append({"type": "<closed>", "detail": repr(e)})
                    errors = [m for m in out["messages"] if m.get("type") == "error"]
                    out["got_error"] = bool(errors)
                    out["error_message"] = errors[0].get("message") if errors else None
                    out["connection_goes_on"] = any(m.get("type") == "commentary" for m in out["messages"]) and \
                        any(m.get("type") == "end" for m in out["messages"])
                    return out
                out["messages"] += await recv_until(ws, {"error"}, 15)
            errors = [m for m in out["messages"] if m.get("type") == "error"]
            out["got_error"] = bool(errors)
            out["error_message"] = errors[0].get("message") if errors else None
            # Does this connection still stream?
            try:
                await ws.send(jpeg)
                await ws.send(jpeg)
                await ws.send(json.dumps({"type": "stop"}))
                got = await recv_until(ws, {"end"}, 60)
            except Exception as e:  # noqa: BLE001
                got = [{"type": "<closed>", "detail": f"{type(e).__name__}: {e}"}]
            out["messages"] += got
            out["connection_goes_on"] = any(m.get("type") == "commentary" and m.get("t_start") == 0 for m in got) \
                and got[-1].get("type") == "end"
    except Exception as e:  # noqa: BLE001
        out["messages"].append({"type": "<exception>", "detail": f"{type(e).__name__}: {e}"})
    for m in out["messages"]:  # keep the JSON small
        if isinstance(m.get("message"), str) and len(m["message"]) > 300:
            m["message"] = m["message"][:300] + "..."
    return out


# oversized: one byte over --max-message-bytes; oversized_5x: five times the limit (docs/serve.md
# promises an error for any message over the limit, and that the connection goes on)
MISBEHAVING = ("malformed_json", "not_an_image", "oversized", "oversized_5x", "frame_after_stop", "unknown_type",
               "frame_before_start")


async def rows_full_check(url: str) -> dict:
    """A client beyond --max-streams: the server must send an error and close the connection."""
    out = {"got_error": False, "closed": False, "messages": []}
    try:
        async with connect(url) as ws:
            try:
                await ws.send(json.dumps({"type": "start", "previous_text": "one client too many."}))
            except Exception as e:  # noqa: BLE001
                out["messages"].append({"type": "<closed>", "detail": repr(e)})
            got = await recv_until(ws, {"ready"}, 15)
            if got[-1].get("type") != "<closed>":
                got += await recv_until(ws, set(), 10)  # wait for the close
            out["messages"] += got
    except Exception as e:  # noqa: BLE001
        out["messages"].append({"type": "<closed>", "detail": f"{type(e).__name__}: {e}"})
    out["got_error"] = any(m.get("type") == "error" for m in out["messages"])
    out["closed"] = any(m.get("type") == "<closed>" for m in out["messages"])
    out["got_ready"] = any(m.get("type") == "ready" for m in out["messages"])
    return out


# ---------------------------------------------------------------- a case: N clients at once

async def run_case(server: Server, clients: list[dict], seconds: int, references: dict, *,
                   sample_every_s: float = 2.0, soak: dict | None = None) -> dict:
    """`clients` stream `seconds` each, concurrently; with `soak`, one of them vanishes and the
    misbehaving and rows-full checks run against the live server meanwhile."""
    n = len(clients)
    health0 = await ahealth(server)
    rss0, cpu0 = server.rss(), server.cpu_s()
    samples, events = [], {}
    wall0 = time.perf_counter()
    t0 = wall0 + 1.0
    ready_count = 0

    def on_ready():
        nonlocal ready_count
        ready_count += 1

    vanish = soak["vanish_client"] if soak else None
    tasks = [asyncio.create_task(stream_client(server.ws_url, c, seconds, t0, i / n,
                                               soak["vanish_after_s"] if i == vanish else None, on_ready))
             for i, c in enumerate(clients)]

    async def sampler():
        while True:
            h = await ahealth(server)
            samples.append({"t": round(time.perf_counter() - t0, 2), "rss": server.rss(),
                            "streams_active": h.get("streams_active"), "rounds": h.get("rounds")})
            await asyncio.sleep(sample_every_s)

    sample_task = asyncio.create_task(sampler())

    async def soak_checks():
        while ready_count < n:
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)
        events["active_with_all"] = (await ahealth(server)).get("streams_active")
        events["rows_full"] = await rows_full_check(server.ws_url)
        events["active_after_rows_full"] = (await ahealth(server)).get("streams_active")
        # the vanish
        t_vanish = t0 + vanish / n + soak["vanish_after_s"]
        await asyncio.sleep(max(0.0, t_vanish - time.perf_counter()))
        before = events["active_with_all"]
        t_start = time.perf_counter()
        drop_s, active = None, before
        while time.perf_counter() - t_start < 60:
            active = (await ahealth(server)).get("streams_active")
            if active is not None and before is not None and active <= before - 1:
                drop_s = time.perf_counter() - t_start
                break
            await asyncio.sleep(0.25)
        events["vanish"] = {"client": vanish, "after_s": soak["vanish_after_s"], "active_before": before,
                            "active_after": active, "dropped_within_s": drop_s}
        checks = []
        for name in MISBEHAVING:
            checks.append(await misbehaving_check(server.ws_url, name, soak["max_message_bytes"]))
            checks[-1]["t"] = round(time.perf_counter() - t0, 1)
            checks[-1]["streams_active_after"] = (await ahealth(server)).get("streams_active")
        events["misbehaving"] = checks
        await asyncio.sleep(2.0)
        events["active_after_misbehaving"] = (await ahealth(server)).get("streams_active")

    soak_task = asyncio.create_task(soak_checks()) if soak else None
    records = await asyncio.gather(*tasks)
    if soak_task:
        try:
            await asyncio.wait_for(soak_task, 120)
        except Exception as e:  # noqa: BLE001
            events["soak_checks_error"] = f"{type(e).__name__}: {e}"
    sample_task.cancel()
    await asyncio.sleep(1.0)
    health1 = await ahealth(server)
    rss1, cpu1 = server.rss(), server.cpu_s()
    wall = time.perf_counter() - wall0

    per_client, srv_lat, cli_lat = [], [], []
    for i, (rec, c) in enumerate(zip(records, clients)):
        ref = references.get(c["seed"])
        chk = check_client(rec, c, ref)
        com = rec["commentary"]
        s_lat = [x["latency_ms"] for x in com if isinstance(x.get("latency_ms"), (int, float))]
        c_lat = [x["client_latency_ms"] for x in com if x.get("client_latency_ms") is not None]
        if i != vanish:
            srv_lat += s_lat
            cli_lat += c_lat
        streamed = rec["seconds"] if rec["vanished_at_s"] is None else rec["vanished_at_s"]
        rtf = ((com[-1]["t_recv"] - rec["first_send"] + 1 / FPS) / streamed) if com and rec["first_send"] is not None else None
        texts = chk.pop("texts")
        if ref is None and rec["vanished_at_s"] is None:
            references[c["seed"]] = {"texts": texts, "dropped": chk["dropped_s"]}
        per_client.append({
            "client": i, "seed": c["seed"], "teams": list(c["teams"]), "row": rec["row"], **chk,
            "vanished_at_s": rec["vanished_at_s"], "closed_early": rec["closed_early"],
            "server_latency_ms_p50": pct(s_lat, 50), "server_latency_ms_p99": pct(s_lat, 99),
            "client_latency_ms_p50": pct(c_lat, 50), "client_latency_ms_p99": pct(c_lat, 99),
            "real_time_factor": rtf, "work_per_second_s": work_per_second(com),
            "max_lag_s": max((x.get("lag_s") or 0 for x in com), default=None),
            "max_send_lag_ms": rec["max_send_lag_ms"],
            "sample_text": next((x["text"] for x in com if x.get("text")), None)})
    live = [p for p in per_client if p["vanished_at_s"] is None]
    bucket_s = 10
    buckets: dict[int, list[float]] = {}
    for i, rec in enumerate(records):
        for x in rec["commentary"]:
            if isinstance(x.get("latency_ms"), (int, float)):
                buckets.setdefault(int(x["t_recv"] // bucket_s), []).append(x["latency_ms"])
    timeline = [{"t": b * bucket_s, "n": len(v), "server_latency_ms_p50": pct(v, 50), "p99": pct(v, 99)}
                for b, v in sorted(buckets.items())]
    rows = [p["row"] for p in per_client]
    rtfs = [p["real_time_factor"] for p in live if p["real_time_factor"] is not None]
    wps = [p["work_per_second_s"] for p in live if p["work_per_second_s"] is not None]
    rss_s = [s["rss"] for s in samples]
    result = {
        "clients": n, "seconds": seconds,
        "all_ok": all(p["ok"] for p in live) and len(set(rows)) == len(rows),
        "rows_distinct": len(set(rows)) == len(rows),
        "server_latency_ms": {"p50": pct(srv_lat, 50), "p99": pct(srv_lat, 99), "max": max(srv_lat, default=None),
                              "n": len(srv_lat)},
        "client_latency_ms": {"p50": pct(cli_lat, 50), "p99": pct(cli_lat, 99), "max": max(cli_lat, default=None),
                              "n": len(cli_lat)},
        "real_time_factor_worst": max(rtfs, default=None),
        "real_time_factor_median": statistics.median(rtfs) if rtfs else None,
        "work_per_second_s_median": statistics.median(wps) if wps else None,
        "backlogged_clients": len(wps),
        "dropped_s_total": sum(p["dropped_s"] for p in live),
        "dropped_s_max": max((p["dropped_s"] for p in live), default=0),
        "seconds_answered": sum(p["commentaries"] for p in live),
        "foreign_team_mentions": sum(p["foreign_team_mentions"] for p in per_client),
        "same_as_reference_min": min((p["same_as_reference"] for p in live if p["same_as_reference"] is not None),
                                     default=None),
        "accuracy_mean": statistics.mean([p["accuracy"] for p in live if p["accuracy"] is not None] or [float("nan")]),
        "rss_start": rss0, "rss_end": rss1, "rss_max": max(rss_s + [rss0, rss1]),
        "rss_first_sample": rss_s[0] if rss_s else None, "rss_last_sample": rss_s[-1] if rss_s else None,
        "server_cpu_s": cpu1 - cpu0, "wall_s": wall,
        "server_cpu_per_video_s": (cpu1 - cpu0) / seconds,
        "rounds": (health1.get("rounds") or 0) - (health0.get("rounds") or 0),
        "streams_active_before": health0.get("streams_active"), "streams_active_after": health1.get("streams_active"),
        "latency_timeline_10s": timeline, "per_client": per_client, "samples": samples,
    }
    if soak:
        result["soak"] = events
    return result


def summarize_soak(case: dict) -> dict:
    """Memory flatness and the pass/fail of the soak's checks."""
    ev = case["soak"]
    samples = case["samples"]
    rss = [s["rss"] for s in samples]
    ts = [s["t"] for s in samples]
    half = [(t, r) for t, r in zip(ts, rss) if t >= ts[-1] / 2] if ts else []
    slope = (float(np.polyfit([t for t, _ in half], [r for _, r in half], 1)[0]) * 60 if len(half) >= 3 else None)
    S = case["seconds"]

    def median_between(a, b):
        got = [r for t, r in zip(ts, rss) if a <= t <= b]
        return statistics.median(got) if got else None

    mis = ev.get("misbehaving", [])
    vanish = ev.get("vanish", {})
    rows_full = ev.get("rows_full", {})
    return {
        "rss_first": rss[0] if rss else None, "rss_last": rss[-1] if rss else None, "rss_max": max(rss, default=None),
        "rss_growth_last_minus_first": (rss[-1] - rss[0]) if rss else None,
        "rss_slope_bytes_per_min_second_half": slope,
        # steady state, away from start-up and the joins' transients: seconds 60-120 against the last minute
        "rss_median_60_120s": median_between(60, 120), "rss_median_last_minute": median_between(S - 60, S),
        "vanish_ok": vanish.get("dropped_within_s") is not None,
        "rows_full_ok": bool(rows_full.get("got_error") and rows_full.get("closed") and not rows_full.get("got_ready")),
        "misbehaving_ok": {m["check"]: bool(m["got_error"]) for m in mis},
        "misbehaving_connection_goes_on": {m["check"]: m["connection_goes_on"] for m in mis},
        "others_all_ok": case["all_ok"],
        "streams_active_after_misbehaving": ev.get("active_after_misbehaving"),
    }


# ---------------------------------------------------------------- report

def plot(result: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    soak = result.get("soak_case")
    panels = (2 if cases else 0) + (2 if soak else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5), squeeze=False)
    axes = list(axes[0])
    if cases:
        ns = [c["clients"] for c in cases]
        ax = axes[0]
        for key, style in (("server_latency_ms", "-"), ("client_latency_ms", "--")):
            for q, marker in (("p50", "o"), ("p99", "^")):
                ax.plot(ns, [c[key][q] for c in cases], style, marker=marker, label=f"{key.split('_')[0]} {q}")
        ax.set(xlabel="concurrent clients", ylabel="latency (ms)", xscale="log", yscale="log",
               title="per-second latency", xticks=ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        for c in cases:
            if c["dropped_s_total"]:
                ax.annotate(f"{c['dropped_s_total']} s dropped", (c["clients"], c["server_latency_ms"]["p99"]),
                            fontsize=7)
        ax = axes[1]
        x = np.arange(len(cases))
        ax.bar(x - 0.27, [c["rss_start"] / 2**20 for c in cases], 0.27, label="start")
        ax.bar(x, [c["rss_end"] / 2**20 for c in cases], 0.27, label="end")
        ax.bar(x + 0.27, [c["rss_max"] / 2**20 for c in cases], 0.27, label="max (2 s samples)")
        ax.set(xticks=x, xticklabels=[str(n) for n in ns], xlabel="concurrent clients", ylabel="server RSS (MiB)",
               title="server memory per case")
        ax.legend()
    if soak:
        ax = axes[-2]
        tl = soak["latency_timeline_10s"]
        ax.plot([b["t"] for b in tl], [b["server_latency_ms_p50"] for b in tl], label="p50")
        ax.plot([b["t"] for b in tl], [b["p99"] for b in tl], label="p99")
        ev = soak.get("soak", {})
        for m in ev.get("misbehaving", []):
            ax.axvline(m["t"], color="gray", alpha=0.3)
        ax.set(xlabel="soak time (s)", ylabel="server latency (ms), 10 s buckets", yscale="log",
               title="soak latency (grey: misbehaving clients)")
        ax.legend()
        ax = axes[-1]
        s = soak["samples"]
        ax.plot([p["t"] for p in s], [p["rss"] / 2**20 for p in s], label="RSS (MiB)")
        ax.set(xlabel="soak time (s)", ylabel="server RSS (MiB)", title=f"soak: {soak['clients']} clients")
        ax2 = ax.twinx()
        ax2.plot([p["t"] for p in s], [p["streams_active"] for p in s], "r:", label="streams_active")
        ax2.set_ylabel("streams_active")
        ax.legend(loc="lower left")
        ax2.legend(loc="lower right")
    fig.suptitle(f"svlm serve, demo model, 112x112 at 2 fps, {result['device']} ({os.cpu_count()} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def headline(case: dict) -> str:
    mb = 2**20
    return (f"{case['clients']:>2} clients x {case['seconds']} s: ok={case['all_ok']} "
            f"server p50/p99 {fmt(case['server_latency_ms']['p50'])}/{fmt(case['server_latency_ms']['p99'])} ms, "
            f"client p50/p99 {fmt(case['client_latency_ms']['p50'])}/{fmt(case['client_latency_ms']['p99'])} ms, "
            f"RTF worst {fmt(case['real_time_factor_worst'], 3)}, dropped {case['dropped_s_total']} s, "
            f"RSS {case['rss_start'] / mb:.0f} -> {case['rss_end'] / mb:.0f} MiB (max {case['rss_max'] / mb:.0f}), "
            f"server CPU {case['server_cpu_s']:.0f} s in {case['wall_s']:.0f} s wall")


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


async def bench(args, server: Server) -> dict:
    n_max = max(args.clients + ([args.soak_clients] if args.soak else []))
    seeds = pick_seeds(n_max)
    longest = max(([args.seconds] if args.clients else []) + ([args.soak_seconds] if args.soak else []))
    t = time.perf_counter()
    clients = await asyncio.to_thread(lambda: [render_client(s, longest) for s in seeds])
    print(f"rendered {n_max} matches x {longest} s in {time.perf_counter() - t:.1f} s", flush=True)
    references: dict = {}
    cases = []
    for n in args.clients:
        print(f"{n} clients x {args.seconds} s ...", flush=True)
        if args.server_per_case:  # a server of exactly n rows for this case
            own = Server(n, free_port(), server.log_path.with_name(f"server_{n}.log"), server.extra)
            try:
                startup_s = await asyncio.to_thread(own.wait_ready, args.startup_timeout_s)
                case = await run_case(own, clients[:n], args.seconds, references)
                case.update(server_max_streams=n, server_startup_s=startup_s)
            finally:
                own.stop()
        else:
            case = await run_case(server, clients[:n], args.seconds, references)
        print(headline(case), flush=True)
        for p in case["per_client"]:
            if not p["ok"]:
                print(f"  client {p['client']} (seed {p['seed']}): {p['problems']}", flush=True)
        cases.append(case)
        await asyncio.sleep(2.0)
    soak_case = None
    if args.soak:
        print(f"soak: {args.soak_clients} clients x {args.soak_seconds} s ...", flush=True)
        soak = {"vanish_client": args.soak_clients - 1, "vanish_after_s": args.soak_seconds // 3,
                "max_message_bytes": args.max_message_bytes}
        soak_case = await run_case(server, clients[:args.soak_clients], args.soak_seconds, references,
                                   sample_every_s=10.0, soak=soak)
        soak_case["summary"] = summarize_soak(soak_case)
        print(headline(soak_case), flush=True)
        print(json.dumps(soak_case["summary"], indent=1), flush=True)
    return {"cases": cases, "soak_case": soak_case}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="1 and 2 clients x 10 s, a 2-client 20 s soak, to /tmp")
    ap.add_argument("--clients", type=int, nargs="*", default=[1, 4, 16], help="concurrent clients of each case")
    ap.add_argument("--seconds", type=int, default=120, help="seconds of video each client streams")
    ap.add_argument("--soak", action="store_true", help="16 clients x 600 s: memory flatness, a vanishing "
                                                       "client, misbehaving clients (alone unless --clients given)")
    ap.add_argument("--soak-clients", type=int, default=16)
    ap.add_argument("--soak-seconds", type=int, default=600)
    ap.add_argument("--max-streams", type=int, default=None, help="server rows (default: the most clients)")
    ap.add_argument("--max-message-bytes", type=int, default=None,
                    help="passed to the server; the oversized check sends one byte more (default: the server's)")
    ap.add_argument("--server-per-case", action="store_true",
                    help="start a server of --max-streams = clients for each case (the soak keeps the main one)")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--server-arg", action="append", default=[], help="extra `svlm serve` argument (repeatable)")
    ap.add_argument("--startup-timeout-s", type=float, default=600.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    explicit_clients = any(a == "--clients" or a.startswith("--clients=") for a in sys.argv[1:])
    if args.soak and not explicit_clients:
        args.clients = []
    if args.smoke:
        args.clients, args.seconds = [1, 2], 10
        args.soak, args.soak_clients, args.soak_seconds = True, 2, 24
        args.out = args.out or "/tmp/bench_serve_smoke.json"
    if args.max_message_bytes is None:
        args.max_message_bytes = server_default("--max-message-bytes")
    n_max = max(args.clients + ([args.soak_clients] if args.soak else []))
    max_streams = args.max_streams or (n_max if not args.server_per_case or args.soak else 1)
    port = args.port or free_port()
    extra = [*args.server_arg]
    if args.max_message_bytes is not None and "--max-message-bytes" not in " ".join(extra):
        extra += ["--max-message-bytes", str(args.max_message_bytes)]
    log = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "server.log"
    server = Server(max_streams, port, log, extra)
    print(f"server: {' '.join(server.command)} (log {log})", flush=True)
    try:
        startup_s = server.wait_ready(args.startup_timeout_s)
        health = server.health()
        print(f"server healthy after {startup_s:.1f} s: {health}", flush=True)
        rss_idle = server.rss()
        out = asyncio.run(bench(args, server))
        alive = server.proc.poll() is None
        health_end = server.health() if alive else None
        rss_final = server.rss() if alive else None
    finally:
        rc = server.stop()
    log_tail = log.read_bytes()[-3000:].decode(errors="replace")

    from experiments.common import RESULTS, write_result
    default = RESULTS / ("bench_serve_soak.json" if args.soak and not args.clients else "bench_serve.json")
    config = {"server_command": server.command[1:], "model": str(DEMO_MODEL.relative_to(REPO)),
              "frame_size": [112, 112], "fps": FPS,
              "max_streams": "clients of each case" if args.server_per_case else max_streams,
              "max_message_bytes": args.max_message_bytes, "clients": args.clients, "seconds": args.seconds,
              "soak": args.soak, "soak_clients": args.soak_clients if args.soak else None,
              "soak_seconds": args.soak_seconds if args.soak else None, "cpu_count": os.cpu_count(),
              "jpeg_quality": 90, "seeds": pick_seeds(n_max)}
    result = {"config": config, "method": METHOD, "server_startup_s": startup_s, "health_at_start": health,
              "health_at_end": health_end, "rss_idle_after_startup": rss_idle, "rss_final": rss_final,
              "server_exit_code": rc, "server_log_tail": log_tail, **out}
    path = write_result("bench_serve", result, args.out or default)
    plot(json.loads(path.read_text()), path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def server_default(flag: str) -> int | None:
    """A numeric default of `svlm serve --help` ("... (default: 123)"), None when absent."""
    try:
        text = subprocess.run([*SERVER, "serve", "--help"], capture_output=True,
                              text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^\s+" + re.escape(flag) + r"[^\n]*(?:\n\s+[^-\s][^\n]*)*", text, re.MULTILINE)
    if not m:
        return None
    d = re.search(r"default:?\s*([\d_,]+)", m.group(0))
    return int(d.group(1).replace(",", "").replace("_", "")) if d else None


if __name__ == "__main__":
    main()
