"""Finding the real server binaries the tests start (rclone for S3, nats-server), and free ports.

Imported by tests/s3server.py and tests/natsserver.py, which also run as scripts (the CI
install scripts call them with ``--check``).
"""

from __future__ import annotations

import os
import shutil
import socket
import sysconfig
from collections.abc import Callable


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
