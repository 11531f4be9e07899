"""Helpers the command modules share: argument types and checks, logging setup, the
client connection, importing function modules, decoding values for display. Private
to the ``cli`` package."""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import logging
import os
import sys
from typing import Any

from ..errors import ConfigError, StatefunMeshError
from ..functions import StatefulFunctions

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7700"
#: seconds `egress` waits for a further record (on top of the checkpoint interval by default)
DEFAULT_IDLE = 2.0
#: `run`'s state directory when neither --state-dir nor the config names one (relative to the cwd)
DEFAULT_STATE_DIR = "statefun-mesh-state"
log = logging.getLogger("statefun_mesh.cli")


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
    from .. import valuetypes as vt
    from ..egress_io import KafkaProducerRecordType, KinesisEgressRecordType

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
    from ..config import parse_http_endpoint

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
    from ..logutil import JsonFormatter

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
    p.add_argument(
        "--log-format",
        type=_log_format,
        metavar="{text,json}",
        default=os.environ.get("STATEFUN_MESH_LOG_FORMAT", "text") or "text",
        help="text lines, or one JSON object per line (default: $STATEFUN_MESH_LOG_FORMAT or text)",
    )


async def _with_client(args: argparse.Namespace, fn: Any) -> int:
    from ..client import MeshClient

    try:
        async with MeshClient(args.endpoint, timeout=args.timeout, keys=_client_keys(args)) as client:
            return await fn(client)  # type: ignore[no-any-return]
    except StatefunMeshError:
        raise
    except ValueError as exc:  # e.g. a --timeout that is NaN or over the peer's max_request_timeout
        raise StatefunMeshError(str(exc)) from None


def _client_keys(args: argparse.Namespace) -> Any:
    """The ``--client-key`` file's keys; ``None``: let MeshClient find them (docs/security.md)."""
    from ..security import ClientKeys

    path = getattr(args, "client_key", None)
    return ClientKeys.load(path) if path else None


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
