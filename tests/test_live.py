"""Live intake: a bounded queue that drops the oldest seconds, and a file played at live speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from svlm_jax.media.live import LiveIntake, paced
from svlm_jax.media.video import VideoSecond


def seconds(n: int, length_s: float = 1.0):
    for k in range(n):
        yield VideoSecond(k * length_s, (k + 1) * length_s, np.full((2, 4, 4, 3), k, np.uint8), ())


def test_a_consumer_that_falls_behind_gets_the_newest_seconds():
    intake = LiveIntake(seconds(10), max_queue_s=3)
    intake._thread.join(10)  # the source is read to its end before the consumer takes anything
    assert intake.lag_s == 3 and intake.dropped_s == 7
    assert [s.t_start for s in intake] == [7.0, 8.0, 9.0]


def test_a_consumer_that_keeps_up_gets_every_second_in_order():
    got = [int(s.frames_thwc[0, 0, 0, 0]) for s in LiveIntake(paced(seconds(5, length_s=0.05)), max_queue_s=1)]
    assert got == [0, 1, 2, 3, 4]


def test_a_source_error_comes_after_the_seconds_read_before_it():
    def broken():
        yield from seconds(2)
        raise OSError("stream ended early")

    intake = LiveIntake(broken(), max_queue_s=4)
    taken = []
    with pytest.raises(OSError, match="ended early"):
        for second in intake:
            taken.append(second.t_start)
    assert taken == [0.0, 1.0]


def test_paced_plays_at_the_seconds_own_speed():
    began = time.monotonic()
    arrivals = [time.monotonic() - began for _ in paced(seconds(3, length_s=0.1))]
    assert all(a >= 0.1 * (k + 1) - 0.01 for k, a in enumerate(arrivals)), arrivals
    assert arrivals[-1] < 1.0
