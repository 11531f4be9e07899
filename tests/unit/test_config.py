"""load_config: mesh.toml files, good and bad; every error names the file and the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from statefun_mesh.config import MeshConfig, load_config
from statefun_mesh.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "mesh.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | str, key: str | None) -> ConfigError:
    """Load ``path`` expecting a ConfigError naming the file (and ``key``, if given)."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    message = str(err)
    assert os.fspath(path) in message, f"the error does not name the file: {message}"
    assert err.source == os.fspath(path)
    if key is not None:
        assert key in message, f"the error does not name the key {key!r}: {message}"
    assert isinstance(err, ValueError)  # ConfigError is also a ValueError
    return err


# -- good files ----------------------------------------------------------------------------


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config == MeshConfig()
    assert config.peers == 1 and config.endpoints == () and config.state_dir is None


def test_top_level_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        functions = ["app.module:functions", "other:fns"]
        state_dir = "/var/lib/mesh"
        max_parallelism = 256
        peers = 2
        endpoints = ["tcp://127.0.0.1:7801", "tcp://127.0.0.1:7802"]
        client_endpoints = ["tcp://127.0.0.1:7700", ""]
        max_batch = 50
        inbox_limit = 5000
        credit_window = 700
        max_frame_records = 100
        linger = 0.002
        max_frame_bytes = 1048576
        heartbeat_interval = 1
        heartbeat_timeout = 2.5
        egress_retention = 10
        map_size = 1048576
        max_map_size = 2097152
        sync_interval = 0
        """,
    )
    config = load_config(path)
    assert config.functions == ("app.module:functions", "other:fns")
    assert config.state_dir == "/var/lib/mesh"
    assert config.max_parallelism == 256
    assert config.peers == 2
    assert config.endpoints == ("tcp://127.0.0.1:7801", "tcp://127.0.0.1:7802")
    assert config.client_endpoints == ("tcp://127.0.0.1:7700", "")
    assert (config.max_batch, config.inbox_limit) == (50, 5000)
    assert (config.credit_window, config.max_frame_records) == (700, 100)
    assert config.linger == 0.002
    assert config.max_frame_bytes == 1 << 20
    assert (config.heartbeat_interval, config.heartbeat_timeout) == (1, 2.5)
    assert (config.egress_retention, config.map_size, config.max_map_size) == (10, 1 << 20, 2 << 20)
    assert config.sync_interval == 0


def test_a_single_string_is_a_one_item_list(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'functions = "app:functions"\n'))
    assert config.functions == ("app:functions",)


def test_peer_tables(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        state_dir = "/srv/state"
        [[peer]]
        endpoint = "tcp://10.0.0.1:7800"
        client_endpoint = "tcp://0.0.0.0:7700"
        [[peer]]
        endpoint = "tcp://10.0.0.2:7800"
        [[peer]]
        endpoint = "ipc:///run/mesh/peer-2.sock"
        client_endpoint = "ipc:///run/mesh/client-2.sock"
        """,
    )
    config = load_config(path)
    assert config.peers == 3
    assert config.endpoints == ("tcp://10.0.0.1:7800", "tcp://10.0.0.2:7800", "ipc:///run/mesh/peer-2.sock")
    assert config.client_endpoints == ("tcp://0.0.0.0:7700", "", "ipc:///run/mesh/client-2.sock")


def test_peer_tables_without_client_endpoints(tmp_path: Path) -> None:
    path = write(tmp_path, '[[peer]]\nendpoint = "tcp://a:1"\n[[peer]]\nendpoint = "tcp://b:1"\n')
    config = load_config(path)
    assert config.peers == 2 and config.client_endpoints == ()


def test_relative_state_dir_is_relative_to_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = write(conf_dir, 'state_dir = "data/state"\n')
    monkeypatch.chdir(elsewhere)
    assert load_config(path).state_dir == str(conf_dir / "data" / "state")
    # also when the file itself is named by a relative path
    assert load_config(os.path.relpath(path)).state_dir == str(conf_dir / "data" / "state")


