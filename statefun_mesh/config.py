"""Mesh configuration: one frozen dataclass, every setting with a default."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError

__all__ = ["MeshConfig"]


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """Settings shared by every peer of a mesh.

    Attributes:
        state_dir: directory holding each peer's LMDB environment (``peer-<id>/``).
            ``None``: a temporary directory, deleted when the mesh closes.
        max_parallelism: number of key groups; fixed for the life of the application.
        peers: number of peers.
        max_batch: most messages a peer takes into one batch (one LMDB write).
        inbox_limit: queued messages above which ``send`` waits (backpressure).
        egress_retention: records kept per egress and peer; older ones are trimmed.
        map_size: initial LMDB map size in bytes (it grows by doubling when full).
        max_map_size: the largest LMDB map a peer grows to.
        sync_interval: seconds between fsyncs of the state store (0: fsync every batch).
    """

    state_dir: str | None = None
    max_parallelism: int = 1024
    peers: int = 1
    max_batch: int = 1000
    inbox_limit: int = 100_000
    egress_retention: int = 100_000
    map_size: int = 1 << 30
    max_map_size: int = 1 << 40
    sync_interval: float = 1.0

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"expected {expected}, got {getattr(self, key)!r}", key=key)

        for f in fields(self):
            value: Any = getattr(self, f.name)
            if f.type == "int" and (type(value) is not int or value < 1):
                raise bad(f.name, "a positive integer")
        if not 1 <= self.max_parallelism <= 32768:
            raise bad("max_parallelism", "an integer between 1 and 32768")
        if self.peers > self.max_parallelism:
            raise bad("peers", f"at most max_parallelism ({self.max_parallelism}) peers")
        if not isinstance(self.sync_interval, (int, float)) or self.sync_interval < 0:
            raise bad("sync_interval", "a number of seconds >= 0")
        if self.state_dir is not None and not isinstance(self.state_dir, str):
            raise bad("state_dir", "a directory path")
