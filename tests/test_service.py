"""``reflowd service``: the units it writes pass systemd's own checker, and install/status/uninstall do what they say.

No user manager can run on the test machine (systemd is not PID 1), so the
commands sent to one are checked as a plan (``install_commands``) and through a
recording runner; everything else runs for real in a private HOME.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from reflowd import service
from reflowd.service import ServiceSpec, render_units

# Under CI (.ci/run installs Debian's systemd package) a missing tool fails instead of skipping.
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None and not (os.environ.get("CI") or os.environ.get("REFLOW_CI")),
                                   reason="systemd-analyze is missing (Debian package systemd)")


def private_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user with its own HOME and runtime dir, where no user manager answers."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REFLOW_", "XDG_", "DBUS_", "NOTIFY_", "LISTEN_", "WATCHDOG_", "JOURNAL_"))}
    env.update(HOME=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(runtime), **extra)
    return env


def reflowd(args: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reflowd", *args], env=env, capture_output=True, text=True, timeout=120)


def split_print(text: str) -> dict[str, str]:
    """Undo ``--print``: every unit starts at its ``# <name>`` line."""
    units: dict[str, str] = {}
    current = None
    for line in text.splitlines(keepends=True):
        if line.strip() in ("# reflowd.service", "# reflowd.socket"):
            current = line.strip()[2:]
            units[current] = ""
        elif current is not None:
            units[current] += line
    return {name: body.rstrip("\n") + "\n" for name, body in units.items()}


def analyze_verify(unit_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "--user", "verify", str(unit_dir / service.SERVICE), str(unit_dir / service.SOCKET)],
                          env=env, capture_output=True, text=True, timeout=120)


@needs_analyze
def test_printed_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    env = private_env(tmp_path)
    result = reflowd(["service", "install", "--print"], env)
    assert result.returncode == 0, result.stderr
    units = split_print(result.stdout)
    assert set(units) == {"reflowd.service", "reflowd.socket"}
    assert not (tmp_path / "home" / ".config" / "systemd").exists(), "--print installs nothing"
    service_text = units["reflowd.service"]
    assert f"ExecStart={os.path.abspath(sys.executable)} -m reflowd --socket %t/reflow/reflowd.sock " in service_text
    assert f"--state-dir {tmp_path}/home/.local/state/reflow " in service_text
    assert "Type=notify" in service_text and "WatchdogSec=" in service_text and "Restart=on-failure" in service_text
    assert "ListenStream=%t/reflow/reflowd.sock" in units["reflowd.socket"]
    out = tmp_path / "units"
    out.mkdir()
    for name, text in units.items():
        (out / name).write_text(text)
    checked = analyze_verify(out, env)
    assert checked.returncode == 0 and checked.stderr.strip() == "", checked.stderr  # warnings count as failures


@needs_analyze
def test_awkward_paths_are_quoted_for_systemd(tmp_path: Path) -> None:
    """Spaces, %, $, quotes and backslashes in paths reach reflowd literally (systemd would expand or split them)."""
    odd = tmp_path / "my state 100%$HOME \"q\" back\\slash"
    spec = ServiceSpec(python=os.path.abspath(sys.executable), socket=service.socket_for_unit(tmp_path / "s 1%.sock", None),
                       state_dir=str(odd), config=str(tmp_path / "c.toml"), path="/usr/bin:/bin:/opt/100%")
    out = tmp_path / "units"
    out.mkdir()
    for name, text in render_units(spec).items():
        (out / name).write_text(text)
    checked = analyze_verify(out, private_env(tmp_path))
    assert checked.returncode == 0 and checked.stderr.strip() == "", checked.stderr
    text = render_units(spec)["reflowd.service"]
    assert '"' + str(odd).replace("%", "%%").replace("$", "$$").replace("\\", "\\\\").replace('"', '\\"') + '"' in text
    assert 'Environment="PATH=/usr/bin:/bin:/opt/100%%"' in text
    assert f"ListenStream={tmp_path}/s 1%%.sock" in render_units(spec)["reflowd.socket"]


@needs_analyze
def test_systemd_analyze_catches_a_unit_whose_interpreter_is_gone(tmp_path: Path) -> None:
    """The check above can fail: a unit naming an interpreter that does not exist is refused."""
    spec = ServiceSpec(python=str(tmp_path / "gone" / "python"), socket="%t/reflow/reflowd.sock",
                       state_dir=str(tmp_path / "state"), config=str(tmp_path / "c.toml"))
    out = tmp_path / "units"
    out.mkdir()
    for name, text in render_units(spec).items():
        (out / name).write_text(text)
    checked = analyze_verify(out, private_env(tmp_path))
    assert checked.returncode != 0 and "gone/python" in checked.stderr


def test_socket_and_state_overrides_reach_the_units(tmp_path: Path) -> None:
    env = private_env(tmp_path, REFLOW_SOCKET=str(tmp_path / "runtime" / "custom" / "r.sock"),
                      REFLOW_STATE_DIR=str(tmp_path / "st"))
    units = split_print(reflowd(["service", "install", "--print"], env).stdout)
    assert "ListenStream=%t/custom/r.sock" in units["reflowd.socket"], "under XDG_RUNTIME_DIR it is written as %t"
    assert f"--state-dir {tmp_path}/st " in units["reflowd.service"]
    other = split_print(reflowd(["service", "install", "--print", "--socket", "/srv/r.sock"], env).stdout)
    assert "ListenStream=/srv/r.sock" in other["reflowd.socket"] and "--socket /srv/r.sock" in other["reflowd.service"]


