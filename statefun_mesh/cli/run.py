"""The ``run`` command: start a local mesh of N supervised peer processes on this machine."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..config import MeshConfig, load_config
from ..errors import ConfigError
from .common import (
    DEFAULT_ENDPOINT,
    DEFAULT_STATE_DIR,
    _add_log_args,
    _check_state_dir,
    _count,
    _endpoint,
    _port,
    _positive_int,
    _positive_seconds,
    _setup_logging,
    import_functions,
)


def cmd_run(args: argparse.Namespace) -> int:
    """Start a local cluster of peer processes and supervise it."""
    from ..launcher import Launcher

    _setup_logging(args.log_level, "run ", args.log_format)
    os.environ["STATEFUN_MESH_LOG_FORMAT"] = args.log_format  # the peers' --log-format
    overrides: dict[str, Any] = {}
    if args.max_parallelism is not None:
        overrides["max_parallelism"] = args.max_parallelism
    if args.config:
        base = load_config(args.config)
    else:
        base = MeshConfig()
    refs = tuple(args.functions) or base.functions
    if args.module:
        overrides["module"] = os.path.abspath(args.module)
    module = overrides.get("module") or base.module
    if not refs and not module:
        raise ConfigError(
            "no functions given: pass MODULE:ATTR (e.g. examples.greeter:functions) or --module module.yaml"
        )
    for ref in refs:  # fail here, with a clear error, rather than in every peer
        import_functions(ref)
    if module:
        from ..remote.module_yaml import load_module_yaml

        load_module_yaml(module)
    state_dir = os.path.abspath(args.state_dir or base.state_dir or DEFAULT_STATE_DIR)
    _check_state_dir(state_dir, "--state-dir")
    if args.no_checkpoints:
        overrides["blob_store"] = ""
    elif args.blob_store:
        overrides["blob_store"] = args.blob_store
    elif not base.blob_store:
        overrides["blob_store"] = "file://" + os.path.join(state_dir, "checkpoints")
    if args.checkpoint_interval is not None:
        overrides["checkpoint_interval"] = args.checkpoint_interval
    if args.restore is not None:
        if args.no_checkpoints:
            raise ConfigError("--restore needs checkpoints: drop --no-checkpoints")
        overrides["restore"] = args.restore
    launcher = Launcher(
        base.with_(functions=tuple(refs), **overrides),
        peers=args.peers,
        transport=args.transport,
        client_endpoint=args.client_endpoint,
        state_dir=state_dir,
        log_level=args.log_level,
        metrics_port=None if args.no_metrics else args.metrics_port,
        metrics_host=args.metrics_host,
        dashboard_peer=args.dashboard_peer,
        keys=not args.no_keys,
    )
    return launcher.run()


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's command(s) to the ``statefun-mesh`` parser."""
    p = sub.add_parser(
        "run",
        help="start a local mesh: N peer processes, supervised",
        description="Start N peer processes on this machine, print the client endpoint, and keep them running "
        "(a peer that dies is restarted) until Ctrl-C or SIGTERM.",
    )
    p.add_argument("functions", nargs="*", metavar="MODULE:ATTR", help="StatefulFunctions to run, e.g. app:functions")
    p.add_argument(
        "--peers", type=_positive_int, default=None, help="number of peer processes (default: the number of cores)"
    )
    p.add_argument("--transport", choices=["ipc", "tcp"], default="ipc", help="between peers (default: ipc)")
    p.add_argument(
        "--client-endpoint",
        type=_endpoint,
        default=DEFAULT_ENDPOINT,
        help="endpoint peer 0 binds for clients (default: %(default)s)",
    )
    p.add_argument("--state-dir", help="state directory (default: ./statefun-mesh-state)")
    p.add_argument("--max-parallelism", type=_positive_int, help="number of key groups (default: 1024)")
    p.add_argument(
        "--blob-store",
        metavar="URL",
        help="where checkpoints go: file:///dir, s3://bucket/prefix (default: <state-dir>/checkpoints)",
    )
    p.add_argument(
        "--checkpoint-interval", type=_positive_seconds, metavar="SECONDS", help="between checkpoints (default: 5)"
    )
    p.add_argument(
        "--no-checkpoints", action="store_true", help="take no checkpoints (faster; a crash then loses queued messages)"
    )
    p.add_argument(
        "--no-keys",
        action="store_true",
        help="run the links and client endpoints without CURVE: anyone who can reach them can forge "
        "messages (default: keys are made in <state-dir>/keys and used; see docs/security.md)",
    )
    p.add_argument(
        "--restore",
        metavar="latest|ID",
        help="start from this checkpoint, onto --peers peers even if it was taken on another number "
        "(rescaling); an older ID rolls back, deleting newer checkpoints (default: the latest "
        "checkpoint, which must have been taken on --peers peers)",
    )
    p.add_argument(
        "--module",
        metavar="module.yaml",
        help="a StateFun module.yaml: its HTTP endpoints are remote functions the peers call",
    )
    p.add_argument("--config", help="mesh.toml with further settings")
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=0,
        metavar="PORT",
        help="peer K serves /metrics, /healthz and /readyz on PORT+K (default: free ports, printed)",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address the metrics servers bind (default: %(default)s; 0.0.0.0 for every interface)",
    )
    p.add_argument("--no-metrics", action="store_true", help="serve no metrics, health checks or dashboard")
    p.add_argument(
        "--dashboard-peer",
        type=_count,
        default=0,
        metavar="K",
        help="the peer whose metrics server also serves the web dashboard at / (default: 0)",
    )
    _add_log_args(p)
    p.set_defaults(func=cmd_run)
