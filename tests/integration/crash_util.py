"""Helpers of the crash-recovery tests: a ``statefun-mesh run`` mesh whose peers we SIGKILL,
clients that retry with idempotency keys, and bounded waits."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from statefun_mesh import MeshClient
from statefun_mesh.errors import StatefunMeshError
from statefun_mesh.mesh import free_ports
from tests.integration.support import ROOT, _cmdline, alive, children, owner, run_cli

APP = "tests.integration.crash_app:functions"
PEERS = 3


# -- where the checkpoints go --------------------------------------------------------------


class FileBlobs:
    """A ``file://`` blob store the tests read and write behind the mesh's back."""

    kind = "file"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = "file://" + str(root)
        self.env: dict[str, str] = {}

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        (self.root / name).write_bytes(data)

    def manifests(self) -> list[int]:
        d = self.root / "checkpoints"
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "manifest.json").exists())


class S3Blobs:
    """An ``s3://bucket/prefix`` blob store on the local S3 test server; the peers get its
    endpoint and credentials through the AWS environment variables."""

    kind = "s3"

    def __init__(self, server: Any, bucket: str, prefix: str) -> None:
        from tests.s3server import raw_client

        self.server = server
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}"
        self.client = raw_client(server)
        self.env = {
            "AWS_ENDPOINT_URL": server.endpoint_url,
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_REGION": server.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent/statefun-mesh-test-aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/statefun-mesh-test-aws-credentials",
        }

    def read(self, name: str) -> bytes:
        body = self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def write(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}", Body=data)

    def manifests(self) -> list[int]:
        out = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/checkpoints/"
        )
        for page in pages:
            for obj in page.get("Contents", ()):
                parts = obj["Key"].split("/")
                if parts[-1] == "manifest.json" and parts[-2].isdigit():
                    out.append(int(parts[-2]))
        return sorted(out)

    def close(self) -> None:
        self.client.close()


