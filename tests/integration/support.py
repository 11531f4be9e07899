"""Helpers of the integration tests: clusters in subprocesses, the CLI, /proc, bounded loops."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from statefun_mesh import EgressRecord, MeshClient
from statefun_mesh._speedups import key_group

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.integration.app:functions"
T = TypeVar("T")


# -- placement -------------------------------------------------------------------------------


def owner(id: str, peers: int = 3, max_parallelism: int = 1024) -> int:
    """The peer that owns instance ``id`` (Flink's contiguous key-group ranges)."""
    return key_group(id, max_parallelism) * peers // max_parallelism


def ids_on(peer: int, prefix: str, count: int, peers: int = 3) -> list[str]:
    """``count`` ids starting with ``prefix`` that live on ``peer``."""
    out: list[str] = []
    for i in range(100_000):
        candidate = f"{prefix}-{i}"
        if owner(candidate, peers) == peer:
            out.append(candidate)
            if len(out) == count:
                return out
    raise AssertionError(f"no {count} ids on peer {peer}")


# -- bounded loops ---------------------------------------------------------------------------


async def gather_bounded(coros: Iterable[Awaitable[T]], limit: int) -> list[T]:
    """Await every coroutine with at most ``limit`` running at once; results in order."""
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[T]) -> T:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


