"""The ``checkpoints`` command: list the checkpoints in a blob store."""

from __future__ import annotations

import argparse
import asyncio
import os

from ..config import load_config
from ..errors import ConfigError, StatefunMeshError
from .common import DEFAULT_STATE_DIR


def cmd_checkpoints(args: argparse.Namespace) -> int:
    """List checkpoints in a blob store, or show one."""
    from ..blobstore import open_blob_store
    from ..snapshot.coordinator import list_checkpoints
    from ..snapshot.format import Manifest, manifest_name

    url = args.blob_store
    if not url and args.config:
        url = load_config(args.config).blob_store
    if not url:
        # where `statefun-mesh run` puts them by default: <state dir>/checkpoints
        where = os.path.join(os.path.abspath(args.state_dir or DEFAULT_STATE_DIR), "checkpoints")
        if not os.path.isdir(where):
            raise ConfigError(
                f"no checkpoints at {where} (where `statefun-mesh run` keeps them for "
                f"{'--state-dir ' + args.state_dir if args.state_dir else 'its default state directory'}); "
                "give --state-dir DIR, --blob-store URL or --config mesh.toml"
            )
        url = "file://" + where

    async def go() -> int:
        blobs = open_blob_store(url)
        try:
            ids = await list_checkpoints(blobs)
            if args.action == "list":
                if not ids:
                    print(f"no checkpoints in {url}")
                for n in ids:
                    name = manifest_name(n)
                    try:
                        m = Manifest.from_json(await blobs.get(name), name=name)
                    except StatefunMeshError as exc:
                        print(f"{n:>8}  INVALID  {exc}")
                        continue
                    size = sum(r.size for p in m.parts for r in (*p.chain, p.inflight))
                    print(
                        f"{n:>8}  complete  peers={m.peers}  generation={m.generation}  "
                        f"{size / 1e6:.2f} MB  created {_iso(m.created_ms)}"
                    )
                return 0
            n = ids[-1] if args.id in (None, "latest") else int(args.id)
            name = manifest_name(n)
            m = Manifest.from_json(await blobs.get(name), name=name)
            print(
                f"checkpoint {m.checkpoint}: {m.peers} peers, max_parallelism {m.max_parallelism}, "
                f"generation {m.generation}, created {_iso(m.created_ms)}"
            )
            for p in m.parts:
                print(
                    f"  peer {p.peer}: key groups [{p.key_groups[0]}, {p.key_groups[1]}), "
                    f"ingress position {p.ingress_position}"
                )
                for r in p.chain:
                    print(f"    {r.kind:<8} {r.name}  {r.size:>12,} bytes  {r.entries:>9,} entries")
                r = p.inflight
                print(f"    {'inflight':<8} {r.name}  {r.size:>12,} bytes  {r.entries:>9,} messages")
                for eg, head in sorted(p.egress.items()):
                    print(f"    egress {eg}: released up to offset {head}")
            return 0
        finally:
            await blobs.aclose()

    return asyncio.run(go())


def _iso(ms: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's command(s) to the ``statefun-mesh`` parser."""
    p = sub.add_parser(
        "checkpoints",
        help="list checkpoints or inspect one",
        description="List the checkpoints in a blob store, or show one's objects per peer.",
    )
    p.add_argument("action", choices=["list", "inspect"])
    p.add_argument("id", nargs="?", help="checkpoint id for inspect (default: latest)")
    p.add_argument("--blob-store", metavar="URL", help="file:///dir, a path, or s3://bucket/prefix")
    p.add_argument("--config", help="mesh.toml whose blob_store to read")
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="without --blob-store or --config: read <DIR>/checkpoints, where `run` keeps them "
        "(default: ./statefun-mesh-state, run's default)",
    )
    p.set_defaults(func=cmd_checkpoints)
