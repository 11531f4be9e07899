"""The rough edges a new user hit with the ``statefun-mesh`` command (issue 10), each against
real meshes: egress right after send, bare ``checkpoints list``, a client port already in
use, a bad state directory, endpoints without a scheme, timeouts, quiet and JSON logs, and
the ``status`` table."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from statefun_mesh.mesh import free_ports
from tests.integration import app
from tests.integration.support import APP, ROOT, Cluster, run_cli, running_cluster

pytestmark = [pytest.mark.integration, pytest.mark.c_core_only]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("STATEFUN_MESH_ENDPOINT", None)
    env.pop("STATEFUN_MESH_LOG_FORMAT", None)
    env.pop("STATEFUN_MESH_LOG_LEVEL", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _run(*args: str, cwd: Path | str = ROOT, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "statefun_mesh", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )


def _one_error_line(out: subprocess.CompletedProcess[str], command: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, out.stderr
    assert errors[0].startswith(f"statefun-mesh {command}: error:"), out.stderr
    return errors[0]


# -- egress right after send ----------------------------------------------------------------


def test_egress_right_after_send_prints_the_record(cluster: Cluster) -> None:
    """The record is released by the next checkpoint (5 s away); the old default --idle of
    2 s gave up before it and printed nothing."""
    run = uuid.uuid4().hex[:8]
    egress = f"it/fresh-{run}"
    sent = run_cli(
        "send",
        app.EMIT,
        f"e-{run}",
        "--json",
        json.dumps({"egress": egress, "n": 1, "tag": run}),
        "--endpoint",
        cluster.endpoint,
    )
    assert sent.returncode == 0, sent.stderr
    out = run_cli("egress", egress, "--endpoint", cluster.endpoint, timeout=40)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["value"] for line in out.stdout.splitlines()] == [f"{run}:e-{run}:0"]


def test_egress_with_nothing_says_when_records_appear(cluster: Cluster) -> None:
    out = run_cli("egress", f"it/empty-{uuid.uuid4().hex[:8]}", "--idle", "0.5", "--endpoint", cluster.endpoint)
    assert out.returncode == 0 and out.stdout == "", out
    assert "no records in it/empty-" in out.stderr and "within 0.5 s" in out.stderr, out.stderr
    assert "records appear when the checkpoint after them completes (every 5 s)" in out.stderr, out.stderr


# -- checkpoints list, bare -----------------------------------------------------------------


def test_checkpoints_list_bare_reads_runs_default_state_dir(cluster: Cluster, tmp_path: Path) -> None:
    """`statefun-mesh checkpoints list` as the README shows it, next to run's default state dir."""
    deadline = time.monotonic() + 30
    while not any((cluster.state_dir / "checkpoints").rglob("manifest.json")):
        assert time.monotonic() < deadline, "no checkpoint within 30 s"
        time.sleep(0.2)
    (tmp_path / "statefun-mesh-state").symlink_to(cluster.state_dir)
    out = _run("checkpoints", "list", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^\s+\d+\s+complete\s+peers=3", out.stdout, re.M), out.stdout
    same = _run("checkpoints", "list", "--state-dir", str(cluster.state_dir))
    assert same.returncode == 0 and "complete" in same.stdout, same.stderr


def test_checkpoints_list_bare_without_state_says_what_it_looked_for(tmp_path: Path) -> None:
    line = _one_error_line(_run("checkpoints", "list", cwd=tmp_path), "checkpoints")
    assert str(tmp_path / "statefun-mesh-state" / "checkpoints") in line and "--blob-store" in line, line


# -- a client port already in use -----------------------------------------------------------


def test_client_port_in_use_is_refused_without_claiming_the_mesh_is_up(cluster: Cluster, tmp_path: Path) -> None:
    """The other mesh answered the start-up check, so the old launcher printed "is up"."""
    t0 = time.monotonic()
    out = _run(
        "run",
        APP,
        "--peers",
        "2",
        "--client-endpoint",
        cluster.endpoint,
        "--state-dir",
        str(tmp_path / "s"),
        timeout=60,
    )
    line = _one_error_line(out, "run")
    assert "is up" not in out.stdout + out.stderr, (out.stdout, out.stderr)
    assert cluster.endpoint in line and "in use" in line and "--client-endpoint" in line, line
    assert time.monotonic() - t0 < 20
    status = run_cli("status", "--json", "--endpoint", cluster.endpoint)  # the other mesh is unharmed
    assert status.returncode == 0 and json.loads(status.stdout)["peers"] == 3, status.stderr


def test_launcher_checks_who_answers_its_client_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Second line of defence, for a port taken between the check and the bind: the answer
    to the start-up probe must come from the peer process the launcher started. (With
    CURVE keys, the default, another mesh cannot even answer the probe: its peers do not
    admit this run's client key. So both meshes here run without keys.)"""
    from statefun_mesh import launcher as launcher_mod
    from statefun_mesh.config import MeshConfig

    (tmp_path / "other").mkdir()
    with running_cluster(tmp_path / "other", args=("--no-keys",)) as cluster:
        monkeypatch.setattr(launcher_mod, "_check_endpoint_free", lambda endpoint: None)
        monkeypatch.chdir(ROOT)
        launcher = launcher_mod.Launcher(
            MeshConfig(functions=(APP,), blob_store="file://" + str(tmp_path / "ck")),
            peers=2,
            transport="ipc",
            client_endpoint=cluster.endpoint,
            state_dir=str(tmp_path / "state"),
            log_level="warning",
            keys=False,
        )
        assert launcher.run() == 2
    out, err = capfd.readouterr()
    assert "is up" not in out + err
    assert f"{cluster.endpoint} is already served by another mesh" in err, err
    assert launcher.foreign is not None and launcher.foreign[1]["peers"] == 3


# -- state directory ------------------------------------------------------------------------


def test_unusable_state_dir_is_one_line_and_status_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    port = free_ports(1)[0]
    out = _run(
        "run",
        APP,
        "--peers",
        "2",
        "--client-endpoint",
        f"tcp://127.0.0.1:{port}",
        "--state-dir",
        str(blocker / "state"),
    )
    line = _one_error_line(out, "run")
    assert str(blocker / "state") in line and "--state-dir" in line, line


def test_peers_refusing_their_state_dirs_exit_2_without_tracebacks(tmp_path: Path) -> None:
    """The state dir is fine, each peer's own directory is not: the peers say so in one line each."""
    state = tmp_path / "state"
    state.mkdir()
    for k in range(2):
        (state / f"peer-{k}").write_text("in the way")
    port = free_ports(1)[0]
    out = _run("run", APP, "--peers", "2", "--client-endpoint", f"tcp://127.0.0.1:{port}", "--state-dir", str(state))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "is up" not in out.stdout, out.stderr
    peer_errors = [line for line in out.stderr.splitlines() if line.startswith("statefun-mesh peer: error:")]
    assert sorted(peer_errors) == sorted(
        f"statefun-mesh peer: error: cannot write the state directory {state / f'peer-{k}'}: File exists; fix its "
        "permissions or choose another with --state-dir or state_dir in the config"
        for k in range(2)
    ), out.stderr


# -- endpoints and timeouts ----------------------------------------------------------------


def test_endpoint_without_scheme_means_tcp(cluster: Cluster) -> None:
    bare = cluster.endpoint.removeprefix("tcp://")
    key = f"bare-{uuid.uuid4().hex[:8]}"
    got = run_cli("request", app.COUNTER, key, "--int", "3", "--endpoint", bare)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["value"] == 3


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("localhost", "is not an endpoint: expected tcp://HOST:PORT"),
        ("http://127.0.0.1:7700", "unknown scheme 'http'"),
        ("tcp://127.0.0.1", "expected tcp://HOST:PORT with a port"),
        ("tcp://127.0.0.1:99999", "port from 1 to 65535"),
    ],
)
def test_bad_endpoint_is_one_clear_line(endpoint: str, message: str) -> None:
    out = run_cli("status", "--endpoint", endpoint, timeout=30)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "ZMQError" not in out.stderr
    assert message in out.stderr, out.stderr


