"""Choosing and opening a peer's transport from its configuration (by the endpoints' URL scheme).

Owns: which :class:`~statefun_mesh.transport.base.Transport` a configuration means
(``memory://`` hubs in one process, ZeroMQ otherwise, with CURVE when configured) and
the ZMTP heartbeat it runs with. Called by ``Peer``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import MeshConfig
    from .base import Transport

__all__ = ["open_transport"]


def open_transport(config: MeshConfig, peer_id: int) -> Transport:
    """Create the transport that ``config.endpoints`` name (by URL scheme)."""
    eps = list(config.endpoints)
    if all(ep.startswith("memory://") for ep in eps):
        from .memory import InMemoryTransport

        hub = eps[0][len("memory://") :].rsplit("/", 1)[0]
        return InMemoryTransport(hub, peer_id, config.peers)
    if any(ep.startswith("memory://") for ep in eps):
        raise ConfigError(
            "memory:// endpoints cannot be mixed with ZeroMQ endpoints: use one kind for every peer", key="endpoints"
        )
    from .zeromq import ZmqTransport

    # ZMTP pings drop a connection to an address nobody answers at any more (a host gone
    # without closing its connections, a peer moved elsewhere under the same name).
    heartbeat = (config.heartbeat_interval, 3 * config.heartbeat_timeout)
    if config.curve:
        return ZmqTransport(
            peer_id,
            eps,
            max_frame=config.max_frame_bytes,
            heartbeat=heartbeat,
            keys=config.keypair(peer_id),
            peer_keys=config.peer_public_keys(),
        )
    return ZmqTransport(peer_id, eps, max_frame=config.max_frame_bytes, heartbeat=heartbeat)
