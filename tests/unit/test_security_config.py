"""CURVE keys in mesh.toml, key files, client key files, `statefun-mesh keys generate`: good and bad."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from statefun_mesh.cli import main
from statefun_mesh.config import MeshConfig, load_config
from statefun_mesh.errors import ConfigError
from statefun_mesh.launcher import write_config
from statefun_mesh.security import (
    ClientKeys,
    ensure_keypair,
    find_client_keys,
    generate_keypair,
    read_key,
    register_client_keys,
    registry_path,
    write_key_file,
)

EPS = 'endpoints = ["tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002"]\n'


def keys_dir(tmp_path: Path, n: int = 2) -> list[str]:
    d = tmp_path / "keys"
    d.mkdir(exist_ok=True)
    return [ensure_keypair(str(d / f"peer-{k}")).public for k in range(n)]


def load_error(path: Path, key: str, *fragments: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert os.fspath(path) in message and key in message, message
    for f in fragments:
        assert f in message, message
    return info.value


def test_key_files_are_private_and_read_back(tmp_path: Path) -> None:
    pair = generate_keypair()
    public_path, secret_path = write_key_file(str(tmp_path / "peer-0"), pair)
    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600
    assert read_key(public_path, secret=False) == pair.public
    assert read_key(secret_path, secret=True) == pair.secret
    assert read_key(secret_path, secret=False) == pair.public  # the secret file holds both
    assert ensure_keypair(str(tmp_path / "peer-0")) == pair  # reused, never replaced


def test_zmq_auth_reads_our_files(tmp_path: Path) -> None:
    import zmq.auth

    pair = generate_keypair()
    _, secret_path = write_key_file(str(tmp_path / "c"), pair)
    public, secret = zmq.auth.load_certificate(secret_path)
    assert secret is not None and (public.decode(), secret.decode()) == (pair.public, pair.secret)


def test_mesh_toml_with_keys(tmp_path: Path) -> None:
    publics = keys_dir(tmp_path)
    client = generate_keypair()
    path = tmp_path / "mesh.toml"
    path.write_text(
        f"peers = 2\n{EPS}peer_keys = {publics!r}\n".replace("'", '"')
        + 'secret_key = "keys/peer-{id}.key_secret"\n'
        + f'client_keys = ["{client.public}"]\n'
    )
    config = load_config(path)
    assert config.curve
    assert config.secret_key == str(tmp_path / "keys" / "peer-{id}.key_secret")  # relative to the file
    assert config.keypair(1).public == publics[1]
    assert config.client_public_keys() == [client.public]
    # what `statefun-mesh run` writes reads back the same
    out = tmp_path / "written.toml"
    write_config(config, str(out))
    again = load_config(out)
    assert again.peer_keys == config.peer_keys and again.client_keys == config.client_keys


def test_peer_tables_take_public_keys(tmp_path: Path) -> None:
    publics = keys_dir(tmp_path)
    text = "".join(
        f'[[peer]]\nendpoint = "tcp://127.0.0.1:700{k}"\npublic_key = "keys/peer-{k}.key"\n' for k in range(2)
    )
    path = tmp_path / "mesh.toml"
    path.write_text('secret_key = "keys/peer-{id}.key_secret"\nany_client_key = true\n' + text)
    config = load_config(path)
    assert config.peer_public_keys() == publics and config.any_client_key


def test_bad_key_text_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "mesh.toml"
    path.write_text(f'peers = 2\n{EPS}peer_keys = ["{"x" * 39}~", "short"]\nsecret_key = "s"\n')
    load_error(path, "peer_keys[0]", "not a valid Z85 public key")


def test_missing_key_file_names_the_key_and_the_file(tmp_path: Path) -> None:
    publics = keys_dir(tmp_path)
    path = tmp_path / "mesh.toml"
    path.write_text(
        f'peers = 2\n{EPS}peer_keys = ["{publics[0]}", "keys/nope.key"]\nsecret_key = "keys/peer-0.key_secret"\n'
    )
    load_error(path, "peer_keys[1]", str(tmp_path / "keys" / "nope.key"), "does not exist")


def test_missing_secret_key_file(tmp_path: Path) -> None:
    publics = keys_dir(tmp_path)
    path = tmp_path / "mesh.toml"
    path.write_text(f'peers = 2\n{EPS}peer_keys = ["{publics[0]}", "{publics[1]}"]\nsecret_key = "gone.key_secret"\n')
    load_error(path, "secret_key", str(tmp_path / "gone.key_secret"))


def test_key_file_without_a_key(tmp_path: Path) -> None:
    (tmp_path / "empty.key").write_text("# nothing here\n")
    path = tmp_path / "mesh.toml"
    path.write_text('peer_keys = ["empty.key"]\nsecret_key = "x"\n')
    load_error(path, "peer_keys[0]", "holds no valid public key", "empty.key")


def test_a_secret_key_that_is_not_the_peers(tmp_path: Path) -> None:
    publics = keys_dir(tmp_path)
    stranger = generate_keypair()
    config = MeshConfig(
        peers=2,
        endpoints=("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"),
        peer_keys=tuple(publics),
        secret_key=stranger.secret,
    )
    with pytest.raises(ConfigError, match=r"does not belong to peer_keys\[0\]"):
        config.keypair(0)


@pytest.mark.parametrize(
    ("settings", "key", "fragment"),
    [
        ({"secret_key": "x"}, "secret_key", "needs peer_keys"),
        ({"any_client_key": True}, "any_client_key", "needs peer_keys"),
        ({"peer_keys": ("P",) * 0 + ("",)}, "peer_keys[0]", "got ''"),
    ],
)
def test_inconsistent_key_settings(settings: dict[str, object], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        MeshConfig(**settings)  # type: ignore[arg-type]
    assert key in str(info.value) and fragment in str(info.value)


def test_peer_keys_need_one_per_peer_and_a_secret(tmp_path: Path) -> None:
    publics = keys_dir(tmp_path, 1)
    eps = ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    with pytest.raises(ConfigError, match=r"peer_keys: expected one public key per peer \(2\), got 1"):
        MeshConfig(peers=2, endpoints=eps, peer_keys=tuple(publics), secret_key="x")
    with pytest.raises(ConfigError, match="secret_key: peer_keys are set"):
        MeshConfig(peer_keys=tuple(publics))
    pair = generate_keypair()
    with pytest.raises(ConfigError, match="not both"):
        MeshConfig(peer_keys=(pair.public,), secret_key=pair.secret, client_keys=(pair.public,), any_client_key=True)


def test_client_key_file(tmp_path: Path) -> None:
    pair, server = generate_keypair(), generate_keypair()
    keys = ClientKeys(pair.public, pair.secret, {"tcp://127.0.0.1:7700": server.public})
    path = tmp_path / "client.toml"
    keys.save(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ClientKeys.load(str(path)) == keys
    with pytest.raises(ConfigError, match="does not exist"):
        ClientKeys.load(str(tmp_path / "none.toml"))
    path.write_text(f'public_key = "{pair.public}"\nsecret_key = "{server.secret}"\n')
    with pytest.raises(ConfigError, match="does not belong"):
        ClientKeys.load(str(path))


def test_find_client_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("STATEFUN_MESH_CLIENT_KEY", raising=False)
    pair, server = generate_keypair(), generate_keypair()
    ep = "tcp://127.0.0.1:7711"
    assert find_client_keys(ep) is None
    keys = ClientKeys(pair.public, pair.secret, {ep: server.public})
    path = register_client_keys(ep, keys)
    assert path == registry_path(ep) and path.startswith(str(tmp_path))
    assert find_client_keys(ep) == keys
    assert find_client_keys("tcp://127.0.0.1:7712") is None  # not listed: not used
    other = tmp_path / "other.toml"
    keys2 = ClientKeys(server.public, server.secret, {ep: pair.public})
    keys2.save(str(other))
    monkeypatch.setenv("STATEFUN_MESH_CLIENT_KEY", str(other))
    assert find_client_keys(ep) == keys2  # the environment wins


def test_keys_generate_writes_files_and_prints_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "mesh.toml"
    conf.write_text(
        '[[peer]]\nendpoint = "tcp://127.0.0.1:7001"\nclient_endpoint = "tcp://127.0.0.1:7700"\n'
        '[[peer]]\nendpoint = "tcp://127.0.0.1:7002"\n'
    )
    d = tmp_path / "k"
    assert main(["keys", "generate", "--dir", str(d), "--config", str(conf), "--clients", "1"]) == 0
    out = capsys.readouterr().out
    assert "peer_keys = [" in out and "client_keys = [" in out
    for name in ("peer-0.key_secret", "peer-1.key_secret", "client-0.key_secret", "client-0.toml"):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600, name
    client = ClientKeys.load(str(d / "client-0.toml"))
    assert client.server_keys == {"tcp://127.0.0.1:7700": read_key(str(d / "peer-0.key"), secret=False)}
    # never overwritten by accident
    assert main(["keys", "generate", "--dir", str(d), "--peers", "2"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["keys", "generate"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith('public_key = "') and "secret_key" in printed


@pytest.mark.integration  # a process
def test_a_dead_runs_client_key_copy_is_ignored_and_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed without cleaning up leaves its key copy; a later mesh on the same endpoint
    (a reused port) must not be approached with those keys."""
    import subprocess
    import sys

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("STATEFUN_MESH_CLIENT_KEY", raising=False)
    pair, server = generate_keypair(), generate_keypair()
    ep = "tcp://127.0.0.1:7713"
    path = register_client_keys(ep, ClientKeys(pair.public, pair.secret, {ep: server.public}))
    assert find_client_keys(ep) is not None  # this process, its owner, is alive
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    Path(path + ".pid").write_text(dead)
    assert find_client_keys(ep) is None
    assert not os.path.exists(path) and not os.path.exists(path + ".pid")