class CrashMesh:
    """``python -m statefun_mesh run tests.integration.crash_app:functions`` in a session of
    its own. Peers run in sessions of their own too (the launcher starts them so), hence
    every peer pid ever seen is remembered and killed at :meth:`cleanup` if still alive.

    The same ``workdir`` (state and checkpoints) can be started again with :meth:`start`
    after :meth:`stop`.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        peers: int = PEERS,
        checkpoint_interval: float = 0.5,
        port: int | None = None,
        extra_config: str = "",
        blobs: FileBlobs | S3Blobs | None = None,
        state_dir: Path | None = None,
        checkpoints: bool = True,
        apps: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        #: the StatefulFunctions to run (``MODULE:ATTR``; default: crash_app's)
        self.apps = apps or [APP]
        self.peers = peers
        self.port = port or free_ports(1)[0]
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.state_dir = state_dir or workdir / "state"
        #: where the checkpoints go (default: ``statefun-mesh run``'s, <state-dir>/checkpoints)
        self.blobs = blobs or FileBlobs(self.state_dir / "checkpoints")
        self.checkpoint_interval = checkpoint_interval
        self.checkpoints = checkpoints
        self.extra_config = extra_config
        #: more arguments for the next start (e.g. ["--restore", "latest"])
        self.extra_args: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self._seen: dict[int, list[str]] = {}
        self.client_endpoints: list[str] = []

    # -- processes -----------------------------------------------------------------------

    @property
    def out_path(self) -> Path:
        return self.workdir / f"launcher-{self.runs}.out"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"launcher-{self.runs}.log"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        cmd = [
            sys.executable,
            "-m",
            "statefun_mesh",
            "run",
            *self.apps,
            "--peers",
            str(self.peers),
            "--transport",
            "ipc",
            "--client-endpoint",
            self.endpoint,
            "--state-dir",
            str(self.state_dir),
        ]
        if self.checkpoints:
            cmd += ["--checkpoint-interval", str(self.checkpoint_interval), "--blob-store", self.blobs.url]
        else:
            cmd += ["--no-checkpoints"]
        cmd += self.extra_args
        if self.extra_config:
            cfg = self.workdir / "extra.toml"
            cfg.write_text(self.extra_config)
            cmd += ["--config", str(cfg)]
        env = dict(os.environ)
        env.pop("STATEFUN_MESH_ENDPOINT", None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env.update(self.blobs.env)
        with open(self.out_path, "wb") as out, open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=out, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def log(self, runs: int | None = None) -> str:
        """The launcher's stderr (it and its peers log there) of run ``runs`` (default: all)."""
        paths = (
            [self.workdir / f"launcher-{r}.log" for r in range(1, self.runs + 1)]
            if runs is None
            else [self.workdir / f"launcher-{runs}.log"]
        )
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def wait_up(self, timeout: float = 60.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while "is up" not in self.output():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"statefun-mesh run exited with {self.proc.returncode} before it was up:\n"
                    f"{self.log(self.runs)[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"statefun-mesh run not up within {timeout} s:\n{self.log(self.runs)[-4000:]}")
            time.sleep(0.05)
        self.peer_pids()

    def peer_pids(self) -> dict[int, int]:
        """Peer id -> pid of the launcher's live peer processes (scan of /proc)."""
        out: dict[int, int] = {}
        if self.proc is None or self.proc.poll() is not None:
            return out
        for pid in children(self.proc.pid):
            cmd = _cmdline(pid)
            text = " ".join(cmd)
            if "statefun_mesh peer" in text and "--id" in cmd and alive(pid):
                out[int(cmd[cmd.index("--id") + 1])] = pid
                self._seen[pid] = cmd
        return out

    def kill_peer(self, k: int) -> tuple[int, float]:
        """SIGKILL peer ``k``; return its pid and the monotonic time of the kill."""
        pids = self.peer_pids()
        assert k in pids, f"peer {k} is not running (peers: {pids})"
        pid = pids[k]
        os.kill(pid, signal.SIGKILL)
        return pid, time.monotonic()

    def wait_peer_restarted(self, k: int, old_pid: int, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            pid = self.peer_pids().get(k)
            if pid is not None and pid != old_pid:
                return pid
            if time.monotonic() > deadline:
                raise AssertionError(f"peer {k} was not restarted within {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM the launcher (it stops its peers gracefully); SIGKILL what lingers."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self.peer_pids()
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        self._kill_leftovers()
        return proc.returncode

    def cleanup(self) -> None:
        """Kill the launcher's process group and every peer we saw, at once (teardown)."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                self.peer_pids()
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        for pid, cmd in self._seen.items():
            if alive(pid) and _cmdline(pid) == cmd:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # -- checkpoints on disk -------------------------------------------------------------

    def manifests(self) -> list[int]:
        return self.blobs.manifests()

    def manifest(self, n: int) -> dict[str, Any]:
        return json.loads(self.blobs.read(f"checkpoints/{n:012d}/manifest.json"))

    def checkpoints_list(self) -> str:
        r = run_cli("checkpoints", "list", "--blob-store", self.blobs.url, timeout=60, env=self.blobs.env)
        assert r.returncode == 0, r.stderr
        return r.stdout


# -- clients -------------------------------------------------------------------------------


class Clients:
    """One MeshClient per peer client endpoint; sends retry (same idempotency key) through
    the next endpoint on any error, until a deadline."""

    def __init__(self, endpoints: list[str], *, timeout: float = 3.0) -> None:
        self.endpoints = endpoints
        self.clients = [MeshClient(ep, timeout=timeout) for ep in endpoints]
        self.retries = 0
        self.errors: dict[str, int] = {}

    @classmethod
    async def connect(cls, endpoint: str, *, timeout: float = 3.0, wait: float = 30.0) -> Clients:
        deadline = time.monotonic() + wait
        async with MeshClient(endpoint, timeout=2.0) as c:
            while True:
                try:
                    info = await c.info()
                    break
                except StatefunMeshError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        eps = list(info["client_endpoints"])
        assert len(eps) == info["peers"] and all(eps), info
        return cls(eps, timeout=timeout)

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()

    def _note(self, exc: BaseException) -> None:
        self.retries += 1
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1

    async def send(self, message: Any, key: str, *, first: int = 0, deadline: float) -> int:
        """Send until accepted; return the number of attempts."""
        attempt = 0
        while True:
            c = self.clients[(first + attempt) % len(self.clients)]
            attempt += 1
            try:
                await c.send(message, idempotency_key=key)
                return attempt
            except (StatefunMeshError, OSError) as exc:
                self._note(exc)
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"send {key} not accepted by the deadline ({attempt} attempts): {exc!r}"
                    ) from None
                await asyncio.sleep(0.05)

    async def request(self, message: Any, *, first: int = 0, deadline: float, timeout: float = 3.0) -> Any:
        """Request until answered (through the next endpoint after an error)."""
        attempt = 0
        while True:
            c = self.clients[(first + attempt) % len(self.clients)]
            attempt += 1
            try:
                return await c.request(message, timeout=timeout)
            except (StatefunMeshError, OSError) as exc:
                self._note(exc)
                if time.monotonic() > deadline:
                    raise AssertionError(f"request {message!r} not answered by the deadline: {exc!r}") from None
                await asyncio.sleep(0.05)


def reply_json(reply: Any) -> Any:
    return json.loads(reply.raw_value().decode("utf-8"))


def probe_ids(prefix: str, peers: int = PEERS) -> list[str]:
    """One id per peer (owned by that peer), for ``cr/counter`` liveness probes."""
    out = []
    for p in range(peers):
        i = 0
        while owner(f"{prefix}-{p}-{i}", peers) != p:
            i += 1
        out.append(f"{prefix}-{p}-{i}")
    return out


async def wait_responsive(
    endpoint: str, probes: list[str], make_query: Any, *, timeout: float, request_timeout: float = 2.0
) -> float:
    """Wait until a request to each probe id (one per peer) through ``endpoint`` is answered;
    return the monotonic time of the first success of the last probe."""
    deadline = time.monotonic() + timeout
    async with MeshClient(endpoint, timeout=request_timeout) as c:
        for pid in probes:
            while True:
                try:
                    await c.request(make_query(pid), timeout=request_timeout)
                    break
                except (StatefunMeshError, OSError) as exc:
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"the mesh did not answer a request to {pid} within {timeout} s: {exc!r}"
                        ) from None
                    await asyncio.sleep(0.05)
    return time.monotonic()


def wait_log(mesh: CrashMesh, pattern: str, *, timeout: float, after: int = 0) -> str:
    """Wait until the current run's launcher log matches ``pattern`` (a regex) after
    character ``after``; return the match."""
    import re

    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while True:
        m = rx.search(mesh.log(mesh.runs), after)
        if m:
            return m.group(0)
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matching {pattern!r} within {timeout} s:\n{mesh.log(mesh.runs)[-3000:]}")
        time.sleep(0.05)


class app_client:
    """``async with app_client(mesh) as client``: a MeshClient on peer 0's endpoint."""

    def __init__(self, mesh: CrashMesh) -> None:
        self.client = MeshClient(mesh.endpoint, timeout=10.0)

    async def __aenter__(self) -> Any:
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()
