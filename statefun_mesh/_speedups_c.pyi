"""Type stub of the Cython core (csrc/_speedups_c.pyx); the spec is ``_speedups_py``."""

from collections.abc import Iterable, Sequence
from typing import Any, Final, TypeAlias

from typing_extensions import Buffer, disjoint_base

__all__ = [
    "FRAME_VERSION",
    "KIND_BATCH",
    "BatchEncoder",
    "Record",
    "collect_puts",
    "decode_batch",
    "dispatch_groups",
    "encode_batch",
    "group_records",
    "invoke_sync",
    "key_group",
    "key_groups",
    "load_cells",
    "partition",
    "record_size",
    "records_bytes",
    "stable_hash",
]

FRAME_VERSION: Final[int]
KIND_BATCH: Final[int]

#: One message on the wire: (target_typename, target_id, caller_typename, caller_id,
#: value_typename, value, reply_peer, request_id).
Record: TypeAlias = tuple[str, str, str, str, str, bytes, int, int]

def stable_hash(data: Buffer) -> int: ...
def key_group(id: str, max_parallelism: int) -> int: ...
def key_groups(ids: Iterable[str], max_parallelism: int) -> list[int]: ...
def partition(records: Iterable[Record], max_parallelism: int, n_peers: int) -> list[list[Record]]: ...

@disjoint_base  # a cdef class: its C layout cannot be combined with another base
class BatchEncoder:
    def __init__(self) -> None: ...
    def append(self, record: Record) -> None: ...
    def extend(self, records: Iterable[Record]) -> None: ...
    def fill(self, records: Sequence[Record], start: int = 0, max_bytes: int = 0, max_records: int = 0) -> int: ...
    def __len__(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def frame_size(self) -> int: ...
    def flush(self) -> bytes: ...
    def flush_room(self, room: int) -> bytearray: ...

def record_size(record: Record) -> int: ...
def records_bytes(records: Iterable[Any]) -> int: ...
def encode_batch(records: Iterable[Record]) -> bytes: ...
def decode_batch(frame: Buffer) -> list[Record]: ...

# the dispatcher's per-batch loop, compiled from statefun_mesh/_dispatch_loop.py (its spec)
def group_records(records: list[Any]) -> dict[Any, Any]: ...
def dispatch_groups(
    d: Any,
    kit: tuple[Any, ...],
    groups: dict[Any, Any],
    txn: Any,
    now_ms: Any,
    out: Any,
    max_send_bytes: Any,
    merging: dict[Any, Any],
    starting: list[Any],
    touched: list[Any],
) -> Any: ...
def collect_puts(touched: list[Any], ops: list[Any], encode: Any) -> None: ...

# the per-address steps and the objects a function sees, native (csrc/objects.pxi); their
# spec is _dispatch_loop.load_cells/invoke_sync, context.PyCell/PyStorage/PyContext and
# messages.PyMessage (context.py and messages.py put these classes in their place)
def load_cells(
    fspec: Any,
    typename: str,
    id: str,
    kg: int,
    get: Any,
    db_state: Any,
    cache: dict[bytes, bytes | None] | None,
    now_ms: Any,
    kit: tuple[Any, ...],
) -> dict[Any, Any]: ...
def invoke_sync(
    d: Any,
    fspec: Any,
    address: Any,
    kg: int,
    cells: dict[Any, Any],
    recs: list[Any],
    limit: int,
    outbox: Any,
    stage_bytes: int,
    out: Any,
    sends: list[Any],
    now_ms: Any,
    kit: tuple[Any, ...],
) -> int: ...
def load_cells_native(
    fspec: Any,
    typename: str,
    id: str,
    kg: int,
    get: Any,
    db_state: Any,
    cache: dict[bytes, bytes | None] | None,
    now_ms: Any,
    kit: tuple[Any, ...],
) -> dict[Any, Any]: ...
def invoke_sync_native(
    d: Any,
    fspec: Any,
    address: Any,
    kg: int,
    cells: dict[Any, Any],
    recs: list[Any],
    limit: int,
    outbox: Any,
    stage_bytes: int,
    out: Any,
    sends: list[Any],
    now_ms: Any,
    kit: tuple[Any, ...],
) -> int: ...
def collect_puts_native(touched: list[Any], ops: list[Any], encode: Any) -> None: ...
def bind_messages(accessors: Any, from_typed_value: Any, int_type: Any, long_type: Any) -> None: ...
def bind_context(deleted: Any, address: Any, py_context: Any, py_storage: Any) -> None: ...
def encode_value(stype: Any, value: Any) -> bytes: ...
def decode_value(stype: Any, data: bytes) -> Any: ...

Cell: Any
Storage: Any
StateProperty: Any
Context: Any
Message: Any
