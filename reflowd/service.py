"""``reflowd service install|uninstall|status``: reflowd as a systemd user service.

The unit files are rendered by pure functions from a :class:`ServiceSpec` (the
interpreter that runs this command, the user's socket, state directory,
configuration file and ``PATH``), so ``--print`` and ``install`` write the same
text (the repository keeps no unit files of its own that could drift). The thin layer below
them writes files and runs ``systemctl --user`` / ``loginctl`` with timeouts.
"""

from __future__ import annotations

import argparse
import os
import pwd
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reflow_client.config import ConfigError, config_path, load_config, socket_path

SERVICE = "reflowd.service"
SOCKET = "reflowd.socket"
UNITS = (SERVICE, SOCKET)
DEFAULT_SOCKET = "%t/reflow/reflowd.sock"  # $XDG_RUNTIME_DIR/reflow/reflowd.sock, as clients compute it
LOGS_HINT = "journalctl --user -u reflowd"
COMMAND_TIMEOUT = 30.0


class ServiceError(RuntimeError):
    """The service cannot be installed or inspected; the message says why and what to do."""


@dataclass(frozen=True)
class ServiceSpec:
    """Everything the two unit files depend on."""

    python: str                 # absolute path of the interpreter that has reflowd installed (not resolved: venvs are symlinks)
    socket: str                 # in systemd's syntax: "%t/reflow/reflowd.sock" or an absolute path
    state_dir: str
    config: str
    path: str | None = None     # PATH for the daemon, so it finds sbatch & co. as the user's shell does
    watchdog_sec: int = 60


# ---------------------------------------------------------------- rendering (pure)

def _check_line(value: str, what: str) -> str:
    if "\n" in value or "\r" in value:
        raise ServiceError(f"{what} {value!r} contains a line break, which a unit file cannot hold; pick another path")
    return value


def specifier_escape(value: str) -> str:
    """Escape systemd's ``%`` specifiers."""
    return value.replace("%", "%%")


