"""`svlm serve` over a real uvicorn server and real WebSocket clients, against one-stream sessions."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from PIL import Image
from websockets.sync.client import connect

from svlm_jax import demo
from svlm_jax.serve.app import create_app
from svlm_jax.serve.protocol import Ask, ProtocolError, SecondAssembler, Start, Stop, decode_frame, parse_message
from svlm_jax.serve.scheduler import ServeConfig, Server
from svlm_jax.streaming import StreamingSession
from svlm_jax.synth import MatchConfig, RenderConfig, stream_seconds
from svlm_jax.tokenizer import Tokenizer
from svlm_jax.weights import load_pretrained

POLICY = dataclasses.replace(demo.STREAM.policy, max_question_tokens=16, max_answer_tokens=24)
CONFIG = dataclasses.replace(demo.STREAM, policy=POLICY)
SERVE = ServeConfig(max_streams=2, frame_size=(112, 112), max_queue_s=64, max_message_bytes=2**20)
QUESTION = "What is the score?"


@pytest.fixture(scope="module")
def demo_model():
    model = load_pretrained(demo.DEMO_MODEL_DIR, dtype="float32")
    return model, Tokenizer.from_pretrained(demo.DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def served(demo_model):
    """(base ws/http address, Server) of a running server on a free port."""
    model, tokenizer = demo_model
    session = StreamingSession(model, tokenizer, CONFIG, batch=SERVE.max_streams,
                               preprocess=tokenizer.vision_preprocess)
    server = Server(session, SERVE, model_name="demo_model")
    server.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning",
                                        ws_max_size=4 * SERVE.max_message_bytes))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"127.0.0.1:{port}", server
    web.should_exit = True
    thread.join(10)
    server.close()


def match_pngs(seed: int, seconds: int) -> list[list[bytes]]:
    """PNG frames (lossless: the oracle decodes the same bytes) of a synthetic match, per second."""
    def png(frame):
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, "PNG")
        return buffer.getvalue()
    return [[png(f) for f in item.frames]
            for item in itertools.islice(stream_seconds(MatchConfig(seed), RenderConfig()), seconds)]


def alone(demo_model, pngs, previous_text: str, questions=None) -> list[str]:
    """The commentary one stream gets from its own batch-1 session."""
    model, tokenizer = demo_model
    session = StreamingSession(model, tokenizer, dataclasses.replace(CONFIG, previous_text=previous_text),
                               preprocess=tokenizer.vision_preprocess)
    questions = questions or [None] * len(pngs)
    return [session.step_batch([np.stack([decode_frame(p, SERVE.frame_size) for p in second])], [float(k)],
                               [k + 1.0], questions=[questions[k]])[0]
            for k, second in enumerate(pngs)]


def receive_until(ws, kind: str, timeout: float = 60) -> list[dict]:
    """Messages up to and including the first of type `kind`."""
    messages = []
    while not messages or messages[-1]["type"] != kind:
        messages.append(json.loads(ws.recv(timeout=timeout)))
    return messages


def health(address: str) -> dict:
    import urllib.request
    with urllib.request.urlopen(f"http://{address}/health", timeout=10) as response:
        return json.loads(response.read())


def commentate(address: str, pngs, previous_text: str, results: dict, key) -> None:
    with connect(f"ws://{address}/v1/stream") as ws:
        ws.send(json.dumps({"type": "start", "previous_text": previous_text}))
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        for second in pngs:
            for frame in second:
                ws.send(frame)
        ws.send(json.dumps({"type": "stop"}))
        results[key] = receive_until(ws, "end")


def commentary(messages) -> list[dict]:
    return [m for m in messages if m["type"] == "commentary"]


def test_health(served):
    address, _ = served
    assert health(address) == {"model": "demo_model", "streams_active": 0, "streams_max": 2,
                               "frame_size": [112, 112], "fps": 2, "rounds": health(address)["rounds"]}


def test_concurrent_clients_each_get_their_own_stream(served, demo_model):
    """Two clients at once, each with its own match and previous text: every second, in order, and
    the text its stream gets alone (nothing crosses between rows)."""
    address, _ = served
    streams = {"a": (match_pngs(1000, 6), "Blue home, Black away."), "b": (match_pngs(1001, 6), "Red home, White away.")}
    results: dict = {}
    threads = [threading.Thread(target=commentate, args=(address, pngs, previous, results, key))
               for key, (pngs, previous) in streams.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for key, (pngs, previous) in streams.items():
        got = commentary(results[key])
        assert [(m["t_start"], m["t_end"]) for m in got] == [(float(k), k + 1.0) for k in range(6)]
        assert [m["text"] for m in got] == alone(demo_model, pngs, previous), key
        assert all(m["latency_ms"] >= 0 and m["dropped_s"] == 0 for m in got)
    assert any(m["text"] for m in commentary(results["a"]))


def test_a_question_joins_its_second(served, demo_model):
    address, _ = served
    pngs, previous = match_pngs(1002, 4), "Blue home, Black away."
    with connect(f"ws://{address}/v1/stream") as ws:
        ws.send(json.dumps({"type": "start", "previous_text": previous}))
        receive_until(ws, "ready")
        for second in pngs[:3]:
            for frame in second:
                ws.send(frame)
        while not any(m["type"] == "commentary" and m["t_start"] == 2.0 for m in receive_until(ws, "commentary")):
            pass
        ws.send(json.dumps({"type": "ask", "text": QUESTION}))
        for frame in pngs[3]:
            ws.send(frame)
        ws.send(json.dumps({"type": "stop"}))
        messages = receive_until(ws, "end")
    expected = alone(demo_model, pngs, previous, [None, None, None, QUESTION])
    assert [m["type"] for m in messages] == ["commentary", "answer", "end"]
    assert messages[0]["t_start"] == 3.0 and messages[0]["text"] == expected[3]
    assert messages[1] == {"type": "answer", "t": 3.0, "question": QUESTION, "text": expected[3]}


def test_bad_messages_get_errors_and_every_stream_goes_on(served, demo_model):
    address, _ = served
    pngs = match_pngs(1003, 3)
    results: dict = {}
    good = threading.Thread(target=commentate, args=(address, pngs, "Blue home, Black away.", results, "good"))
    good.start()
    with connect(f"ws://{address}/v1/stream") as ws:
        def error_for(message) -> str:
            ws.send(message)
            reply = json.loads(ws.recv(timeout=30))
            assert reply["type"] == "error", reply
            return reply["message"]

        assert "before start" in error_for(pngs[0][0])
        assert "first message must be start" in error_for(json.dumps({"type": "stop"}))
        ws.send(json.dumps({"type": "start"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        assert "malformed JSON" in error_for("{not json")
        assert "unknown message type 'dance'" in error_for(json.dumps({"type": "dance"}))
        assert "unknown field(s) ['colour']" in error_for(json.dumps({"type": "ask", "text": "hi", "colour": 1}))
        assert "JPEG or PNG" in error_for(b"\x00not an image at all")
        assert "over this server's limit" in error_for(b"\xff" * (SERVE.max_message_bytes + 1))
        assert "tokens; this stream takes at most 16" in error_for(json.dumps({"type": "ask", "text": "goal " * 40}))
        assert "started already" in error_for(json.dumps({"type": "start"}))
        for frame in pngs[0]:
            ws.send(frame)
        ws.send(json.dumps({"type": "stop"}))
        assert "after stop" in error_for(pngs[1][0])
        messages = receive_until(ws, "end")
        assert [m["t_start"] for m in commentary(messages)] == [0.0]
    good.join(120)
    got = commentary(results["good"])
    assert [m["text"] for m in got] == alone(demo_model, pngs, "Blue home, Black away.")


def test_a_vanished_client_frees_its_row(served):
    """... and clients coming and going recompile nothing (the server compiled at start-up)."""
    import jax

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    address, _ = served
    with connect(f"ws://{address}/v1/stream") as first, connect(f"ws://{address}/v1/stream") as second:
        for ws in (first, second):
            ws.send(json.dumps({"type": "start"}))
            assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        assert health(address)["streams_active"] == 2
        with connect(f"ws://{address}/v1/stream") as third:
            third.send(json.dumps({"type": "start"}))
            reply = json.loads(third.recv(timeout=30))
            assert reply["type"] == "error" and "taken" in reply["message"]
        first.socket.close()  # gone without stop or close handshake
        deadline = time.monotonic() + 30
        while health(address)["streams_active"] != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert health(address)["streams_active"] == 1
        with connect(f"ws://{address}/v1/stream") as third:
            third.send(json.dumps({"type": "start"}))
            assert json.loads(third.recv(timeout=30))["type"] == "ready"
            for frame in match_pngs(1004, 1)[0]:
                third.send(frame)
            third.send(json.dumps({"type": "stop"}))
            assert [m["type"] for m in receive_until(third, "end")] == ["commentary", "end"]
    assert compiles == []


def test_a_source_the_server_reads(served, tmp_path):
    from svlm_jax.synth.dataset import write_video

    path = tmp_path / "match.mp4"
    frames = [f for item in itertools.islice(stream_seconds(MatchConfig(1005), RenderConfig()), 3) for f in item.frames]
    write_video(path, frames, fps=2, height=112, width=112)
    address, _ = served
    with connect(f"ws://{address}/v1/stream") as ws:
        ws.send(json.dumps({"type": "start", "source": str(path)}))
        messages = receive_until(ws, "end")
    assert [m["t_start"] for m in commentary(messages)] == [0.0, 1.0, 2.0]
    with connect(f"ws://{address}/v1/stream") as ws:
        ws.send(json.dumps({"type": "start", "source": str(tmp_path / "missing.mp4")}))
        messages = receive_until(ws, "end")
    assert messages[-2]["type"] == "error" and "no such file" in messages[-2]["message"]


def test_a_live_queue_drops_its_oldest_seconds(served):
    """The bound on a live stream's queue (the engine loop is not started: nothing is taken)."""
    _, running = served
    server = Server(running.session, dataclasses.replace(SERVE, max_queue_s=2), model_name="x")
    sent: list[dict] = []
    stream = server.open_stream(Start(), sent.append)
    black = np.zeros((2, 112, 112, 3), np.uint8)
    for _ in range(5):
        server.add_second(stream, black)
    assert [s.t_start for s in stream.queue] == [3.0, 4.0] and stream.dropped_s == 3
    assert sent[0]["type"] == "ready"


def test_protocol_messages_and_second_assembly():
    assert parse_message('{"type": "start", "fps": 4, "previous_text": "x"}') == Start(previous_text="x", fps=4)
    assert parse_message('{"type": "ask", "text": "Who?"}') == Ask("Who?")
    assert parse_message('{"type": "stop"}') == Stop()
    for bad, why in [('[1]', "JSON object"), ('{"type": "start", "fps": true}', "must be a int"),
                     ('{"type": "start", "fps": 0}', "fps must be"), ('{"type": "ask"}', "needs a"),
                     ('{"type": "ask", "text": " "}', "empty")]:
        with pytest.raises(ProtocolError, match=why):
            parse_message(bad)
    # 4 client frames a second, on screen at s + 1/4 .. s + 1: the model's 2 are those at s + 1/2, s + 1.
    assembler = SecondAssembler(client_fps=4, model_fps=2)
    frames = [np.full((2, 2, 3), i, np.uint8) for i in range(8)]
    seconds = [assembler.add(f) for f in frames]
    assert [s is None for s in seconds] == [True, True, True, False] * 2
    assert [int(f[0, 0, 0]) for f in seconds[3]] == [1, 3] and [int(f[0, 0, 0]) for f in seconds[7]] == [5, 7]
