"""The ``statefun-mesh`` command: run a local mesh, run one peer, send, request, read egress, status,
bridge a NATS JetStream stream into a mesh."""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar

from . import __version__
from .config import MeshConfig, load_config
from .errors import ConfigError, StatefunMeshError
from .functions import StatefulFunctions
from .logutil import format_seconds

__all__ = ["decode_for_display", "import_functions", "main", "status_table"]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7700"
#: seconds `egress` waits for a further record (on top of the checkpoint interval by default)
DEFAULT_IDLE = 2.0
#: `run`'s state directory when neither --state-dir nor the config names one (relative to the cwd)
DEFAULT_STATE_DIR = "statefun-mesh-state"
log = logging.getLogger("statefun_mesh.cli")


# -- helpers -----------------------------------------------------------------------------


def import_functions(ref: str) -> list[StatefulFunctions]:
    """Import ``package.module:attribute`` and return the ``StatefulFunctions`` it names.

    The attribute may be one ``StatefulFunctions`` or a list/tuple of them. The current
    directory is importable, as with ``python -m``.

    Raises:
        ConfigError: the reference is malformed, cannot be imported, or names something else.
    """
    if ref.count(":") != 1:
        raise ConfigError(f"expected 'package.module:attribute', got {ref!r}", key="functions")
    module_name, attr = ref.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import {module_name!r} ({exc}); run from the directory that holds the package "
            "or add it to PYTHONPATH",
            key="functions",
        ) from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}", key="functions") from None
    items = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    if not items or not all(isinstance(i, StatefulFunctions) for i in items):
        raise ConfigError(
            f"{ref} is a {type(obj).__name__}, expected StatefulFunctions (or a list of them)", key="functions"
        )
    return items


def decode_for_display(value_typename: str, data: bytes) -> Any:
    """Decode a typed value for printing: primitives and JSON as themselves, else base64."""
    from . import valuetypes as vt
    from .egress_io import KafkaProducerRecordType, KinesisEgressRecordType

    for t in (vt.IntType, vt.LongType, vt.FloatType, vt.DoubleType, vt.BoolType, vt.StringType, vt.MsgPackType):
        if value_typename == t.typename:
            try:
                return t.serializer().deserialize(data)
            except ValueError:
                break
    for t in (KafkaProducerRecordType, KinesisEgressRecordType):  # their fields, the value decoded as below
        if value_typename == t.typename:
            try:
                record = t.serializer().deserialize(data)
            except ValueError:
                break
            fields = {k: getattr(record, k) for k in record.__slots__ if k != "value"}
            shown = decode_for_display("", record.value)
            if isinstance(shown, dict) and "base64" in shown:
                try:  # plain text (the builders' str values) reads better as itself
                    shown = record.value.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            return {**fields, "value": shown}
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {"base64": base64.b64encode(data).decode("ascii")}


