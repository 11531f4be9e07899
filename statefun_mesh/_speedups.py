"""Selects the hot-path implementation: the Cython core, or its pure-Python twin.

``STATEFUN_MESH_NO_EXTENSIONS=1`` forces the twin. ``STATEFUN_MESH_REQUIRE_EXTENSIONS=1``
makes a missing or broken Cython core an error instead of a silent fallback (CI uses
it so a build problem cannot pass as a pure-Python run). ``IMPLEMENTATION`` says which
one is in use: ``"c"`` or ``"python"``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

NO_EXTENSIONS: Final = bool(os.environ.get("STATEFUN_MESH_NO_EXTENSIONS"))
REQUIRE_EXTENSIONS: Final = bool(os.environ.get("STATEFUN_MESH_REQUIRE_EXTENSIONS"))

IMPLEMENTATION: str
if TYPE_CHECKING or NO_EXTENSIONS:
    from ._speedups_py import (
        FRAME_VERSION,
        KIND_BATCH,
        BatchEncoder,
        collect_puts,
        decode_batch,
        dispatch_groups,
        encode_batch,
        group_records,
        invoke_sync,
        key_group,
        key_groups,
        load_cells,
        partition,
        record_size,
        records_bytes,
        stable_hash,
    )

    IMPLEMENTATION = "python"
else:
    try:
        from ._speedups_c import (  # type: ignore[no-redef]
            FRAME_VERSION,
            KIND_BATCH,
            BatchEncoder,
            collect_puts,
            decode_batch,
            dispatch_groups,
            encode_batch,
            group_records,
            invoke_sync,
            key_group,
            key_groups,
            load_cells,
            partition,
            record_size,
            records_bytes,
            stable_hash,
        )

        IMPLEMENTATION = "c"
    except ImportError as exc:
        if REQUIRE_EXTENSIONS:
            raise ImportError(
                "STATEFUN_MESH_REQUIRE_EXTENSIONS is set but the Cython core "
                "statefun_mesh._speedups_c could not be imported; rebuild it with "
                "`pip install -e .` (needs Cython and a C compiler)"
            ) from exc
        from ._speedups_py import (
            FRAME_VERSION,
            KIND_BATCH,
            BatchEncoder,
            collect_puts,
            decode_batch,
            dispatch_groups,
            encode_batch,
            group_records,
            invoke_sync,
            key_group,
            key_groups,
            load_cells,
            partition,
            record_size,
            records_bytes,
            stable_hash,
        )

        IMPLEMENTATION = "python"

__all__ = [
    "FRAME_VERSION",
    "IMPLEMENTATION",
    "KIND_BATCH",
    "BatchEncoder",
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
