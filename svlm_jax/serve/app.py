"""The ASGI app of `svlm serve` (docs/serve.md): the viewer at `/`, `/health`, the WebSocket `/v1/stream`."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from svlm_jax.serve.protocol import Ask, ProtocolError, SecondAssembler, Start, Stop, decode_frame, parse_message
from svlm_jax.serve.scheduler import Server, ServerFull, Stream

STATIC = Path(__file__).parent / "static"
CLOSE_TRY_AGAIN_LATER = 1013  # WebSocket close code: the server is full


def create_app(server: Server) -> Starlette:
    """The app over a started `Server` (the app does not start or close it)."""

    async def index(request: Request):
        return FileResponse(STATIC / "index.html")

    async def health(request: Request):
        return JSONResponse(server.health())

    async def stream(websocket: WebSocket):
        await websocket.accept()
        outbox: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        connection = Connection(server, lambda message: loop.call_soon_threadsafe(outbox.put_nowait, message))
        sender = asyncio.create_task(_send_all(websocket, outbox))
        try:
            while not sender.done():
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    await connection.receive(message.get("bytes"), message.get("text"))
                except ProtocolError as error:
                    connection.send({"type": "error", "message": str(error)})
                except ServerFull as error:
                    connection.send({"type": "error", "message": str(error)})
                    connection.send({"type": "close", "code": CLOSE_TRY_AGAIN_LATER})
        except WebSocketDisconnect:
            pass
        finally:
            connection.release()
            if not sender.done():
                outbox.put_nowait({"type": "close", "code": 1000})
            with contextlib.suppress(Exception):
                await sender

    routes = [Route("/", index), Route("/health", health), WebSocketRoute("/v1/stream", stream)]
    if STATIC.is_dir():
        routes.append(Mount("/static", StaticFiles(directory=STATIC), name="static"))
    return Starlette(routes=routes)


async def _send_all(websocket: WebSocket, outbox: asyncio.Queue) -> None:
    """The connection's only writer: sends the outbox in order; closes after `end` or a close request
    (the pseudo-message {"type": "close", "code"}, never sent as such)."""
    while True:
        message = await outbox.get()
        if message["type"] == "close":
            with contextlib.suppress(Exception):
                await websocket.close(code=message["code"])
            return
        try:
            await websocket.send_json(message)
        except Exception:  # the client is gone: the receive loop sees the disconnect
            return
        if message["type"] == "end":
            with contextlib.suppress(Exception):
                await websocket.close()
            return


class Connection:
    """One WebSocket's side of the protocol: start, frames, questions, stop."""

    def __init__(self, server: Server, send):
        self.server, self.send = server, send
        self.stream: Stream | None = None
        self.assembler: SecondAssembler | None = None

    async def receive(self, data: bytes | None, text: str | None) -> None:
        size = len(data) if data is not None else len((text or "").encode())
        limit = self.server.config.max_message_bytes
        if size > limit:
            raise ProtocolError(f"a message of {size} bytes is over this server's limit of {limit} "
                                "(--max-message-bytes)")
        if data is not None:
            await self._frame(data)
            return
        message = parse_message(text or "")
        if isinstance(message, Start):
            if self.stream is not None:
                raise ProtocolError("the stream has started already")
            self.stream = self.server.open_stream(message, self.send)
            self.assembler = SecondAssembler(message.fps, self.server.session.config.policy.fps)
            return
        if self.stream is None:
            raise ProtocolError(f"the first message must be start, not {type(message).__name__.lower()}")
        if isinstance(message, Ask):
            self.server.ask(self.stream, message.text)
        elif isinstance(message, Stop):
            if self.stream.stopped:
                raise ProtocolError("the stream has stopped already")
            self.server.stop(self.stream)

    async def _frame(self, data: bytes) -> None:
        if self.stream is None:
            raise ProtocolError("a frame before start: send {\"type\": \"start\"} first")
        if self.stream.start.source is not None:
            raise ProtocolError(f"this stream reads {self.stream.start.source}; it takes no frames")
        if self.stream.stopped:
            raise ProtocolError("a frame after stop")
        # Decoded off the event loop (and off the engine's thread), in the order received.
        frame_hwc = await run_in_threadpool(decode_frame, data, self.server.config.frame_size)
        second = self.assembler.add(frame_hwc)
        if second is not None:
            self.server.add_second(self.stream, second)

    def release(self) -> None:
        if self.stream is not None:
            self.server.release(self.stream)