def exec_quote(arg: str, *, keep_specifiers: bool = False) -> str:
    """Quote one ``ExecStart=`` word: specifiers, ``$`` expansion, whitespace and quotes are made literal."""
    _check_line(arg, "command argument")
    text = arg if keep_specifiers else specifier_escape(arg)
    text = text.replace("$", "$$")
    if not text or any(c in text for c in " \t\"'\\;"):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def env_assignment(name: str, value: str) -> str:
    """One ``Environment=`` value, quoted as systemd.exec(5) describes."""
    _check_line(value, name)
    text = specifier_escape(f"{name}={value}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def socket_for_unit(socket: Path, runtime_dir: str | None) -> str:
    """The socket path in unit syntax: under ``$XDG_RUNTIME_DIR`` it becomes ``%t/...``, which the user manager knows."""
    _check_line(str(socket), "socket path")
    if runtime_dir:
        try:
            rel = socket.relative_to(runtime_dir)
        except ValueError:
            pass
        else:
            return "%t/" + specifier_escape(rel.as_posix())
    if not socket.is_absolute():
        raise ServiceError(f"socket path {socket} is not absolute; pass --socket with an absolute path")
    return specifier_escape(str(socket))


def render_service(spec: ServiceSpec) -> str:
    """``reflowd.service``: Type=notify, watchdog, restart on failure, local jobs outlive restarts."""
    argv = [exec_quote(spec.python), "-m", "reflowd",
            "--socket", exec_quote(spec.socket, keep_specifiers=True),
            "--state-dir", exec_quote(spec.state_dir),
            "--config", exec_quote(spec.config)]
    env = [env_assignment("PYTHONUNBUFFERED", "1")]
    if spec.path:
        env.append(env_assignment("PATH", spec.path))
    lines = [
        "# Written by 'reflowd service install'; run it again rather than editing this file.",
        "# READY=1 is sent after unfinished runs are recovered, WATCHDOG=1 from the event loop,",
        "# STOPPING=1 on shutdown. Restart=on-failure restarts a crashed or hung (watchdog) daemon,",
        "# not one stopped on purpose ('reflow-client shutdown', exit 0): the socket starts it again",
        "# on the next client connection. KillMode=process: local jobs survive a restart, as batch jobs do.",
        "[Unit]",
        "Description=reflow workflow daemon",
        f"Requires={SOCKET}",
        f"After={SOCKET}",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=" + " ".join(argv),
        *[f"Environment={e}" for e in env],
        "SyslogIdentifier=reflowd",
        "Restart=on-failure",
        "RestartSec=5",
        f"WatchdogSec={spec.watchdog_sec}",
        "TimeoutStartSec=300",
        "TimeoutStopSec=60",
        "KillMode=process",
        "",
        "[Install]",
        "WantedBy=default.target",
    ]
    return "\n".join(lines) + "\n"


def render_socket(spec: ServiceSpec) -> str:
    """``reflowd.socket``: the first client connection starts reflowd; only the user may connect."""
    lines = [
        "# Written by 'reflowd service install'; run it again rather than editing this file.",
        "# The first client connection starts reflowd.service; the socket is private to the user.",
        "[Unit]",
        "Description=reflow workflow daemon socket",
        "",
        "[Socket]",
        f"ListenStream={spec.socket}",
        "SocketMode=0600",
        "DirectoryMode=0700",
        "",
        "[Install]",
        "WantedBy=sockets.target",
    ]
    return "\n".join(lines) + "\n"


def render_units(spec: ServiceSpec) -> dict[str, str]:
    return {SERVICE: render_service(spec), SOCKET: render_socket(spec)}


def render_print(units: Mapping[str, str]) -> str:
    """What ``--print`` writes: each unit introduced by ``# <file name>``."""
    return "\n".join(f"# {name}\n{text}" for name, text in units.items())


def parse_linger(text: str) -> bool | None:
    """``loginctl show-user USER --property=Linger`` output -> True/False, None if it says neither."""
    for line in text.splitlines():
        key, _, value = line.strip().partition("=")
        if key == "Linger":
            return {"yes": True, "no": False}.get(value.strip())
    return None


def linger_advice(user: str, linger: bool | None) -> str:
    """What lingering means for reflowd, and how to turn it on."""
    if linger:
        return (f"lingering is on for {user}: your user manager, and reflowd with it, keeps running after you log out "
                "and starts at boot.")
    head = ("lingering is off" if linger is False else "could not tell whether lingering is on") + f" for {user}"
    return (
        f"{head}: systemd stops your user manager, and reflowd with it, when your last session ends. Runs then pause "
        "(jobs already on the cluster keep running and are picked up later) until you log in again. To keep reflowd "
        f"running:\n    loginctl enable-linger {user}\nWhere that is refused, only an administrator can enable it: ask "
        "your cluster's support. If your site does not allow daemons on login nodes, run reflowd on a workstation "
        "that reaches the cluster over SSH instead (see 'Running the service' in the documentation)."
    )


def manager_running(is_system_running: str) -> bool:
    """Whether ``systemctl --user is-system-running`` output means a user manager answers."""
    return is_system_running.strip() in {"running", "degraded", "starting", "initializing", "maintenance", "stopping"}


def install_commands() -> list[list[str]]:
    """What install asks the user manager to do, in order."""
    return [
        ["systemctl", "--user", "daemon-reload"],
        # Enabled service: after a reboot (with lingering) unfinished runs continue without waiting for a client.
        ["systemctl", "--user", "enable", SERVICE],
        ["systemctl", "--user", "enable", "--now", SOCKET],
    ]


def uninstall_commands() -> list[list[str]]:
    return [["systemctl", "--user", "disable", "--now", SOCKET, SERVICE]]


# ---------------------------------------------------------------- environment and I/O

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a systemd tool with a timeout; a missing tool is an exit status 127 result, not an exception."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]}: not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), 124, "", f"{' '.join(argv)}: no answer within {COMMAND_TIMEOUT:.0f} s")


def unit_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/systemd/user``, where a user's own units live."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or os.path.expanduser("~")) / ".config")
    return Path(base) / "systemd" / "user"


def current_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or str(os.getuid())


def spec_from_environment(socket: Path | None = None, state_dir: Path | None = None, config: Path | None = None,
                          env: Mapping[str, str] | None = None) -> ServiceSpec:
    """The spec for the user running this command, with the interpreter running it."""
    env = os.environ if env is None else env
    config_file = (config or config_path()).expanduser().absolute()
    try:
        cfg = load_config(config_file)
    except ConfigError as exc:
        raise ServiceError(f"{exc}; fix the configuration before installing the service") from None
    python = os.path.abspath(sys.executable)  # not resolve(): a venv's python is a symlink to the system one
    if socket is None and not env.get("REFLOW_SOCKET") and cfg.socket == socket_path():
        unit_socket = DEFAULT_SOCKET  # the default, even from a shell without XDG_RUNTIME_DIR (su, some ssh setups)
    else:
        unit_socket = socket_for_unit((socket or cfg.socket).expanduser().absolute(), env.get("XDG_RUNTIME_DIR"))
    return ServiceSpec(
        python=_check_line(python, "interpreter path"),
        socket=unit_socket,
        state_dir=_check_line(str((state_dir or cfg.state_dir).expanduser().absolute()), "state directory"),
        config=_check_line(str(config_file), "configuration file"),
        path=env.get("PATH") or None,
    )


def user_manager_runs(run: Runner = run_command) -> bool:
    return manager_running(run(["systemctl", "--user", "is-system-running"]).stdout)


def check_linger(user: str, run: Runner = run_command) -> bool | None:
    result = run(["loginctl", "show-user", user, "--property=Linger"])
    linger = parse_linger(result.stdout) if result.returncode == 0 else None
    if linger is None and Path("/var/lib/systemd/linger").is_dir():
        linger = (Path("/var/lib/systemd/linger") / user).exists()  # logind's own record, readable without a bus
    return linger


def _daemon_info(socket: Path) -> dict[str, object] | None:
    from reflow_client.client import Client, DaemonNotRunning, ReflowError

    try:
        with Client(socket, timeout=5) as client:
            return dict(client.hello())
    except (DaemonNotRunning, ReflowError, OSError, ValueError):
        return None


def _stop_unmanaged_daemon(socket: Path, out: Callable[[str], None]) -> None:
    """A reflowd started outside systemd holds the socket path and the state lock; ask it to stop (jobs keep running)."""
    from reflow_client.client import Client, DaemonNotRunning, ReflowError

    info = _daemon_info(socket)
    if info is None:
        return
    try:
        with Client(socket, timeout=10) as client:
            client.shutdown()
    except (DaemonNotRunning, ReflowError, OSError):
        pass
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and socket.exists() and _daemon_info(socket) is not None:
        time.sleep(0.2)
    if socket.exists() and _daemon_info(socket) is not None:
        raise ServiceError(f"the reflowd (pid {info.get('pid')}) running outside systemd did not stop within 60 s; "
                           "stop it ('reflow-client shutdown', or kill it: jobs keep running) and install again")
    out(f"stopped the reflowd (pid {info.get('pid')}) that ran outside systemd; jobs keep running and the "
        "service picks them up")


def _wrap(text: str) -> str:
    """Wrap prose for a terminal; indented lines (commands) stay whole."""
    return "\n".join(line if line.startswith(" ") else
                     textwrap.fill(line, width=100, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)
                     for line in text.splitlines())


def _socket_path(spec: ServiceSpec, env: Mapping[str, str]) -> Path:
    if spec.socket.startswith("%t/"):
        runtime = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"  # what the user manager's %t is
        return Path(runtime) / spec.socket[3:].replace("%%", "%")
    return Path(spec.socket.replace("%%", "%"))


def install(spec: ServiceSpec, *, out: Callable[[str], None] = print, run: Runner = run_command,
            env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    target = unit_dir(env)
    target.mkdir(parents=True, exist_ok=True)
    for name, text in render_units(spec).items():
        tmp = target / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(target / name)
        out(f"wrote {target / name}")
    out(f"reflowd runs as: {spec.python} -m reflowd (socket {spec.socket}, state {spec.state_dir})")
    if not user_manager_runs(run):
        out("no systemd user manager is running for you here, so nothing was started. Where one runs, enable the "
            "socket with:\n  systemctl --user daemon-reload && systemctl --user enable reflowd.service && "
            "systemctl --user enable --now reflowd.socket")
    else:
        if run(["systemctl", "--user", "is-active", SERVICE]).stdout.strip() != "active":
            _stop_unmanaged_daemon(_socket_path(spec, env), out)
        for argv in install_commands():
            result = run(argv)
            if result.returncode != 0:
                raise ServiceError(f"'{' '.join(argv)}' failed: {(result.stderr or result.stdout).strip()}; "
                                   f"see '{LOGS_HINT}'")
        out("enabled reflowd.service and started reflowd.socket: the first client connection starts reflowd")
    out(_wrap("linger: " + linger_advice(current_user(), check_linger(current_user(), run))))
    out(f"logs: {LOGS_HINT}")
    return 0


def uninstall(*, out: Callable[[str], None] = print, run: Runner = run_command, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    target = unit_dir(env)
    manager = user_manager_runs(run)
    if manager:
        for argv in uninstall_commands():
            run(argv)  # units that were never enabled make this fail harmlessly
    removed = 0
    for name in UNITS:
        try:
            (target / name).unlink()
            out(f"removed {target / name}")
            removed += 1
        except FileNotFoundError:
            pass
    if manager:
        run(["systemctl", "--user", "daemon-reload"])
    if not removed:
        out(f"no reflowd units in {target}; nothing to remove")
    else:
        out("jobs and runs are untouched; the daemon's state stays in its state directory")
    return 0


def status(spec: ServiceSpec, *, out: Callable[[str], None] = print, run: Runner = run_command,
           env: Mapping[str, str] | None = None) -> int:
    """Print whether the units are installed, enabled and active, and where the logs are; 0 when installed."""
    env = os.environ if env is None else env
    target = unit_dir(env)
    expected = render_units(spec)
    installed = True
    for name in UNITS:
        path = target / name
        if not path.exists():
            out(f"{name}: not installed ({path}); run 'reflowd service install'")
            installed = False
        elif path.read_text() != expected[name]:
            out(f"{name}: installed at {path}, but differs from what 'reflowd service install' writes now "
                "(another interpreter, socket or state directory?); run it again to update")
        else:
            out(f"{name}: installed at {path}")
    if user_manager_runs(run):
        for name in UNITS:
            enabled = run(["systemctl", "--user", "is-enabled", name]).stdout.strip() or "unknown"
            active = run(["systemctl", "--user", "is-active", name]).stdout.strip() or "unknown"
            out(f"{name}: {enabled}, {active}")
    else:
        out("systemd: no user manager is running for you here (units cannot be enabled or started from this session)")
    info = _daemon_info(_socket_path(spec, env))
    if info is None:
        out("daemon: not running (with the socket enabled, the first client connection starts it)")
    else:
        out(f"daemon: reflowd {info.get('version')} (pid {info.get('pid')}) answers on {info.get('socket')}")
    out(_wrap("linger: " + linger_advice(current_user(), check_linger(current_user(), run))))
    out(f"logs: {LOGS_HINT}")
    return 0 if installed else 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reflowd service",
        description="Run reflowd as a systemd user service (socket-activated, Type=notify, restarted on failure).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{install,uninstall,status}")
    inst = sub.add_parser("install", help="write reflowd.service and reflowd.socket and start the socket")
    inst.add_argument("--print", action="store_true", dest="print_only",
                      help="write both units to standard output instead of installing them")
    for p in (inst, sub.add_parser("status", help="installed? enabled? active? where are the logs?")):
        p.add_argument("--socket", type=Path, help="socket path (default: as reflowd)")
        p.add_argument("--state-dir", type=Path, help="state directory (default: as reflowd)")
        p.add_argument("--config", type=Path, help="configuration file (default: as reflowd)")
    sub.add_parser("uninstall", help="stop, disable and remove the units (runs and jobs are untouched)")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        if args.command == "uninstall":
            return uninstall()
        spec = spec_from_environment(args.socket, args.state_dir, args.config)
        if args.command == "status":
            return status(spec)
        if args.print_only:
            sys.stdout.write(render_print(render_units(spec)))
            return 0
        return install(spec)
    except (ServiceError, OSError) as exc:
        print(f"reflowd service: {exc}", file=sys.stderr)
        return 1