def _message_from_args(args: argparse.Namespace) -> Any:
    from . import valuetypes as vt
    from .messages import message_builder

    given = [k for k in ("int", "long", "float", "double", "bool", "str", "json") if getattr(args, k) is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one value: --int, --long, --float, --double, --bool, --str or --json")
    kind = given[0]
    raw = getattr(args, kind)
    try:
        if kind == "json":
            typename = args.value_type or "statefun-mesh.types/json"
            return message_builder(
                args.typename, args.id, value=json.loads(raw), value_type=vt.make_json_type(typename)
            )
        if kind == "bool":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--bool takes true or false, got {raw!r}")
            return message_builder(args.typename, args.id, bool_value=raw.lower() in ("true", "1"))
        conv = {"int": int, "long": int, "float": float, "double": float, "str": str}[kind]
        key = {"str": "str_value"}.get(kind, f"{kind}_value")
        return message_builder(args.typename, args.id, **{key: conv(raw)})
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--json is not valid JSON: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad message: {exc}") from exc


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _count(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _seconds(text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf") or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"must be {'0 or more' if allow_zero else 'more than 0'} seconds, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    """argparse type: seconds > 0."""
    return _seconds(text, allow_zero=False)


def _non_negative_seconds(text: str) -> float:
    """argparse type: seconds >= 0."""
    return _seconds(text, allow_zero=True)


def _endpoint(text: str) -> str:
    """argparse type: a client endpoint; ``HOST:PORT`` without a scheme means ``tcp://HOST:PORT``."""
    text = text.strip()
    if "://" not in text:
        host, sep, port = text.rpartition(":")
        if not (sep and host and port.isdigit()):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an endpoint: expected tcp://HOST:PORT (or HOST:PORT), ipc:///PATH or inproc://NAME"
            )
        text = f"tcp://{text}"
    scheme, _, rest = text.partition("://")
    if scheme not in ("tcp", "ipc", "inproc"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown scheme {scheme!r}; expected tcp://HOST:PORT, ipc:///PATH or inproc://NAME"
        )
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise argparse.ArgumentTypeError(f"{text!r}: expected tcp://HOST:PORT with a port from 1 to 65535")
    elif not rest:
        raise argparse.ArgumentTypeError(f"{text!r}: the {scheme} endpoint has no path or name")
    return text


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a port from 0 to 65535 (0: pick free ports)")
    return int(text)


def _http_endpoint(text: str) -> str:
    from .config import parse_http_endpoint

    if text:
        try:
            parse_http_endpoint(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _check_state_dir(path: str, flag: str) -> None:
    """Create ``path`` if needed and make sure files can be written there, so that a bad
    state directory is one line naming it, not a traceback from deep inside a peer."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".statefun-mesh-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the state directory {path}: {exc.strerror or exc}; fix its permissions or choose another "
            f"with {flag}"
        ) from None


def _setup_logging(level: str, prefix: str = "", fmt: str = "text") -> None:
    from .logutil import JsonFormatter

    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(prefix.strip()))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(text: str) -> str:
    """argparse type: a log level name, any case."""
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return text.lower()


def _log_format(text: str) -> str:
    """argparse type: ``text`` or ``json`` (also checks $STATEFUN_MESH_LOG_FORMAT, the default)."""
    if text.lower() not in ("text", "json"):
        raise argparse.ArgumentTypeError(f"expected text or json, got {text!r}")
    return text.lower()


def _add_log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        type=_log_level,
        default=os.environ.get("STATEFUN_MESH_LOG_LEVEL", "info"),
        help="debug, info, warning or error (default: $STATEFUN_MESH_LOG_LEVEL or info)",
    )
    p.add_argument("--log-format", type=_log_format, metavar="{text,json}",
                   default=os.environ.get("STATEFUN_MESH_LOG_FORMAT", "text") or "text",
                   help="text lines, or one JSON object per line (default: $STATEFUN_MESH_LOG_FORMAT or text)")


def _summary(status: dict[str, Any]) -> str:
    """A peer's counters as a sentence (for its last log line)."""
    ck = status.get("checkpoints")
    last = f"; last checkpoint {ck['last_complete']}" if ck and ck.get("last_complete") is not None else ""
    return (
        f"{status['invocations']:,} invocations ({status['failures']:,} failed) in {status['batches']:,} "
        f"batches, {status['queued']:,} queued{last}"
    )


# -- commands ----------------------------------------------------------------------------


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
    from .memory import limit_arenas
    from .peer import Peer

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
        # what start-up made (modules, functions, config) lives as long as the process: out
        # of the cyclic GC's generations, so its collections scan only the batches' objects
        # (bench/RESULTS.md, "Session 6": 5-10 % of the batch work with a peer-sized heap)
        import gc

        gc.freeze()
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


def cmd_run(args: argparse.Namespace) -> int:
    """Start a local cluster of peer processes and supervise it."""
    from .launcher import Launcher

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
        from .remote.module_yaml import load_module_yaml

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


async def _with_client(args: argparse.Namespace, fn: Any) -> int:
    from .client import MeshClient

    try:
        async with MeshClient(args.endpoint, timeout=args.timeout, keys=_client_keys(args)) as client:
            return await fn(client)  # type: ignore[no-any-return]
    except StatefunMeshError:
        raise
    except ValueError as exc:  # e.g. a --timeout that is NaN or over the peer's max_request_timeout
        raise StatefunMeshError(str(exc)) from None


def _client_keys(args: argparse.Namespace) -> Any:
    """The ``--client-key`` file's keys; ``None``: let MeshClient find them (docs/security.md)."""
    from .security import ClientKeys

    path = getattr(args, "client_key", None)
    return ClientKeys.load(path) if path else None


def cmd_send(args: argparse.Namespace) -> int:
    """Send one message."""
    message = _message_from_args(args)

    async def go(client: Any) -> int:
        await client.send(message, idempotency_key=args.idempotency_key)
        print(f"sent to {args.typename}/{args.id}", file=sys.stderr)
        return 0

    return asyncio.run(_with_client(args, go))


def cmd_request(args: argparse.Namespace) -> int:
    """Send one message and print the function's reply."""
    message = _message_from_args(args)

    async def go(client: Any) -> int:
        reply = await client.request(message, timeout=args.timeout)
        print(
            json.dumps(
                {
                    "from": f"{reply.target_typename}/{reply.target_id}",
                    "type": reply.value_typename(),
                    "value": decode_for_display(reply.value_typename(), reply.raw_value()),
                },
                ensure_ascii=False,
            )
        )
        return 0

    return asyncio.run(_with_client(args, go))


def cmd_egress(args: argparse.Namespace) -> int:
    """Print an egress's records as JSON lines."""

    async def go(client: Any) -> int:
        count = 0
        idle = None if args.follow else args.idle
        interval = None
        if not args.follow:
            # Records are released when the checkpoint after them completes, so a record sent
            # just now may be one checkpoint interval away even when older ones came at once:
            # by default wait that long for each further record.
            info = await client.info()
            if args.typename not in info.get("egress_immediate", ()):
                interval = info.get("checkpoint_interval")
            if idle is None:
                idle = DEFAULT_IDLE if interval is None else interval + DEFAULT_IDLE
        async for rec in client.egress(args.typename, start=args.start, stop_when_idle=idle):
            doc = {
                "peer": rec.peer,
                "offset": rec.offset,
                "type": rec.value_typename(),
                "value": decode_for_display(rec.value_typename(), rec.raw_value()),
            }
            if rec.id is not None:
                doc["id"] = rec.id
            print(json.dumps(doc, ensure_ascii=False), flush=True)
            count += 1
            if args.limit and count >= args.limit:
                break
        if count == 0 and not args.follow:
            hint = (
                f"; records appear when the checkpoint after them completes (every {format_seconds(interval)} s)"
                if interval
                else ""
            )
            print(
                f"statefun-mesh egress: no records in {args.typename} within {format_seconds(idle or 0)} s{hint}",
                file=sys.stderr,
            )
        return 0

    return asyncio.run(_with_client(args, go))


def cmd_status(args: argparse.Namespace) -> int:
    """Print every peer's status: a table, or JSON with --json; --watch refreshes it."""
    from .client import MeshClient

    async def sample(client: Any) -> dict[str, Any]:
        info = await client.info()

        async def one(i: int, ep: str) -> dict[str, Any]:
            if not ep:
                return {"peer": i, "status": "no client endpoint"}
            try:
                async with MeshClient(ep, timeout=args.timeout, keys=client.keys) as c:
                    return (await c.info())["status"]  # type: ignore[no-any-return]
            except StatefunMeshError as exc:
                return {"peer": i, "status": f"unreachable: {exc}"}

        endpoints = info["client_endpoints"] or [args.endpoint]
        out = await asyncio.gather(*(one(i, ep) for i, ep in enumerate(endpoints)))
        return {
            "peers": info["peers"],
            "max_parallelism": info["max_parallelism"],
            "functions": info["functions"],
            "checkpoint_interval": info.get("checkpoint_interval"),
            "status": list(out),
        }

    def show(doc: dict[str, Any], before: dict[str, Any] | None, seconds: float) -> None:
        if args.json:
            print(json.dumps(doc) if args.watch is not None else json.dumps(doc, indent=2), flush=True)
            return
        if args.watch is not None and sys.stdout.isatty():
            print("\x1b[H\x1b[2J", end="")  # clear the terminal: the table replaces the last one
        elif args.watch is not None and before is not None:
            print()  # a log or a pipe: a blank line between tables
        print(status_table(doc, before, seconds), flush=True)

    async def go(client: Any) -> int:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        doc = await sample(client)
        if args.watch is None:
            before = None
            if not args.json:  # a rate needs two samples: take the second a second later
                await asyncio.sleep(RATE_SAMPLE)
                before, doc, t1 = doc, await sample(client), loop.time()
            show(doc, before, loop.time() - t0 if before is None else t1 - t0)
            return 0
        shown = 0
        before, t_before = None, t0
        while True:
            now = loop.time()
            show(doc, before, now - t_before)
            shown += 1
            if args.count and shown >= args.count:
                return 0
            before, t_before = doc, now
            await asyncio.sleep(args.watch)
            while True:
                try:
                    doc = await sample(client)
                    break
                except StatefunMeshError as exc:  # keep watching: the mesh may be restarting
                    print(f"statefun-mesh status: {exc}; retrying", file=sys.stderr, flush=True)
                    before = None
                    await asyncio.sleep(args.watch)

    try:
        return asyncio.run(_with_client(args, go))
    except KeyboardInterrupt:  # Ctrl-C ends --watch: a normal way to stop it
        return 0


RATE_SAMPLE: Final = 1.0
_UNITS: Final = ("B", "kB", "MB", "GB", "TB")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size, unit = float(n), 0
    while size >= 1000 and unit < len(_UNITS) - 1:
        size, unit = size / 1000, unit + 1
    return f"{size:.0f} {_UNITS[unit]}" if unit == 0 else f"{size:.1f} {_UNITS[unit]}"


def status_table(doc: dict[str, Any], before: dict[str, Any] | None = None, seconds: float = 0.0) -> str:
    """The ``status`` table: one row per peer.

    Args:
        doc: what ``status --json`` prints.
        before: an earlier ``doc``, for invocations per second over ``seconds``.
    """
    interval = doc.get("checkpoint_interval")
    lines = [
        f"mesh: {doc['peers']} peer{'s' if doc['peers'] != 1 else ''}, {doc['max_parallelism']} key groups, "
        f"checkpoints {'every ' + format_seconds(interval) + ' s' if interval else 'off'}; "
        f"functions: {', '.join(doc['functions'])}"
    ]
    prev = {s.get("peer"): s for s in (before or {}).get("status", []) if isinstance(s.get("invocations"), int)}
    down_seen = {p for s in doc["status"] for p in s.get("unavailable_peers", ())}
    header = ("PEER", "ALIVE", "KEY GROUPS", "INVOCATIONS", "INV/S", "FAILED", "BACKLOG", "STATE", "CHECKPOINT", "AGE")
    rows: list[tuple[str, ...]] = []
    for s in doc["status"]:
        peer = s.get("peer", "?")
        if not isinstance(s.get("invocations"), int):  # unreachable, or no client endpoint
            rows.append((str(peer), "NO", "-", "-", "-", "-", "-", "-", "-", "-"))
            continue
        kg = s.get("key_groups")
        rate = "-"
        if peer in prev and seconds > 0:
            rate = f"{max(s['invocations'] - prev[peer]['invocations'], 0) / seconds:,.0f}"
        backlog = s.get("queued", 0) + sum(s.get("outgoing", ())) + s.get("parked_sends", 0)
        ck = s.get("checkpoints") or {}
        if not ck:
            last, age = "off", "-"
        else:
            last = "-" if ck.get("last_complete") is None else str(ck["last_complete"])
            if ck.get("failing"):
                last += " (FAILING)"
            a = ck.get("last_complete_age_s")
            age = "-" if a is None else f"{format_seconds(round(a, 1))} s"
        alive = "yes" if peer not in down_seen else "yes (others lost it)"
        rows.append(
            (
                str(peer),
                alive,
                f"{kg[0]}-{kg[1] - 1}" if kg else "-",
                f"{s['invocations']:,}",
                rate,
                f"{s.get('failures', 0):,}",
                f"{backlog:,}",
                _size(s.get("state_bytes")),
                last,
                age,
            )
        )
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        cells = (c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        lines.append("  ".join(cells).rstrip())
    for s in doc["status"]:
        if not isinstance(s.get("invocations"), int):
            lines.append(f"peer {s.get('peer', '?')}: {s.get('status')}")
        elif (s.get("checkpoints") or {}).get("last_error"):
            lines.append(f"peer {s['peer']}: {s['checkpoints']['last_error']}")
    return "\n".join(lines)


def cmd_checkpoints(args: argparse.Namespace) -> int:
    """List checkpoints in a blob store, or show one."""
    from .blobstore import open_blob_store
    from .snapshot.coordinator import list_checkpoints
    from .snapshot.format import Manifest, manifest_name

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


def _export_client_key(args: argparse.Namespace) -> None:
    """For the NATS bridges: check ``--client-key`` lists ``--mesh`` and leave it where the
    bridge's ``MeshClient`` finds it (``$STATEFUN_MESH_CLIENT_KEY``)."""
    if not args.client_key:
        return
    from .security import ENV_CLIENT_KEY

    keys = _client_keys(args)
    if keys.server_key(args.mesh) is None:
        raise ConfigError(
            f"the client key file {args.client_key} lists no public key for {args.mesh} in its [server_keys]",
            key="client_key",
        )
    os.environ[ENV_CLIENT_KEY] = args.client_key


def cmd_nats_ingress(args: argparse.Namespace) -> int:
    """Bridge a NATS JetStream stream into the mesh until SIGTERM/SIGINT."""
    from .connectors.nats import NatsIngress, NatsIngressConfig

    _setup_logging(args.log_level, "nats-ingress ", args.log_format)
    _export_client_key(args)
    config = NatsIngressConfig(
        stream=args.stream,
        durable=args.durable,
        nats_url=args.nats_url,
        mesh_endpoint=args.mesh,
        subject=args.subject,
        subject_prefix=args.subject_prefix,
        target_type=args.target_type,
        value_type=args.value_type,
        dead_letter_subject=args.dead_letter_subject,
        max_in_flight=args.max_in_flight,
        max_ack_pending=args.max_ack_pending or max(1024, args.max_in_flight),
        fetch_batch=args.fetch_batch,
        ack_wait=args.ack_wait,
        mesh_timeout=args.timeout,
        status_interval=args.status_interval,
        ordered=not args.unordered,
    )

    # a signal while still starting (e.g. waiting for NATS) stops at once, as a second one does:
    # whatever was not acked is delivered again later, and the mesh drops what it has
    return _run_bridge(
        "nats-ingress", lambda: NatsIngress(config), lambda b: b.stats.line(0), stop_now=lambda b: not b.consuming
    )


def cmd_nats_egress(args: argparse.Namespace) -> int:
    """Bridge mesh egresses into NATS JetStream until SIGTERM/SIGINT."""
    from .connectors.nats_egress import EgressRoute, NatsEgress, NatsEgressConfig

    _setup_logging(args.log_level, "nats-egress ", args.log_format)
    _export_client_key(args)
    config = NatsEgressConfig(
        routes=tuple(EgressRoute.parse(r) for r in args.route or ()),
        name=args.name,
        nats_url=args.nats_url,
        mesh_endpoint=args.mesh,
        kv_bucket=args.kv_bucket,
        start=args.start,
        batch=args.batch,
        publish_timeout=args.publish_timeout,
        mesh_timeout=args.timeout,
        status_interval=args.status_interval,
    )

    # a second signal while stopping stops at once: whatever was acked but not recorded is
    # published again on restart and dropped by JetStream (same Nats-Msg-Id)
    return _run_bridge("nats-egress", lambda: NatsEgress(config), lambda b: b.stats.line())


_Bridge = TypeVar("_Bridge", bound="_Runs")


class _Runs(Protocol):
    async def run(self, stop: asyncio.Event) -> Any: ...


def _run_bridge(
    what: str,
    make: Callable[[], _Bridge],
    status: Callable[[_Bridge], str],
    *,
    stop_now: Callable[[_Bridge], bool] = lambda _b: False,
) -> int:
    """Run the bridge ``make()`` builds (on the loop) until SIGTERM/SIGINT asks it to stop. A second
    signal, or one while ``stop_now(bridge)``, cancels it at once; that is logged with ``status(bridge)``."""

    async def run() -> int:
        stop = asyncio.Event()
        bridge = make()
        main = asyncio.current_task()
        assert main is not None

        def on_signal() -> None:
            if stop.is_set() or stop_now(bridge):
                main.cancel()
            stop.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            await bridge.run(stop)
        except asyncio.CancelledError:
            log.warning("%s: stopped by a signal before finishing: %s", what, status(bridge))
        return 0

    return asyncio.run(run())


def cmd_keys(args: argparse.Namespace) -> int:
    """Make CURVE key pairs: one printed, or key files for every peer and some clients."""
    from .security import ClientKeys, generate_keypair, write_key_file

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
            print(f"#   {base}.toml" + ("" if endpoints else "  (add [server_keys] \"<endpoint>\" = \"<peer key>\")"))
    return 0


def _iso(ms: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- argument parsing --------------------------------------------------------------------


def _add_value_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("typename", help="target function type, e.g. example/person")
    p.add_argument("id", help="target instance id")
    g = p.add_argument_group("value (exactly one)")
    g.add_argument("--int", metavar="N", help="a 32-bit int (io.statefun.types/int)")
    g.add_argument("--long", metavar="N", help="a 64-bit int (io.statefun.types/long)")
    g.add_argument("--float", metavar="X", help="a float (io.statefun.types/float)")
    g.add_argument("--double", metavar="X", help="a double (io.statefun.types/double)")
    g.add_argument("--bool", metavar="true|false", help="a bool (io.statefun.types/bool)")
    g.add_argument("--str", metavar="TEXT", help="a string (io.statefun.types/string)")
    g.add_argument("--json", metavar="JSON", help="a JSON document, typed by --value-type")
    g.add_argument("--value-type", metavar="NS/NAME", help="type name of a --json value (as in make_json_type)")


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint",
        type=_endpoint,
        default=os.environ.get("STATEFUN_MESH_ENDPOINT", DEFAULT_ENDPOINT),
        help="a peer's client endpoint (default: $STATEFUN_MESH_ENDPOINT or %(default)s)",
    )
    p.add_argument(
        "--timeout", type=_positive_seconds, default=10.0, help="seconds to wait for an answer (default: 10)"
    )
    _add_client_key_arg(p)


def _add_client_key_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--client-key",
        metavar="FILE",
        help="client key file for a mesh with CURVE keys (default: the file $STATEFUN_MESH_CLIENT_KEY "
        "names, else the one `statefun-mesh run` left on this machine for the endpoint; none: "
        "plaintext)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statefun-mesh",
        description="Stateful Functions for Python, at scale, without a Flink cluster.",
        epilog="Start with: statefun-mesh run examples.greeter:functions --peers 2",
    )
    parser.add_argument("--version", action="version", version=f"statefun-mesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    p.add_argument("--blob-store", metavar="URL",
                   help="where checkpoints go: file:///dir, s3://bucket/prefix (default: <state-dir>/checkpoints)")
    p.add_argument(
        "--checkpoint-interval", type=_positive_seconds, metavar="SECONDS", help="between checkpoints (default: 5)"
    )
    p.add_argument("--no-checkpoints", action="store_true",
                   help="take no checkpoints (faster; a crash then loses queued messages)")
    p.add_argument("--no-keys", action="store_true",
                   help="run the links and client endpoints without CURVE: anyone who can reach them can forge "
                   "messages (default: keys are made in <state-dir>/keys and used; see docs/security.md)")
    p.add_argument("--restore", metavar="latest|ID",
                   help="start from this checkpoint, onto --peers peers even if it was taken on another number "
                        "(rescaling); an older ID rolls back, deleting newer checkpoints (default: the latest "
                        "checkpoint, which must have been taken on --peers peers)")
    p.add_argument(
        "--module",
        metavar="module.yaml",
        help="a StateFun module.yaml: its HTTP endpoints are remote functions the peers call",
    )
    p.add_argument("--config", help="mesh.toml with further settings")
    p.add_argument("--metrics-port", type=_port, default=0, metavar="PORT",
                   help="peer K serves /metrics, /healthz and /readyz on PORT+K (default: free ports, printed)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics servers bind (default: %(default)s; 0.0.0.0 for every interface)")
    p.add_argument("--no-metrics", action="store_true", help="serve no metrics, health checks or dashboard")
    p.add_argument("--dashboard-peer", type=_count, default=0, metavar="K",
                   help="the peer whose metrics server also serves the web dashboard at / (default: 0)")
    _add_log_args(p)
    p.set_defaults(func=cmd_run)

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
    p.add_argument("--restore", metavar="latest|ID",
                   help="peer 0 only: start the mesh from this checkpoint, rescaling if it was taken on another "
                        "number of peers (remove it again once the mesh is up)")
    p.add_argument("--metrics-endpoint", type=_http_endpoint, metavar="HOST:PORT",
                   help="serve /metrics, /healthz and /readyz here (overrides the config's metrics_endpoints entry "
                        "for this peer; '' for none)")
    p.add_argument("--dashboard", action="store_true",
                   help="also serve the web dashboard at / on the metrics endpoint")
    _add_log_args(p)
    p.set_defaults(func=cmd_peer)

    p = sub.add_parser("send", help="send one message", description="Send one message into the mesh.")
    _add_value_args(p)
    p.add_argument(
        "--idempotency-key", metavar="KEY", help="resending with the same key does not apply the message twice"
    )
    _add_client_args(p)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser(
        "request",
        help="send a message and print the reply",
        description="Send a message and print the function's context.reply as JSON.",
    )
    _add_value_args(p)
    _add_client_args(p)
    p.set_defaults(func=cmd_request)

    p = sub.add_parser(
        "egress",
        help="print an egress's records as JSON lines",
        description="Print the records of an egress, from every peer, as JSON lines.",
    )
    p.add_argument("typename", help="egress name, e.g. example/greetings")
    p.add_argument(
        "--from",
        dest="start",
        choices=["earliest", "latest"],
        default="earliest",
        help="start at the oldest retained record or at new ones (default: earliest)",
    )
    p.add_argument("--follow", action="store_true", help="keep waiting for new records")
    p.add_argument("--idle", type=_non_negative_seconds, metavar="SECONDS",
                   help="without --follow, stop after this many quiet seconds (default: 2 more than the mesh's "
                   "checkpoint interval, since records appear when a checkpoint completes; 2 without checkpoints)")
    p.add_argument("--limit", type=_count, default=0, help="stop after this many records (default: 0, no limit)")
    _add_client_args(p)
    p.set_defaults(func=cmd_egress)

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

    p = sub.add_parser(
        "nats-ingress",
        help="bridge a NATS JetStream stream into the mesh, exactly once",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Read a JetStream stream through a durable pull consumer and send every message into the
mesh with an idempotency key: the Nats-Msg-Id header, else <stream>:<sequence>@<stream
creation ms>. A message is acked to JetStream only after the mesh acknowledged it (it is
then in a peer's ingress log), so a crash of this process leads to redelivery, which the
mesh drops: every message affects function state exactly once. Runs until Ctrl-C or
SIGTERM. Needs nats-py: pip install 'statefun-mesh[nats]'.""",
        epilog="""\
mapping of a NATS message to a mesh message:
  target type   header Statefun-Target-Type, else --target-type, else the subject
  target id     header Statefun-Target-Id, else the subject
  subject       after --subject-prefix: <namespace>.<name>.<id>, or <id> alone when the
                type is known (the id may then contain dots)
  value type    header Statefun-Value-Type, else --value-type; for io.statefun.types/
                string, int, long, float, double and bool the payload is the value as
                text ("42", "true"); for any other type it is the value's bytes, as is
  unmappable    bad headers or subject, a payload that is not its type, a function type
                the mesh does not know: logged and terminated (after publishing it to
                --dead-letter-subject, if given); never blocks the messages behind it

example:
  statefun-mesh run examples.greeter:functions --peers 2
  nats stream add ORDERS --subjects 'orders.>' --defaults
  statefun-mesh nats-ingress --stream ORDERS --subject 'orders.>' --durable mesh
  nats pub orders.example.person.Alice Alice      # -> example/person, id Alice

See docs/connectors.md.""",
    )
    g = p.add_argument_group("source (NATS JetStream)")
    g.add_argument("--nats-url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"), metavar="URL",
                   help="NATS server URL, several comma-separated (default: $NATS_URL or nats://127.0.0.1:4222)")
    g.add_argument("--stream", required=True, help="the JetStream stream to read (it must exist)")
    g.add_argument("--durable", required=True, metavar="NAME",
                   help="durable consumer name: created, or updated to these settings; restart with the same "
                   "name to go on where the last run stopped")
    g.add_argument("--subject", metavar="SUBJECT",
                   help="consumer filter subject, e.g. 'orders.>' (default: every subject of the stream)")
    g.add_argument("--max-ack-pending", type=int, metavar="N",
                   help="the consumer's limit of delivered, unacked messages (default: 1024, at least --max-in-flight)")
    g.add_argument("--ack-wait", type=float, default=30.0, metavar="SECONDS",
                   help="redeliver a message not acked within this time (default: %(default)s; also how soon "
                   "messages held by a crashed bridge come again)")
    g.add_argument("--fetch-batch", type=int, default=128, metavar="N",
                   help="messages asked for per fetch (default: %(default)s)")
    g = p.add_argument_group("mapping")
    g.add_argument("--subject-prefix", metavar="TOKENS",
                   help="leading subject tokens that are not part of the target (default: the tokens of --subject "
                   "before its first wildcard, e.g. 'orders' for 'orders.>')")
    g.add_argument("--target-type", metavar="NS/NAME",
                   help="send every message to this function type; the subject (after the prefix) is the id")
    g.add_argument("--value-type", default="io.statefun.types/string", metavar="NS/NAME",
                   help="value type of messages without a Statefun-Value-Type header (default: %(default)s)")
    g.add_argument("--dead-letter-subject", metavar="SUBJECT",
                   help="publish unmappable messages here (through JetStream: a stream must capture it), with "
                   "a Statefun-Error header, before terminating them (default: only log and terminate)")
    g = p.add_argument_group("target (the mesh)")
    g.add_argument("--mesh", type=_endpoint, default=os.environ.get("STATEFUN_MESH_ENDPOINT", DEFAULT_ENDPOINT),
                   metavar="ENDPOINT",
                   help="a peer's client endpoint (default: $STATEFUN_MESH_ENDPOINT or %(default)s); the other "
                   "peers' endpoints are learnt from it and used when a send has to be retried")
    g.add_argument("--max-in-flight", type=int, default=256, metavar="N",
                   help="messages being sent at once (default: %(default)s); messages to one function "
                   "instance are sent one after another, in stream order")
    g.add_argument("--unordered", action="store_true",
                   help="pipeline messages to one function instance too: faster for hot instances, but a retried "
                   "send may then overtake a later one")
    g.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="wait this long for the mesh to acknowledge a send before retrying it (default: %(default)s)")
    _add_client_key_arg(p)
    p.add_argument("--status-interval", type=float, default=10.0, metavar="SECONDS",
                   help="log a progress line this often while something changes; 0: never (default: %(default)s)")
    _add_log_args(p)
    p.set_defaults(func=cmd_nats_ingress)

    p = sub.add_parser(
        "nats-egress",
        help="publish mesh egress records to NATS JetStream, exactly once",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Follow egresses on every peer and publish each record to a JetStream subject, with a
Nats-Msg-Id from the record's identity (<egress>/<peer>/<offset>, or the record id of an
immediate egress), so JetStream's duplicate window drops a record published twice. The
position (per egress and peer: the offset after the last acked record) is kept in a
JetStream key-value bucket under --name; a restart goes on from there. Waits out NATS or
the mesh being away. Runs until Ctrl-C or SIGTERM. Needs nats-py: pip install
'statefun-mesh[nats]'.""",
        epilog="""\
subject templates (--route EGRESS=TEMPLATE):
  {egress} namespace.name of the egress   {namespace} {name}   {peer}   {type}
  {topic} {key}               of a kafka_egress_message record (else _)
  {stream} {partition_key}    of a kinesis_egress_message record (else _)
  record values become one token: '.', spaces and wildcards -> '_', empty -> '_'
payload: a string/int/long/float/double/bool value as text; a Kafka/Kinesis record's
  value bytes (topic, key... in Statefun-Kafka-*/Statefun-Kinesis-* headers); any other
  value's bytes as they are. Headers: Nats-Msg-Id, Statefun-Value-Type, Statefun-Egress,
  Statefun-Peer, Statefun-Offset (and Statefun-Record-Id for immediate egress).

example:
  nats stream add OUT --subjects 'out.>' --defaults
  statefun-mesh nats-egress --name greets --route 'example/greetings=out.{peer}'

See docs/connectors.md.""",
    )
    p.add_argument(
        "--route",
        action="append",
        metavar="EGRESS=TEMPLATE",
        help="an egress and the subject template of its records, e.g. 'app/out=out.{topic}'; repeat "
        "for more egresses (at least one)",
    )
    p.add_argument(
        "--name",
        required=True,
        help="the bridge's name: the key of its position in the bucket; restart with the same name to go "
        "on (a new mesh with fresh state needs a new name)",
    )
    p.add_argument("--nats-url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"), metavar="URL",
                   help="NATS server URL, several comma-separated (default: $NATS_URL or nats://127.0.0.1:4222)")
    p.add_argument("--kv-bucket", default="statefun_mesh_egress", metavar="BUCKET",
                   help="JetStream key-value bucket of positions, created if missing (default: %(default)s)")
    p.add_argument("--start", choices=["earliest", "latest"], default="earliest",
                   help="where an egress without a stored position starts (default: %(default)s)")
    p.add_argument("--batch", type=int, default=500, metavar="N",
                   help="records read per fetch and published at once (default: %(default)s)")
    p.add_argument("--publish-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="wait this long for JetStream's ack before publishing again (default: %(default)s)")
    p.add_argument(
        "--mesh",
        type=_endpoint,
        default=os.environ.get("STATEFUN_MESH_ENDPOINT", DEFAULT_ENDPOINT),
        metavar="ENDPOINT",
        help="a peer's client endpoint (default: $STATEFUN_MESH_ENDPOINT or %(default)s); the other "
        "peers' endpoints are learnt from it",
    )
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="wait this long for a peer to answer a read before retrying (default: %(default)s)")
    _add_client_key_arg(p)
    p.add_argument("--status-interval", type=float, default=10.0, metavar="SECONDS",
                   help="log a progress line this often while something changes; 0: never (default: %(default)s)")
    _add_log_args(p)
    p.set_defaults(func=cmd_nats_egress)

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
    p.add_argument("--config", metavar="FILE",
                   help="mesh.toml: the peer count, and client endpoints for the client key files' [server_keys]")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser(
        "status",
        help="print every peer's status as a table",
        description="Print a table of every peer: alive, key groups, invocations (and per second, "
        "measured over 1 s), backlog, state size, last checkpoint and its age.",
    )
    p.add_argument("--json", action="store_true", help="print the counters as JSON (the machine form)")
    p.add_argument(
        "--watch",
        nargs="?",
        type=_positive_seconds,
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    p.add_argument(
        "--count",
        type=_count,
        default=0,
        metavar="N",
        help="with --watch: stop after N refreshes (default: 0, until Ctrl-C)",
    )
    _add_client_args(p)
    p.set_defaults(func=cmd_status)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
