"""The server's engine loop: one `StreamingSession` of B rows driven by its own thread.

Streams join and leave the running batch (a row each); every round advances the streams that have a
whole second queued, the others sit it out, so nothing waits for the slowest client and nothing
recompiles. Everything else (sockets, frame decoding, reading sources) happens beside this thread and
meets it only through the queues below, under one lock.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable

import numpy as np
from PIL import Image

from svlm_jax.media.live import paced
from svlm_jax.media.video import VideoError, VideoReader
from svlm_jax.serve.config import ServeConfig
from svlm_jax.serve.protocol import ProtocolError, Start
from svlm_jax.streaming import StreamingSession

logger = logging.getLogger(__name__)

Send = Callable[[dict], None]  # hands one server message to the client's connection (thread-safe)


class ServerFull(RuntimeError):
    """Every row of the batch holds a stream."""


@dataclasses.dataclass
class QueuedSecond:
    frames_thwc: np.ndarray  # uint8 [fps, H, W, 3]
    t_start: float
    t_end: float
    ready_at: float          # time.monotonic() when its last frame arrived


@dataclasses.dataclass
class Stream:
    """One client's stream: its row, its queued seconds and questions, where its messages go."""

    row: int
    start: Start
    send: Send
    queue: collections.deque = dataclasses.field(default_factory=collections.deque)
    questions: collections.deque = dataclasses.field(default_factory=collections.deque)
    seconds_in: int = 0      # whole seconds received (dropped ones included): the next one's start time
    dropped_s: int = 0
    stopped: bool = False    # stop received, or the source ended: no more seconds will come
    ended: bool = False      # `end` sent
    released: bool = False   # the connection is gone
    joined: bool = False     # the engine has (re)started the row for this stream


