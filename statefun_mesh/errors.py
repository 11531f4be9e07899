"""The whole statefun_mesh exception hierarchy.

Every error the runtime raises derives from :class:`StatefunMeshError`. Where a
caller would already catch a builtin (``ValueError``, ``LookupError``) the error
also derives from it, so ``except ValueError`` keeps working. Structured data
lives in attributes, not only in the message text.

User-facing validation in the StateFun-compatible API (``ValueSpec``,
``message_builder``, storage attributes) raises plain ``ValueError``,
``TypeError`` and ``AttributeError`` exactly as the StateFun SDK does.
"""

from __future__ import annotations

__all__ = [
    "BlobNotFoundError",
    "BlobStoreError",
    "BrokenTransportError",
    "ClosedTransportError",
    "ConfigError",
    "FrameDecodeError",
    "FunctionNotFoundError",
    "IncompatibleSnapshotError",
    "InvocationError",
    "MeshBusyError",
    "MessageTooLargeError",
    "RequestTimeoutError",
    "SnapshotError",
    "SnapshotNotFoundError",
    "StateBackendError",
    "StateCapacityError",
    "StatefunMeshError",
    "TransportError",
    "TypeNameError",
    "UnmappableMessage",
]


class StatefunMeshError(Exception):
    """Base class of every error raised by statefun_mesh."""


class ConfigError(StatefunMeshError, ValueError):
    """A configuration value is missing, malformed or inconsistent.

    Attributes:
        source: the file (or ``"<arguments>"``) the value came from, if known.
        key: the dotted configuration key, if known.
    """

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        prefix = ""
        if source:
            prefix += f"{source}: "
        if key:
            prefix += f"{key}: "
        super().__init__(prefix + message)
        self.source = source
        self.key = key


class TypeNameError(StatefunMeshError, ValueError):
    """A type name is not of the form ``namespace/name``."""


class FunctionNotFoundError(StatefunMeshError, LookupError):
    """No function is bound to the message's target type name.

    Attributes:
        typename: the unknown function type.
    """

    def __init__(self, typename: str, known: list[str] | None = None) -> None:
        hint = ""
        if known is not None:
            shown = ", ".join(sorted(known)[:10]) or "none"
            hint = f" (bound functions: {shown})"
        super().__init__(
            f"no function is bound to type {typename!r}{hint}; "
            "bind one with @functions.bind(typename=...) and pass those functions to the mesh"
        )
        self.typename = typename


class InvocationError(StatefunMeshError):
    """A user function raised; the invocation's state changes and effects were discarded.

    Only the text of the user's exception reaches the requester (the exception itself,
    with its traceback, is logged by the peer that ran the function and recorded in the
    dead-letter egress).

    Attributes:
        address: ``"namespace/name/id"`` of the failed instance.
        error: ``"ExceptionType: message"`` of the user's exception.
    """

    def __init__(self, address: str, error: str) -> None:
        super().__init__(f"function {address} raised {error}")
        self.address = address
        self.error = error


class RequestTimeoutError(StatefunMeshError, TimeoutError):
    """A request got no reply in time (the target function never called ``context.reply``)."""


class MeshBusyError(StatefunMeshError):
    """A peer holds as much client work as it will (sends waiting for admission, or
    requests waiting for their reply); nothing was accepted. :class:`~statefun_mesh.client.MeshClient`
    retries refused sends with backoff within its timeout and raises this for refused
    requests; other clients should retry later too."""


class MessageTooLargeError(StatefunMeshError, ValueError):
    """A message (or a reply, or an egress record) is larger than the mesh admits
    (``max_message_bytes``); it was refused where it was made, never accepted.

    Attributes:
        size: the message's size in bytes, as framed (value, type names and ids).
        limit: the largest size admitted.
        what: what was refused ("message", "reply", "egress record", ...).
    """

    def __init__(self, size: int, limit: int, what: str = "message") -> None:
        super().__init__(
            f"{what} of {size} bytes is over the limit of {limit} bytes (max_message_bytes); it was not "
            "accepted: send a smaller value (split it, or store a large blob elsewhere and send a reference), "
            "or raise max_message_bytes (and max_frame_bytes) on every peer"
        )
        self.size = size
        self.limit = limit
        self.what = what


class FrameDecodeError(StatefunMeshError, ValueError):
    """A frame is malformed, truncated, oversized or of a foreign version."""


class TransportError(StatefunMeshError):
    """Base class of transport failures."""


class BrokenTransportError(TransportError):
    """The other side of a channel failed."""


class ClosedTransportError(TransportError):
    """The transport was closed by your own code."""


class StateBackendError(StatefunMeshError):
    """The state backend (LMDB) failed; the batch being written was not applied."""


class StateCapacityError(StateBackendError):
    """The state store is full and could not grow (LMDB map or disk full)."""


class SnapshotError(StatefunMeshError):
    """A snapshot could not be taken or restored."""


class SnapshotNotFoundError(SnapshotError, LookupError):
    """The requested checkpoint does not exist."""


class IncompatibleSnapshotError(SnapshotError):
    """A checkpoint cannot be restored by this mesh (another ``max_parallelism``, another
    number of peers, another format): the peer refuses to start rather than fall back."""


class UnmappableMessage(StatefunMeshError, ValueError):
    """A connector's message (NATS, ...) that cannot become a mesh message; ``str(exc)`` says why."""


class BlobStoreError(StatefunMeshError):
    """The blob store refused or failed an operation."""


class BlobNotFoundError(BlobStoreError, LookupError):
    """The requested blob does not exist."""
