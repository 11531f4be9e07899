"""StateFun ``module.yaml``: the HTTP endpoints of remote functions.

Reads the endpoint components of a StateFun 3.x module file, one YAML document per
component::

    kind: io.statefun.endpoints.v2/http
    spec:
      functions: com.example/*                 # or one type: com.example/greeter
      urlPathTemplate: http://fns:8000/{function.name}
      maxNumBatchRequests: 1000                # default 1000
      transport:
        timeouts: {call: 1 min, connect: 10 sec, read: 10 sec, write: 10 sec}

A statefun_mesh extension: ``urlPathTemplate: python:package.module:attribute`` names a
request-reply handler (anything with ``async handle_async(bytes) -> bytes``, such as the
official SDK's ``RequestReplyHandler``) that the peer imports and calls in-process,
without HTTP.

``io.statefun.endpoints.v1/http`` has ``timeouts`` directly under ``spec``. StateFun's
asynchronous transport (``type: io.statefun.transports.v1/async``) puts ``call`` and
``connect`` directly under ``transport``; both layouts are read. Durations are written
as Flink writes them (``1 min``, ``10s``, ``500 ms``, ``2m``; a bare number is
milliseconds).

Kafka ingresses and egresses (``io.statefun.kafka.v1/ingress`` and ``/egress``) are read
by :mod:`statefun_mesh.connectors.kafka_spec` into :attr:`RemoteModule.kafka_ingresses`
and :attr:`RemoteModule.kafka_egresses`. Any other kind (Kinesis ingress and egress, the
3.0 module format) is a :class:`~statefun_mesh.errors.ConfigError` naming it: nothing is
skipped silently.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from ..durations import parse_duration
from ..errors import ConfigError

__all__ = [
    "DEFAULT_MAX_BATCH",
    "HttpEndpoint",
    "HttpTimeouts",
    "RemoteModule",
    "load_module_yaml",
    "parse_duration",
    "parse_module_yaml",
]

KIND_V1: Final = "io.statefun.endpoints.v1/http"
KIND_V2: Final = "io.statefun.endpoints.v2/http"
TRANSPORT_OKHTTP: Final = "io.statefun.transports.v1/okhttp"
TRANSPORT_ASYNC: Final = "io.statefun.transports.v1/async"
DEFAULT_MAX_BATCH: Final = 1000
_PLACEHOLDER: Final = "{function.name}"
#: statefun_mesh's extension: a request-reply handler called in the peer, without HTTP
_PYTHON: Final = "python:"
_PYTHON_REF: Final = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

#: kinds StateFun knows that statefun_mesh does not read, with what to use instead
_OTHER_KINDS: Final = {
    "io.statefun.kinesis.v1/ingress": "send input with MeshClient or a connector (docs/connectors.md)",
    "io.statefun.kinesis.v1/egress": "read egress with MeshClient (records decode with as_kinesis())",
}


@dataclass(frozen=True, slots=True)
class HttpTimeouts:
    """Transport timeouts in seconds (StateFun's defaults: call 1 min, the others 10 s).

    ``call`` bounds a whole invocation, retries included; ``connect`` one connection
    attempt; ``read`` and ``write`` one socket operation.
    """

    call: float = 60.0
    connect: float = 10.0
    read: float = 10.0
    write: float = 10.0


@dataclass(frozen=True, slots=True)
class HttpEndpoint:
    """One HTTP endpoint component: which functions, where, and how.

    Attributes:
        namespace: the functions' namespace.
        name: the one function type's name, or ``None`` for every function of the namespace.
        url_template: the URL, ``{function.name}`` replaced by the function's name.
        max_batch: at most this many messages in one request (``maxNumBatchRequests``).
        timeouts: the transport timeouts.
        kind: the component kind (v1 or v2).
    """

    namespace: str
    name: str | None
    url_template: str
    max_batch: int = DEFAULT_MAX_BATCH
    timeouts: HttpTimeouts = field(default_factory=HttpTimeouts)
    kind: str = KIND_V2

    @property
    def pattern(self) -> str:
        """``namespace/name`` or ``namespace/*``."""
        return f"{self.namespace}/{self.name or '*'}"

    def url_for(self, typename: str) -> str:
        """The URL for the function type ``typename``."""
        return self.url_template.replace(_PLACEHOLDER, typename[typename.rfind("/") + 1 :])

    @property
    def in_process(self) -> str | None:
        """``package.module:attribute`` of a handler called in the peer (``python:`` URLs), else ``None``."""
        if self.url_template.startswith(_PYTHON):
            return self.url_template[len(_PYTHON) :]
        return None


class RemoteModule:
    """The remote functions of a module: which endpoint serves which function type.

    A component for one function type wins over one for its whole namespace, as in StateFun.
    """

    __slots__ = ("_by_namespace", "_by_type", "endpoints", "kafka_egresses", "kafka_ingresses", "source")

    def __init__(
        self,
        endpoints: Iterable[HttpEndpoint],
        source: str | None = None,
        *,
        kafka_ingresses: Iterable[Any] = (),
        kafka_egresses: Iterable[Any] = (),
    ) -> None:
        self.endpoints = list(endpoints)
        self.source = source
        #: the ``io.statefun.kafka.v1/ingress`` components (``KafkaIngressSpec``)
        self.kafka_ingresses: list[Any] = list(kafka_ingresses)
        #: the ``io.statefun.kafka.v1/egress`` components (``KafkaEgressSpec``)
        self.kafka_egresses: list[Any] = list(kafka_egresses)
        for kind, items in (("ingress", self.kafka_ingresses), ("egress", self.kafka_egresses)):
            ids = [c.id for c in items]
            dup = sorted({i for i in ids if ids.count(i) > 1})
            if dup:
                raise ConfigError(f"two Kafka {kind} components have the id {dup[0]!r}", source=source)
        self._by_type: dict[str, HttpEndpoint] = {}
        self._by_namespace: dict[str, HttpEndpoint] = {}
        for ep in self.endpoints:
            table, key = (self._by_type, ep.pattern) if ep.name else (self._by_namespace, ep.namespace)
            if key in table:
                raise ConfigError(f"functions {ep.pattern} are bound to two endpoints", source=source)
            table[key] = ep

    def endpoint_for(self, typename: str) -> HttpEndpoint | None:
        """The endpoint serving ``typename``, or ``None`` if it is not a remote function."""
        ep = self._by_type.get(typename)
        if ep is not None:
            return ep
        return self._by_namespace.get(typename[: typename.rfind("/")])

    def __len__(self) -> int:
        return len(self.endpoints)

    def __repr__(self) -> str:
        return f"RemoteModule({[ep.pattern for ep in self.endpoints]})"


def _yaml() -> Any:
    try:
        import yaml  # type: ignore[import-untyped,unused-ignore]
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "reading module.yaml needs PyYAML: pip install 'statefun-mesh[remote]' (or pip install pyyaml)"
        ) from exc
    return yaml


def load_module_yaml(path: str | Path) -> RemoteModule:
    """Read a StateFun ``module.yaml`` file.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or holds a component that is
            malformed or of a kind statefun_mesh does not read.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the module file: {exc.strerror}", source=str(p)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the module file is not UTF-8 ({exc.reason} at byte {exc.start})", source=str(p)) from exc
    return parse_module_yaml(text, source=str(p))


def parse_module_yaml(text: str, source: str = "module.yaml") -> RemoteModule:
    """Parse the text of a StateFun ``module.yaml`` (see :func:`load_module_yaml`)."""
    yaml = _yaml()
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=source) from exc
    from ..connectors.kafka_spec import KAFKA_EGRESS, KAFKA_INGRESS, parse_kafka_egress, parse_kafka_ingress

    endpoints = []
    ingresses, egresses = [], []
    for i, doc in enumerate(documents):
        at = f"{source}, document {i + 1}"
        if not isinstance(doc, dict):
            raise ConfigError(f"expected a mapping with 'kind' and 'spec', got {type(doc).__name__}", source=at)
        if "kind" not in doc:
            if "module" in doc or "version" in doc:
                raise ConfigError(
                    "the StateFun 3.0 module format (version/module) is not read; write each endpoint as a "
                    f"component: kind: {KIND_V2}, spec: {{functions, urlPathTemplate, ...}}",
                    source=at,
                )
            raise ConfigError(f"a component needs a 'kind', e.g. kind: {KIND_V2}", source=at)
        kind = doc["kind"]
        if kind in (KAFKA_INGRESS, KAFKA_EGRESS):
            spec = doc.get("spec")
            if not isinstance(spec, dict):
                raise ConfigError("'spec' must be a mapping", source=f"{at} ({kind})", key="spec")
            if kind == KAFKA_INGRESS:
                ingresses.append(parse_kafka_ingress(spec, f"{at} ({kind})"))
            else:
                egresses.append(parse_kafka_egress(spec, f"{at} ({kind})"))
            continue
        if kind not in (KIND_V1, KIND_V2):
            hint = _OTHER_KINDS.get(kind) if isinstance(kind, str) else None
            raise ConfigError(
                f"component kind {kind!r} is not supported by statefun_mesh"
                + (
                    f"; {hint}"
                    if hint
                    else f"; the kinds read are {KIND_V2}, {KIND_V1}, {KAFKA_INGRESS}, {KAFKA_EGRESS}"
                ),
                source=at,
                key="kind",
            )
        spec = doc.get("spec")
        if not isinstance(spec, dict):
            raise ConfigError("'spec' must be a mapping", source=f"{at} ({kind})", key="spec")
        endpoints.append(_endpoint(kind, spec, f"{at} ({kind})"))
    return RemoteModule(endpoints, source=source, kafka_ingresses=ingresses, kafka_egresses=egresses)


def _endpoint(kind: str, spec: dict[str, Any], at: str) -> HttpEndpoint:
    def fail(message: str, key: str) -> ConfigError:
        return ConfigError(message, source=at, key=f"spec.{key}")

    functions = spec.get("functions")
    if not isinstance(functions, str):
        raise fail("required: the functions this endpoint serves, 'namespace/name' or 'namespace/*'", "functions")
    pos = functions.rfind("/")
    namespace, name = functions[:pos], functions[pos + 1 :]
    if pos <= 0 or not name or "*" in namespace or (name != "*" and "*" in name):
        raise fail(f"{functions!r} is not 'namespace/name' or 'namespace/*'", "functions")

    template = spec.get("urlPathTemplate")
    if not isinstance(template, str) or not template:
        raise fail("required: the URL, e.g. http://functions:8000/{function.name}", "urlPathTemplate")
    _check_url(template, fail)

    max_batch = spec.get("maxNumBatchRequests", DEFAULT_MAX_BATCH)
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise fail(f"must be a positive integer, got {max_batch!r}", "maxNumBatchRequests")

    if kind == KIND_V1:
        timeouts_node, tkey = spec.get("timeouts", {}), "timeouts"
    else:
        transport = spec.get("transport", {})
        if not isinstance(transport, dict):
            raise fail("must be a mapping", "transport")
        ttype = transport.get("type", TRANSPORT_OKHTTP)
        if ttype not in (TRANSPORT_OKHTTP, TRANSPORT_ASYNC):
            raise fail(
                f"unknown transport type {ttype!r} (known: {TRANSPORT_OKHTTP}, {TRANSPORT_ASYNC})", "transport.type"
            )
        if "timeouts" in transport:
            timeouts_node, tkey = transport["timeouts"], "transport.timeouts"
        else:  # the async transport's layout: call and connect directly under transport
            timeouts_node = {k: transport[k] for k in ("call", "connect", "read", "write") if k in transport}
            tkey = "transport"
    if not isinstance(timeouts_node, dict):
        raise fail("must be a mapping of call, connect, read, write", tkey)
    unknown = set(timeouts_node) - {"call", "connect", "read", "write"}
    if unknown and tkey.endswith("timeouts"):
        raise fail(f"unknown timeout(s) {sorted(unknown)} (known: call, connect, read, write)", tkey)
    values = {k: parse_duration(v, key=f"spec.{tkey}.{k}", source=at) for k, v in timeouts_node.items()}
    timeouts = HttpTimeouts(**values)
    for k in ("connect", "read", "write"):
        if getattr(timeouts, k) > timeouts.call:
            raise fail(f"the {k} timeout cannot be larger than the call timeout", f"{tkey}.{k}")
    return HttpEndpoint(
        namespace=namespace,
        name=None if name == "*" else name,
        url_template=template,
        max_batch=max_batch,
        timeouts=timeouts,
        kind=kind,
    )


def _check_url(template: str, fail: Any) -> None:
    if template.startswith(_PYTHON):
        if not _PYTHON_REF.match(template[len(_PYTHON) :]):
            raise fail(f"{template!r}: expected python:package.module:attribute", "urlPathTemplate")
        return
    braces = re.findall(r"\{[^}]*\}", template)
    bad = [b for b in braces if b != _PLACEHOLDER]
    if bad or template.count("{") != len(braces) or template.count("}") != len(braces):
        raise fail(f"{template!r}: the only placeholder is {_PLACEHOLDER}", "urlPathTemplate")
    url = urlsplit(template.replace(_PLACEHOLDER, "x"))
    if url.scheme in ("http+unix", "https+unix"):
        raise fail(
            f"{template!r}: UNIX domain socket endpoints are not supported yet; use http(s)://", "urlPathTemplate"
        )
    if url.scheme not in ("http", "https") or not url.hostname:
        raise fail(f"{template!r} is not an http:// or https:// URL with a host", "urlPathTemplate")
    try:
        url.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise fail(f"{template!r} has an invalid port", "urlPathTemplate") from None
