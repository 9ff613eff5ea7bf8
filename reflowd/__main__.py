"""``reflowd``: the per-user workflow daemon (runs in the foreground).

Start-up problems a user can fix (a socket path that is too long or not
writable, a socket another reflowd already serves, a bad configuration file)
are one line ``reflowd: error: ...`` with the fix and a documented exit code;
``--debug`` (or ``REFLOW_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path

from reflow_client import cli_errors
from reflow_client.cli_errors import CliError
from reflow_client.cli_parser import Parser
from reflow_client.config import ConfigError, config_path, load_config, socket_path, state_dir

from .daemon import VERSION, Daemon, DaemonError, DaemonOptions, tune_interpreter

PROG = "reflowd"
#: sun_path holds 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107

EXIT_CODES = ("Exit codes: 0 stopped cleanly; 1 cannot run (another reflowd holds the state directory or the socket); "
              "2 bad flags, configuration or socket path; 70 internal error (use --debug).")


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="The reflow daemon: holds your workflows' DAGs, submits ready tasks, polls the schedulers and "
        "serves reflow clients on a Unix socket. Runs in the foreground; jobs survive restarts.",
        epilog=f"In force here: socket {socket_path()}, state {state_dir()}, configuration {config_path()}. "
        "'reflowd service install [--print] | uninstall | status' runs it as a systemd user service. " + EXIT_CODES,
    )
    parser.add_argument("--socket", type=Path, metavar="PATH",
                        help=f"socket path (default here: {socket_path()}, from $REFLOW_SOCKET or "
                             "$XDG_RUNTIME_DIR/reflow/reflowd.sock)")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help=f"where the database and lock live (default here: {state_dir()}, from "
                             "$REFLOW_STATE_DIR or $XDG_STATE_HOME/reflow)")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help=f"configuration file (default here: {config_path()}, from $REFLOW_CONFIG or "
                             "$XDG_CONFIG_HOME/reflow/config.toml)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        default=os.environ.get("REFLOW_LOG_LEVEL", "info"), help="default: info ($REFLOW_LOG_LEVEL)")
    parser.add_argument("--log-format", choices=["auto", "json", "console", "journal"], default="auto",
                        help="json lines, console text, journal (<N>-prefixed lines for journald), or auto "
                             "(journal under systemd, else json unless stderr is a terminal)")
    parser.add_argument("--retry-backoff", type=float, default=5.0, metavar="SECONDS",
                        help="seconds before the first automatic retry of a task with retries=N (doubles each time)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors (also REFLOW_DEBUG=1)")
    parser.add_argument("--version", action="version", version=f"{PROG} {VERSION}")
    return parser


def check_socket_path(path: Path) -> None:
    """Refuse socket paths that cannot work, before anything is opened."""
    size = len(os.fsencode(str(path)))
    if size > MAX_SOCKET_PATH:
        raise CliError(f"socket path {path} is {size} bytes long, over the {MAX_SOCKET_PATH}-byte limit of Unix "
                       "sockets; use a shorter --socket (or $REFLOW_SOCKET), for example under $XDG_RUNTIME_DIR")
    parent = path.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CliError(f"cannot create the socket's directory {parent}: {existing} is not a directory; "
                       "use another --socket")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "write in the socket's directory" if existing == parent else f"create the socket's directory {parent}"
        raise CliError(f"cannot {what}: {existing} is not writable by you; use another --socket "
                       "(or $REFLOW_SOCKET)")


def check_socket_free(path: Path) -> None:
    """A live socket means another reflowd serves it: say which, instead of failing later."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except OSError:
        return  # a stale socket from a crash: the daemon removes it
    finally:
        probe.close()
    pid = "?"
    try:
        from reflow_client.client import Client

        with Client(path, timeout=5) as client:
            pid = client.ping().get("pid", "?")
    except Exception:  # noqa: BLE001 - the pid is a courtesy
        pass
    raise CliError(f"another reflowd (pid {pid}) already listens on {path}; stop it first ('reflow-client shutdown') "
                   "or start this one with another --socket", code=cli_errors.RUN_FAILED)


def _leaf(exc: BaseException) -> BaseException:
    """The one real error inside task-group exception groups."""
    while isinstance(getattr(exc, "exceptions", None), tuple) and len(exc.exceptions) == 1:  # type: ignore[attr-defined]
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return exc


def _os_error(exc: OSError, options: DaemonOptions) -> CliError:
    where = str(exc.filename or "")
    if exc.errno == errno.EADDRINUSE:
        return CliError(f"{options.socket_path} is in use; stop whatever serves it or use another --socket",
                        code=cli_errors.RUN_FAILED)
    if where and where.startswith(str(options.state_dir)):
        flag = "--state-dir (or $REFLOW_STATE_DIR)"
    elif where and where.startswith(str(options.socket_path.parent)):
        flag = "--socket (or $REFLOW_SOCKET)"
    else:
        flag = "--socket or --state-dir"
    return CliError(f"cannot use {where or 'a path'}: {exc.strerror or exc}; pick another location with {flag}")


def run(args: argparse.Namespace) -> int:
    import anyio

    from .engine.engine import EngineSettings
    from .logging import configure
    from . import systemd

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    try:
        activated = systemd.activation_socket()  # refuse a wrongly passed socket before anything starts
    except systemd.ActivationError as exc:
        raise CliError(str(exc)) from None
    options = DaemonOptions(
        socket_path=(args.socket or config.socket).expanduser().absolute(),
        state_dir=(args.state_dir or config.state_dir).expanduser().absolute(),
        config=config,
        settings=EngineSettings(retry_backoff=args.retry_backoff,
                                fault_points=frozenset(p for p in os.environ.get("REFLOW_FAULT_POINTS", "").split(",")
                                                       if p)),
    )
    if activated is None:
        check_socket_path(options.socket_path)
        check_socket_free(options.socket_path)
    configure(args.log_level, json=None if args.log_format in ("auto", "journal") else args.log_format == "json",
              journal=True if args.log_format == "journal" else None)
    tune_interpreter()
    try:
        return anyio.run(Daemon(options).run)
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:  # noqa: BLE001 - unwrapped and classified below, or re-raised
        leaf = _leaf(exc)
        if isinstance(leaf, DaemonError):
            raise CliError(str(leaf), code=cli_errors.RUN_FAILED) from exc
        if isinstance(leaf, OSError):
            raise _os_error(leaf, options) from exc
        if leaf is not exc and isinstance(leaf, Exception):
            raise leaf from exc
        raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["service"]:  # reflowd service install|uninstall|status: reflowd/service.py
        from .service import main as service_main

        return service_main(argv[1:])
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:
        import argcomplete

        argcomplete.autocomplete(parser)
    return cli_errors.guarded(PROG, lambda: run(parser.parse_args(argv)), debug=cli_errors.debug_enabled(argv))


if __name__ == "__main__":
    sys.exit(main())
