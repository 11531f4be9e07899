"""The local launcher behind ``statefun-mesh run``: N peer processes, supervised."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Final

from .config import MeshConfig
from .errors import ConfigError
from .mesh import free_ports, local_endpoints
from .security import ClientKeys, ensure_keypair, register_client_keys

__all__ = ["Launcher", "write_config"]

log = logging.getLogger("statefun_mesh.launcher")

#: delay before restarting a peer that died, by how many times it died in a row (each within
#: ``RAN_FINE`` s of its start): the first restart is at once (a SIGKILL or an OOM kill is one
#: event, and every second of it is unavailability); only a peer that keeps dying waits
RESTART_BACKOFF: Final = (0.0, 0.5, 1.0, 2.0, 5.0)
#: a peer that ran this long before it died starts the back-off afresh
RAN_FINE: Final = 60.0
#: the supervision loop's longest wait (stop signals are seen within it)
POLL: Final = 0.1
STOP_GRACE: Final = 15.0
_PR_SET_PDEATHSIG: Final = 1


def _stop_with(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the peer SIGTERM when the launcher dies
    (Linux ``PR_SET_PDEATHSIG``; ``None`` elsewhere). Peers run in sessions of their own,
    so a launcher killed by SIGKILL (or the OOM killer) left them running, unsupervised,
    on the mesh's endpoints; and since a dead peer is restarted at once, a peer restarted
    just before the launcher died would be such an orphan too."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def child() -> None:  # between fork and exec: no locks, no allocation worth the name
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return child


def restart_delay(deaths_in_a_row: int) -> float:
    """Seconds to wait before restarting a peer that died; ``deaths_in_a_row`` counts this
    death (1: the first since the peer last ran for ``RAN_FINE`` s)."""
    return RESTART_BACKOFF[min(max(deaths_in_a_row, 1), len(RESTART_BACKOFF)) - 1]


class _ExitWatch:
    """Waits until a child process exits, or a timeout: with a pidfd per child (Linux 5.3+)
    the launcher sees a death when it happens, not at its next poll; elsewhere it polls."""

    def __init__(self) -> None:
        self._poll = select.poll() if hasattr(os, "pidfd_open") and hasattr(select, "poll") else None
        self._fds: dict[int, int] = {}  # pid -> pidfd

    def add(self, pid: int) -> None:
        if self._poll is None:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # too old a kernel, or the process is already gone: polling sees it
            return
        self._fds[pid] = fd
        self._poll.register(fd, select.POLLIN)

    def remove(self, pid: int) -> None:
        fd = self._fds.pop(pid, None)
        if fd is not None and self._poll is not None:
            self._poll.unregister(fd)
            os.close(fd)

    def wait(self, timeout: float) -> None:
        if timeout <= 0:
            return
        if self._poll is None or not self._fds:
            time.sleep(timeout)
            return
        self._poll.poll(timeout * 1000)  # a signal handler's flag is checked by the caller after it

    def close(self) -> None:
        for pid in list(self._fds):
            self.remove(pid)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_config(config: MeshConfig, path: str) -> None:
    """Write ``config`` as a ``mesh.toml`` that :func:`~statefun_mesh.config.load_config` reads back."""
    from dataclasses import fields

    lines = ["# written by statefun-mesh run"]
    for f in fields(config):
        if f.name.startswith("_"):
            continue
        value = getattr(config, f.name)
        if value is None:
            continue
        lines.append(f"{f.name} = {_toml_value(value)}")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)  # a peer starting meanwhile reads the old file or the new one


def _check_endpoint_free(endpoint: str) -> None:
    """Refuse a ``tcp://`` client endpoint that something on this machine already listens on.

    Binding a plain socket with SO_REUSEADDR (as ZeroMQ does) fails only while another
    socket listens on the port, not for connections of an earlier run in TIME_WAIT.
    """
    import socket

    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not port.isdigit():
        return
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("" if host == "*" else host, int(port)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"the client endpoint {endpoint} is in use (another mesh or program listens there); stop it "
                    "or choose another with --client-endpoint"
                ) from None
            # anything else (e.g. a host name of another machine): the peer reports it when it binds


def _metrics_ports(host: str, base: int, n: int) -> list[int]:
    """``base + k`` for each peer k, or with ``base`` 0 ports that are free now (the OS picks them).

    They stay fixed for the run, so a restarted peer serves its metrics where it did before.
    """
    import socket

    if base:
        if base + n - 1 > 65535:
            raise ConfigError(f"--metrics-port {base} leaves no port for peer {n - 1} (ports run to 65535)")
        return [base + k for k in range(n)]
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            try:
                s.bind((host, 0))
            except OSError as exc:
                raise ConfigError(
                    f"cannot bind a metrics port on {host!r}: {exc.strerror or exc}; check --metrics-host"
                ) from None
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Launcher:
    """Starts ``peers`` peer processes on this machine and keeps them running.

    Each peer is ``python -m statefun_mesh peer --config <run dir>/mesh.toml --id K``,
    so ``ps`` shows its id. Ctrl-C or SIGTERM stops them all (SIGTERM, then SIGKILL
    after a grace period). A peer that dies is reported and restarted: at once the first time, then
    with a growing delay while it keeps dying (:data:`RESTART_BACKOFF`).
    """

    def __init__(
        self,
        config: MeshConfig,
        *,
        peers: int | None,
        transport: str,
        client_endpoint: str,
        state_dir: str,
        log_level: str = "info",
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        dashboard_peer: int = 0,
        keys: bool = True,
    ) -> None:
        n = peers or (config.peers if config.endpoints else max(os.cpu_count() or 1, 1))
        if config.metrics_endpoints and len(config.metrics_endpoints) == n:
            metrics = config.metrics_endpoints
        elif metrics_port is None:
            metrics = ()
        else:
            metrics = tuple(f"{metrics_host}:{p}" for p in _metrics_ports(metrics_host, metrics_port, n))
        if metrics and not 0 <= dashboard_peer < n:
            raise ConfigError(f"--dashboard-peer must be in 0..{n - 1}, got {dashboard_peer}")
        #: the peer that serves the dashboard (None: no metrics servers)
        self.dashboard_peer = dashboard_peer if metrics and metrics[dashboard_peer] else None
        self.run_dir = tempfile.mkdtemp(prefix="statefun-mesh-run-")
        os.makedirs(state_dir, exist_ok=True)
        # tcp ports for the peer links and the other peers' client endpoints, picked together
        # and never the client endpoint's or a metrics port (not bound yet: free_ports would offer them)
        ports: list[int] = []
        if transport == "tcp":
            given = [ep.rsplit(":", 1)[-1] for ep in (client_endpoint, *metrics) if ep]  # and the metrics ports
            ports = free_ports(2 * n, exclude=[int(p) for p in given if p.isdigit()])
        if config.endpoints and len(config.endpoints) == n:
            endpoints = config.endpoints
        elif ports:
            endpoints = tuple(f"tcp://127.0.0.1:{port}" for port in ports[:n])
        else:
            endpoints = local_endpoints(transport, n, self.run_dir)
        if config.client_endpoints and len(config.client_endpoints) == n and all(config.client_endpoints):
            clients = config.client_endpoints
        else:
            if ports:
                others = tuple(f"tcp://127.0.0.1:{port}" for port in ports[n:])
            else:
                others = local_endpoints(transport, n, os.path.join(self.run_dir, "clients"))
            os.makedirs(os.path.join(self.run_dir, "clients"), exist_ok=True)
            clients = (client_endpoint, *others[1:])
        self.config = config.with_(
            peers=n,
            endpoints=tuple(endpoints),
            client_endpoints=tuple(clients),
            state_dir=os.path.abspath(state_dir),
            metrics_endpoints=metrics,
        )
        self.config_path = os.path.join(self.run_dir, "mesh.toml")
        self.client_keys: ClientKeys | None = None
        self.client_key_path: str | None = None
        self._registered: list[str] = []
        if keys and not config.peer_keys:
            self._make_keys(os.path.join(os.path.abspath(state_dir), "keys"))
        write_config(self.config, self.config_path)
        self.log_level = log_level
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.restarts = [0] * n
        self._exits = _ExitWatch()
        self._stopping = False
        #: (endpoint, its INFO) when a client endpoint was answered by a process this launcher did not start
        self.foreign: tuple[str, dict[str, object]] | None = None

    def _make_keys(self, keys_dir: str) -> None:
        """The secure default on one machine: a key pair per peer and one for clients, kept in
        ``<state_dir>/keys`` (mode 0600) and reused by the next run over the same state."""
        os.makedirs(keys_dir, mode=0o700, exist_ok=True)
        os.chmod(keys_dir, 0o700)
        n = self.config.peers
        pairs = [ensure_keypair(os.path.join(keys_dir, f"peer-{k}"), f"statefun-mesh peer {k}") for k in range(n)]
        client = ensure_keypair(os.path.join(keys_dir, "client"), "statefun-mesh client")
        extra = {} if self.config.any_client_key else {"client_keys": (*self.config.client_keys, client.public)}
        self.config = self.config.with_(
            peer_keys=tuple(p.public for p in pairs), secret_key=os.path.join(keys_dir, "peer-{id}.key_secret"), **extra
        )
        servers = {ep: pairs[k].public for k, ep in enumerate(self.config.client_endpoints) if ep}
        self.client_keys = ClientKeys(client.public, client.secret, servers)
        self.client_key_path = os.path.join(keys_dir, "client.toml")
        self.client_keys.save(self.client_key_path)

    def _register_client_keys(self) -> None:
        # clients of this user on this machine find the key by the endpoint they are given
        if self.client_keys is None:
            return
        for ep in self.config.client_endpoints:
            if ep:
                try:
                    self._registered.append(register_client_keys(ep, self.client_keys))
                except OSError as exc:
                    log.warning(
                        "cannot leave the client key for %s where clients look for it: %s; pass "
                        "--client-key %s to clients",
                        ep,
                        exc,
                        self.client_key_path,
                    )

    def _unregister_client_keys(self) -> None:
        for path in self._registered:
            for name in (path, path + ".pid"):
                try:
                    os.unlink(name)
                except OSError:
                    pass
        self._registered = []

    def _spawn(self, k: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        paths = [os.getcwd(), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        cmd = [
            sys.executable,
            "-m",
            "statefun_mesh",
            "peer",
            "--config",
            self.config_path,
            "--id",
            str(k),
            "--log-level",
            self.log_level,
        ]
        if k == self.dashboard_peer:
            cmd.append("--dashboard")
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_stop_with(os.getpid()))
        self._exits.add(proc.pid)
        return proc

    def _wait_ready(self, timeout: float) -> bool:
        from .client import MeshClient

        async def probe() -> bool:
            deadline = time.monotonic() + timeout
            for k, ep in enumerate(self.config.client_endpoints):
                while True:
                    if any(p is not None and p.poll() is not None for p in self.procs):
                        return False
                    try:
                        async with MeshClient(ep, timeout=0.5, keys=self.client_keys) as c:
                            info = await c.info()
                    except Exception:
                        if time.monotonic() > deadline:
                            return False
                        continue
                    proc = self.procs[k]
                    if proc is not None and info.get("pid") != proc.pid:
                        # answered, but not by the peer we started: another mesh holds the endpoint
                        self.foreign = (ep, info)
                        return False
                    break
            return True

        return asyncio.run(probe())

    def run(self) -> int:
        """Start the peers, supervise them until a stop signal, and return an exit code."""
        stop_signal: list[int] = []

        def on_signal(signum: int, _frame: object) -> None:
            stop_signal.append(signum)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        n = self.config.peers
        try:
            for ep in self.config.client_endpoints:
                _check_endpoint_free(ep)
            self._register_client_keys()
            for k in range(n):
                self.procs[k] = self._spawn(k)
            print(
                f"statefun-mesh: starting {n} peers ({', '.join(self.config.functions)}); "
                f"state in {self.config.state_dir}",
                file=sys.stderr,
                flush=True,
            )
            if not self._wait_ready(60.0) and not stop_signal:
                if self.foreign is not None:
                    ep, info = self.foreign
                    print(
                        f"statefun-mesh run: error: {ep} is already served by another mesh (its peer "
                        f"{info.get('peer')}, pid {info.get('pid', '?')}); stop that mesh or choose another "
                        "--client-endpoint",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 2
                codes = [p.poll() for p in self.procs if p is not None]
                print("statefun-mesh: a peer failed to start; see its log above", file=sys.stderr, flush=True)
                return 2 if 2 in codes else 1
            if self.config.restore:
                # Done: a peer restarted from here on recovers from the latest checkpoint
                # (restoring the requested one again would roll the mesh back).
                self.config = self.config.with_(restore="")
                write_config(self.config, self.config_path)
            if not stop_signal:
                print(
                    f"statefun-mesh: mesh of {n} peer{'s' if n != 1 else ''} is up; clients connect to "
                    f"{self.config.client_endpoints[0]}",
                    flush=True,
                )
                if self.config.metrics_endpoints:
                    urls = [f"http://{ep.removeprefix('http://')}" for ep in self.config.metrics_endpoints if ep]
                    print(f"statefun-mesh: metrics at {', '.join(u + '/metrics' for u in urls)}", flush=True)
                    if self.dashboard_peer is not None:
                        print(f"statefun-mesh: dashboard at {urls[self.dashboard_peer]}/", flush=True)
                print(
                    f"statefun-mesh: try `statefun-mesh status --endpoint {self.config.client_endpoints[0]}`; "
                    "Ctrl-C stops the mesh",
                    file=sys.stderr,
                    flush=True,
                )
                if self.client_key_path is not None:
                    print(
                        f"statefun-mesh: links are authenticated (CURVE); clients on this machine find the client "
                        f"key by the endpoint; elsewhere pass --client-key {self.client_key_path} (or "
                        "MeshClient(..., keys=ClientKeys.load(path)))",
                        file=sys.stderr,
                        flush=True,
                    )
            next_restart = [0.0] * n
            started_at = [time.monotonic()] * n
            while not stop_signal:
                # wake when a peer dies (or a restart is due), not at the next poll
                now = time.monotonic()
                self._exits.wait(min([POLL, *(next_restart[k] - now for k, p in enumerate(self.procs) if p is None)]))
                for k, proc in enumerate(self.procs):
                    if proc is None:
                        if time.monotonic() >= next_restart[k] and not stop_signal:
                            self.procs[k] = self._spawn(k)
                            started_at[k] = time.monotonic()
                            print(
                                f"statefun-mesh: peer {k} restarted (restart #{self.restarts[k]})",
                                file=sys.stderr,
                                flush=True,
                            )
                        continue
                    code = proc.poll()
                    if code is None:
                        continue
                    if code == 2:  # the peer refused to start (bad config, incompatible checkpoint)
                        print(
                            f"statefun-mesh: peer {k} refused to start (see its error above); stopping the mesh",
                            file=sys.stderr,
                            flush=True,
                        )
                        return 2
                    self._exits.remove(proc.pid)
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                    if time.monotonic() - started_at[k] > RAN_FINE:
                        self.restarts[k] = 0  # it ran fine for a while: start the backoff afresh
                    self.restarts[k] += 1
                    delay = restart_delay(self.restarts[k])
                    after = (
                        "; the mesh then recovers from its last checkpoint"
                        if self.config.blob_store
                        else " (checkpoints are off: messages it had queued are lost)"
                    )
                    when = f"in {delay} s" if delay > 0 else "now"
                    print(f"statefun-mesh: peer {k} {how}; restarting it {when}{after}", file=sys.stderr, flush=True)
                    self.procs[k] = None
                    next_restart[k] = time.monotonic() + delay
            print(f"statefun-mesh: stopping {n} peers", file=sys.stderr, flush=True)
            return 0
        finally:
            self._stop_all()
            self._exits.close()
            self._unregister_client_keys()
            for s, h in old.items():
                signal.signal(s, h)
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _stop_all(self) -> None:
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE
        for p in live:
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                print(
                    f"statefun-mesh: peer pid {p.pid} did not stop in {STOP_GRACE} s; killing it",
                    file=sys.stderr,
                    flush=True,
                )
                p.kill()
                p.wait()
