"""The ``keys`` command: make CURVE key pairs."""

from __future__ import annotations

import argparse
import os

from ..config import load_config
from ..errors import ConfigError


def cmd_keys(args: argparse.Namespace) -> int:
    """Make CURVE key pairs: one printed, or key files for every peer and some clients."""
    from ..security import ClientKeys, generate_keypair, write_key_file

    if not args.dir:
        pair = generate_keypair()
        print(f'public_key = "{pair.public}"\nsecret_key = "{pair.secret}"  # SECRET: keep private')
        return 0
    config = load_config(args.config) if args.config else None
    peers = args.peers or (config.peers if config is not None else 0)
    if peers < 1 and args.clients < 1:
        raise ConfigError("give --peers N (or --config mesh.toml) and/or --clients M")
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    bases = [os.path.join(args.dir, f"peer-{k}") for k in range(peers)]
    bases += [os.path.join(args.dir, f"client-{j}") for j in range(args.clients)]
    if not args.force:
        existing = [b + ext for b in bases for ext in (".key", ".key_secret") if os.path.exists(b + ext)]
        if existing:
            raise ConfigError(
                f"{existing[0]} exists: keys are never overwritten unless you pass --force "
                "(a peer or client holding the old key would be locked out)"
            )
    publics = []
    for k in range(peers):
        pair = generate_keypair()
        write_key_file(bases[k], pair, f"statefun-mesh peer {k}")
        publics.append(pair.public)
    if config is None and peers:
        peer_publics = publics
    else:
        peer_publics = publics or (config.peer_public_keys() if config is not None else [])
    endpoints = list(config.client_endpoints) if config is not None else []
    client_files = []
    for j in range(args.clients):
        pair = generate_keypair()
        base = os.path.join(args.dir, f"client-{j}")
        write_key_file(base, pair, f"statefun-mesh client {j}")
        servers = {ep: key for ep, key in zip(endpoints, peer_publics, strict=False) if ep}
        ClientKeys(pair.public, pair.secret, servers).save(base + ".toml")
        client_files.append((base, pair.public))
    rel = args.dir
    print("# add to mesh.toml (the same on every peer); copy keys/peer-K.key_secret to peer K only")
    if publics:
        print("peer_keys = [" + ", ".join(f'"{p}"' for p in publics) + "]")
        print(f'secret_key = "{os.path.join(rel, "peer-{id}.key_secret")}"')
    if client_files:
        print("client_keys = [" + ", ".join(f'"{pub}"' for _, pub in client_files) + "]")
        print("# clients: MeshClient(endpoint, keys=ClientKeys.load(path)) or statefun-mesh ... --client-key path:")
        for base, _ in client_files:
            print(f"#   {base}.toml" + ("" if endpoints else '  (add [server_keys] "<endpoint>" = "<peer key>")'))
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's command(s) to the ``statefun-mesh`` parser."""
    p = sub.add_parser(
        "keys",
        help="make CURVE keys for a mesh (docs/security.md)",
        description="Make CURVE key pairs. Without --dir: print one pair. With --dir: write peer-K.key (public) "
        "and peer-K.key_secret (mode 0600) for every peer, client-J.* and a client key file client-J.toml for "
        "--clients clients, and print the mesh.toml lines that use them.",
    )
    p.add_argument("action", choices=["generate"], help="generate")
    p.add_argument("--dir", help="write key files here (made with mode 0700)")
    p.add_argument("--peers", type=int, default=0, help="key pairs for this many peers (default: --config's peers)")
    p.add_argument("--clients", type=int, default=0, help="client key pairs to make (default: 0)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="mesh.toml: the peer count, and client endpoints for the client key files' [server_keys]",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p.set_defaults(func=cmd_keys)