def test_install_status_uninstall_without_a_user_manager(tmp_path: Path) -> None:
    env = private_env(tmp_path)
    unit_dir = tmp_path / "home" / ".config" / "systemd" / "user"
    printed = split_print(reflowd(["service", "install", "--print"], env).stdout)

    before = reflowd(["service", "status"], env)
    assert before.returncode == 3 and "not installed" in before.stdout

    result = reflowd(["service", "install"], env)
    assert result.returncode == 0, result.stderr
    assert {p.name: p.read_text() for p in unit_dir.iterdir()} == printed, "install writes exactly what --print shows"
    assert "no systemd user manager is running" in result.stdout
    assert "systemctl --user enable --now reflowd.socket" in result.stdout
    assert "lingering" in result.stdout and "journalctl --user -u reflowd" in result.stdout

    status = reflowd(["service", "status"], env)
    assert status.returncode == 0, status.stdout
    assert f"reflowd.service: installed at {unit_dir / 'reflowd.service'}" in status.stdout
    assert "daemon: not running" in status.stdout and "journalctl --user -u reflowd" in status.stdout

    # Another interpreter or state directory: status says the installed units are stale.
    stale = reflowd(["service", "status"], {**env, "REFLOW_STATE_DIR": str(tmp_path / "elsewhere")})
    assert "differs from what 'reflowd service install' writes now" in stale.stdout

    gone = reflowd(["service", "uninstall"], env)
    assert gone.returncode == 0 and not (unit_dir / "reflowd.service").exists() and not (unit_dir / "reflowd.socket").exists()
    assert "nothing to remove" in reflowd(["service", "uninstall"], env).stdout


class RecordingManager:
    """Answers as a running user manager would, and records what it was asked."""

    def __init__(self, active: str = "inactive") -> None:
        self.calls: list[list[str]] = []
        self.active = active

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append(argv)
        out = {"is-system-running": "running\n", "is-active": self.active + "\n", "is-enabled": "enabled\n"}.get(argv[2], "")
        if argv[0] == "loginctl":
            out = "Linger=no\n"
        return subprocess.CompletedProcess(argv, 0, out, "")


def test_install_with_a_user_manager_reloads_enables_and_starts_the_socket(tmp_path: Path) -> None:
    env = private_env(tmp_path)
    manager = RecordingManager(active="active")  # a service already runs: nothing to stop first
    lines: list[str] = []
    spec = ServiceSpec(python=sys.executable, socket="%t/reflow/reflowd.sock", state_dir=str(tmp_path / "st"),
                       config=str(tmp_path / "c.toml"))
    assert service.install(spec, out=lines.append, run=manager, env=env) == 0
    systemctl = [c for c in manager.calls if c[0] == "systemctl" and c[2] not in ("is-system-running", "is-active")]
    assert systemctl == service.install_commands() == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "reflowd.service"],
        ["systemctl", "--user", "enable", "--now", "reflowd.socket"],
    ]
    assert ["loginctl", "show-user", service.current_user(), "--property=Linger"] in manager.calls
    text = "\n".join(lines)
    assert "lingering is off" in text and f"loginctl enable-linger {service.current_user()}" in text
    assert "workstation" in text, "where daemons on login nodes are forbidden, the alternative is named"

    failing = RecordingManager(active="active")
    failing_run = lambda argv: (subprocess.CompletedProcess(list(argv), 1, "", "Failed to enable unit: Access denied")  # noqa: E731
                                if "enable" in argv else failing(argv))
    with pytest.raises(service.ServiceError, match="Access denied"):
        service.install(spec, out=lines.append, run=failing_run, env=env)


def test_linger_answers() -> None:
    assert service.parse_linger("Linger=yes\n") is True
    assert service.parse_linger("Linger=no\n") is False
    assert service.parse_linger("Failed to get user: User ID 1000 is not logged in or lingering\n") is None
    assert "keeps running after you log out" in service.linger_advice("alice", True)
    assert "ask your cluster's support" in service.linger_advice("alice", False)
    assert service.manager_running("degraded\n") and not service.manager_running("offline\n")


def test_unit_values_with_line_breaks_are_refused(tmp_path: Path) -> None:
    with pytest.raises(service.ServiceError, match="line break"):
        render_units(ServiceSpec(python=sys.executable, socket="%t/r.sock", state_dir="/a\nb", config="/c"))


def test_install_stops_a_daemon_running_outside_systemd_first(tmp_path: Path) -> None:
    """Its socket path and state lock would keep the socket-activated service from starting."""
    from .support import DaemonProcess

    d = DaemonProcess(tmp_path / "d").start()
    try:
        spec = ServiceSpec(python=sys.executable, socket=str(d.socket), state_dir=str(d.state_dir), config=str(d.config_path))
        lines: list[str] = []
        service.install(spec, out=lines.append, run=RecordingManager(active="inactive"), env=private_env(tmp_path))
        assert d.proc is not None and d.proc.wait(timeout=60) == 0
        assert any(f"stopped the reflowd (pid {d.proc.pid})" in line for line in lines)
    finally:
        d.stop()
