"""Starting reflowd in the background when a client needs one and none answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .client import Client, DaemonNotRunning
from .config import state_dir as default_state_dir


class DaemonStartError(RuntimeError):
    """reflowd was started but did not come up; the message says why and where its log is."""


@dataclass(frozen=True)
class StartedDaemon:
    pid: int
    log_path: Path
    socket_path: Path


def announce(started: StartedDaemon) -> None:
    """The default note when a client starts reflowd itself (stderr: stdout stays the command's output)."""
    try:
        print(f"reflow: started reflowd in the background (pid {started.pid}, log {started.log_path})",
              file=sys.stderr, flush=True)
    except OSError:
        pass


def _reason(log_path: Path, since: int) -> str:
    """The daemon's own one-line error from what it wrote to its log in this attempt."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(since)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("reflowd: error:"):
            return line[len("reflowd: error:"):].strip()
    return lines[-1][:300] if lines else ""


def start_daemon(socket_path: Path, *, state_dir: Path | None = None, config: Path | None = None,
                 wait: float = 30.0) -> StartedDaemon:
    """Launch ``reflowd`` detached (its log goes to ``<state_dir>/reflowd.log``) and wait until it answers."""
    sd = state_dir or Path(os.environ.get("REFLOW_STATE_DIR") or default_state_dir())
    try:
        sd.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise DaemonStartError(f"cannot start reflowd: cannot create its state directory {sd}: {exc.strerror}; "
                               "set $REFLOW_STATE_DIR to a writable directory") from None
    log_path = sd / "reflowd.log"
    cmd = [sys.executable, "-m", "reflowd", "--socket", str(socket_path), "--state-dir", str(sd)]
    if config is not None:
        cmd += ["--config", str(config)]
    since = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, env={**os.environ, "REFLOW_LOG_LEVEL":
                                                                             os.environ.get("REFLOW_LOG_LEVEL", "info")})
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with Client(socket_path, timeout=5) as client:
                client.ping()
            return StartedDaemon(proc.pid, log_path, socket_path)
        except DaemonNotRunning:
            pass
        if proc.poll() is not None:
            reason = _reason(log_path, since) or f"it exited with code {proc.returncode}"
            raise DaemonStartError(f"reflowd did not start: {reason} (its log: {log_path})")
        time.sleep(0.1)
    raise DaemonStartError(f"reflowd did not answer on {socket_path} within {wait:.0f} s (pid {proc.pid}, its log: "
                           f"{log_path}); see the log, or start it yourself with 'reflowd'")


def connect(socket_path: Path, *, autostart: bool, state_dir: Path | None = None, config: Path | None = None,
            on_start: Callable[[StartedDaemon], None] | None = announce) -> Client:
    """A connected Client, starting reflowd first if allowed and needed (*on_start* is told when it does)."""
    client = Client(socket_path)
    try:
        client.connect()
        return client
    except DaemonNotRunning:
        if not autostart:
            raise
    started = start_daemon(socket_path, state_dir=state_dir, config=config)
    if on_start is not None:
        on_start(started)
    client.connect()
    return client