def test_timeouts_are_honoured_and_printed_plainly() -> None:
    port = free_ports(1)[0]
    t0 = time.monotonic()
    out = run_cli("request", app.COUNTER, "k", "--int", "1", "--timeout", "1", "--endpoint", f"tcp://127.0.0.1:{port}")
    took = time.monotonic() - t0
    assert out.returncode == 2, out.stderr
    assert took < 4.0, f"request --timeout 1 took {took:.1f} s"  # the old client waited timeout + 5
    sent = run_cli("send", app.COUNTER, "k", "--int", "1", "--timeout", "1", "--endpoint", f"tcp://127.0.0.1:{port}")
    assert sent.returncode == 2
    for o in (out, sent):
        assert "within 1 s;" in o.stderr, o.stderr  # not "within 0.999609762000091 s"


def test_request_without_reply_times_out_on_time(cluster: Cluster) -> None:
    t0 = time.monotonic()
    out = run_cli(
        "request",
        app.FANOUT,
        "x",
        "--json",
        json.dumps({"k": 0, "prefix": "x"}),
        "--timeout",
        "1",
        "--endpoint",
        cluster.endpoint,
    )
    assert out.returncode == 2, out.stderr
    assert f"no reply from {app.FANOUT}/x within 1 s;" in out.stderr, out.stderr
    assert time.monotonic() - t0 < 5.0


