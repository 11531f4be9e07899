"""Calling remote functions: StateFun's request-reply protocol from the mesh's side.

The dispatcher runs every address of a batch whose target type is served by an HTTP
endpoint of the module file as a task of its own (:meth:`RemoteFunctions.run`), exactly
like an address of an ``async`` local function: a slow address may be parked and stalls
only itself. Per address the batch's messages go in one request
(``maxNumBatchRequests`` at most; more go in the next request, after the answer), with
the state values the function registered. An answer's state mutations go to the
address's cells at once; its other effects (messages, delayed messages and
cancellations, egress records) are applied, with the dispatcher's own helpers, to the
batch that commits the address, and the peer routes the messages after that commit. A
recovery replays the messages and calls the function again with the restored state,
so remote functions get the same exactly-once guarantee as local ones.

``IncompleteInvocationContext`` registers the missing specs (type and expiry, kept in
memory: after a restart the function asks again) and resends. Transport failures,
timeouts and 5xx/408/429 answers are retried with backoff within the endpoint's
``call`` timeout; then, or for an answer that breaks the protocol (garbage bytes, state
the function never declared), the messages of that request go to the dead-letter
egress with the reason and the peer goes on serving everything else.

Longer than ~500 lines because one request-reply round (batching, the missing-spec
round trip, retries, applying an answer's effects) is one protocol; the wire format
lives apart, in ``remote/protocol.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from .. import _aio, _speedups
from ..address import Address
from ..context import Cell
from ..errors import StatefunMeshError
from ..logutil import ThrottledLog
from ..records import CALLER, CALLER_ID, REPLY_PEER, REQUEST_ID, TARGET_ID, TARGET_TYPE, VALUE, VALUE_TYPE
from ..state.lmdb_backend import decode_state_value, state_key
from .module_yaml import HttpEndpoint, RemoteModule

if TYPE_CHECKING:
    from ..dispatch import BatchOutcome, Dispatcher, Record
    from ..outbox import AsyncStage

__all__ = ["RemoteFunctionError", "RemoteFunctions", "RemoteSpec"]

log = logging.getLogger("statefun_mesh.remote")

#: rounds of IncompleteInvocationContext answered for one request before giving up
_MAX_REGISTRATION_ROUNDS: Final = 4
_RETRY_STATUSES: Final = frozenset({408, 429})
#: the largest answer read from an endpoint; a larger one is a protocol error, not a retry
MAX_RESPONSE_BYTES: Final = 64 << 20
_FIRST_BACKOFF: Final = 0.01
_MAX_BACKOFF: Final = 1.0


class RemoteFunctionError(StatefunMeshError):
    """A remote function could not be invoked, or answered outside the protocol.

    Attributes:
        typename: the function type.
        url: the endpoint called.
    """

    def __init__(self, typename: str, url: str, message: str) -> None:
        super().__init__(f"remote function {typename} at {url}: {message}")
        self.typename = typename
        self.url = url


class RemoteSpec:
    """A state value a remote function registered: its name, type name and expiry."""

    __slots__ = ("expire_ms", "mode", "name", "typename")

    def __init__(self, name: str, typename: str, mode: int, expire_ms: int) -> None:
        self.name = name
        self.typename = typename
        self.mode = mode  # ExpireMode: 0 none, 1 after write, 2 after invoke
        self.expire_ms = expire_ms

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteSpec) and (self.name, self.typename, self.mode, self.expire_ms) == (
            other.name,
            other.typename,
            other.mode,
            other.expire_ms,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RemoteSpec({self.name!r}, {self.typename!r}, mode={self.mode}, expire_ms={self.expire_ms})"


class RemoteFunctions:
    """A peer's client of the remote functions of one module file.

    Args:
        module: the endpoints (from :func:`~statefun_mesh.remote.module_yaml.load_module_yaml`).

    One instance per peer, used from the peer's event loop; :meth:`aclose` closes its
    HTTP connections.
    """

    def __init__(self, module: RemoteModule) -> None:
        from . import protocol  # protobuf

        self._pb = protocol
        try:
            import aiohttp
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ImportError("calling remote functions needs aiohttp: pip install 'statefun-mesh[remote]'") from exc
        self._aiohttp = aiohttp
        self.module = module
        #: handlers of python: endpoints, imported now so a bad reference fails at construction
        self._handlers: dict[str, Any] = {}
        for ep in module.endpoints:
            ref = ep.in_process
            if ref is not None and ref not in self._handlers:
                self._handlers[ref] = _import_handler(ref, module.source)
        self._session: Any = None
        #: function type -> state name -> registered spec
        self.specs: dict[str, dict[str, RemoteSpec]] = {}
        self._tlog = ThrottledLog(log)
        #: counters for status: HTTP requests, retried attempts, requests given up
        self.requests = 0
        self.retries = 0
        self.failures = 0

    def endpoint_for(self, typename: str) -> HttpEndpoint | None:
        """The endpoint serving ``typename``, or ``None`` if it is not a remote function."""
        return self.module.endpoint_for(typename)

    async def aclose(self) -> None:
        """Close the HTTP connections (idempotent)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        self._tlog.flush()

    # -- one batch of one address ------------------------------------------------------------

    def load(self, d: Dispatcher, txn: Any, typename: str, id: str, kg: int, now_ms: int) -> dict[str, Cell]:
        """The address's cells for every state registered so far, read in the batch's transaction."""
        cells: dict[str, Cell] = {}
        for name in self.specs.get(typename, ()):
            cells[name] = _load_cell(d, txn, kg, typename, id, name, now_ms)
        return cells

    async def run(
        self,
        d: Dispatcher,
        endpoint: HttpEndpoint,
        address: Address,
        kg: int,
        recs: list[Record],
        cells: dict[str, Cell],
        now_ms: int,
        effects: list[Callable[[BatchOutcome], None]],
    ) -> None:
        """Invoke the remote function for ``recs`` (all to ``address``).

        Runs as the address's task (the dispatcher may park it). State mutations go to
        ``cells`` at once (cells of specs the function registers now are added to it);
        every other effect is appended to ``effects`` as a closure that the dispatcher
        applies to the outcome of the batch that commits the address.
        """
        self._tlog.flush()
        step = endpoint.max_batch
        for start in range(0, len(recs), step):
            chunk = recs[start : start + step]
            try:
                response = await self._invoke(d, endpoint, address, kg, chunk, cells, now_ms)
                url = endpoint.url_for(address.typename)
                effects.append(self._apply(d, url, address, kg, chunk, cells, response, now_ms))
            except RemoteFunctionError as exc:
                self.failures += 1
                self._tlog.error("remote failure", "%s; %d message(s) moved to dead letters", exc, len(chunk))
                effects.append(_dead_letters(d, chunk, str(exc)))

    async def _invoke(
        self,
        d: Dispatcher,
        endpoint: HttpEndpoint,
        address: Address,
        kg: int,
        chunk: list[Record],
        cells: dict[str, Cell],
        now_ms: int,
    ) -> Any:
        pb = self._pb
        typename = address.typename
        url = endpoint.url_for(typename)
        registered = self.specs.setdefault(typename, {})
        asked: list[set[str]] = []
        for _ in range(_MAX_REGISTRATION_ROUNDS):
            body = self._request(address, chunk, registered, cells)
            raw = await self._post(endpoint, typename, url, body)
            response = pb.FromFunction()
            try:
                response.ParseFromString(raw)
            except Exception as exc:  # DecodeError is not a ValueError
                raise RemoteFunctionError(typename, url, f"the answer is not a FromFunction message ({exc})") from None
            if response.WhichOneof("response") != "incomplete_invocation_context":
                return response
            missing = response.incomplete_invocation_context.missing_values
            names = {m.state_name for m in missing}
            if not names or any(not n for n in names):
                raise RemoteFunctionError(typename, url, "IncompleteInvocationContext names no (or an empty) state")
            if names in asked:
                raise RemoteFunctionError(
                    typename, url, f"asks again for state {sorted(names)} after it was sent; check its ValueSpecs"
                )
            asked.append(names)
            new_names = []
            for m in missing:
                spec = RemoteSpec(
                    m.state_name, m.type_typename, m.expiration_spec.mode, m.expiration_spec.expire_after_millis
                )
                if registered.get(m.state_name) != spec:
                    log.info("remote function %s registers state %s", typename, spec)
                registered[m.state_name] = spec
                new_names.append(m.state_name)
            if new_names:
                with d.backend.read_unflushed() as txn:  # _load_cell reads through the write-back cache
                    for name in new_names:
                        if name not in cells:
                            cells[name] = _load_cell(d, txn, kg, typename, address.id, name, now_ms)
        raise RemoteFunctionError(typename, url, f"still incomplete after {_MAX_REGISTRATION_ROUNDS} registrations")

    def _request(
        self, address: Address, chunk: list[Record], registered: dict[str, RemoteSpec], cells: dict[str, Cell]
    ) -> bytes:
        pb = self._pb
        to = pb.ToFunction()
        batch = to.invocation
        target = batch.target
        target.namespace, target.type, target.id = address.namespace, address.name, address.id
        for name, spec in registered.items():
            pv = batch.state.add()
            pv.state_name = name
            value = pv.state_value
            cell = cells.get(name)
            if cell is not None and cell.data is not None:
                value.typename = cell.vt or spec.typename
                value.has_value = True
                value.value = cell.data
            else:
                value.typename = spec.typename
        for rec in chunk:
            inv = batch.invocations.add()
            caller = rec[CALLER]
            if caller:
                pos = caller.rfind("/")
                inv.caller.namespace, inv.caller.type, inv.caller.id = caller[:pos], caller[pos + 1 :], rec[CALLER_ID]
            arg = inv.argument
            arg.typename, arg.has_value, arg.value = rec[VALUE_TYPE], True, rec[VALUE]
        return to.SerializeToString()  # type: ignore[no-any-return]

    async def _post(self, endpoint: HttpEndpoint, typename: str, url: str, body: bytes) -> bytes:
        """POST ``body``; retry transient failures with backoff until the call timeout."""
        ref = endpoint.in_process
        if ref is not None:
            return await self._call_in_process(endpoint, typename, url, self._handlers[ref], body)
        aiohttp = self._aiohttp
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), headers={"Content-Type": "application/octet-stream"}
            )
        t = endpoint.timeouts
        deadline = time.monotonic() + t.call
        backoff = _FIRST_BACKOFF
        attempts = 0
        while True:
            attempts += 1
            self.requests += 1
            remaining = deadline - time.monotonic()
            timeout = aiohttp.ClientTimeout(total=remaining, connect=min(t.connect, remaining), sock_read=t.read)
            try:
                async with self._session.post(url, data=body, timeout=timeout) as resp:
                    data = await _read_bounded(resp, typename, url)
                    if resp.status == 200:
                        return data
                    problem = f"HTTP {resp.status} {resp.reason or ''}".rstrip()
                    if resp.status < 500 and resp.status not in _RETRY_STATUSES:
                        raise RemoteFunctionError(typename, url, f"{problem}: {data[:200]!r}")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if time.monotonic() + backoff >= deadline:
                raise RemoteFunctionError(
                    typename, url, f"{problem} (gave up after {attempts} attempts within the {t.call:g} s call timeout)"
                )
            self.retries += 1
            self._tlog.warning("remote retry", "remote function %s at %s: %s; retrying", typename, url, problem)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _call_in_process(
        self, endpoint: HttpEndpoint, typename: str, url: str, handler: Any, body: bytes
    ) -> bytes:
        """Hand ``body`` to a handler in this process: what its HTTP server would do, minus HTTP.

        A function that raises is not retried (it would raise again): its messages go to
        the dead letters at once, with the exception.
        """
        self.requests += 1
        try:
            out = await _aio.wait_for(handler.handle_async(body), endpoint.timeouts.call)
        except asyncio.TimeoutError:
            raise RemoteFunctionError(
                typename, url, f"no answer within the {endpoint.timeouts.call:g} s call timeout"
            ) from None
        except Exception as exc:
            raise RemoteFunctionError(typename, url, f"the handler raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, (bytes, bytearray)):
            raise RemoteFunctionError(typename, url, f"the handler returned {type(out).__name__}, not bytes")
        return bytes(out)

    # -- applying an answer ----------------------------------------------------------------

    def _apply(
        self,
        d: Dispatcher,
        url: str,
        address: Address,
        kg: int,
        chunk: list[Record],
        cells: dict[str, Cell],
        response: Any,
        now_ms: int,
    ) -> Callable[[BatchOutcome], None]:
        """Check the whole answer first, then apply it: a bad answer applies nothing.

        The state mutations go to ``cells`` now; the returned closure applies the rest
        (messages, delayed messages, egress) to the outcome of the committing batch.
        """
        typename = address.typename
        registered = self.specs.get(typename, {})
        result = response.invocation_result
        for m in result.state_mutations:
            spec = registered.get(m.state_name)
            if spec is None:
                raise RemoteFunctionError(typename, url, f"answered with state {m.state_name!r} it never declared")
            if m.mutation_type == 1 and m.state_value.typename != spec.typename:
                raise RemoteFunctionError(
                    typename,
                    url,
                    f"wrote state {m.state_name!r} as {m.state_value.typename!r}, declared as {spec.typename!r}",
                )
        sends = []
        for msg in result.outgoing_messages:
            t = msg.target
            if not t.namespace or not t.type or not t.id:
                raise RemoteFunctionError(typename, url, f"sent a message to an incomplete address {t!r}")
            sends.append((f"{t.namespace}/{t.type}", t.id, msg.argument))
        delayed: list[tuple[Any, ...]] = []
        for di in result.delayed_invocations:
            if di.is_cancellation_request:
                if di.cancellation_token:
                    delayed.append(("cancel", di.cancellation_token))
                continue
            t = di.target
            if not t.namespace or not t.type or not t.id:
                raise RemoteFunctionError(typename, url, f"sent a delayed message to an incomplete address {t!r}")
            delayed.append((t, di))
        for eg in result.outgoing_egresses:
            if not eg.egress_namespace or not eg.egress_type:
                raise RemoteFunctionError(typename, url, "sent an egress record without an egress name")

        # A request's reply context travels with the messages only when it is unambiguous.
        reply_peer, request_id = (chunk[0][6], chunk[0][7]) if len(chunk) == 1 else (0, 0)
        records = [
            (target_typename, target_id, typename, address.id, arg.typename, bytes(arg.value), reply_peer, request_id)
            for target_typename, target_id, arg in sends
        ]
        del sends
        items: list[tuple[Any, ...]] = []
        for item in delayed:
            if item[0] == "cancel":
                items.append(item)
                continue
            t, di = item
            rec = (
                f"{t.namespace}/{t.type}",
                t.id,
                typename,
                address.id,
                di.argument.typename,
                bytes(di.argument.value),
                0,
                0,
            )
            items.append(("after", timedelta(milliseconds=max(di.delay_in_ms, 0)), rec, di.cancellation_token))
        egress = [
            (f"{eg.egress_namespace}/{eg.egress_type}", eg.argument.typename, bytes(eg.argument.value))
            for eg in result.outgoing_egresses
        ]
        limit = d.message_limit
        if limit:
            for rec in records + [item[2] for item in items if item[0] == "after"]:
                size = _speedups.record_size(rec)
                if size > limit:
                    raise RemoteFunctionError(
                        typename,
                        url,
                        f"sent a message of {size:,} bytes to {rec[TARGET_TYPE]}/{rec[TARGET_ID]}, over "
                        "max_message_bytes "
                        f"({limit:,})",
                    )
        for m in result.state_mutations:
            cell = cells[m.state_name]
            cell.dirty = True
            cell.expire = 0
            if m.mutation_type == 1:
                cell.vt, cell.data = m.state_value.typename, bytes(m.state_value.value)
            else:
                cell.vt = cell.data = None
        for spec in registered.values():
            if spec.mode == 0 or spec.expire_ms <= 0:
                continue
            ttl_cell = cells.get(spec.name)
            if ttl_cell is None or ttl_cell.data is None:
                continue
            cell = ttl_cell
            if spec.mode == 2 or cell.expire == 0:  # after invoke: every call refreshes; after write: on write
                cell.expire = now_ms + spec.expire_ms
                cell.dirty = True
        n = len(chunk)
        stage = _stage(d, records)
        if stage is not None:
            records = []

        def effect(out: BatchOutcome) -> None:
            # Applied by the batch that commits the address: the timer sequence and
            # egress offsets advance inside that batch (and roll back with it).
            if stage is not None:
                stage.emitted(out.sends)  # what went to disk, in its place (outbox.py)
            out.sends.extend(records)
            if items:
                d._timers(address, kg, items, now_ms, out)
            for name, vt, data in egress:
                rid = d._egress_id(address, kg) if name in d.immediate else None
                d._egress(name, vt, data, out, rid)
            d.invocations += n

        return effect


def _stage(d: Dispatcher, records: list[Record]) -> AsyncStage | None:
    """An answer's messages past the outbox's ``stage_bytes`` go to disk until the batch that
    commits the address (as an async function's sends do); ``None``: they stay in memory
    (few enough, no outbox, or the disk is full)."""
    outbox = d.outbox
    if outbox is None or not records:
        return None
    room = outbox.stage_bytes
    for rec in records:  # the estimate Context.send counts (memory.RECORD_OVERHEAD: 400)
        room -= len(rec[TARGET_ID]) + len(rec[VALUE]) + 400
        if room <= 0:
            break
    else:
        return None
    stage = outbox.new_stage()
    return stage if stage.write(records) else None


def _dead_letters(d: Dispatcher, chunk: list[Record], error: str) -> Callable[[BatchOutcome], None]:
    """The effect of a request that failed for good: its messages go to the dead letters."""

    def effect(out: BatchOutcome) -> None:
        for rec in chunk:
            d.failures += 1
            d._dead_letter(rec, "remote function failed", error, "", out)
            if rec[REQUEST_ID]:
                out.replies.append(
                    (rec[REPLY_PEER], rec[REQUEST_ID], 1, "InvocationError", error, rec[TARGET_TYPE], rec[TARGET_ID])
                )

    return effect


async def _read_bounded(resp: Any, typename: str, url: str) -> bytes:
    """The response body, refused past :data:`MAX_RESPONSE_BYTES` without reading it all."""
    if resp.content_length is not None and resp.content_length > MAX_RESPONSE_BYTES:
        raise RemoteFunctionError(
            typename, url, f"the answer has {resp.content_length:,} bytes, over {MAX_RESPONSE_BYTES:,}"
        )
    parts = []
    size = 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise RemoteFunctionError(typename, url, f"the answer is over {MAX_RESPONSE_BYTES:,} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _import_handler(ref: str, source: str | None) -> Any:
    import importlib

    from ..errors import ConfigError

    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import the handler python:{ref}: {exc}", source=source) from exc
    if not callable(getattr(obj, "handle_async", None)):
        raise ConfigError(
            f"python:{ref} is a {type(obj).__name__}, not a request-reply handler (no handle_async)", source=source
        )
    return obj


def _load_cell(d: Dispatcher, txn: Any, kg: int, typename: str, id: str, name: str, now_ms: int) -> Cell:
    key = state_key(kg, typename, id, name)
    raw = d.backend.state_get(txn, key)
    if raw is None:
        return Cell(name, None, key, None, None, 0)  # type: ignore[arg-type]
    vt, data, expire = decode_state_value(raw)
    cell = Cell(name, None, key, vt, data, expire)  # type: ignore[arg-type]
    if expire and expire <= now_ms:
        cell.vt = cell.data = None
        cell.expire = 0
        cell.dirty = True
    return cell
