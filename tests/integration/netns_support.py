"""Many hosts on one machine: every peer, the S3 server and the clients in a Linux network
namespace of their own, joined by veth pairs to a bridge in a hub namespace (issue 12).

Nothing here touches the root namespace's interfaces or routes: the bridge lives in a
namespace of the harness's own, every address is in 198.18.0.0/24 (RFC 2544's benchmark
range) and exists only inside these namespaces, so all traffic stays in them. The only
file outside the test's temp directory is ``/etc/netns/<namespace>/hosts``, which
``ip netns exec`` bind-mounts over ``/etc/hosts`` for the processes it starts: it gives
every host a name (``peer0``, ``s3``, ...) that the mesh's endpoints use, as a
Kubernetes headless Service or a site's DNS would. Rewriting those files in place moves a
name to another address for every process at its next lookup.

Names are ``sfmh<pid of the test process>-<host>``; :func:`clean_stale` removes those a
crashed run left behind (their pid is gone), :meth:`Hosts.close` removes everything
this run made, whatever happened.

Faults, all confined to one host's namespace or the hub:

- :meth:`Hosts.isolate` / :meth:`Hosts.heal`: the host's veth on the bridge down/up (a
  cable pulled: the host hears no one and no one hears it);
- :meth:`Hosts.blackhole`: the host drops every packet it would send to another host
  (one direction only; see :meth:`Hosts.blackhole` for what that means for TCP);
- :meth:`Hosts.lossy`: random loss (nftables ``numgen``) and, where the kernel has
  ``sch_netem``, delay with jitter on one host's link;
- :meth:`Hosts.remove`: the host vanishes (its processes SIGKILLed, its namespace deleted).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.support import ROOT, alive

PREFIX = "sfmh"
SUBNET = "198.18.0"  # /24, only inside the namespaces
NETNS_ETC = Path("/etc/netns")
_NAME = re.compile(rf"^{PREFIX}(\d+)-[a-z0-9]+$")


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``, no veth/bridge support)."""


