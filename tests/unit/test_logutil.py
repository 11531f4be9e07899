"""ThrottledLog: the first line of a kind goes out, repeats are summarised."""

from __future__ import annotations

import logging

import pytest

from statefun_mesh.logutil import ThrottledLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_repeats_are_counted_and_summarised(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    tl = ThrottledLog(logging.getLogger("t.throttle"), window=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, "t.throttle"):
        assert tl.warning("bad frames", "bad frame %d", 0)
        for i in range(1, 10_483):
            assert not tl.warning("bad frames", "bad frame %d", i)
        assert tl.warning("full disk", "disk full")  # another kind is not throttled by the first
        clock.now = 10.0
        tl.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["bad frame 0", "disk full", "... and 10,482 more bad frames in the last 10 s"]


def test_window_reopens_after_summary(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    tl = ThrottledLog(logging.getLogger("t.throttle2"), window=5.0, clock=clock)
    with caplog.at_level(logging.WARNING, "t.throttle2"):
        tl.warning("k", "one")
        tl.warning("k", "two")
        clock.now = 6.0
        assert tl.warning("k", "three")  # summary of the closed window, then this line
        tl.flush()  # window of "three" still open: nothing
    assert [r.getMessage() for r in caplog.records] == ["one", "... and 1 more k in the last 6 s", "three"]


def test_flush_forgets_quiet_kinds(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    tl = ThrottledLog(logging.getLogger("t.throttle3"), window=1.0, clock=clock)
    with caplog.at_level(logging.WARNING, "t.throttle3"):
        tl.warning("k", "one")
        clock.now = 2.0
        tl.flush()
        assert tl.warning("k", "again")
    assert [r.getMessage() for r in caplog.records] == ["one", "again"]