async def eventually(check: Callable[[], Awaitable[T]], *, timeout: float, interval: float = 0.1, what: str) -> T:
    """Call ``check`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await check()
        except Exception as exc:  # e.g. a request timing out while a peer restarts
            last = exc
        else:
            if last:
                return last  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true within {timeout} s (last result: {last!r})")
        await asyncio.sleep(interval)


async def read_egress(
    client: MeshClient,
    name: str,
    *,
    count: int | None = None,
    keep: Callable[[EgressRecord], bool] | None = None,
    idle: float | None = None,
    timeout: float = 30.0,
) -> list[EgressRecord]:
    """Read egress ``name`` from every peer until ``count`` kept records, or ``idle`` quiet seconds.

    With checkpoints on (``statefun-mesh run``'s default) records become readable when the
    checkpoint that produced them completes, so give ``count`` and no ``idle`` to wait for them.
    """
    out: list[EgressRecord] = []

    async def run() -> None:
        async with contextlib.aclosing(client.egress(name, stop_when_idle=idle)) as records:
            async for rec in records:
                if keep is None or keep(rec):
                    out.append(rec)
                if count is not None and len(out) >= count:
                    return

    try:
        await asyncio.wait_for(run(), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        if count is not None and len(out) >= count:
            # Everything arrived, only closing the reader hung: that is the MeshClient.egress
            # bug test_client_egress.py pins down; do not fail unrelated tests on it.
            return out
        raise AssertionError(f"egress {name}: {len(out)} of {count} records within {timeout} s") from None
    return out


# -- /proc -----------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def children(pid: int) -> list[int]:
    """Live children of ``pid`` (a scan of /proc; no psutil)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ppid(int(entry)) == pid:
            out.append(int(entry))
    return out


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS``, ``RssAnon`` and ``RssFile`` of a process, in KiB (empty if it is gone)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = Path(f"/proc/{pid}/stat").read_text()
    return state[state.rindex(")") + 2] != "Z"


# -- clusters --------------------------------------------------------------------------------


class Cluster:
    """``statefun-mesh run`` in a subprocess of its own session; stdout and stderr go to files."""

    def __init__(
        self,
        workdir: Path,
        *,
        transport: str,
        peers: int = 3,
        port: int,
        config: str | None = None,
        env: dict[str, str] | None = None,
        app: str = APP,
        args: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.transport = transport
        self.peers = peers
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.state_dir = workdir / "state"
        self.out_path = workdir / "launcher.out"
        self.log_path = workdir / "launcher.log"
        cmd = [
            sys.executable,
            "-m",
            "statefun_mesh",
            "run",
            app,
            "--peers",
            str(peers),
            "--transport",
            transport,
            "--client-endpoint",
            self.endpoint,
            "--state-dir",
            str(self.state_dir),
            *args,
        ]
        if config is not None:
            cfg = workdir / "extra.toml"
            cfg.write_text(config)
            cmd += ["--config", str(cfg)]
        full_env = dict(os.environ)
        full_env.pop("STATEFUN_MESH_ENDPOINT", None)
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p)
        full_env.update(env or {})
        self._seen_peers: dict[int, list[str]] = {}
        with open(self.out_path, "wb") as out, open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=out, stderr=log, stdin=subprocess.DEVNULL, env=full_env, start_new_session=True
            )

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_up(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while "is up" not in self.output():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"statefun-mesh run exited with {self.proc.returncode} before it was up:\n{self.log()[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"statefun-mesh run not up within {timeout} s:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        assert self.endpoint in self.output(), self.output()
        self.peer_pids()

    def peer_pids(self) -> dict[int, int]:
        """Peer id -> pid of the launcher's live peer processes (remembered for cleanup)."""
        out: dict[int, int] = {}
        for pid in children(self.proc.pid):
            cmd = _cmdline(pid)
            if "peer" in cmd and "--id" in cmd:
                out[int(cmd[cmd.index("--id") + 1])] = pid
                self._seen_peers[pid] = cmd
        return out

    def stop(self, grace: float = 25.0) -> None:
        """SIGTERM the launcher's process group, SIGKILL it if it lingers, then any peer it left behind."""
        if self.proc.poll() is None:
            self.peer_pids()
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        # Peers run in sessions of their own: a launcher killed hard leaves them behind.
        for pid, cmd in self._seen_peers.items():
            if alive(pid) and _cmdline(pid) == cmd:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Call ``check()`` every ``interval`` s until it returns something true, and return that;
    AssertionError after ``timeout`` s (blocking: for tests that are not async)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def running_cluster(workdir: Path, *, transport: str = "ipc", **kwargs: Any) -> Iterator[Cluster]:
    """A :class:`Cluster` (``statefun-mesh run``) on a free client port, up; stopped on leaving,
    also when the body failed. ``kwargs`` are Cluster's (peers, config, env, app, args)."""
    from statefun_mesh.mesh import free_ports

    cluster = Cluster(workdir, transport=transport, port=free_ports(1)[0], **kwargs)
    try:
        cluster.wait_up()
        yield cluster
    finally:
        cluster.stop()


class BridgeProcess:
    """``python -m statefun_mesh <command> --nats-url URL --mesh ENDPOINT ...`` (a NATS bridge) in a
    session of its own; each start is a run of its own, logging to ``<workdir>/bridge-<run>.log``."""

    def __init__(self, command: str, workdir: Path, nats_url: str, mesh: Cluster, *args: str) -> None:
        self.workdir = workdir
        self.cmd = [sys.executable, "-m", "statefun_mesh", command, "--nats-url", nats_url, "--mesh", mesh.endpoint]
        self.cmd += ["--status-interval", "1", *args]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def runs(self) -> int:
        return len(self.procs)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.procs[-1]

    def log_path(self, run: int) -> Path:
        return self.workdir / f"bridge-{run}.log"

    def start(self) -> None:
        assert not self.procs or self.proc.poll() is not None, "already running"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        with open(self.log_path(self.runs + 1), "wb") as log:
            out = {"stdout": log, "stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL}
            proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, start_new_session=True, **out)
        self.procs.append(proc)

    def log(self, run: int | None = None) -> str:
        """Run ``run``'s log, or every run's."""
        runs = range(1, self.runs + 1) if run is None else [run]
        return "".join(self.log_path(r).read_text(errors="replace") for r in runs if self.log_path(r).exists())

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM: the bridge finishes what is in flight and logs its counters."""
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                raise AssertionError(f"the bridge did not stop within {timeout} s:\n{self.log()[-3000:]}") from None
        return proc.returncode

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None and alive(p.pid):
                p.kill()
                p.wait(10)


def run_cli(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m statefun_mesh ARGS`` to completion (killed after ``timeout``)."""
    full_env = dict(os.environ)
    full_env.pop("STATEFUN_MESH_ENDPOINT", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "statefun_mesh", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        stdin=subprocess.DEVNULL,
    )


def run_bench_script(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[str, str]:
    """Run a bench/ script to completion and return its stdout and stderr (text); on a
    timeout it gets SIGTERM (the scripts stop the meshes they started, then exit), then its
    whole session SIGKILL, and the test fails naming the script. The exit code must be 0."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    name = Path(cmd[1]).name if len(cmd) > 1 else cmd[0]
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        raise AssertionError(f"{name} did not finish in {timeout:.0f} s:\n{stderr.decode()[-3000:]}") from None
    text, err = stdout.decode(), stderr.decode()
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{text[-2000:]}\n{err[-3000:]}"
    return text, err


def mount_tmpfs(path: Path, size: str) -> Path:
    """Mount a tmpfs of ``size`` (``mount``'s syntax: "6m") at ``path`` for a full-disk test,
    or skip the test saying why it cannot; unmount it with :func:`unmount`."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        import pytest

        pytest.skip(f"a full disk needs a small tmpfs mount, and mount could not run: {exc}")
    if r.returncode != 0:
        import pytest

        pytest.skip(
            f"a full disk needs a small tmpfs mount, which is not permitted here "
            f"(needs root with CAP_SYS_ADMIN): {r.stderr.strip()}"
        )
    return path


def unmount(path: Path) -> None:
    """Lazily unmount what :func:`mount_tmpfs` mounted at ``path``."""
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill_disk(directory: Path) -> Path:
    """Fill the file system of ``directory`` with one file, until ENOSPC; return the file."""
    st = os.statvfs(directory)
    assert st.f_blocks * st.f_frsize <= (256 << 20), f"refusing to fill {directory}: not one of our small mounts"
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 1 << 12):
            data = b"\0" * chunk
            for _ in range(100_000):  # bounded: the mounts are a few MiB
                try:
                    if os.write(fd, data) < chunk:
                        break
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    st = os.statvfs(directory)
    assert st.f_bavail * st.f_frsize < (1 << 20), f"{directory} is not full: {st.f_bavail * st.f_frsize} bytes free"
    return path
