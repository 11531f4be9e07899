"""``RequestReplyHandler``: serve statefun_mesh functions to any StateFun runtime over HTTP.

A StateFun runtime (Flink StateFun 3.x, or a statefun_mesh peer calling a remote
function) POSTs a ``ToFunction`` to an HTTP endpoint; the endpoint hands the body to
:meth:`RequestReplyHandler.handle_async` and answers with the bytes it returns, exactly
as programs written with the official SDK do::

    handler = RequestReplyHandler(functions)

    async def handle(request: web.Request) -> web.Response:
        body = await handler.handle_async(await request.read())
        return web.Response(body=body, content_type="application/octet-stream")

The functions run with the same ``Context``, ``storage`` and ``Message`` as inside a
mesh. The batch's effects go back in one ``FromFunction``: state mutations, messages,
delayed messages and cancellations, egress records. As in the official SDK, an
exception raised by a function propagates out of ``handle_async`` (the web framework
answers 500 and the runtime retries the whole batch), and a batch that lacks a declared
state value is answered with ``IncompleteInvocationContext`` naming the missing specs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from ..address import Address, parse_typename
from ..context import DELETED, Cell, Context, Storage
from ..errors import FunctionNotFoundError
from ..functions import FunctionSpec, StatefulFunctions, ValueSpec, merge_functions
from ..messages import Message
from ..records import TARGET_ID, TARGET_TYPE, VALUE, VALUE_TYPE

#: the protocol module, imported by the first handler (it needs protobuf; the rest of
#: statefun_mesh does not, so ``from statefun_mesh import *`` works without it)
pb: Any = None

__all__ = ["RequestReplyHandler"]

_EMPTY_KEY = b""


class RequestReplyHandler:
    """Answers request-reply ``ToFunction`` requests with ``FromFunction`` responses.

    Args:
        functions: the bound functions (one ``StatefulFunctions`` or several).

    Raises:
        ValueError: no functions given, or a type bound in two of them.
    """

    __slots__ = ("_table", "functions")

    def __init__(self, functions: StatefulFunctions | Iterable[StatefulFunctions]) -> None:
        global pb
        if not functions and not isinstance(functions, StatefulFunctions):
            raise ValueError("functions must be provided.")
        if pb is None:
            from . import protocol

            pb = protocol
        self.functions = functions
        self._table = merge_functions(functions)

    def handle_sync(self, request_bytes: bytes | bytearray | memoryview) -> bytes:
        """Answer one request; for use outside an event loop.

        Runs ``async def`` functions in a fresh event loop (as ``asyncio.run`` does);
        ``def`` functions run directly, without one.

        Raises:
            ValueError: the bytes are not a ``ToFunction`` with an invocation batch.
            FunctionNotFoundError: (a ``LookupError``) no function bound to the target type.
            Exception: whatever a function raised (no response: the runtime retries).
        """
        fspec, request = self._parse(request_bytes)
        if fspec.is_async:
            return asyncio.run(self._invoke_async(fspec, request))
        return self._invoke_sync(fspec, request)

    async def handle_async(self, request_bytes: bytes | bytearray | memoryview) -> bytes:
        """Answer one request (call from a coroutine, e.g. an aiohttp handler).

        Raises:
            ValueError: the bytes are not a ``ToFunction`` with an invocation batch.
            FunctionNotFoundError: (a ``LookupError``) no function bound to the target type.
            Exception: whatever a function raised (no response: the runtime retries).
        """
        fspec, request = self._parse(request_bytes)
        if fspec.is_async:
            return await self._invoke_async(fspec, request)
        return self._invoke_sync(fspec, request)

    # -- the batch -------------------------------------------------------------------------

    def _parse(self, request_bytes: bytes | bytearray | memoryview) -> tuple[FunctionSpec, Any]:
        if not isinstance(request_bytes, (bytes, bytearray, memoryview)):
            raise TypeError(f"request_bytes must be bytes, got {type(request_bytes).__name__}")
        to_function = pb.ToFunction()
        try:
            to_function.ParseFromString(bytes(request_bytes))
        except Exception as exc:  # google.protobuf.message.DecodeError is not a ValueError
            raise ValueError(f"the request is not a StateFun ToFunction message: {exc}") from exc
        if to_function.WhichOneof("request") != "invocation":
            raise ValueError("the ToFunction request holds no invocation batch")
        request = to_function.invocation
        target = request.target
        typename = f"{target.namespace}/{target.type}"
        fspec = self._table.get(typename)
        if fspec is None:
            raise FunctionNotFoundError(typename, sorted(self._table))
        return fspec, request

    def _resolve(self, fspec: FunctionSpec, request: Any) -> tuple[dict[str, Cell] | None, bytes | None]:
        """The batch's state cells, or the ``IncompleteInvocationContext`` answer if some are missing."""
        received: dict[str, Any] = {}
        for value in request.state:
            received[value.state_name] = value.state_value if value.HasField("state_value") else None
        missing = [spec for spec in fspec.specs if spec.name not in received]
        if missing:
            return None, _incomplete(missing)
        cells: dict[str, Cell] = {}
        for spec in fspec.specs:
            tv = received[spec.name]
            if tv is None or not tv.has_value:
                cells[spec.name] = Cell(spec.name, spec.type, _EMPTY_KEY, None, None, 0)
            else:
                cells[spec.name] = Cell(spec.name, spec.type, _EMPTY_KEY, tv.typename, tv.value, 0)
        return cells, None

    def _invoke_sync(self, fspec: FunctionSpec, request: Any) -> bytes:
        cells, incomplete = self._resolve(fspec, request)
        if cells is None:
            return incomplete  # type: ignore[return-value]
        address = Address(fspec.typename, request.target.id)
        response = pb.FromFunction()
        result = response.invocation_result
        fun = fspec.fun
        for invocation in request.invocations:
            ctx, message = _context(address, cells, invocation)
            fun(ctx, message)
            _collect(ctx, cells, result)
        _mutations(fspec, cells, result)
        return response.SerializeToString()  # type: ignore[no-any-return]

    async def _invoke_async(self, fspec: FunctionSpec, request: Any) -> bytes:
        cells, incomplete = self._resolve(fspec, request)
        if cells is None:
            return incomplete  # type: ignore[return-value]
        address = Address(fspec.typename, request.target.id)
        response = pb.FromFunction()
        result = response.invocation_result
        fun = fspec.fun
        for invocation in request.invocations:
            ctx, message = _context(address, cells, invocation)
            await fun(ctx, message)
            _collect(ctx, cells, result)
        _mutations(fspec, cells, result)
        return response.SerializeToString()  # type: ignore[no-any-return]


