"""LocalMesh: a whole mesh inside one asyncio program, for tests, notebooks and small services."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable
from typing import Any, Final

from . import _aio
from .clock import Clock
from .config import MeshConfig
from .errors import StatefunMeshError
from .functions import StatefulFunctions
from .messages import EgressRecord, Message
from .peer import Peer

__all__ = ["LocalMesh", "local_endpoints"]

TRANSPORTS: Final = ("memory", "inproc", "ipc", "tcp")
_mesh_ids = itertools.count()


def local_endpoints(transport: str, peers: int, run_dir: str, base_port: int = 0) -> tuple[str, ...]:
    """Endpoints for ``peers`` peers on this machine over ``transport``.

    ``tcp`` uses ``127.0.0.1`` and ports ``base_port + i`` (``base_port`` 0: free ports
    picked now); ``ipc`` uses sockets in ``run_dir``.
    """
    if transport == "memory":
        hub = f"mesh-{os.getpid()}-{next(_mesh_ids)}"
        return tuple(f"memory://{hub}/{i}" for i in range(peers))
    if transport == "inproc":
        hub = f"statefun-mesh-{os.getpid()}-{next(_mesh_ids)}"
        return tuple(f"inproc://{hub}-{i}" for i in range(peers))
    if transport == "ipc":
        return tuple(f"ipc://{os.path.join(run_dir, f'peer-{i}.sock')}" for i in range(peers))
    if transport == "tcp":
        if base_port:
            return tuple(f"tcp://127.0.0.1:{base_port + i}" for i in range(peers))
        return tuple(f"tcp://127.0.0.1:{port}" for port in free_ports(peers))
    raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")


def free_ports(n: int, exclude: Iterable[int] = ()) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that are free right now, none in ``exclude``
    (ports already promised to something that has not bound them yet).

    They are picked below the kernel's ephemeral range (``ip_local_port_range``) when it
    leaves room: a port from that range, free now, can be taken as the source port of any
    outgoing connection on the machine before whoever it was picked for binds it (a test
    run saw "Address already in use" that way). Ports below the range are never handed out
    implicitly, so only another program choosing the same port explicitly can take one.
    """
    import random
    import socket

    skip = set(exclude)
    socks: list[socket.socket] = []
    ports: list[int] = []
    low = _ephemeral_low()
    try:
        if low > 11_000:
            rng = random.Random()
            for _ in range(50 * n + 50):  # bounded: a busy range falls back to the kernel's pick
                if len(ports) == n:
                    break
                port = rng.randrange(10_000, low)
                if port in skip or port in ports:
                    continue
                s = socket.socket()
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    s.close()
                    continue
                socks.append(s)  # held until all are picked: the ports are distinct
                ports.append(port)
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port not in skip:
                ports.append(port)
        return ports
    finally:
        for s in socks:
            s.close()


