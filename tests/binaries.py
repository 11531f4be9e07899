"""The real server binaries the tests start (rclone for S3, nats-server, tansu for Kafka):
finding them, free ports, and starting, waiting for and stopping a server process.

Imported by tests/s3server.py, tests/natsserver.py and tests/kafkabroker.py, which also run
as scripts (the CI install scripts call them with ``--check``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar


def find_executable(
    name: str, env_var: str, version: Callable[[str], tuple[int, ...] | None], minimum: tuple[int, ...]
) -> tuple[str | None, list[str]]:
    """The first runnable ``name`` at least ``minimum`` (by ``version``): from ``$env_var``,
    this interpreter's scripts directory, then ``PATH``. Returns ``(path or None, every
    candidate that exists)``, so the caller can say what it found and rejected."""
    scripts = sysconfig.get_path("scripts")
    candidates = [os.environ.get(env_var), os.path.join(scripts, name) if scripts else None, shutil.which(name)]
    seen: list[str] = []
    for path in candidates:
        if not path or path in seen or not os.access(path, os.X_OK):
            continue
        seen.append(path)
        found = version(path)
        if found is not None and found >= minimum:
            return path, seen
    return None, seen


def require_binary(find: Callable[[], str], unavailable: type[Exception], what: str) -> str:
    """``find()`` the binary of a test server; in a pytest run, skip when it is missing (``unavailable``
    raised), but fail when ``CI`` is set: there, the tests of ``what`` must not be skipped."""
    import pytest

    try:
        return find()
    except unavailable as exc:
        if os.environ.get("CI") is not None:
            pytest.fail(f"CI is set, so the {what} tests must not be skipped: {exc}")
        pytest.skip(str(exc))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (below the ephemeral
    range, where no outgoing connection takes it meanwhile: statefun_mesh.mesh.free_ports)."""
    from statefun_mesh.mesh import free_ports

    return free_ports(1)[0]


class ServerProcess:
    """What a running test server shares (mixed into its dataclass, which has these two fields)."""

    log_path: Path
    process: subprocess.Popen[bytes]

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server process (kill it if it does not exit in ``timeout`` s). Idempotent."""
        proc = self.process
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a paused (SIGSTOPped) process cannot act on SIGTERM
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


S = TypeVar("S", bound=ServerProcess)


def wait_serving(server: ServerProcess, what: str, port: int, ready: Callable[[], bool], timeout: float) -> bool:
    """Wait until ``ready()`` or the process exits: True if it serves, False if it exited. Stops it
    and raises ``RuntimeError`` (with its log) when it neither serves nor exits within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while server.process.poll() is None and not ready():
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{what} did not answer on port {port} within {timeout} s; log:\n{server.log_tail()}")
        time.sleep(0.05)
    return server.process.poll() is None


def start_server(
    what: str,
    launch: Callable[[int], S],
    ready: Callable[[S], bool],
    *,
    port: int | None = None,
    startup_timeout: float = 20.0,
) -> S:
    """``launch(port)`` a server on ``port`` (a free one if ``None``) and wait until ``ready(server)``.
    Three attempts: a free port may be taken again before the server binds it.

    Raises:
        RuntimeError: it did not answer in time, or exited at startup three times (with its log).
    """
    for _attempt in range(3):
        p = free_port() if port is None else port
        server = launch(p)
        if wait_serving(server, what, p, lambda: ready(server), startup_timeout):  # noqa: B023 - called at once
            return server
    raise RuntimeError(f"{what} exited at startup three times; log:\n{server.log_tail()}")


@contextlib.contextmanager
def running_in_temp_dir(prefix: str, start: Callable[[Path], S]) -> Iterator[S]:
    """``start(root)`` a server over a new temporary directory; stop it and remove the directory after."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    server: S | None = None
    try:
        server = start(root)
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