def _incomplete(missing: list[ValueSpec]) -> bytes:
    response = pb.FromFunction()
    values = response.incomplete_invocation_context.missing_values
    for spec in missing:
        value = values.add()
        value.state_name = spec.name
        value.type_typename = spec.type.typename
        expiration = value.expiration_spec
        if spec.after_call:
            expiration.mode = pb.EXPIRE_AFTER_INVOKE
            expiration.expire_after_millis = spec.duration
        elif spec.after_write:
            expiration.mode = pb.EXPIRE_AFTER_WRITE
            expiration.expire_after_millis = spec.duration
        else:
            expiration.mode = pb.EXPIRE_NONE
            expiration.SetInParent()  # the official SDK always sends the spec, NONE included
    return response.SerializeToString()  # type: ignore[no-any-return]


def _context(address: Address, cells: dict[str, Cell], invocation: Any) -> tuple[Context, Message]:
    caller_typename = caller_id = ""
    if invocation.HasField("caller"):
        c = invocation.caller
        if c.namespace or c.type or c.id:
            caller_typename, caller_id = f"{c.namespace}/{c.type}", c.id
    arg = invocation.argument
    value = arg.value if arg.has_value else b""
    message = Message(address.typename, address.id, arg.typename, value)
    rec = (address.typename, address.id, caller_typename, caller_id, arg.typename, value, 0, 0)
    return Context(address, rec, Storage(address, cells)), message


def _set_target(target: Any, typename: str, id: str) -> None:
    namespace, name = parse_typename(typename)
    target.namespace = namespace
    target.type = name
    target.id = id


def _set_value(tv: Any, typename: str, data: bytes) -> None:
    tv.typename = typename
    tv.has_value = True
    tv.value = data


def _collect(ctx: Context, cells: dict[str, Cell], result: Any) -> None:
    """Apply one invocation's writes to the cells and append its messages to the response."""
    writes = ctx.storage._writes or {}
    for name, value in writes.items():
        cell = cells[name]
        cell.dirty = True
        cell.has_decoded = False
        if value is DELETED:
            cell.vt = cell.data = None
        else:
            data = cell.type.serializer().serialize(value)
            if not isinstance(data, bytes):
                raise TypeError(
                    f"the serializer of type {cell.type.typename!r} returned {type(data).__name__}, "
                    f"not bytes, for state {name!r}"
                )
            cell.vt = cell.type.typename
            cell.data = data
    if ctx._sends:
        messages = result.outgoing_messages
        for rec in ctx._sends:
            out = messages.add()
            _set_target(out.target, rec[TARGET_TYPE], rec[TARGET_ID])
            _set_value(out.argument, rec[VALUE_TYPE], rec[VALUE])
    if ctx._delayed:
        delayed = result.delayed_invocations
        for item in ctx._delayed:
            out = delayed.add()
            if item[0] == "cancel":
                out.is_cancellation_request = True
                out.cancellation_token = item[1]
                continue
            _, duration, rec, token = item
            out.delay_in_ms = int(duration.total_seconds() * 1000.0)
            _set_target(out.target, rec[TARGET_TYPE], rec[TARGET_ID])
            _set_value(out.argument, rec[VALUE_TYPE], rec[VALUE])
            out.cancellation_token = token
    if ctx._egress:
        egresses = result.outgoing_egresses
        for typename, vt, data in ctx._egress:
            out = egresses.add()
            namespace, name = parse_typename(typename)
            out.egress_namespace = namespace
            out.egress_type = name
            _set_value(out.argument, vt, data)


def _mutations(fspec: FunctionSpec, cells: dict[str, Cell], result: Any) -> None:
    """One mutation per state the batch changed, in declaration order, as the official SDK sends them."""
    for spec in fspec.specs:
        cell = cells[spec.name]
        if not cell.dirty:
            continue
        mutation = result.state_mutations.add()
        mutation.state_name = spec.name
        if cell.data is None:
            mutation.mutation_type = pb.DELETE
        else:
            mutation.mutation_type = pb.MODIFY
            _set_value(mutation.state_value, cell.vt or spec.type.typename, cell.data)
