"""The configuration file: clusters, defaults, environment overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from reflow_client.config import ConfigError, load_config, parse_config
from reflowd.clusters import build_cluster
from reflowd.transports.local import LocalTransport
from reflowd.transports.ssh import SSHTransport

HPC = {
    "scheduler": "slurm",
    "host": "login.hpc.example.org",
    "port": 2222,
    "user": "alice",
    "identity_file": "~/.ssh/id_hpc",
    "known_hosts": "~/.ssh/known_hosts_hpc",
    "proxy_jump": "alice@gw.example.org",
    "python": "/opt/env/bin/python",
    "workdir": "/scratch/alice",
    "partition": "compute",
    "submit_options": {"qos": "normal"},
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REFLOW_PARTITION", "REFLOW_ACCOUNT", "REFLOW_QOS", "REFLOW_PYTHON", "REFLOW_CLUSTER"):
        monkeypatch.delenv(name, raising=False)


def test_no_file_means_the_local_cluster(tmp_path: Path) -> None:
    config = load_config(tmp_path / "absent.toml")
    assert config.default_cluster == "local" and list(config.clusters) == ["local"]
    assert not config.cluster(None).remote


def test_remote_cluster_and_defaults() -> None:
    config = parse_config({"defaults": {"cluster": "hpc", "account": "proj42"}, "clusters": {"hpc": HPC}})
    hpc = config.cluster(None)
    assert hpc.remote and hpc.port == 2222 and hpc.user == "alice" and hpc.proxy_jump == "alice@gw.example.org"
    assert hpc.submit_options == {"qos": "normal", "partition": "compute", "account": "proj42"}
    assert "local" in config.clusters


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFLOW_PARTITION", "debug")
    monkeypatch.setenv("REFLOW_CLUSTER", "hpc")
    config = parse_config({"clusters": {"hpc": HPC}})
    assert config.default_cluster == "hpc" and config.cluster("hpc").submit_options["partition"] == "debug"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({**HPC, "hots": "x"}, "unknown key 'hots' (did you mean 'host'?)"),
        ({**HPC, "port": 70000}, "port: 70000 is not a TCP port"),
        ({**HPC, "port": "ssh"}, "port: expected a number"),
        ({**HPC, "max_channels": 1}, "max_channels: at least 2"),
        ({**HPC, "user": 5}, "user: expected a string"),
        ({"scheduler": "slurm", "identity_file": "~/.ssh/id"}, "identity_file only apply to a cluster reached over SSH"),
        ({**HPC, "scheduler": "local"}, "a cluster with a 'host' needs a batch scheduler"),
        ({**HPC, "scheduler": "condor"}, "'condor' is not one of"),
        ({k: v for k, v in HPC.items() if k != "scheduler"}, "missing 'scheduler'"),
    ],
)
def test_bad_cluster_tables_name_the_problem(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="clusters.hpc") as info:
        parse_config({"clusters": {"hpc": table}})
    assert message in str(info.value)


def test_unknown_default_cluster_and_cluster_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="default cluster 'nowhere' is not defined"):
        parse_config({"defaults": {"cluster": "nowhere"}})
    with pytest.raises(ConfigError, match=r"unknown cluster 'hcp' \(configured: hpc, local\)"):
        parse_config({"clusters": {"hpc": HPC}}).cluster("hcp")
    bad = tmp_path / "config.toml"
    bad.write_text("[clusters.hpc\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_build_cluster_picks_the_transport() -> None:
    config = parse_config({"clusters": {"hpc": HPC, "here": {"scheduler": "slurm"}}})
    remote = build_cluster(config.cluster("hpc"))
    assert isinstance(remote.transport, SSHTransport) and remote.transport.name == "ssh:alice@login.hpc.example.org:2222"
    assert remote.python_for("/usr/bin/python3") == "/opt/env/bin/python"
    assert isinstance(build_cluster(config.cluster("here")).transport, LocalTransport)
    broken = parse_config({"clusters": {"hpc": {**HPC, "proxy_jump": "gw:http"}}})
    with pytest.raises(ConfigError, match="cluster 'hpc': proxy_jump 'gw:http': 'http' is not a port number"):
        build_cluster(broken.cluster("hpc"))


# ---------------------------------------------------------------------- files that are not configuration (issue #8)


def _config_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "config.toml"
    if kind == "not utf-8":
        path.write_bytes(b'[defaults]\ncluster = "caf\xe9"\n')  # Latin-1, as an old editor saves it
    elif kind == "nested 5000 deep (arrays)":
        path.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    elif kind == "nested 5000 deep (tables)":
        path.write_text("a = " + "{ b = " * 5000 + "1" + " }" * 5000 + "\n")
    elif kind == "a directory":
        path.mkdir()
    elif kind == "huge":
        path.write_text("# " + "x" * (2 * 1024 * 1024) + "\n")
    elif kind == "section not a table":
        path.write_text('defaults = "hpc"\n')
    elif kind == "nan poll interval":
        path.write_text('[clusters.local]\nscheduler = "local"\npoll_interval = nan\n')
    elif kind == "NUL in socket path":
        path.write_text('[daemon]\nsocket = "/tmp/a\\u0000b"\n')
    return path


CONFIG_CASES = {
    "not utf-8": "not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8",
    "nested 5000 deep (arrays)": "nested too deeply",
    "nested 5000 deep (tables)": "nested too deeply",
    "a directory": "is a directory, not a configuration file",
    "huge": "larger than 1024 KiB",
    "section not a table": "[defaults] must be a table",
    "nan poll interval": "poll_interval: expected a positive number, got nan",
    "NUL in socket path": "daemon.socket: expected a path",
}


@pytest.mark.parametrize("kind", list(CONFIG_CASES))
def test_a_file_that_is_not_a_configuration_gives_one_clear_line(tmp_path: Path, kind: str) -> None:
    path = _config_file(tmp_path, kind)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)) and CONFIG_CASES[kind] in message, message
    assert "\n" not in message


@pytest.mark.parametrize("kind", ["not utf-8", "nested 5000 deep (arrays)", "a directory"])
def test_reflowd_says_so_in_one_line(tmp_path: Path, kind: str) -> None:
    import os
    import subprocess
    import sys

    path = _config_file(tmp_path, kind)
    env = {**os.environ, "REFLOW_CONFIG": str(path), "REFLOW_STATE_DIR": str(tmp_path / "state"),
           "REFLOW_SOCKET": str(tmp_path / "run" / "s.sock")}
    result = subprocess.run([sys.executable, "-m", "reflowd"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and CONFIG_CASES[kind] in lines[0], result.stderr