# -- logs -----------------------------------------------------------------------------------


def test_an_idle_mesh_logs_a_few_lines_not_one_per_checkpoint(start_cluster) -> None:  # type: ignore[no-untyped-def]
    # a generous heartbeat_timeout: on a starved machine (a busy CI box) a late heartbeat is a
    # WARNING worth logging, but this test is about a healthy idle mesh's log volume
    c = start_cluster(config="checkpoint_interval = 0.2\nheartbeat_timeout = 30.0\n")
    time.sleep(4.0)  # ~20 checkpoints
    c.stop()
    peer_lines = [line for line in c.log().splitlines() if " peer-" in line]
    assert not [line for line in peer_lines if " WARNING " in line or " ERROR " in line], peer_lines
    assert len([line for line in peer_lines if "checkpoint" in line and "complete" in line]) == 1, peer_lines
    # per peer: starting, ready, stopping, stopped (and peer 0 the first checkpoint)
    assert len(peer_lines) <= 4 * 3 + 1, "\n".join(peer_lines)
    assert "{'" not in c.log(), "raw dicts at shutdown"
    assert re.search(r"peer 1 stopping: \d+ invocations \(0 failed\) in \d+ batches", c.log()), c.log()


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    """`peer --log-format json`: every line of its log parses, with the fields collectors index."""
    port = free_ports(1)[0]
    cfg = tmp_path / "mesh.toml"
    cfg.write_text(
        f'functions = ["{APP}"]\nstate_dir = "state"\nclient_endpoints = ["tcp://127.0.0.1:{port}"]\n'
        f'blob_store = "file://{tmp_path}/ck"\ncheckpoint_interval = 0.2\n'
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "statefun_mesh",
            "peer",
            "--config",
            str(cfg),
            "--id",
            "0",
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            st = run_cli("status", "--json", "--endpoint", f"tcp://127.0.0.1:{port}", "--timeout", "1")
            if st.returncode == 0 and json.loads(st.stdout)["status"][0]["checkpoints"]["last_complete"]:
                break
            assert time.monotonic() < deadline and proc.poll() is None, st.stderr
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    docs = [json.loads(line) for line in err.splitlines()]  # every line is one JSON object
    assert len(docs) >= 4
    for d in docs:
        assert set(d) >= {"time", "level", "logger", "message", "source"}, d
        assert d["source"] == "peer-0" and d["level"] in ("DEBUG", "INFO", "WARNING"), d
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", d["time"]), d
    messages = [d["message"] for d in docs]
    assert any(m.startswith("peer 0/1 starting: state at ") for m in messages), messages
    assert any(re.fullmatch(r"checkpoint \d+ complete in [\d.]+ s", m) for m in messages), messages  # debug
    assert messages[-1] == "peer 0 stopped", messages


def test_run_passes_the_log_format_to_its_peers(start_cluster) -> None:  # type: ignore[no-untyped-def]
    c = start_cluster(env={"STATEFUN_MESH_LOG_FORMAT": "json"})
    c.stop()
    peer_lines = [line for line in c.log().splitlines() if not line.startswith("statefun-mesh: ")]
    assert peer_lines
    sources = {json.loads(line)["source"] for line in peer_lines}
    assert sources == {"peer-0", "peer-1", "peer-2"}, peer_lines


# -- status ---------------------------------------------------------------------------------


def _wait_checkpoint(cluster: Cluster) -> None:
    deadline = time.monotonic() + 30
    while True:
        out = run_cli("status", "--json", "--endpoint", cluster.endpoint)
        if out.returncode == 0 and all(s["checkpoints"]["last_complete"] for s in json.loads(out.stdout)["status"]):
            return
        assert time.monotonic() < deadline, out.stdout + out.stderr
        time.sleep(0.3)


def test_status_table(cluster: Cluster) -> None:
    key = f"st-{uuid.uuid4().hex[:8]}"
    assert run_cli("send", app.COUNTER, key, "--int", "1", "--endpoint", cluster.endpoint).returncode == 0
    _wait_checkpoint(cluster)
    out = run_cli("status", "--endpoint", cluster.endpoint)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("mesh: 3 peers, 1024 key groups, checkpoints every 5 s; functions: "), lines
    assert app.COUNTER in lines[0]
    assert lines[1].split() == [
        "PEER",
        "ALIVE",
        "KEY",
        "GROUPS",
        "INVOCATIONS",
        "INV/S",
        "FAILED",
        "BACKLOG",
        "STATE",
        "CHECKPOINT",
        "AGE",
    ], lines
    rows = [line.split() for line in lines[2:5]]
    assert [r[0] for r in rows] == ["0", "1", "2"] and all(r[1] == "yes" for r in rows), lines
    assert [r[2] for r in rows] == ["0-341", "342-682", "683-1023"], lines
    total = sum(int(r[3].replace(",", "")) for r in rows)
    doc = json.loads(run_cli("status", "--json", "--endpoint", cluster.endpoint).stdout)
    assert total <= sum(s["invocations"] for s in doc["status"]) and total >= 1
    for r, s in zip(rows, doc["status"], strict=True):
        assert r[8] in ("kB", "MB") and float(r[7]) > 0  # state size, e.g. "45.1 kB"
        assert r[9].isdigit() and int(r[9]) <= s["checkpoints"]["last_complete"]  # last checkpoint
        assert r[11] == "s" and float(r[10]) < 30  # its age
    assert len(lines) == 5, lines  # no error lines under a healthy mesh


def test_status_json_has_the_fields_the_table_shows(cluster: Cluster) -> None:
    _wait_checkpoint(cluster)
    out = run_cli("status", "--json", "--endpoint", cluster.endpoint)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["peers"] == 3 and doc["checkpoint_interval"] == 5.0
    for k, s in enumerate(doc["status"]):
        assert s["key_groups"] == [[0, 342], [342, 683], [683, 1024]][k]
        assert s["state_bytes"] > 0
        assert 0 <= s["checkpoints"]["last_complete_age_s"] < 60


def test_status_watch_refreshes_and_stops(cluster: Cluster) -> None:
    out = run_cli("status", "--watch", "0.2", "--count", "3", "--endpoint", cluster.endpoint, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("mesh: 3 peers") == 3, out.stdout
    watched = run_cli("status", "--watch", "0.2", "--count", "2", "--json", "--endpoint", cluster.endpoint)
    assert [json.loads(line)["peers"] for line in watched.stdout.splitlines()] == [3, 3], watched.stdout


def test_status_watch_ends_cleanly_on_ctrl_c(cluster: Cluster) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "statefun_mesh", "status", "--watch", "0.2", "--endpoint", cluster.endpoint],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 20
        assert proc.stdout is not None
        seen = 0
        while seen < 2:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "no refreshes"
            seen += line.startswith("mesh: ")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_status_shows_an_unreachable_peer(tmp_path: Path) -> None:
    """Peer 1 of a 2-peer mesh is not running: its row says NO, and a line says why."""
    port = free_ports(1)[0]
    cfg = tmp_path / "mesh.toml"
    cfg.write_text(
        f'functions = ["{APP}"]\nstate_dir = "state"\npeers = 2\n'
        f'endpoints = ["ipc://{tmp_path}/p0.sock", "ipc://{tmp_path}/p1.sock"]\n'
        f'client_endpoints = ["tcp://127.0.0.1:{port}", "ipc://{tmp_path}/c1.sock"]\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "statefun_mesh", "peer", "--config", str(cfg), "--id", "0", "--log-level", "error"],
        cwd=ROOT,
        env=_env(),
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            out = run_cli("status", "--endpoint", f"tcp://127.0.0.1:{port}", "--timeout", "1")
            if out.returncode == 0:
                break
            assert time.monotonic() < deadline and proc.poll() is None, out.stderr
            time.sleep(0.2)
        lines = out.stdout.splitlines()
        assert lines[0].startswith("mesh: 2 peers, 1024 key groups, checkpoints off;"), lines
        assert lines[2].split()[:3] == ["0", "yes", "0-511"], lines
        assert lines[3].split() == ["1", "NO", "-", "-", "-", "-", "-", "-", "-", "-"], lines
        assert lines[4].startswith(f"peer 1: unreachable: no answer from the peer at ipc://{tmp_path}/c1.sock"), lines
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
