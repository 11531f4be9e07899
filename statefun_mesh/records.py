"""Named parts of the positional tuples that flow through a peer: message records and
the write operations of a batch.

A message record is a plain 8-tuple (``dispatch.Record``): it is what the Cython core
encodes, partitions and decodes, so it stays a tuple; these constants name its fields.
A batch's writes to the state store (``state/lmdb_backend.py`` applies them) are tuples
tagged by their first item; these constants name the tags.

Code that runs per record in a loop of the hot path (routing, the inbox, the size
estimate in ``memory.py``, dispatch) keeps literal indices: a module constant is a
global lookup per use (measured on CPython 3.11, net of the loop: ``rec[5]`` 21 ns,
``rec[VALUE]`` 38 ns), where a literal is free. Everything else uses the names.
Imports nothing of the package.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CALLER",
    "CALLER_ID",
    "OP_CANCEL",
    "OP_DEL",
    "OP_FIRED",
    "OP_PUT",
    "REPLY_PEER",
    "REQUEST_ID",
    "TARGET_ID",
    "TARGET_TYPE",
    "VALUE",
    "VALUE_TYPE",
]

# -- a message record: (target_type, target_id, caller, caller_id, value_type, value, reply_peer, request_id)

#: the target function's type name, ``"namespace/name"``
TARGET_TYPE: Final = 0
#: the target instance's id
TARGET_ID: Final = 1
#: the calling function's type name (``""``: from outside the mesh)
CALLER: Final = 2
#: the calling instance's id; for a client message, its idempotency key (``""``: none)
CALLER_ID: Final = 3
#: the value's type name (``io.statefun.types/int`` and the like)
VALUE_TYPE: Final = 4
#: the value's bytes
VALUE: Final = 5
#: the peer waiting for the reply to a request (with ``REQUEST_ID``)
REPLY_PEER: Final = 6
#: the request's id at ``REPLY_PEER`` (0: not a request)
REQUEST_ID: Final = 7

# -- a batch's write operations (state/lmdb_backend.py)

#: ``(OP_PUT, db, key, value)``
OP_PUT: Final = "put"
#: ``(OP_DEL, db, key)``
OP_DEL: Final = "del"
#: ``(OP_CANCEL, key_group, token_prefix)``: cancel the delayed messages of a token
OP_CANCEL: Final = "cancel"
#: ``(OP_FIRED, key_group, seq, due_ms, token_prefix_or_None)``: a timer fired
OP_FIRED: Final = "fired"
