"""User configuration (``~/.config/reflow/config.toml``) and the XDG paths.

Precedence, highest first: ``REFLOW_*`` environment variables, the cluster's
own ``[clusters.NAME]`` table, the ``[defaults]`` table, built-in defaults.
The local machine is always available as cluster ``local``.

Example::

    [defaults]
    cluster = "hpc"            # where submit sends runs without --cluster
    account = "proj42"

    [clusters.hpc]
    scheduler = "slurm"
    host = "login.hpc.example.org"   # omit to run Slurm commands on this machine
    user = "alice"
    python = "/opt/conda/envs/sci/bin/python"
    workdir = "/scratch/alice/reflow"
    submit_options = { partition = "compute", qos = "normal" }
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import retry
from .pack import parse_pack

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

SCHEDULER_KINDS = ("local", "slurm", "pbs", "lsf", "sge", "flux")

#: Keys a ``[clusters.NAME]`` table may hold.
CLUSTER_KEYS = frozenset(
    {
        "scheduler",
        "host",
        "port",
        "user",
        "identity_file",
        "known_hosts",
        "proxy_jump",
        "python",
        "workdir",
        "submit_options",
        "partition",
        "account",
        "qos",
        "max_workers",
        "poll_interval",
        "min_poll_interval",
        "max_poll_interval",
        "max_calls_per_minute",
        "command_timeout",
        "max_channels",
        "keepalive_interval",
        "lost_grace",
        "env",
        "parallel_environment",
        "memory_resource",
        "retry_policy",
        "max_queued",
        "pack",
        "slurm_dependencies",
    }
)

#: Keys that only mean something to some schedulers (set elsewhere they are a mistake).
SCHEDULER_ONLY_KEYS = {
    "parallel_environment": ("sge",),  # Grid Engine's -pe name for cpus > 1 (qconf -spl)
    "memory_resource": ("sge",),  # Grid Engine's complex for mem=: h_vmem, mem_free, a site's own, or none
}

#: Environment variables that override every cluster's setting of the same name.
ENV_OVERRIDES = {
    "REFLOW_PARTITION": "partition",
    "REFLOW_ACCOUNT": "account",
    "REFLOW_QOS": "qos",
    "REFLOW_PYTHON": "python",
}


class ConfigError(ValueError):
    """The configuration file is malformed; the message names file and key."""


def _home() -> Path:
    return Path(os.path.expanduser("~"))


def config_path() -> Path:
    env = os.environ.get("REFLOW_CONFIG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(_home() / ".config")
    return Path(base) / "reflow" / "config.toml"


def state_dir() -> Path:
    env = os.environ.get("REFLOW_STATE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(_home() / ".local" / "state")
    return Path(base) / "reflow"


def socket_path() -> Path:
    env = os.environ.get("REFLOW_SOCKET")
    if env:
        return Path(env).expanduser()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "reflow" / "reflowd.sock"
    return Path(f"/tmp/reflow-{os.getuid()}") / "reflowd.sock"


@dataclass
class ClusterConfig:
    """One place jobs can run."""

    name: str
    scheduler: str = "local"
    host: str | None = None
    port: int = 22
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    proxy_jump: str | None = None
    python: str | None = None
    workdir: str | None = None
    submit_options: dict[str, Any] = field(default_factory=dict)
    max_workers: int | None = None
    poll_interval: float = 10.0
    min_poll_interval: float = 1.0
    max_poll_interval: float = 60.0
    max_calls_per_minute: float = 12.0
    command_timeout: float = 30.0
    max_channels: int = 8
    keepalive_interval: float = 15.0
    lost_grace: float = 60.0
    env: dict[str, str] = field(default_factory=dict)
    parallel_environment: str | None = None
    memory_resource: str = "h_vmem"
    #: Which failure causes are retried and how (``reflow_client/retry.py``); a task's own keys win.
    retry_policy: dict[str, Any] = field(default_factory=dict)
    #: Most elements this daemon keeps in the cluster's queue (a site limit published only in its docs).
    max_queued: int | None = None
    #: Default packing of array elements into jobs (``reflow_client.pack``): "auto" when unset.
    pack: int | str | bool | None = None
    #: Slurm only: submit a downstream job early, waiting in the queue on its upstream (``afterok``).
    slurm_dependencies: bool = False

    @property
    def remote(self) -> bool:
        return bool(self.host)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class Config:
    """The parsed configuration file plus environment overrides."""

    path: Path | None = None
    default_cluster: str = "local"
    clusters: dict[str, ClusterConfig] = field(default_factory=dict)
    socket: Path = field(default_factory=socket_path)
    state_dir: Path = field(default_factory=state_dir)

    def cluster(self, name: str | None) -> ClusterConfig:
        name = name or self.default_cluster
        if name not in self.clusters:
            known = ", ".join(sorted(self.clusters)) or "none"
            raise ConfigError(
                f"unknown cluster {name!r} (configured: {known}); add [clusters.{name}] to {self.path or config_path()}"
            )
        return self.clusters[name]


_NUM_KEYS = {
    "port": int,
    "max_queued": int,
    "max_workers": int,
    "max_channels": int,
    "poll_interval": float,
    "min_poll_interval": float,
    "max_poll_interval": float,
    "max_calls_per_minute": float,
    "command_timeout": float,
    "keepalive_interval": float,
    "lost_grace": float,
}


def _cluster_from(name: str, table: dict[str, Any], defaults: dict[str, Any], where: str) -> ClusterConfig:
    merged: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for source in (defaults, table):
        for key, value in source.items():
            if key == "cluster":
                continue
            if key not in CLUSTER_KEYS:
                close = difflib.get_close_matches(key, sorted(CLUSTER_KEYS), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(CLUSTER_KEYS))}"
                raise ConfigError(f"{where}: unknown key {key!r} ({hint})")
            if key == "submit_options":
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}.submit_options: expected a table like {{ partition = \"debug\" }}")
                options.update(value)
            else:
                merged[key] = value
    for env_name, key in ENV_OVERRIDES.items():
        if os.environ.get(env_name):
            merged[key] = os.environ[env_name]
    # partition/account/qos are shorthands for submit options.
    for key in ("partition", "account", "qos"):
        value = merged.pop(key, None)
        if value:
            options[key] = value
    scheduler = merged.get("scheduler", "local" if name == "local" else None)
    if scheduler not in SCHEDULER_KINDS:
        raise ConfigError(
            f"{where}.scheduler: {scheduler!r} is not one of {', '.join(SCHEDULER_KINDS)}"
            if scheduler
            else f"{where}: missing 'scheduler' (one of {', '.join(SCHEDULER_KINDS)})"
        )
    merged["scheduler"] = scheduler
    for key, kind in _NUM_KEYS.items():
        if key in merged and merged[key] is not None:
            try:
                merged[key] = kind(merged[key])
            except (TypeError, ValueError, OverflowError):
                raise ConfigError(f"{where}.{key}: expected a number, got {merged[key]!r}") from None
            if not math.isfinite(merged[key]) or merged[key] <= 0:
                raise ConfigError(f"{where}.{key}: expected a positive number, got {merged[key]!r}")
    env = merged.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ConfigError(f"{where}.env: expected a table of strings")
    try:
        merged["retry_policy"] = retry.check(merged.get("retry_policy"), f"{where}.retry_policy")
    except retry.RetryPolicyError as exc:
        raise ConfigError(str(exc)) from None
    _check_remote(merged, where)
    _check_scheduler_keys(merged, table, where)
    if "slurm_dependencies" in merged and not isinstance(merged["slurm_dependencies"], bool):
        raise ConfigError(f"{where}.slurm_dependencies: expected true or false, got {merged['slurm_dependencies']!r}")
    if merged.get("pack") is not None:
        try:
            parse_pack(merged["pack"], f"{where}.pack")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return ClusterConfig(name=name, submit_options=options, **merged)


def _check_scheduler_keys(merged: dict[str, Any], table: dict[str, Any], where: str) -> None:
    """Scheduler-specific keys: a name each, and (when the cluster's own table sets one) the right scheduler.

    Set under [defaults] they apply to the clusters that use them and are dropped elsewhere.
    """
    for key, kinds in SCHEDULER_ONLY_KEYS.items():
        if merged.get(key) is None:
            continue
        if merged["scheduler"] not in kinds:
            if key in table:
                raise ConfigError(f"{where}.{key}: only applies to scheduler {' or '.join(repr(k) for k in kinds)}, "
                                  f"not {merged['scheduler']!r}; remove it")
            del merged[key]
            continue
        value = merged[key]
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
            raise ConfigError(f"{where}.{key}: expected a name like \"smp\" or \"h_vmem\", got {value!r}")


_SSH_ONLY = ("port", "user", "identity_file", "known_hosts", "proxy_jump")


def _check_remote(merged: dict[str, Any], where: str) -> None:
    """SSH settings make sense only with a host, and must be well-formed before the daemon uses them."""
    for key in ("host", *_SSH_ONLY[1:], "workdir", "python"):
        if key in merged and merged[key] is not None and not isinstance(merged[key], str):
            raise ConfigError(f"{where}.{key}: expected a string, got {merged[key]!r}")
    if not merged.get("host"):
        stray = [k for k in _SSH_ONLY if merged.get(k) is not None]
        if stray:
            raise ConfigError(f"{where}: {', '.join(stray)} only apply to a cluster reached over SSH; "
                              "set 'host' (the login node) or remove them")
        return
    port = merged.get("port", 22)
    if not 0 < port < 65536:
        raise ConfigError(f"{where}.port: {port} is not a TCP port (1-65535)")
    if merged.get("max_channels") is not None and merged["max_channels"] < 2:
        raise ConfigError(f"{where}.max_channels: at least 2 (one SFTP session and one command); "
                          "keep it below the server's MaxSessions (OpenSSH's default is 10)")
    if merged.get("scheduler") == "local":
        raise ConfigError(f"{where}: scheduler 'local' runs on this machine; a cluster with a 'host' needs a batch "
                          "scheduler such as 'slurm'")


def parse_config(data: dict[str, Any], path: Path | None = None) -> Config:
    """Build a Config from parsed TOML (pure apart from reading REFLOW_* variables)."""
    where = str(path) if path else "config"
    unknown = set(data) - {"defaults", "clusters", "daemon"}
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(sorted(unknown))} (known: defaults, clusters, daemon)")
    for section in ("defaults", "daemon"):
        if not isinstance(data.get(section, {}), dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
    defaults = dict(data.get("defaults", {}))
    clusters_table = data.get("clusters", {})
    if not isinstance(clusters_table, dict):
        raise ConfigError(f"{where}: [clusters] must be a table of [clusters.NAME] tables")
    clusters: dict[str, ClusterConfig] = {}
    for name, table in clusters_table.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: clusters.{name} must be a table")
        clusters[name] = _cluster_from(name, table, defaults, f"{where}: clusters.{name}")
    if "local" not in clusters:
        local_defaults = {k: v for k, v in defaults.items() if k in ("python", "max_workers", "env", "pack")}
        clusters["local"] = _cluster_from("local", {"scheduler": "local"}, local_defaults, f"{where}: clusters.local")
    default_cluster = os.environ.get("REFLOW_CLUSTER") or defaults.get("cluster") or "local"
    if default_cluster not in clusters:
        raise ConfigError(f"{where}: default cluster {default_cluster!r} is not defined under [clusters]")
    daemon = data.get("daemon", {})
    for key in ("socket", "state_dir"):
        value = daemon.get(key)
        if value is not None and (not isinstance(value, str) or not value or "\0" in value):
            raise ConfigError(f"{where}: daemon.{key}: expected a path, got {value!r}")
    socket = Path(os.environ["REFLOW_SOCKET"]) if os.environ.get("REFLOW_SOCKET") else (
        Path(daemon["socket"]).expanduser() if daemon.get("socket") else socket_path()
    )
    state = Path(os.environ["REFLOW_STATE_DIR"]) if os.environ.get("REFLOW_STATE_DIR") else (
        Path(daemon["state_dir"]).expanduser() if daemon.get("state_dir") else state_dir()
    )
    return Config(path=path, default_cluster=default_cluster, clusters=clusters, socket=socket, state_dir=state)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the configuration file (absent file: built-in defaults, local cluster only)."""
    file = Path(path) if path else config_path()
    data = read_toml(file)
    return parse_config(data or {}, file if data is not None else None)


#: Largest configuration file read (a real one is a few kilobytes).
MAX_CONFIG_BYTES = 1024 * 1024


def read_toml(file: Path) -> dict[str, Any] | None:
    """The parsed file, None if there is none; ConfigError (one line: file, problem, fix) for anything else."""
    try:
        with open(file, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ConfigError(f"{file}: is a directory, not a configuration file; point REFLOW_CONFIG or --config "
                          "at a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot be read ({exc.strerror or exc}); check its permissions") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{file}: larger than {MAX_CONFIG_BYTES // 1024} KiB; is this really the configuration file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{file}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
                          "save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{file}: nested too deeply to be a reflow configuration") from None
