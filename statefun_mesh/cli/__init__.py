"""The ``statefun-mesh`` command: run a local mesh, run one peer, send, request, read egress, status,
bridge a NATS JetStream stream into a mesh.

Owns: the top-level parser (each command module adds its own subparser, in the order
``--help`` lists them) and :func:`main` (the entry point: parse, run the command, turn a
configuration or mesh error into one line on stderr and exit status 2). One module per
command: ``run``, ``peer``, ``send`` (``send`` and ``request``), ``egress``,
``checkpoints``, ``nats`` (``nats-ingress`` and ``nats-egress``), ``keys``, ``status``;
``common`` holds what they share.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import ConfigError, StatefunMeshError
from . import checkpoints, egress, keys, nats, peer, run, send, status
from .common import decode_for_display, import_functions
from .peer import cmd_peer, peer_id_from_hostname
from .status import status_table

__all__ = [
    "build_parser",
    "cmd_peer",
    "decode_for_display",
    "import_functions",
    "main",
    "peer_id_from_hostname",
    "status_table",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statefun-mesh",
        description="Stateful Functions for Python, at scale, without a Flink cluster.",
        epilog="Start with: statefun-mesh run examples.greeter:functions --peers 2",
    )
    parser.add_argument("--version", action="version", version=f"statefun-mesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (run, peer, send, egress, checkpoints, nats, keys, status):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, StatefunMeshError) as exc:
        # one write, line and newline together: peers started by `run` share its stderr,
        # and two separate writes of theirs may interleave
        sys.stderr.write(f"statefun-mesh {args.command}: error: {exc}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `statefun-mesh egress ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
