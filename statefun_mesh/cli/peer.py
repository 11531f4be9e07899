"""The ``peer`` command: run one peer of a cluster described by a config file."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

from ..config import load_config
from ..errors import ConfigError
from ..functions import StatefulFunctions
from .common import _add_log_args, _check_state_dir, _count, _http_endpoint, _setup_logging, import_functions, log


def _summary(status: dict[str, Any]) -> str:
    """A peer's counters as a sentence (for its last log line)."""
    ck = status.get("checkpoints")
    last = f"; last checkpoint {ck['last_complete']}" if ck and ck.get("last_complete") is not None else ""
    return (
        f"{status['invocations']:,} invocations ({status['failures']:,} failed) in {status['batches']:,} "
        f"batches, {status['queued']:,} queued{last}"
    )


def peer_id_from_hostname(hostname: str) -> int:
    """The peer id a StatefulSet pod's host name carries: ``mesh-2`` (or ``mesh-2.mesh.ns...``) is 2.

    Raises:
        ConfigError: the name does not end in ``-<number>``.
    """
    name = hostname.split(".", 1)[0]
    _, dash, tail = name.rpartition("-")
    if not dash or not tail.isdigit():
        raise ConfigError(
            f"--id-from-hostname: the host name {hostname!r} does not end in '-<number>' (as a StatefulSet "
            "pod's does, e.g. mesh-2); pass --id instead"
        )
    return int(tail)


def cmd_peer(args: argparse.Namespace) -> int:
    """Run one peer of a cluster until SIGTERM/SIGINT."""
    from ..dispatch import raise_gc_threshold
    from ..memory import freeze_startup_objects, limit_arenas
    from ..peer import Peer

    if args.id is None:
        import socket

        args.id = peer_id_from_hostname(socket.gethostname())
    limit_arenas()  # a peer process's heap returns to its baseline after a load (memory.py)
    _setup_logging(args.log_level, f"peer-{args.id} ", args.log_format)
    overrides: dict[str, Any] = {"state_dir": args.state_dir}
    if args.restore is not None:
        overrides["restore"] = args.restore
    if args.dashboard:
        overrides["dashboard"] = True
    config = load_config(args.config, **overrides)
    if not 0 <= args.id < config.peers:
        raise ConfigError(f"--id must be in 0..{config.peers - 1} for this config, got {args.id}", source=args.config)
    if args.metrics_endpoint is not None:  # this peer's entry only
        metrics = list(config.metrics_endpoints) or [""] * config.peers
        metrics[args.id] = args.metrics_endpoint
        config = config.with_(metrics_endpoints=tuple(metrics))
    refs = list(args.functions) or list(config.functions)
    if not refs and not config.module:
        raise ConfigError(
            "no functions given: list them in the config (functions = [...]), pass MODULE:ATTR, "
            "or name remote functions with module = 'module.yaml'",
            source=args.config,
            key="functions",
        )
    modules = [m for ref in refs for m in import_functions(ref)] or [StatefulFunctions()]
    if config.state_dir is None:
        raise ConfigError("a peer needs a state_dir", source=args.config, key="state_dir")
    _check_state_dir(os.path.join(config.state_dir, f"peer-{args.id}"), "--state-dir or state_dir in the config")

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        peer = Peer(config, modules, peer_id=args.id)
        starting = asyncio.ensure_future(peer.start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while waiting for the mesh (e.g. its first recovery round)
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await peer.aclose()
            return 0
        stopping.cancel()
        starting.result()  # a start-up error ends the peer here, with its message
        freeze_startup_objects()  # no collection walks the start-up heap again (request latency)
        raise_gc_threshold()  # and what the batches make is walked ~20 times less often (issue 9)
        try:
            log.info(
                "peer %d ready (client endpoint %s)",
                args.id,
                config.client_endpoints[args.id] if config.client_endpoints else "none",
            )
            stopped = asyncio.ensure_future(stop.wait())
            died = asyncio.ensure_future(peer.dispatch_died.wait())
            await asyncio.wait({stopped, died}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            died.cancel()
            if peer.dispatch_died.is_set():
                # a process that heartbeats but processes nothing would stall the mesh: exit,
                # so that the supervisor (run, systemd, Kubernetes) restarts it and the mesh
                # recovers from its last checkpoint
                log.error("peer %d exits: its dispatch loop died (%s)", args.id, peer.dispatch_failure())
                return 1
            log.info("peer %d stopping: %s", args.id, _summary(peer.status()))
            return 0
        finally:
            await peer.aclose()

    return asyncio.run(run())


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's command(s) to the ``statefun-mesh`` parser."""
    p = sub.add_parser(
        "peer",
        help="run one peer of a cluster described by a config file",
        description="Run peer --id of the cluster in --config until SIGTERM or Ctrl-C.",
    )
    p.add_argument("functions", nargs="*", metavar="MODULE:ATTR", help="override the config's functions")
    p.add_argument("--config", required=True, help="mesh.toml naming every peer's endpoints")
    ident = p.add_mutually_exclusive_group(required=True)
    ident.add_argument("--id", type=_count, help="this peer's index in the config")
    ident.add_argument(
        "--id-from-hostname",
        action="store_true",
        help="take the index from the host name's last '-N' (a Kubernetes StatefulSet pod mesh-2 is peer 2)",
    )
    p.add_argument("--state-dir", help="override the config's state_dir")
    p.add_argument(
        "--restore",
        metavar="latest|ID",
        help="peer 0 only: start the mesh from this checkpoint, rescaling if it was taken on another "
        "number of peers (remove it again once the mesh is up)",
    )
    p.add_argument(
        "--metrics-endpoint",
        type=_http_endpoint,
        metavar="HOST:PORT",
        help="serve /metrics, /healthz and /readyz here (overrides the config's metrics_endpoints entry "
        "for this peer; '' for none)",
    )
    p.add_argument("--dashboard", action="store_true", help="also serve the web dashboard at / on the metrics endpoint")
    _add_log_args(p)
    p.set_defaults(func=cmd_peer)
