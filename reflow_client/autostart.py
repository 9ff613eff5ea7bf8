"""Starting reflowd in the background when a client needs one and none answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from .client import Client, DaemonNotRunning
from .config import state_dir as default_state_dir


class DaemonStartError(RuntimeError):
    """reflowd was started but did not come up; the message carries the end of its log."""


def start_daemon(socket_path: Path, *, state_dir: Path | None = None, config: Path | None = None,
                 wait: float = 30.0) -> Path:
    """Launch ``reflowd`` detached (its log goes to ``<state_dir>/reflowd.log``); return the log path."""
    sd = state_dir or Path(os.environ.get("REFLOW_STATE_DIR") or default_state_dir())
    sd.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = sd / "reflowd.log"
    cmd = [sys.executable, "-m", "reflowd", "--socket", str(socket_path), "--state-dir", str(sd)]
    if config is not None:
        cmd += ["--config", str(config)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, env={**os.environ, "REFLOW_LOG_LEVEL":
                                                                             os.environ.get("REFLOW_LOG_LEVEL", "info")})
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with Client(socket_path, timeout=5) as client:
                client.ping()
            return log_path
        except DaemonNotRunning:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise DaemonStartError(f"reflowd did not start (see {log_path}):\n{tail}")


def connect(socket_path: Path, *, autostart: bool, state_dir: Path | None = None,
            config: Path | None = None) -> Client:
    """A connected Client, starting reflowd first if allowed and needed."""
    client = Client(socket_path)
    try:
        client.connect()
        return client
    except DaemonNotRunning:
        if not autostart:
            raise
    start_daemon(socket_path, state_dir=state_dir, config=config)
    client.connect()
    return client
