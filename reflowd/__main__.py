"""``reflowd``: the per-user workflow daemon (runs in the foreground)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import anyio

from reflow_client.config import ConfigError, load_config

from . import systemd
from .daemon import VERSION, Daemon, DaemonError, DaemonOptions
from .engine.engine import EngineSettings
from .logging import configure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reflowd",
        description="The reflow daemon: holds your workflows' DAGs, submits ready tasks, polls the schedulers and "
        "serves reflow clients on a Unix socket. Runs in the foreground; jobs survive restarts.",
        epilog="'reflowd service install [--print] | uninstall | status' runs it as a systemd user service.",
    )
    parser.add_argument("--socket", type=Path, help="socket path (default: $REFLOW_SOCKET or "
                                                    "$XDG_RUNTIME_DIR/reflow/reflowd.sock)")
    parser.add_argument("--state-dir", type=Path, help="where the database and lock live (default: "
                                                       "$REFLOW_STATE_DIR or ~/.local/state/reflow)")
    parser.add_argument("--config", type=Path, help="configuration file (default: $REFLOW_CONFIG or "
                                                    "~/.config/reflow/config.toml)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        default=os.environ.get("REFLOW_LOG_LEVEL", "info"))
    parser.add_argument("--log-format", choices=["auto", "json", "console", "journal"], default="auto",
                        help="json lines, console text, journal (<N>-prefixed lines for journald), or auto "
                             "(journal under systemd, else json unless stderr is a terminal)")
    parser.add_argument("--retry-backoff", type=float, default=5.0,
                        help="seconds before the first automatic retry of a task with retries=N (doubles each time)")
    parser.add_argument("--version", action="version", version=f"reflowd {VERSION}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["service"]:  # reflowd service install|uninstall|status: reflowd/service.py
        from .service import main as service_main
        return service_main(argv[1:])
    args = build_parser().parse_args(argv)
    configure(args.log_level, json=None if args.log_format in ("auto", "journal") else args.log_format == "json",
              journal=True if args.log_format == "journal" else None)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"reflowd: {exc}", file=sys.stderr)
        return 2
    try:
        systemd.activation_socket()  # refuse a wrongly passed socket before anything starts
    except systemd.ActivationError as exc:
        print(f"reflowd: {exc}", file=sys.stderr)
        return 2
    faults = frozenset(p for p in os.environ.get("REFLOW_FAULT_POINTS", "").split(",") if p)
    options = DaemonOptions(
        socket_path=(args.socket or config.socket).expanduser().absolute(),
        state_dir=(args.state_dir or config.state_dir).expanduser().absolute(),
        config=config,
        settings=EngineSettings(retry_backoff=args.retry_backoff, fault_points=faults),
    )
    try:
        return anyio.run(Daemon(options).run)
    except DaemonError as exc:
        print(f"reflowd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
