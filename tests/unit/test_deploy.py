"""The deployment files in deploy/ agree with what ``statefun-mesh peer`` and ``load_config`` expect.

Kubernetes and Docker cannot run here: these checks read the manifests, the systemd unit and
the Dockerfile, load the mesh.toml they carry with ``load_config``, and parse the peer's
command line with the CLI's own parser.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from statefun_mesh.cli import build_parser, cmd_peer, peer_id_from_hostname
from statefun_mesh.config import MeshConfig, load_config
from statefun_mesh.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"


def _k8s() -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{key} defined twice"
            out[key] = doc
    return out


def _mesh_toml(tmp_path: Path, text: str) -> MeshConfig:
    p = tmp_path / "mesh.toml"
    p.write_text(text)
    return load_config(p)


def _endpoint(ep: str) -> tuple[str, int]:
    m = re.fullmatch(r"tcp://([^:/]+):(\d+)", ep)
    assert m, f"{ep!r} is not tcp://host:port"
    return m.group(1), int(m.group(2))


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def test_kubernetes_manifests_agree_with_the_peer(tmp_path: Path) -> None:
    docs = _k8s()
    sts = docs[("StatefulSet", "mesh")]
    svc_name = sts["spec"]["serviceName"]
    svc = docs[("Service", svc_name)]
    assert svc["spec"]["clusterIP"] == "None", "peer addresses need a headless Service"
    assert svc["spec"]["publishNotReadyAddresses"] is True, "peers must resolve each other before they are ready"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"] == labels
    for s in (svc, docs[("Service", "mesh-client")]):
        assert s["spec"]["selector"].items() <= labels.items()

    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == ports
    assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])
    # ready when recovered (/readyz), alive while the loops run (/healthz), on the metrics port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}

    # the command line is one statefun-mesh peer accepts, and takes the id from the pod name
    args = build_parser().parse_args(container["args"])
    assert args.func is cmd_peer and args.id is None and args.id_from_hostname
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_map = docs[("ConfigMap", volumes["config"]["configMap"]["name"])]
    assert Path(args.config).parent == Path(mounts["config"])
    config = _mesh_toml(tmp_path, config_map["data"][Path(args.config).name])

    # one [[peer]] per pod, in ordinal order, at the pod's own DNS name and the declared ports
    replicas = sts["spec"]["replicas"]
    assert config.peers == replicas
    name = sts["metadata"]["name"]
    for k in range(replicas):
        pod_name = f"{name}-{k}"
        assert peer_id_from_hostname(pod_name) == k
        assert _endpoint(config.endpoints[k]) == (f"{pod_name}.{svc_name}", ports["peer"])
        assert _endpoint(config.client_endpoints[k]) == (f"{pod_name}.{svc_name}", ports["client"])
        assert config.metrics_endpoints[k] == f"0.0.0.0:{ports['metrics']}"  # probes come from the node

    # the state lives on the per-pod volume
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert config.state_dir == mounts[claim["metadata"]["name"]]
    assert claim["metadata"]["name"] not in volumes

    # checkpoints in S3 with credentials from the Secret, as boto3's environment variables
    assert config.blob_store.startswith("s3://")
    (env_from,) = container["envFrom"]
    secret = docs[("Secret", env_from["secretRef"]["name"])]
    keys = set(secret["stringData"])
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= keys
    assert all(k.startswith("AWS_") for k in keys)

    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert pod["terminationGracePeriodSeconds"] >= 15, "a peer needs time to drain and sync on SIGTERM"
    # the functions are importable from the image (the Dockerfile copies examples/ into /app)
    for ref in config.functions:
        assert (ROOT / (ref.split(":")[0].replace(".", "/") + ".py")).is_file(), ref


def _unit(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def test_systemd_unit_and_mesh_toml_agree(tmp_path: Path) -> None:
    unit = _unit(DEPLOY / "systemd" / "statefun-mesh@.service")
    (exec_start,) = unit["Service.ExecStart"]
    argv = shlex.split(exec_start.replace("%i", "3"))
    assert Path(argv[0]).name == "statefun-mesh"
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_peer and args.id == 3
    assert args.config == "/etc/statefun-mesh/mesh.toml"
    config = _mesh_toml(tmp_path, (DEPLOY / "systemd" / "mesh.toml").read_text())
    assert config.state_dir == "/var/lib/" + unit["Service.StateDirectory"][0]
    assert 0 <= args.id < config.peers
    assert config.blob_store.startswith("s3://")
    hosts: dict[str, set[int]] = {}
    for ep, cep in zip(config.endpoints, config.client_endpoints, strict=True):
        host, port = _endpoint(ep)
        chost, cport = _endpoint(cep)
        assert host == chost
        hosts.setdefault(host, set())
        assert not {port, cport} & hosts[host], f"two peers on {host} share a port"
        hosts[host] |= {port, cport}
    assert unit["Service.KillSignal"] == ["SIGTERM"]
    assert unit["Service.RestartPreventExitStatus"] == ["2"], "exit status 2 is a refusal: do not restart"


def test_dockerfile_builds_the_c_core_and_serves_the_manifests_ports() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    stages = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(stages) == 2 and all("python:3" in s for s in stages)
    # every COPY from the build context names something the repository has
    for ln in lines:
        if ln.startswith("COPY ") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which the repository does not have"
    assert "build-essential" in text, "the Cython core needs a C compiler in the build stage"
    assert "COPY csrc/" in text and "pip wheel" in text
    assert "[s3]" in text, "the S3 blob store needs boto3"
    assert "STATEFUN_MESH_REQUIRE_EXTENSIONS=1" in text
    assert 'python -c "import statefun_mesh._speedups_c"' in text
    assert 'ENTRYPOINT ["statefun-mesh"]' in text
    sts = _k8s()[("StatefulSet", "mesh")]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    exposed = {int(p) for ln in lines if ln.startswith("EXPOSE ") for p in ln.split()[1:]}
    assert exposed == {p["containerPort"] for p in container["ports"]}
    user = re.search(r"^USER (\d+):(\d+)$", text, re.M)
    ctx = sts["spec"]["template"]["spec"]["securityContext"]
    assert user and (int(user.group(1)), int(user.group(2))) == (ctx["runAsUser"], ctx["runAsGroup"])
    assert "/var/lib/statefun-mesh" in text


@pytest.mark.parametrize(
    ("hostname", "peer"),
    [
        ("mesh-0", 0),
        ("mesh-12", 12),
        ("my-mesh-3", 3),
        ("mesh-2.mesh.default.svc.cluster.local", 2),
    ],
)
def test_peer_id_from_hostname(hostname: str, peer: int) -> None:
    assert peer_id_from_hostname(hostname) == peer


@pytest.mark.parametrize("hostname", ["mesh", "mesh-", "mesh-x", "web-1a", ""])
def test_peer_id_from_hostname_refuses_names_without_an_ordinal(hostname: str) -> None:
    with pytest.raises(ConfigError, match="does not end in '-<number>'"):
        peer_id_from_hostname(hostname)


def test_id_and_id_from_hostname_are_exclusive_and_one_is_required() -> None:
    parser = build_parser()
    for argv in (["peer", "--config", "m.toml"], ["peer", "--config", "m.toml", "--id", "1", "--id-from-hostname"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


@pytest.mark.integration  # processes
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare --uts")
@pytest.mark.parametrize(
    ("hostname", "expect"),
    [
        ("mesh-5", "--id must be in 0..1 for this config, got 5"),
        ("webserver", "the host name 'webserver' does not end in '-<number>'"),
    ],
)
def test_peer_takes_its_id_from_the_real_hostname(tmp_path: Path, hostname: str, expect: str) -> None:
    """A real ``statefun-mesh peer --id-from-hostname`` in a UTS namespace with the given host name."""
    cfg = tmp_path / "mesh.toml"
    peers = '[[peer]]\nendpoint = "ipc:///nonexistent/a"\n[[peer]]\nendpoint = "ipc:///nonexistent/b"\n'
    cfg.write_text(f'functions = ["examples.greeter:functions"]\nstate_dir = "state"\n{peers}')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    script = f'hostname {shlex.quote(hostname)} && exec "$0" -m statefun_mesh peer --config "$1" --id-from-hostname'
    r = subprocess.run(
        ["unshare", "--uts", "sh", "-c", script, sys.executable, str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert expect in r.stderr
