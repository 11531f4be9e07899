"""The launcher's restart policy: a peer that dies is restarted at once the first time, and
the launcher sees the death when it happens (a pidfd per child), not at its next poll."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from statefun_mesh.launcher import RESTART_BACKOFF, _ExitWatch, restart_delay

pytestmark = pytest.mark.integration


def test_the_first_death_is_restarted_at_once_and_repeated_deaths_back_off() -> None:
    assert restart_delay(1) == 0.0
    delays = [restart_delay(k) for k in range(1, 8)]
    assert delays == sorted(delays), "the delay never shrinks while the peer keeps dying"
    assert delays[1] > 0, "a peer that dies again right away is not restarted in a tight loop"
    assert delays[-1] == RESTART_BACKOFF[-1]


@pytest.mark.timeout(60)
def test_the_exit_watch_wakes_when_a_child_exits_not_at_its_timeout() -> None:
    watch = _ExitWatch()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    try:
        watch.add(child.pid)
        started = time.monotonic()
        watch.wait(30.0)
        waited = time.monotonic() - started
        assert child.poll() is not None, "wait() returned while the child still ran"
        assert waited < 20.0, f"wait() slept {waited:.1f} s of its 30 s timeout after the child exited"
        watch.remove(child.pid)
        started = time.monotonic()
        watch.wait(0.2)  # nothing left to watch: the timeout
        assert time.monotonic() - started >= 0.15
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        watch.close()
