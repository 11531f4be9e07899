"""MeshClient: send, request and read egress from any asyncio service, over ZeroMQ."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import random
from collections.abc import AsyncIterator
from typing import Any, Final

import zmq
import zmq.asyncio

from . import _aio, _speedups, errors
from .config import FRAME_HEADROOM, MIN_FRAME_BYTES
from .errors import ClosedTransportError, FrameDecodeError, StatefunMeshError
from .logutil import format_seconds
from .messages import EgressRecord, Message
from .security import ClientKeys, Keypair, curve_client, find_client_keys
from .transport import codec
from .transport.loopsock import LoopSocket

__all__ = ["MeshClient"]

log = logging.getLogger("statefun_mesh.client")

_REPLY_KINDS: Final = frozenset({codec.R_ACK, codec.R_REPLY, codec.R_ERROR, codec.R_RECORDS, codec.R_INFO})
_BUILTIN_ERRORS: Final = {"ValueError": ValueError, "TypeError": TypeError}
#: a message up to this size fits every mesh's frames; a larger one is checked against
#: the peer's max_message_bytes (learnt once per connection) before it is sent
_ALWAYS_FITS: Final = MIN_FRAME_BYTES - FRAME_HEADROOM


def _check_seconds(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number of seconds > 0, got {value!r}")


#: how much longer than a request's timeout the client waits for the peer's own timeout
#: answer (which says which function did not reply) before giving up on the peer itself
REQUEST_GRACE: Final = 0.5


def _rebuild_error(name: str, message: str, args: list[Any]) -> Exception:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, StatefunMeshError):
        try:
            return cls(*args)
        except TypeError:
            return StatefunMeshError(f"{name}: {message}")
    if name in _BUILTIN_ERRORS:
        return _BUILTIN_ERRORS[name](message)
    return StatefunMeshError(f"{name}: {message}")


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class _Connection:
    """One DEALER socket to one peer's client endpoint, matching answers to calls by id.

    A plain socket read from the loop's reader callback (transport/loopsock.py), and one
    timer per call for its timeout: no task, no future per message sent.
    """

    def __init__(
        self, ctx: zmq.asyncio.Context, endpoint: str, keys: ClientKeys | None = None, server_key: str | None = None
    ) -> None:
        self.endpoint = endpoint
        self.curve = keys is not None
        sock: zmq.Socket[Any] = zmq.Socket(ctx, zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        if keys is not None and server_key is not None:
            curve_client(sock, Keypair(keys.public, keys.secret), server_key)
        sock.connect(endpoint)
        self._calls: dict[int, asyncio.Future[tuple[int, list[Any]]]] = {}
        self._ids = itertools.count(1)
        #: calls the socket had no room for (its SNDHWM), sent in order once it has
        self._unsent: collections.deque[tuple[int, bytes]] = collections.deque()
        #: the peer's max_message_bytes, once asked for
        self.message_limit: int | None = None
        self._loop = asyncio.get_running_loop()
        self._sock = LoopSocket(sock, self._receive, on_writable=self._send_unsent, name=f"client of {endpoint}")

    def _receive(self, parts: list[bytes]) -> None:
        try:
            kind, items = codec.decode_control(parts[-1], _REPLY_KINDS)
        except FrameDecodeError as exc:
            log.error("client: rejected a frame from %s: %s", self.endpoint, exc)
            return
        fut = self._calls.pop(items[0], None)
        if fut is None:
            if items[0] == 0 and kind == codec.R_ERROR:
                log.error("client: %s reported a malformed frame: %s", self.endpoint, items[2])
            return
        if not fut.done():
            fut.set_result((kind, items))

    def _send(self, corr: int, frame: bytes) -> None:
        if not self._unsent:
            try:
                self._sock.sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                pass
            else:
                self._sock.sent()
                return
        self._unsent.append((corr, frame))
        self._sock.want_write()

    def _send_unsent(self) -> None:
        unsent = self._unsent
        send = self._sock.sock.send
        while unsent:
            corr, frame = unsent[0]
            if corr in self._calls:  # else its caller gave up: never sent, so never acted on
                try:
                    send(frame, zmq.NOBLOCK)
                except zmq.Again:
                    self._sock.want_write()
                    return
            unsent.popleft()

    async def call(
        self, kind: int, *items: Any, timeout: float | None, said: float | None = None
    ) -> tuple[int, list[Any]]:
        """Send a call and wait ``timeout`` s for its answer (``said``: the timeout to name on expiry)."""
        if self._sock.closed:
            raise ClosedTransportError("the client was closed")
        corr = next(self._ids)
        frame = codec.encode_control(kind, corr, *items)
        loop = self._loop
        fut: asyncio.Future[tuple[int, list[Any]]] = loop.create_future()
        self._calls[corr] = fut
        timer = loop.call_at(loop.time() + timeout, _expire, fut) if timeout is not None else None
        try:
            self._send(corr, frame)
            rkind, ritems = await fut
        except TimeoutError:
            hint = (
                "; or does it refuse this client's key (is its public key in the mesh's client_keys?)"
                if self.curve
                else "; or does it require CURVE keys (MeshClient(..., keys=), --client-key)?"
            )
            raise errors.RequestTimeoutError(
                f"no answer from the peer at {self.endpoint} within {format_seconds(said or timeout or 0)} s; "
                f"is the mesh running there{hint}"
            ) from None
        finally:
            self._calls.pop(corr, None)
            if timer is not None:
                timer.cancel()
        if rkind == codec.R_ERROR:
            raise _rebuild_error(ritems[1], ritems[2], ritems[3])
        return rkind, ritems

    async def close(self) -> None:
        self._sock.close(0)
        self._unsent.clear()
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(ClosedTransportError("the client was closed"))


class MeshClient:
    """A client of a mesh: ``async with MeshClient("tcp://127.0.0.1:7700") as client:``.

    Any peer accepts any message and routes it to the peer that owns its target. The
    client connects to one peer; ``egress`` also connects to every other peer's client
    endpoint, since each peer keeps the egress records its functions produced.

    Args:
        endpoint: a peer's client endpoint (what ``statefun-mesh run`` prints).
        timeout: seconds to wait for a peer to acknowledge a send, or answer an info
            call, before :class:`~statefun_mesh.errors.RequestTimeoutError`.
        keys: the client's CURVE keys and the peers' public keys, for a mesh with
            ``peer_keys`` (:meth:`ClientKeys.load <statefun_mesh.security.ClientKeys.load>`
            reads the file ``statefun-mesh keys generate --client`` or ``statefun-mesh run``
            writes). ``None``: the keys :func:`~statefun_mesh.security.find_client_keys`
            finds for ``endpoint`` (the file ``$STATEFUN_MESH_CLIENT_KEY`` names, or the one
            ``statefun-mesh run`` left for its mesh on this machine), else plaintext.
    """

    def __init__(self, endpoint: str, *, timeout: float = 10.0, keys: ClientKeys | None = None) -> None:
        _check_seconds("timeout", timeout)
        self.endpoint = endpoint
        self.timeout = timeout
        if keys is None:
            keys = find_client_keys(endpoint)
        self._keys = keys
        self._server_keys: dict[str, str] = dict(keys.server_keys) if keys is not None else {}
        self._ctx = zmq.asyncio.Context.instance()
        self._conns: dict[str, _Connection] = {}
        self._closed = False

    def _conn(self, endpoint: str | None = None) -> _Connection:
        if self._closed:
            raise ClosedTransportError("the client is closed")
        ep = endpoint or self.endpoint
        conn = self._conns.get(ep)
        if conn is None:
            server_key = None
            if self._keys is not None:
                server_key = self._server_keys.get(ep)
                if server_key is None:
                    raise errors.ConfigError(
                        f"no public key known for the peer at {ep}: add it to the client key file's [server_keys] "
                        "(or connect to a peer whose key is listed: it tells the others')",
                        key="server_keys",
                    )
            conn = self._conns[ep] = _Connection(self._ctx, ep, self._keys, server_key)
        return conn

    async def _check_size(self, conn: _Connection, rec: tuple[Any, ...], what: str) -> None:
        # The peer's client socket drops a frame over max_frame_bytes without a word (a
        # ZeroMQ limit), so the client must not send one: it refuses a message over the
        # peer's max_message_bytes itself; the peer checks exactly what it admits.
        if len(rec[5]) + 4 * sum(len(f) for f in rec[:5]) + 49 <= _ALWAYS_FITS:
            return
        size = _speedups.record_size(rec)
        if size <= _ALWAYS_FITS:
            return
        if conn.message_limit is None:
            _, items = await conn.call(codec.C_INFO, timeout=self.timeout)
            limit = items[1].get("max_message_bytes")
            conn.message_limit = limit if type(limit) is int and limit > 0 else _ALWAYS_FITS
        if size > conn.message_limit:
            raise errors.MessageTooLargeError(size, conn.message_limit, what)

    @property
    def keys(self) -> ClientKeys | None:
        """The client's keys, with every peer's public key learnt from ``info`` so far."""
        if self._keys is None:
            return None
        return ClientKeys(self._keys.public, self._keys.secret, dict(self._server_keys))

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection (idempotent)."""
        self._closed = True
        conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            await c.close()

    async def send(self, message: Message, idempotency_key: str | None = None) -> None:
        """Send ``message``; returns once a peer has accepted it (waits while the mesh is busy).

        Args:
            message: the message.
            idempotency_key: a key unique to this message; a resend with the same key to
                the same target instance, through any peer, within ``dedup_retention``
                seconds, is not applied again. Retry with the same key after an error.

        Raises:
            FunctionNotFoundError: no function is bound to the target type.
            MessageTooLargeError: the message is over the mesh's ``max_message_bytes``
                (refused before it is sent; nothing was accepted).
            RequestTimeoutError: the peer did not acknowledge in time.
        """
        if type(message) is not Message:
            raise TypeError(f"expected a Message (use message_builder), got {type(message).__name__}")
        await self._check_size(
            self._conn(),
            (message.target_typename, message.target_id, "", idempotency_key or "", message._vt, message._v, 0, 0),
            "message",
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        pause = 0.01
        while True:
            try:
                await self._conn().call(
                    codec.C_SEND,
                    message.target_typename,
                    message.target_id,
                    message._vt,
                    message._v,
                    idempotency_key or "",
                    timeout=max(deadline - loop.time(), 0.001),
                    said=self.timeout,
                )
                return
            except errors.MeshBusyError as exc:
                # refused, not accepted: sending it again cannot apply it twice
                left = deadline - loop.time()
                if left <= 0:
                    raise errors.RequestTimeoutError(
                        f"the peer at {self.endpoint} stayed too busy to accept a message for "
                        f"{format_seconds(self.timeout)} s: {exc}"
                    ) from None
                await asyncio.sleep(min(pause * (0.5 + random.random()), left))
                pause = min(pause * 2, 0.5)

    async def request(self, message: Message, timeout: float = 10.0) -> Message:
        """Send ``message`` and return the function's ``context.reply`` as a :class:`Message`.

        Raises:
            RequestTimeoutError: no reply within ``timeout`` seconds.
            InvocationError: the function raised.
            FunctionNotFoundError: no function is bound to the target type.
            MessageTooLargeError: the message is over the mesh's ``max_message_bytes``.
            MeshBusyError: the peer holds as many pending requests as it will (for this
                connection or in total); nothing was sent on to the function.
            ValueError: ``timeout`` is not finite and > 0, or over the peer's
                ``max_request_timeout``.
        """
        if type(message) is not Message:
            raise TypeError(f"expected a Message (use message_builder), got {type(message).__name__}")
        _check_seconds("timeout", timeout)
        conn = self._conn()
        await self._check_size(
            conn, (message.target_typename, message.target_id, "", "", message._vt, message._v, 0, 0), "request"
        )
        _, items = await conn.call(
            codec.C_REQUEST,
            message.target_typename,
            message.target_id,
            message._vt,
            message._v,
            timeout,
            timeout=timeout + REQUEST_GRACE,
            said=timeout,
        )
        return Message(items[1], items[2], items[3], items[4])

    async def info(self) -> dict[str, Any]:
        """The connected peer's view of the mesh: peers, client endpoints, functions, status."""
        _, items = await self._conn().call(codec.C_INFO, timeout=self.timeout)
        info = items[1]
        keys = info.get("peer_keys") if isinstance(info, dict) else None
        if self._keys is not None and isinstance(keys, list) and len(keys) == len(info.get("client_endpoints", ())):
            # told over a connection authenticated with a key we hold: trust it for the other peers
            for ep, key in zip(info["client_endpoints"], keys, strict=True):
                if ep and isinstance(key, str):
                    self._server_keys.setdefault(ep, key)
        return info  # type: ignore[no-any-return]

    async def fetch_egress(
        self,
        typename: str,
        endpoint: str,
        start: int | str = "earliest",
        generation: int = -1,
        *,
        limit: int = 1000,
        wait: float = 1.0,
    ) -> tuple[int, int, list[EgressRecord], int]:
        """One read of an egress from the peer at ``endpoint`` (a connector's building block).

        Returns ``(peer, next_offset, records, generation)``: up to ``limit`` released records
        from ``start`` (an offset, ``"earliest"`` or ``"latest"``) on, waiting up to ``wait``
        seconds for the first. Pass the returned offset and generation to the next call: if the
        peer recovered since ``generation`` (``-1``: none known), it re-reads from its restored
        position, so an immediate egress's re-produced records are not skipped.
        """
        _, items = await self._conn(endpoint).call(
            codec.C_FETCH, typename, start, limit, int(wait * 1000), generation, timeout=self.timeout + wait + 2
        )
        _, peer, nxt, records, gen = items
        return peer, nxt, [EgressRecord(typename, peer, *rec) for rec in records], gen

    async def egress(
        self, typename: str, start: str = "earliest", *, stop_when_idle: float | None = None
    ) -> AsyncIterator[EgressRecord]:
        """Iterate an egress's records from every peer.

        Records of one peer arrive in offset order; ``(record.peer, record.offset)``
        identifies a record. ``start`` is ``"earliest"`` or ``"latest"``.

        Args:
            stop_when_idle: end the iteration after this many seconds without a new
                record (``None``: follow forever).
        """
        if start not in ("earliest", "latest"):
            raise ValueError("start must be 'earliest' or 'latest'")
        info = await self.info()
        endpoints = list(info["client_endpoints"]) or [self.endpoint]
        if len(endpoints) != info["peers"] or not all(endpoints):
            raise StatefunMeshError(
                "reading egress needs a client endpoint on every peer; set client_endpoints for all peers"
            )
        queue: asyncio.Queue[EgressRecord | BaseException] = asyncio.Queue(maxsize=10_000)

        async def follow(ep: str) -> None:
            conn = self._conn(ep)
            pos: int | str = start
            gen = -1
            try:
                while True:
                    _, items = await conn.call(codec.C_FETCH, typename, pos, 1000, 1000, gen, timeout=self.timeout + 2)
                    _, peer, nxt, records, gen = items
                    for rec in records:
                        await queue.put(EgressRecord(typename, peer, *rec))
                    pos = nxt
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                await queue.put(exc)

        tasks = [asyncio.create_task(follow(ep)) for ep in endpoints]
        try:
            while True:
                try:
                    item = await _aio.wait_for(queue.get(), stop_when_idle)
                except (asyncio.TimeoutError, TimeoutError):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=5.0)