def test_absolute_state_dir_is_kept(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, f'state_dir = "{tmp_path}/abs"\n')).state_dir == f"{tmp_path}/abs"


def test_overrides_win_and_none_overrides_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, 'state_dir = "s"\nmax_batch = 10\n')
    config = load_config(path, state_dir="/override", max_batch=None)
    assert config.state_dir == "/override"
    assert config.max_batch == 10


def test_path_like(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "peers = 1\n")).peers == 1


def test_write_config_round_trips(tmp_path: Path) -> None:
    from statefun_mesh.launcher import write_config

    config = MeshConfig(
        functions=("a:b",),
        state_dir=str(tmp_path / "st"),
        peers=2,
        endpoints=("ipc:///tmp/x-0", "ipc:///tmp/x-1"),
        client_endpoints=("tcp://127.0.0.1:1", ""),
        linger=0.5,
        heartbeat_timeout=9.0,
    )
    write_config(config, str(tmp_path / "out.toml"))
    assert load_config(tmp_path / "out.toml") == config


# -- bad files -----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    err = config_error(tmp_path / "nope.toml", None)
    assert "does not exist" in str(err)


def test_invalid_toml(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "peers = = 3\n"), None)
    assert "TOML" in str(err)
    assert "line 1" in str(err)  # tomllib says where


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "mesh.toml"
    path.write_bytes(b'state_dir = "\xff\xfe"\n')
    config_error(path, None)


def test_path_that_is_a_directory(tmp_path: Path) -> None:
    config_error(tmp_path, None)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "peers = 1\nmax_paralelism = 8\n"), "max_paralelism")
    assert err.key == "max_paralelism"
    assert "max_parallelism" in str(err)  # the known keys are listed


def test_unknown_table(tmp_path: Path) -> None:
    config_error(write(tmp_path, "[blobstore]\nurl = 'file:///x'\n"), "blobstore")


def test_private_field_is_not_a_setting(tmp_path: Path) -> None:
    config_error(write(tmp_path, '_source = "x"\n'), "_source")


def test_unknown_key_in_peer_table(tmp_path: Path) -> None:
    text = '[[peer]]\nendpoint = "tcp://a:1"\n[[peer]]\nendpoint = "tcp://b:1"\nport = 3\n'
    err = config_error(write(tmp_path, text), "peer[1].port")
    assert err.key == "peer[1].port"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('peers = "3"\n', "peers"),
        ("peers = 2.0\n", "peers"),
        ("peers = true\n", "peers"),
        ("peers = 0\n", "peers"),
        ("max_batch = -1\n", "max_batch"),
        ("max_batch = [1]\n", "max_batch"),
        ("inbox_limit = 1.5\n", "inbox_limit"),
        ("credit_window = {a = 1}\n", "credit_window"),
        ("max_parallelism = 0\n", "max_parallelism"),
        ("max_parallelism = 40000\n", "max_parallelism"),
        ('linger = "fast"\n', "linger"),
        ("linger = -0.1\n", "linger"),
        ("linger = true\n", "linger"),
        ("heartbeat_interval = [0.5]\n", "heartbeat_interval"),
        ('sync_interval = "1s"\n', "sync_interval"),
        ("state_dir = 5\n", "state_dir"),
        ('state_dir = ["a"]\n', "state_dir"),
        ("functions = 5\n", "functions"),
        ("functions = [1, 2]\n", "functions"),
        ('functions = ["no_colon"]\n', "functions"),
        ('functions = ["a:b:c"]\n', "functions"),
        ("endpoints = 7\n", "endpoints"),
        ("client_endpoints = [1]\n", "client_endpoints"),
        ("peer = 5\n", "peer"),
        ("peer = [1, 2]\n", "peer"),
        ("[[peer]]\nendpoint = 5\n", "peer[0].endpoint"),
        ('[[peer]]\nclient_endpoint = "tcp://a:1"\n', "peer[0].endpoint"),
        ('[[peer]]\nendpoint = "tcp://a:1"\nclient_endpoint = 1\n', "peer[0].client_endpoint"),
        ("max_frame_bytes = 1e6\n", "max_frame_bytes"),
    ],
)
def test_wrong_types_and_ranges(tmp_path: Path, text: str, key: str) -> None:
    config_error(write(tmp_path, text), key)


