"""The few facts about a peer that every view of it starts from: its settings, its index
and the size of its mesh.

:class:`PeerView` is the base of the typed protocols through which other parts see a
``Peer`` — the snapshot code's ``CheckpointHost`` and ``RecoveryHost``
(``snapshot/host.py``) and the client endpoint's ``ClientHost`` (``client_host.py``) —
so those three stubs are written once. Imports nothing of the package at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .config import MeshConfig

__all__ = ["PeerView"]


class PeerView(Protocol):
    """A peer's settings, index and mesh size (read-only)."""

    @property
    def config(self) -> MeshConfig: ...

    @property
    def peer_id(self) -> int: ...

    @property
    def n_peers(self) -> int: ...