def _ip(*args: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _in(ns: str, *cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=20, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {ns} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def netns_list() -> list[str]:
    r = _ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def clean_stale() -> list[str]:
    """Delete namespaces (and their /etc/netns entries) of this harness whose test process is gone."""
    removed = []
    names = set(netns_list())
    if NETNS_ETC.is_dir():
        names |= {p.name for p in NETNS_ETC.iterdir()}
    for name in sorted(names):
        m = _NAME.match(name)
        if not m or int(m.group(1)) == os.getpid() or alive(int(m.group(1))):
            continue
        _kill_netns_pids(name)
        _ip("netns", "del", name, check=False)
        shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
        removed.append(name)
    return removed


def _kill_netns_pids(ns: str) -> None:
    r = _ip("netns", "pids", ns, check=False)
    for tok in r.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(tok), signal.SIGKILL)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or ``None``."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
        try:
            _ip("-n", probe, "link", "add", "b0", "type", "bridge")
            _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        finally:
            _ip("netns", "del", probe, check=False)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot make a network namespace with a bridge and a veth pair: {exc}"
    return None


def has_nft() -> bool:
    return shutil.which("nft") is not None


_NETEM: bool | None = None


def has_netem() -> bool:
    """Whether this kernel has the netem qdisc (many minimal kernels do not)."""
    global _NETEM
    if _NETEM is None:
        probe = f"{PREFIX}{os.getpid()}-netem"
        try:
            _ip("netns", "add", probe)
            _ip("-n", probe, "link", "add", "d0", "type", "dummy")
            r = _in(probe, "tc", "qdisc", "add", "dev", "d0", "root", "netem", "delay", "1ms", check=False)
            _NETEM = r.returncode == 0
        except (RuntimeError, OSError):
            _NETEM = False
        finally:
            _ip("netns", "del", probe, check=False)
    return _NETEM


@dataclass
class Host:
    name: str
    ns: str
    ip: str
    veth: str  # its end on the bridge, in the hub namespace
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


class Hosts:
    """The hosts of one test: a hub namespace with a bridge, and a namespace per host.

    Use as a context manager (or call :meth:`close`): every process started with
    :meth:`popen`, every namespace and every /etc/netns entry is removed on the way out.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.run = f"{PREFIX}{os.getpid()}"
        self.hub = f"{self.run}-hub"
        self.hosts: dict[str, Host] = {}
        self._next = 10
        self._made: list[str] = []
        self._aliases: dict[str, str] = {}  # extra name -> ip (a name that moved)
        clean_stale()
        if self.hub in netns_list():  # left by an earlier test of this very process
            self._delete_ns(self.hub)
        self._add_ns(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building ------------------------------------------------------------------------

    def _add_ns(self, ns: str) -> None:
        if ns in netns_list():
            self._delete_ns(ns)
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _delete_ns(self, ns: str) -> None:
        _kill_netns_pids(ns)
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)

    def add(self, name: str) -> Host:
        """A new host ``name`` with the next free address, reachable from every other host."""
        assert re.fullmatch(r"[a-z0-9]+", name) and name not in self.hosts, name
        assert self._next < 250, "too many hosts"
        ns = f"{self.run}-{name}"
        ip = f"{SUBNET}.{self._next}"
        veth = f"h{self._next}"
        self._next += 1
        self._add_ns(ns)
        _ip("-n", self.hub, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.hub, "link", "set", veth, "master", "br0")
        _ip("-n", self.hub, "link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        host = Host(name, ns, ip, veth)
        self.hosts[name] = host
        self.write_hosts_files()
        return host

    def names(self) -> dict[str, str]:
        out = {h.name: h.ip for h in self.hosts.values()}
        out.update(self._aliases)
        return out

    def write_hosts_files(self) -> None:
        """(Re)write every host's /etc/hosts in place (same inode: running processes see it)."""
        text = "127.0.0.1 localhost\n" + "".join(f"{ip} {n}\n" for n, ip in sorted(self.names().items()))
        for h in self.hosts.values():
            d = NETNS_ETC / h.ns
            d.mkdir(parents=True, exist_ok=True)
            with open(d / "hosts", "w") as fh:  # truncate and write: the bind mount keeps the inode
                fh.write(text)

    def move_name(self, name: str, to: Host) -> None:
        """Make ``name`` resolve to ``to``'s address on every host (a DNS record updated)."""
        self._aliases[name] = to.ip
        self.write_hosts_files()

    # -- processes -----------------------------------------------------------------------

    def popen(
        self, host: Host, cmd: list[str], *, log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in ``host``'s namespace (``ip netns exec`` execs it: the pid is the command's)."""
        full_env = dict(os.environ)
        full_env.pop("STATEFUN_MESH_ENDPOINT", None)
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p)
        full_env.update(env or {})
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", host.ns, *cmd],
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                start_new_session=True,
            )
        host.procs.append(proc)
        return proc

    def run_py(
        self, host: Host, args: list[str], *, timeout: float, env: dict[str, str] | None = None, log: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python ARGS`` in ``host``'s namespace to completion (killed after ``timeout``)."""
        full_env = dict(os.environ)
        full_env.pop("STATEFUN_MESH_ENDPOINT", None)
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p)
        full_env.update(env or {})
        return subprocess.run(
            ["ip", "netns", "exec", host.ns, sys.executable, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            stdin=subprocess.DEVNULL,
        )

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    # -- faults --------------------------------------------------------------------------

    def isolate(self, host: Host) -> None:
        """Pull the host's cable: its veth on the bridge goes down."""
        _ip("-n", self.hub, "link", "set", host.veth, "down")

    def heal(self, host: Host) -> None:
        _ip("-n", self.hub, "link", "set", host.veth, "up")

    def blackhole(self, host: Host, to: Host) -> None:
        """``host`` drops every packet it sends to ``to``: ``to`` still reaches ``host``, not the
        reverse. TCP needs both directions (SYN-ACKs and ACKs travel back), so every TCP
        connection between the two stalls, whoever opened it, while both still reach
        every other host: a non-transitive partition."""
        _ip("-n", host.ns, "route", "add", "blackhole", f"{to.ip}/32")

    def unblackhole(self, host: Host, to: Host) -> None:
        _ip("-n", host.ns, "route", "del", "blackhole", f"{to.ip}/32", check=False)

    def lossy(self, host: Host, *, loss_pct: int, delay_ms: int = 0, jitter_ms: int = 0) -> str:
        """Random loss of ``loss_pct`` % of the packets ``host`` sends and receives (nftables
        ``numgen random``) and, where the kernel has netem, ``delay_ms`` ± ``jitter_ms`` on
        both directions. Returns what was applied (for the test's report)."""
        applied = []
        if has_netem():
            for ns, dev in ((host.ns, "eth0"), (self.hub, host.veth)):
                _in(
                    ns,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "netem",
                    "loss",
                    f"{loss_pct}%",
                    "delay",
                    f"{delay_ms}ms",
                    f"{jitter_ms}ms",
                )
            return f"netem loss {loss_pct}% delay {delay_ms}ms {jitter_ms}ms, both directions"
        if not has_nft():
            raise NetnsUnavailable("neither netem nor nftables is available to drop packets")
        rules = (
            "table inet sfmloss {\n"
            " chain in { type filter hook input priority 0; policy accept;"
            f' iifname "eth0" numgen random mod 100 < {loss_pct} drop; }}\n'
            " chain out { type filter hook output priority 0; policy accept;"
            f' oifname "eth0" numgen random mod 100 < {loss_pct} drop; }}\n'
            "}\n"
        )
        _in(host.ns, "nft", "-f", "-", input=rules)
        applied.append(f"nftables loss {loss_pct}% each direction")
        if delay_ms:
            applied.append("no delay: this kernel has no sch_netem")
        return "; ".join(applied)

    def unlossy(self, host: Host) -> None:
        if has_netem():
            _in(host.ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
            _in(self.hub, "tc", "qdisc", "del", "dev", host.veth, "root", check=False)
        else:
            _in(host.ns, "nft", "delete", "table", "inet", "sfmloss", check=False)

    def remove(self, host: Host, *, silent: bool = False) -> None:
        """The host is gone for good: its processes SIGKILLed (their kernel still closes their
        TCP connections, so the other hosts see FINs) and its namespace deleted. With
        ``silent``, as at a power loss or a crashed VM: its cable is pulled first, so no FIN
        or RST reaches anyone and the others' connections to it are left half-open."""
        if silent:
            self.isolate(host)
        for p in host.procs:
            self.kill(p)
        self._delete_ns(host.ns)
        self._made.remove(host.ns)
        del self.hosts[host.name]
        self.write_hosts_files()

    # -- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        for h in list(self.hosts.values()):
            for p in h.procs:
                self.kill(p)
        for ns in reversed(self._made):
            self._delete_ns(ns)
        self._made.clear()
        self.hosts.clear()


# -- a mesh on these hosts -------------------------------------------------------------------

S3_PORT = 9000
PEER_PORT = 7800
CLIENT_PORT = 7700
FUNCTIONS = ["tests.integration.crash_app:functions", "tests.integration.netns_app:functions"]


class NetMesh:
    """An S3 server on host ``s3``, peers ``peer0..peerN-1`` on hosts of their own and a
    ``client`` host, every peer a real ``python -m statefun_mesh peer --config mesh.toml --id K``.

    The endpoints in mesh.toml are host names (``tcp://peer1:7800``), resolved through each
    namespace's /etc/hosts, as a Kubernetes headless Service would give them.
    """

    def __init__(self, hosts: Hosts, workdir: Path, *, peers: int = 3, extra_config: str = "") -> None:
        from tests.s3server import TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY, find_rclone

        self.hosts = hosts
        self.workdir = workdir
        self.n = peers
        self.s3 = hosts.add("s3")
        self.client = hosts.add("client")
        self.peer_hosts = [hosts.add(f"peer{k}") for k in range(peers)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.starts = [0] * peers
        s3root = workdir / "s3"
        (s3root / "data" / "mesh").mkdir(parents=True)  # the bucket: a top-level directory
        rclone = find_rclone()
        self.s3_proc = hosts.popen(
            self.s3,
            [
                rclone,
                "serve",
                "s3",
                str(s3root / "data"),
                "--addr",
                f"{self.s3.ip}:{S3_PORT}",
                "--auth-key",
                f"{TEST_ACCESS_KEY},{TEST_SECRET_KEY}",
                "--config",
                str(s3root / "rclone.conf"),
                "--cache-dir",
                str(s3root / "cache"),
            ],
            log=workdir / "s3.log",
        )
        self.env = {
            "AWS_ENDPOINT_URL": f"http://s3:{S3_PORT}",
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
            "AWS_REGION": TEST_REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent/statefun-mesh-test-aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/statefun-mesh-test-aws-credentials",
        }
        self.config_path = workdir / "mesh.toml"
        peers_toml = "".join(
            f'[[peer]]\nendpoint = "tcp://peer{k}:{PEER_PORT}"\nclient_endpoint = "tcp://peer{k}:{CLIENT_PORT}"\n'
            for k in range(peers)
        )
        self.config_path.write_text(
            f"functions = {json_list(FUNCTIONS)}\n"
            'blob_store = "s3://mesh/checkpoints"\n'
            "checkpoint_interval = 0.5\n"
            "heartbeat_interval = 0.2\n"
            "heartbeat_timeout = 1.0\n"
            f"{extra_config}\n{peers_toml}"
        )
        self.endpoints = [f"tcp://peer{k}:{CLIENT_PORT}" for k in range(peers)]

    def state_dir(self, k: int) -> Path:
        return self.workdir / f"state-peer{k}"

    def log_path(self, k: int) -> Path:
        return self.workdir / f"peer{k}.log"

    def log(self, k: int) -> str:
        try:
            return self.log_path(k).read_text(errors="replace")
        except OSError:
            return ""

    def digest(self, k: int, lines: int = 40) -> str:
        """The last ``lines`` lines of peer ``k``'s own log that say what it did (no steady
        checkpoint lines, no library debug chatter): printed when a test fails."""
        keep = [
            line[:300]
            for line in self.log(k).splitlines()
            if (" statefun_mesh" in line or line.startswith("===") or "Traceback" in line or "Error" in line)
            and "botocore" not in line
            and not re.search(r"checkpoint \d+ complete in", line)
        ]
        return "\n".join(keep[-lines:])

    def start_peer(self, k: int, host: Host | None = None) -> None:
        host = host or self.peer_hosts[k]
        self.starts[k] += 1
        with open(self.log_path(k), "ab") as fh:
            fh.write(f"=== start #{self.starts[k]} on {host.ns} ({host.ip}) at {time.monotonic():.3f}\n".encode())
        self.procs[k] = self.hosts.popen(
            host,
            [
                sys.executable,
                "-m",
                "statefun_mesh",
                "peer",
                "--config",
                str(self.config_path),
                "--id",
                str(k),
                # debug: the tests read the recovery rounds a peer joined from its log
                "--state-dir",
                str(self.state_dir(k)),
                "--log-level",
                "debug",
            ],
            log=self.log_path(k),
            env=self.env,
        )

    def start(self, timeout: float = 60.0) -> None:
        for k in range(self.n):
            self.start_peer(k)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float, peers: list[int] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for k in peers if peers is not None else range(self.n):
            marker = f"peer {k} ready"
            while marker not in self.log(k).rsplit("=== start", 1)[-1]:
                if self.procs[k].poll() is not None:
                    raise AssertionError(f"peer {k} exited with {self.procs[k].returncode}:\n{self.log(k)[-3000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"peer {k} not ready within {timeout} s:\n{self.log(k)[-3000:]}")
                time.sleep(0.05)

    def run_load(self, *, seconds: float, tag: str, deadline: float = 90.0) -> subprocess.Popen[bytes]:
        out = self.workdir / f"load-{tag}.json"
        return self.hosts.popen(
            self.client,
            [
                sys.executable,
                "-m",
                "tests.integration.netns_workload",
                "load",
                "--endpoints",
                ",".join(self.endpoints),
                "--seconds",
                str(seconds),
                "--tag",
                tag,
                "--deadline",
                str(deadline),
                "--out",
                str(out),
            ],
            log=self.workdir / f"load-{tag}.log",
        )

    def wait_load(self, proc: subprocess.Popen[bytes], tag: str, timeout: float) -> dict[str, object]:
        import json

        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.hosts.kill(proc)
            raise AssertionError(f"the load did not finish within {timeout} s") from None
        log = (self.workdir / f"load-{tag}.log").read_text(errors="replace")
        assert proc.returncode == 0, f"load failed ({proc.returncode}):\n{log[-3000:]}"
        return json.loads((self.workdir / f"load-{tag}.json").read_text())  # type: ignore[no-any-return]

    def check(self, tag: str, timeout: float = 60.0, at_most_once: str | None = None) -> dict[str, object]:
        import json

        out = self.workdir / f"check-{tag}.json"
        r = self.hosts.run_py(
            self.client,
            [
                "-m",
                "tests.integration.netns_workload",
                "check",
                "--endpoints",
                ",".join(self.endpoints),
                "--load",
                str(self.workdir / f"load-{tag}.json"),
                "--timeout",
                str(timeout),
                "--out",
                str(out),
            ]
            + (["--at-most-once", at_most_once] if at_most_once else []),
            timeout=timeout + 60,
        )
        assert r.returncode == 0, f"check failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        return json.loads(out.read_text())  # type: ignore[no-any-return]

    def stop(self) -> None:
        for p in self.procs.values():
            self.hosts.kill(p, signal.SIGTERM)
        self.hosts.kill(self.s3_proc, signal.SIGTERM)


def json_list(items: list[str]) -> str:
    import json

    return json.dumps(items)
