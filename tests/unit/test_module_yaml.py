"""StateFun module.yaml: HTTP endpoint components, v1 and v2, and clear errors for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from statefun_mesh.errors import ConfigError
from statefun_mesh.remote.module_yaml import (
    HttpTimeouts,
    load_module_yaml,
    parse_duration,
    parse_module_yaml,
)

V2 = """
kind: io.statefun.endpoints.v2/http
spec:
  functions: com.foo.bar/*
  urlPathTemplate: http://bar.foo.com:8080/functions/{function.name}
  maxNumBatchRequests: 10000
  transport:
    type: io.statefun.transports.v1/okhttp
    timeouts:
      call: 1minute
      connect: 30seconds
      read: 20seconds
      write: 10seconds
"""

V1 = """
kind: io.statefun.endpoints.v1/http
spec:
  functions: com.foo.bar/*
  urlPathTemplate: http://bar.foo.com:8080/functions/{function.name}
  maxNumBatchRequests: 10000
  timeouts:
    call: 1minute
    connect: 30seconds
    read: 20seconds
    write: 10seconds
"""


@pytest.mark.parametrize("text", [V1, V2], ids=["v1", "v2"])
def test_statefun_binder_examples(text: str) -> None:
    # The examples StateFun's own binder tests read, in both versions.
    (ep,) = parse_module_yaml(text).endpoints
    assert (ep.namespace, ep.name, ep.max_batch) == ("com.foo.bar", None, 10000)
    assert ep.timeouts == HttpTimeouts(call=60.0, connect=30.0, read=20.0, write=10.0)
    assert ep.url_for("com.foo.bar/greeter") == "http://bar.foo.com:8080/functions/greeter"


def test_defaults_and_lookup(tmp_path: Path) -> None:
    path = tmp_path / "module.yaml"
    path.write_text(
        """
kind: io.statefun.endpoints.v2/http
spec:
  functions: example/*
  urlPathTemplate: http://localhost:8000/statefun
---
kind: io.statefun.endpoints.v2/http
spec:
  functions: example/special
  urlPathTemplate: https://special:9443/{function.name}/run
  transport:
    type: io.statefun.transports.v1/async
    call: 2m
    connect: 20s
    pool_size: 1024
"""
    )
    module = load_module_yaml(path)
    general, special = module.endpoints
    assert general.max_batch == 1000 and general.timeouts == HttpTimeouts()  # StateFun's defaults
    assert special.timeouts.call == 120.0 and special.timeouts.connect == 20.0
    # one type's endpoint wins over its namespace's; other namespaces are not remote
    assert module.endpoint_for("example/special") is special
    assert module.endpoint_for("example/greeter") is general
    assert module.endpoint_for("other/greeter") is None
    assert special.url_for("example/special") == "https://special:9443/special/run"
    assert general.url_for("example/greeter") == "http://localhost:8000/statefun"


@pytest.mark.parametrize(
    ("text", "value"),
    [("1 min", 60), ("10 sec", 10), ("500ms", 0.5), ("2m", 120), ("1500", 1.5), ("1 h", 3600), ("3 days", 259200)],
)
def test_durations_as_flink_writes_them(text: str, value: float) -> None:
    assert parse_duration(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "soon", "10 fortnights", "-5 s", "0 s", "1.5 s", True, None])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text, key="spec.timeouts.call")


H = "kind: io.statefun.endpoints.v2/http\nspec: "
H1 = "kind: io.statefun.endpoints.v1/http\nspec: "
OK = "{functions: 'a/*', urlPathTemplate: 'http://a/'"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: io.statefun.kinesis.v1/egress\nspec: {}\n", r"kinesis\.v1/egress' is not supported.*Mesh"),
        ("kind: io.statefun.endpoints.v9/http\nspec: {}\n", r"'io\.statefun\.endpoints\.v9/http' is not supported"),
        ("kind: [1]\n", r"\[1\] is not supported"),
        ("spec: {}\n", "needs a 'kind'"),
        ("version: '3.0'\nmodule: {}\n", "3.0 module format"),
        ("- a\n- b\n", "expected a mapping"),
        ("kind: io.statefun.endpoints.v2/http\n", "'spec' must be a mapping"),
        (H + "{urlPathTemplate: 'http://a/'}\n", "spec.functions: .*required"),
        (H + "{functions: 'a*/b', urlPathTemplate: 'http://a/'}\n", "not 'namespace/name'"),
        (H + "{functions: 'a/b*', urlPathTemplate: 'http://a/'}\n", "not 'namespace/name'"),
        (H + "{functions: 'nons', urlPathTemplate: 'http://a/'}\n", "not 'namespace/name'"),
        (H + "{functions: 'a/*'}\n", "urlPathTemplate: required"),
        (H + "{functions: 'a/*', urlPathTemplate: 'ftp://a/'}\n", "not an http"),
        (H + "{functions: 'a/*', urlPathTemplate: 'http:///x'}\n", "with a host"),
        (H + "{functions: 'a/*', urlPathTemplate: 'http://a:99999/'}\n", "invalid port"),
        (H + "{functions: 'a/*', urlPathTemplate: 'http://a/{function.id}'}\n", "only placeholder"),
        (H + "{functions: 'a/*', urlPathTemplate: 'http+unix:///s.sock/x'}\n", "UNIX domain"),
        (H + OK + ", maxNumBatchRequests: 0}\n", "positive integer"),
        (H + OK + ", transport: {type: x/y}}\n", "unknown transport type"),
        (H + OK + ", transport: {timeouts: {call: 1s, read: 2s}}}\n", "larger than the call"),
        (H + OK + ", transport: {timeouts: {cal: 1s}}}\n", "unknown timeout"),
        (H1 + OK + ", timeouts: {call: forever}}\n", "spec.timeouts.call"),
        (H + OK + "}\n---\n" + H + "{functions: 'a/*', urlPathTemplate: 'http://b/'}\n", "two endpoints"),
        (H + "{functions: 'a/*', urlPathTemplate: 'python:no-colon'}\n", "python:package.module:attribute"),
        ("kind: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_module_files_name_what_is_wrong(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        parse_module_yaml(text, source="m.yaml")
    assert str(info.value).startswith("m.yaml")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the module file"):
        load_module_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"kind: \xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_module_yaml(bad)


def test_in_process_handler_reference() -> None:
    (ep,) = parse_module_yaml(H + "{functions: 'a/*', urlPathTemplate: 'python:my_app.serve:handler'}\n").endpoints
    assert ep.in_process == "my_app.serve:handler"
    (http,) = parse_module_yaml(H + OK + "}\n").endpoints
    assert http.in_process is None
