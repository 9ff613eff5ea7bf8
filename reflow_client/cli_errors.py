"""How the command-line tools end: exit codes, one-line errors, ``--debug`` tracebacks, closed pipes.

Every command (``reflow-client``, ``reflowd``, a workflow's ``python pipeline.py``)
runs its body through :func:`guarded`. A mistake the user can fix is a
:class:`CliError` (or a known library error mapped below) and becomes one line
``<prog>: error: <problem>; <fix>`` with a documented exit code. Anything else
is a bug: one line saying so, and the traceback with ``--debug`` or
``REFLOW_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

#: Exit codes shared by reflow-client, reflowd and the workflow CLIs (docs/user-guide.md lists them).
OK = 0
RUN_FAILED = 1  # the run (or the command's subject) ended failed or cancelled; reflowd: could not run
USAGE = 2  # bad flags, bad workflow file, unknown run, a request the daemon refused
NO_DAEMON = 3  # no reflowd answers (or it could not be started)
CLUSTER_UNAVAILABLE = 4  # the cluster cannot be used now; nothing was submitted
INTERNAL = 70  # a bug in reflow (EX_SOFTWARE); run with --debug and report it
INTERRUPTED = 130  # Ctrl-C
BROKEN_PIPE = 141  # the reader of our output went away (128 + SIGPIPE), e.g. ``| head``

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 the run failed or was cancelled; 2 usage error or bad input; "
    "3 no reflowd answers; 4 cluster unavailable, nothing submitted; 70 internal error (use --debug); "
    "130 interrupted"
)

DEBUG_ENV = "REFLOW_DEBUG"


class CliError(Exception):
    """A user-fixable problem: the message names it and the fix; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def debug_enabled(argv: list[str] | None = None) -> bool:
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "no", "false", "off"):
        return True
    return argv is not None and ("--debug" in argv or "--reflow-debug" in argv)


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return " ".join(lines) if len(lines) <= 3 else lines[0] + " ..."


def error(prog: str, message: str) -> None:
    """Print ``<prog>: error: <message>`` as one line on stderr."""
    try:
        sys.stderr.write(f"{prog}: error: {_one_line(message)}\n")
        sys.stderr.flush()
    except (BrokenPipeError, OSError):
        pass


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def classify(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, message) for errors with a known meaning; None for bugs."""
    from .autostart import DaemonStartError
    from .client import ClusterUnavailableError, DaemonNotRunning, ReflowError
    from .config import ConfigError

    if isinstance(exc, CliError):
        return exc.code, exc.message
    if isinstance(exc, (DaemonNotRunning, DaemonStartError)):
        return NO_DAEMON, str(exc)
    if isinstance(exc, ClusterUnavailableError):
        return CLUSTER_UNAVAILABLE, exc.message
    if isinstance(exc, ReflowError):
        return USAGE, exc.message
    if isinstance(exc, ConfigError):
        return USAGE, f"{exc}"
    if isinstance(exc, OSError) and exc.filename and not isinstance(exc, TimeoutError):
        return USAGE, f"cannot use {exc.filename}: {exc.strerror or exc}; check that it exists and is yours to use"
    if isinstance(exc, TimeoutError):
        return NO_DAEMON, f"{exc or 'timed out'}; is reflowd overloaded? 'reflow-client ping' checks it"
    if isinstance(exc, (ValueError, TypeError)) and type(exc).__module__ in ("builtins",) and _raised_by_reflow(exc):
        return USAGE, str(exc)
    return None


def _raised_by_reflow(exc: BaseException) -> bool:
    """ValueError/TypeError raised deliberately by reflow's own checks (not deep inside a library)."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return True
    module = last.tb_frame.f_globals.get("__name__", "")
    return module.split(".")[0] in ("reflow", "reflow_client", "reflowd")


def guarded(prog: str, body: Callable[[], int], *, debug: bool = False) -> int:
    """Run a command body; turn every way it can end into an exit code (never a stray traceback)."""
    try:
        code = body()
        sys.stdout.flush()
        return code
    except SystemExit as exc:  # argparse's own exits (usage errors: 2, --help: 0)
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
            return BROKEN_PIPE
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else USAGE)
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE
    except KeyboardInterrupt:
        error(prog, "interrupted")
        return INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
        known = classify(exc)
        if debug:
            traceback.print_exc()
        if known is not None:
            error(prog, known[1])
            return known[0]
        hint = "" if debug else f" (run again with --debug or {DEBUG_ENV}=1 for the traceback)"
        error(prog, f"internal error: {type(exc).__name__}: {_one_line(str(exc))}{hint}; please report it")
        return INTERNAL


def fail(message: str, code: int = USAGE) -> NoReturn:
    raise CliError(message, code)