def _ephemeral_low() -> int:
    """The lowest port the kernel picks for an unbound socket (0 when unknown)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


class LocalMesh:
    """Run a mesh in this process: ``async with LocalMesh(functions, state_dir=...) as mesh:``.

    Every peer runs in this process and event loop (use ``statefun-mesh run`` for one
    process per peer); with ``transport`` other than ``"memory"`` they still talk over
    real ZeroMQ sockets.

    Args:
        *functions: one or more ``StatefulFunctions`` modules (or lists of them),
            multiplexed into one mesh.
        state_dir: where state lives; reopening the same directory (with the same
            number of peers) finds it again. ``None``: a temporary directory, deleted
            on close.
        peers: number of peers.
        transport: ``"memory"`` (default), ``"inproc"``, ``"ipc"`` or ``"tcp"``.
        clock: time source for ``send_after`` (tests pass a ``ManualClock``).
        **settings: any other :class:`~statefun_mesh.config.MeshConfig` field
            (``max_parallelism``, ``max_batch``, ``egress_retention``, ...).
    """

    def __init__(
        self,
        *functions: StatefulFunctions | Iterable[StatefulFunctions],
        state_dir: str | os.PathLike[str] | None = None,
        peers: int = 1,
        transport: str = "memory",
        clock: Clock | None = None,
        **settings: Any,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self._functions: list[StatefulFunctions] = []
        for f in functions:
            if isinstance(f, StatefulFunctions):
                self._functions.append(f)
            else:
                self._functions.extend(f)
        self._tmp: str | None = None
        if state_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="statefun-mesh-")
            state_dir = self._tmp
        state_dir = os.fspath(state_dir)
        self._run_dir = tempfile.mkdtemp(prefix="statefun-mesh-run-") if transport == "ipc" else None
        endpoints = local_endpoints(transport, peers, self._run_dir or "") if peers > 1 else ()
        self.config = MeshConfig(state_dir=state_dir, peers=peers, endpoints=endpoints, **settings)
        self.transport = transport
        self._peers = [Peer(self.config, self._functions, peer_id=i, clock=clock) for i in range(peers)]

    @property
    def peers(self) -> list[Peer]:
        """The mesh's peers, by id."""
        return list(self._peers)

    async def start(self) -> None:
        """Start every peer (together: with checkpoints, peer 0 waits for all of them)."""
        tasks = [asyncio.ensure_future(p.start()) for p in self._peers]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        errors = [t.exception() for t in done if t.exception() is not None]
        if errors:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for p in self._peers:
                await p.aclose()
            self._cleanup()
            raise errors[0]  # type: ignore[misc]

    async def aclose(self) -> None:
        """Finish queued work, stop the peers, and delete temporary directories."""
        try:
            await self.idle(timeout=30.0)
        except (asyncio.TimeoutError, TimeoutError, StatefunMeshError):
            pass  # a peer whose loop died finishes nothing more; close anyway
        try:
            for p in self._peers:
                await p.aclose()
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        for d in (self._tmp, self._run_dir):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        self._tmp = self._run_dir = None

    async def __aenter__(self) -> LocalMesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _entry(self, message: Message) -> Peer:
        # Enter through the peer that owns the target, saving a hop.
        from ._speedups import key_group

        if len(self._peers) == 1 or type(message) is not Message:
            return self._peers[0]
        kg = key_group(message.target_id, self.config.max_parallelism)
        return self._peers[kg * len(self._peers) // self.config.max_parallelism]

    async def send(self, message: Message, idempotency_key: str | None = None) -> None:
        """Send ``message`` to its target instance (see :meth:`Peer.send`)."""
        await self._entry(message).send(message, idempotency_key)

    async def request(self, message: Message, timeout: float = 10.0) -> Message:
        """Send ``message`` and return the function's ``context.reply`` (see :meth:`Peer.request`)."""
        return await self._entry(message).request(message, timeout)

    def egress(self, typename: str, start: str = "earliest") -> AsyncIterator[EgressRecord]:
        """Iterate the records of an egress from every peer (see :meth:`Peer.egress`).

        Records of one peer come in offset order; records of different peers interleave.
        ``start`` is ``"earliest"`` or ``"latest"``; a record is identified by
        ``(record.peer, record.offset)``.
        """
        if len(self._peers) == 1:
            return self._peers[0].egress(typename, start)
        if start not in ("earliest", "latest"):
            raise ValueError("with several peers, start must be 'earliest' or 'latest'")
        return _merge([p.egress(typename, start) for p in self._peers])

    async def idle(self, timeout: float | None = None) -> None:
        """Wait until every peer has processed everything and no message is in flight.

        Raises:
            StatefunMeshError: a peer's dispatch loop died (it would never be idle).
            TimeoutError: not idle within ``timeout`` seconds.
        """

        async def idle_or_dead(p: Peer) -> None:
            if not p.dispatch_died.is_set():
                waits = {asyncio.ensure_future(p.idle()), asyncio.ensure_future(p.dispatch_died.wait())}
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
            if p.dispatch_died.is_set():  # it would never be idle: say why instead of waiting
                raise StatefunMeshError(f"peer {p.peer_id}'s dispatch loop died: {p.dispatch_failure()!r}")

        async def settle() -> None:
            stable = 0
            while stable < 2:
                for p in self._peers:
                    await idle_or_dead(p)
                await asyncio.sleep(0.001 if self.transport == "memory" else 0.005)
                in_flight = any(
                    a.router.sent_records[b.peer_id] != b.router.received_records[a.peer_id]
                    for a in self._peers
                    for b in self._peers
                    if a is not b
                )
                if all(p.is_idle() for p in self._peers) and not in_flight:
                    stable += 1
                else:
                    stable = 0

        await _aio.wait_for(settle(), timeout)

    def status(self) -> list[dict[str, Any]]:
        """Every peer's :meth:`Peer.status`."""
        return [p.status() for p in self._peers]


async def _merge(iterators: list[AsyncIterator[EgressRecord]]) -> AsyncIterator[EgressRecord]:
    queue: asyncio.Queue[EgressRecord | None] = asyncio.Queue(maxsize=1000)

    async def pump(it: AsyncIterator[EgressRecord]) -> None:
        try:
            async for rec in it:
                await queue.put(rec)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(it)) for it in iterators]
    remaining = len(tasks)
    try:
        while remaining:
            rec = await queue.get()
            if rec is None:
                remaining -= 1
                continue
            yield rec
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
