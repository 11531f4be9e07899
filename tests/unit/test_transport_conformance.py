"""Every transport passes statefun_mesh.testing.check_transport: memory, inproc, ipc and tcp."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from statefun_mesh.mesh import free_ports
from statefun_mesh.testing import check_transport
from statefun_mesh.transport.base import Transport
from statefun_mesh.transport.memory import InMemoryTransport
from statefun_mesh.transport.zeromq import ZmqTransport

_ids = itertools.count()

Factory = Callable[[int], list[Transport]]


def _memory() -> Factory:
    def make(n: int) -> list[Transport]:
        hub = f"conformance-{os.getpid()}-{next(_ids)}"
        return [InMemoryTransport(hub, i, n) for i in range(n)]

    return make


def _inproc() -> Factory:
    def make(n: int) -> list[Transport]:
        name = f"conformance-{os.getpid()}-{next(_ids)}"
        eps = [f"inproc://{name}-{i}" for i in range(n)]
        return [ZmqTransport(i, eps) for i in range(n)]

    return make


def _ipc(sock_dir: Path) -> Factory:
    def make(n: int) -> list[Transport]:
        k = next(_ids)
        eps = [f"ipc://{sock_dir / f'c{k}-{i}.sock'}" for i in range(n)]
        return [ZmqTransport(i, eps) for i in range(n)]

    return make


def _tcp() -> Factory:
    def make(n: int) -> list[Transport]:
        eps = [f"tcp://127.0.0.1:{p}" for p in free_ports(n)]
        return [ZmqTransport(i, eps) for i in range(n)]

    return make


def _tcp_curve() -> Factory:
    from statefun_mesh.security import generate_keypair

    def make(n: int) -> list[Transport]:
        eps = [f"tcp://127.0.0.1:{p}" for p in free_ports(n)]
        pairs = [generate_keypair() for _ in range(n)]
        publics = [p.public for p in pairs]
        return [ZmqTransport(i, eps, keys=pairs[i], peer_keys=publics) for i in range(n)]

    return make


#: ipc and tcp open real sockets (marked integration: ``-m "not integration"`` runs memory and inproc)
_SOCKETS = pytest.mark.integration


@pytest.fixture(params=["memory", "inproc", *(pytest.param(p, marks=_SOCKETS) for p in ("ipc", "tcp", "tcp-curve"))])
def transport_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    if request.param == "memory":
        yield _memory()
    elif request.param == "inproc":
        yield _inproc()
    elif request.param == "ipc":
        if len(str(tmp_path)) < 80:
            yield _ipc(tmp_path)
        else:  # ipc:// paths are limited to ~107 bytes
            with tempfile.TemporaryDirectory(prefix="sfm-ipc-") as d:
                yield _ipc(Path(d))
    elif request.param == "tcp-curve":
        yield _tcp_curve()
    else:
        yield _tcp()


@pytest.mark.timeout(120)
async def test_transport_conformance(transport_factory: Factory) -> None:
    await check_transport(transport_factory, timeout=30.0)


async def test_check_transport_catches_a_reordering_transport() -> None:
    """The suite can fail: a transport that swaps two frames of a channel is caught."""

    class Swapping(InMemoryTransport):
        def __init__(self, hub: str, peer_id: int, n: int) -> None:
            super().__init__(hub, peer_id, n)
            self._held: bytes | None = None

        def send(self, peer: int, frame: bytes) -> None:
            if self.peer_id == 0 and peer == 1 and self._held is None and len(frame) > 100:
                self._held = frame  # hold one big frame back, send it after the next one
                return
            super().send(peer, frame)
            if self._held is not None and self.peer_id == 0 and peer == 1:
                held, self._held = self._held, None
                super().send(peer, held)

    def make(n: int) -> list[Transport]:
        hub = f"swapping-{next(_ids)}"
        return [Swapping(hub, i, n) for i in range(n)]

    with pytest.raises(AssertionError, match=r"frame #\d+ from peer 0 .*reordered"):
        await check_transport(make, frames_per_pair=50, timeout=5.0)


async def test_check_transport_catches_a_lossy_transport() -> None:
    class Lossy(InMemoryTransport):
        sent = 0

        def send(self, peer: int, frame: bytes) -> None:
            Lossy.sent += 1
            if Lossy.sent == 40:
                if self._closed:
                    super().send(peer, frame)
                return  # dropped
            super().send(peer, frame)

    def make(n: int) -> list[Transport]:
        hub = f"lossy-{next(_ids)}"
        return [Lossy(hub, i, n) for i in range(n)]

    with pytest.raises(AssertionError):
        await check_transport(make, frames_per_pair=50, timeout=2.0)