@pytest.mark.parametrize("key", ["linger", "heartbeat_interval", "heartbeat_timeout", "sync_interval"])
def test_nan_is_not_a_number_of_seconds(tmp_path: Path, key: str) -> None:
    # TOML has nan; asyncio.sleep(nan) / call_later(nan) would break the peer's timers.
    config_error(write(tmp_path, f"{key} = nan\n"), key)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('peers = 3\nendpoints = ["tcp://a:1", "tcp://b:1"]\n', "endpoints"),
        ('peers = 2\nendpoints = ["tcp://a:1", "tcp://b:1", "tcp://c:1"]\n', "endpoints"),
        ("peers = 2\n", "endpoints"),
        ('endpoints = ["tcp://a:1", "tcp://b:1"]\n', "endpoints"),  # peers defaults to 1
        ('peers = 2\nendpoints = ["tcp://a:1", "tcp://a:1"]\n', "endpoints"),
        ('peers = 2\nendpoints = ["tcp://a:1", "tcp://b:1"]\nclient_endpoints = ["tcp://c:1"]\n', "client_endpoints"),
        ('endpoints = ["tcp://a:1"]\n[[peer]]\nendpoint = "tcp://a:1"\n', "endpoints"),
    ],
)
def test_endpoint_count_must_match_peers(tmp_path: Path, text: str, key: str) -> None:
    config_error(write(tmp_path, text), key)


def test_peers_conflicting_with_peer_tables(tmp_path: Path) -> None:
    """``peers = 2`` beside three [[peer]] tables is a contradiction, not a silent 3."""
    text = 'peers = 2\n[[peer]]\nendpoint = "tcp://a:1"\n[[peer]]\nendpoint = "tcp://b:1"\n[[peer]]\nendpoint = "tcp://c:1"\n'
    config_error(write(tmp_path, text), "peers")


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ('peers = 2\nendpoints = ["tcp://a:1", "http://b:1"]\n', "endpoints", "http://b:1"),
        ('peers = 2\nendpoints = ["tcp://a:1", "127.0.0.1:9"]\n', "endpoints", "127.0.0.1:9"),
        ('[[peer]]\nendpoint = "tcp://a:1"\n[[peer]]\nendpoint = "udp://b:1"\n', "endpoint", "udp://b:1"),
        ('client_endpoints = ["memory://hub/0"]\n', "client_endpoints", "memory://hub/0"),
        ('[[peer]]\nendpoint = "tcp://a:1"\nclient_endpoint = "ws://x:1"\n', "client_endpoint", "ws://x:1"),
    ],
)
def test_bad_url_scheme(tmp_path: Path, text: str, key: str, value: str) -> None:
    err = config_error(write(tmp_path, text), key)
    assert value in str(err)


@pytest.mark.parametrize(
    "text",
    [
        "heartbeat_interval = 1.0\nheartbeat_timeout = 1.0\n",
        "heartbeat_interval = 2\nheartbeat_timeout = 1\n",
        "heartbeat_timeout = 0.5\n",  # below the default interval of 0.5
        "heartbeat_timeout = 0\n",
    ],
)
def test_heartbeat_timeout_must_exceed_interval(tmp_path: Path, text: str) -> None:
    err = config_error(write(tmp_path, text), "heartbeat_timeout")
    assert "heartbeat_interval" in str(err)


def test_bad_override_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "peers = 1\n"), max_batch=0)
    assert str(tmp_path / "mesh.toml") in str(info.value) and "max_batch" in str(info.value)


def test_local_recovery_is_a_bool_defaulting_to_true(tmp_path: Path) -> None:
    assert MeshConfig().local_recovery is True
    assert load_config(write(tmp_path, "local_recovery = false")).local_recovery is False
    with pytest.raises(ConfigError, match="local_recovery"):
        load_config(write(tmp_path, 'local_recovery = "no"'))
