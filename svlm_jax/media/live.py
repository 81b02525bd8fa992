"""Live sources: seconds read beside the model, with a bounded queue that drops the oldest.

A live source does not wait for the model. `LiveIntake` reads seconds on its own thread, and when
the consumer falls behind it drops the oldest queued seconds (counted in `dropped_s`), so memory
never grows with the lag. `paced` replays a file at the pace of a live source.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Iterable, Iterator

from svlm_jax.media.video import VideoSecond


def paced(seconds: Iterable[VideoSecond]) -> Iterator[VideoSecond]:
    """Each second no sooner than its end time after the first second began. A file plays at the
    speed of a live source this way; a live source already arrives at that pace, so nothing waits."""
    began, first = time.monotonic(), None
    for second in seconds:
        first = second.t_start if first is None else first
        time.sleep(max(0.0, began + second.t_end - first - time.monotonic()))
        yield second


class LiveIntake:
    """Iterates over `seconds` read on a thread, at most `max_queue_s` of them waiting. An error of
    the source is raised once the seconds read before it have been taken."""

    def __init__(self, seconds: Iterable[VideoSecond], max_queue_s: int):
        if max_queue_s < 1:
            raise ValueError(f"max_queue_s must be >= 1, got {max_queue_s}")
        self.max_queue_s = max_queue_s
        self.dropped_s = 0
        self._queue: collections.deque[VideoSecond] = collections.deque()
        self._lock = threading.Condition()
        self._done = self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, args=(iter(seconds),), name="svlm-live-intake",
                                        daemon=True)
        self._thread.start()

    @property
    def lag_s(self) -> int:
        """Seconds read and waiting for the model."""
        with self._lock:
            return len(self._queue)

    def __iter__(self) -> Iterator[VideoSecond]:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._queue or self._done)
                if self._queue:
                    second = self._queue.popleft()
                elif self._error is not None:
                    raise self._error
                else:
                    return
            yield second

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop reading (after the second being read) and wait for the thread, so that the source
        can be closed under it safely."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(timeout_s)

    def __enter__(self) -> "LiveIntake":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, seconds: Iterator[VideoSecond]) -> None:
        try:
            for second in seconds:
                with self._lock:
                    if self._closing:
                        return
                    if len(self._queue) == self.max_queue_s:
                        self._queue.popleft()
                        self.dropped_s += 1
                    self._queue.append(second)
                    self._lock.notify_all()
        except BaseException as error:  # handed to the consumer, which reports it
            self._error = error
        finally:
            with self._lock:
                self._done = True
                self._lock.notify_all()