class Server:
    """The batch and its thread. Public methods may be called from any thread."""

    def __init__(self, session: StreamingSession, config: ServeConfig, model_name: str):
        self.session, self.config, self.model_name = session, config, model_name
        self.rounds = 0
        self._lock = threading.Condition()
        self._free = list(range(session.batch))
        self._streams: dict[int, Stream] = {}
        self._leaving: list[int] = []  # rows of released streams, freed by the engine thread
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="svlm-engine", daemon=True)

    # ------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Build the cache and compile every step (one silent round of row 0), then start the loop."""
        width, height = self.config.frame_size
        self.session.prepare(height, width)
        for row in range(self.session.batch):
            self.session.leave(row)
        black = np.zeros((self.session.config.policy.fps, height, width, 3), np.uint8)
        others = [None] * (self.session.batch - 1)
        self.session.join(0)
        self.session.step_batch([black, *others], [0.0, *others], [1.0, *others])
        self.session.leave(0)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def health(self) -> dict:
        with self._lock:
            # A released row counts until the engine thread has freed it: active = not free to join.
            return {"model": self.model_name, "streams_active": self.session.batch - len(self._free),
                    "streams_max": self.session.batch, "frame_size": list(self.config.frame_size),
                    "fps": self.session.config.policy.fps, "rounds": self.rounds}

    # ------------------------------------------------------------ streams
    def open_stream(self, start: Start, send: Send) -> Stream:
        """A row for a new stream (ServerFull when there is none); a `source` starts being read."""
        with self._lock:
            if not self._free:
                raise ServerFull(f"all {self.session.batch} streams of this server are taken; try again later")
            stream = Stream(row=self._free.pop(0), start=start, send=send)
            self._streams[stream.row] = stream
            self._lock.notify_all()
        # Ready before the source's reader starts: what it reports (an unreadable source) comes after.
        send({"type": "ready", "row": stream.row, "fps": start.fps, "frame_size": list(self.config.frame_size)})
        if start.source is not None:
            threading.Thread(target=self._read_source, args=(stream,), name=f"svlm-source-{stream.row}",
                             daemon=True).start()
        return stream

    def add_second(self, stream: Stream, frames_thwc: np.ndarray, *, block: bool = False) -> None:
        """Queue one whole second. A full queue drops its oldest second, or with `block` waits."""
        with self._lock:
            if stream.stopped:
                raise ProtocolError("a frame after stop")
            if block:
                self._lock.wait_for(lambda: len(stream.queue) < self.config.max_queue_s or stream.released)
            elif len(stream.queue) >= self.config.max_queue_s:
                stream.queue.popleft()
                stream.dropped_s += 1
            t = float(stream.seconds_in)
            stream.seconds_in += 1
            stream.queue.append(QueuedSecond(frames_thwc, t, t + 1.0, time.monotonic()))
            self._lock.notify_all()

    def ask(self, stream: Stream, question: str) -> None:
        """A question for the stream's next second (one question a second, in the order asked)."""
        try:
            self.session.check_question(question)
        except ValueError as error:
            raise ProtocolError(str(error)) from None
        with self._lock:
            if stream.stopped:
                raise ProtocolError("a question after stop")
            stream.questions.append(question)

    def stop(self, stream: Stream) -> None:
        """No more seconds: the queued ones are answered, then `end`."""
        with self._lock:
            stream.stopped = True
            self._lock.notify_all()

    def release(self, stream: Stream) -> None:
        """The connection is gone: free the row (whatever is queued is dropped)."""
        with self._lock:
            if stream.released:
                return
            stream.released, stream.stopped = True, True
            del self._streams[stream.row]
            self._leaving.append(stream.row)
            self._lock.notify_all()

    # ------------------------------------------------------------ the engine thread
    def _has_work(self) -> bool:
        return self._closing or bool(self._leaving) or any(
            s.queue or not s.joined or (s.stopped and not s.ended) for s in self._streams.values())

    def _run(self) -> None:
        batch = self.session.batch
        while True:
            with self._lock:
                self._lock.wait_for(self._has_work)
                if self._closing:
                    return
                leaving, self._leaving = self._leaving, []
                joining = [s for s in self._streams.values() if not s.joined]
                taken = {s.row: (s, s.queue.popleft(), s.questions.popleft() if s.questions else None)
                         for s in self._streams.values() if s.queue}
                lag = {row: len(s.queue) for row, (s, _, _) in taken.items()}
                self._lock.notify_all()  # room in the queues for blocked readers
            for row in leaving:
                self.session.leave(row)
            for stream in joining:
                previous = stream.start.previous_text
                self.session.join(stream.row, self.session.config.previous_text if previous is None else previous,
                                  query=stream.start.query)
                stream.joined = True
            with self._lock:
                self._free.extend(leaving)
            if taken:
                self._round(batch, taken, lag)
            with self._lock:
                done = [s for s in self._streams.values() if s.stopped and not s.queue and not s.ended]
                for stream in done:
                    stream.ended = True
            for stream in done:
                stream.send({"type": "end"})

    def _round(self, batch: int, taken: dict, lag: dict) -> None:
        """One engine round over the streams in `taken` (row -> (stream, second, question))."""
        pick = lambda get: [get(*taken[row]) if row in taken else None for row in range(batch)]
        try:
            texts = self.session.step_batch(pick(lambda s, sec, q: sec.frames_thwc), pick(lambda s, sec, q: sec.t_start),
                                            pick(lambda s, sec, q: sec.t_end), questions=pick(lambda s, sec, q: q))
        except Exception as error:  # a bug or a device failure: the streams of this round cannot go on
            logger.exception("engine round failed")
            for stream, _, _ in taken.values():
                stream.send({"type": "error", "message": f"the engine failed: {error}"})
                self.stop(stream)
            return
        self.rounds += 1
        now = time.monotonic()
        for row, (stream, second, question) in taken.items():
            stream.send({"type": "commentary", "t_start": second.t_start, "t_end": second.t_end, "text": texts[row],
                         "latency_ms": round(1e3 * (now - second.ready_at), 1), "dropped_s": stream.dropped_s,
                         "lag_s": lag[row]})
            if question is not None:
                stream.send({"type": "answer", "t": second.t_start, "question": question, "text": texts[row]})

    def _read_source(self, stream: Stream) -> None:
        """Reads a stream's `source` second by second into its queue (at the model's pace unless live)."""
        width, height = self.config.frame_size
        fps = self.session.config.policy.fps
        try:
            with VideoReader(stream.start.source, fps=fps) as reader:
                for second in paced(reader) if stream.start.live else reader:
                    if stream.released:
                        return
                    frames = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BILINEAR))
                                       if f.shape[:2] != (height, width) else f for f in second.frames_thwc])
                    self.add_second(stream, frames, block=not stream.start.live)
        except (VideoError, OSError, ProtocolError) as error:
            stream.send({"type": "error", "message": f"source {stream.start.source}: {error}"})
        finally:
            self.stop(stream)
