"""A real pseudo-terminal for tests: run a command in it and read the screen as a person would see it.

The child gets a pty of a given size as its controlling terminal; everything it
writes goes through ``pyte`` (a VT100/xterm emulator), so a test reads the
resulting screen, not the byte stream: stale copies of redrawn lines, lines
wider than the terminal and leftover control codes all show up there.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import termios
import time
from collections.abc import Callable, Iterator

import pyte


#: Signals a command in a terminal must receive as a user's would (Ctrl-C, a closed window, Ctrl-\\).
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM)


def _default_signals() -> None:
    """In the forked child, before exec: a signal the test process ignores or blocks would be ignored or
    blocked in the command too (both survive exec), and a typed Ctrl-C would then do nothing. A user's
    shell starts commands with default dispositions and nothing blocked; so do we. (What the pytest
    worker inherited is written to $REFLOW_TERMINAL_SIGNALS_LOG, if set, to tell which test left it.)"""
    ignored = [s.name for s in TERMINAL_SIGNALS if signal.getsignal(s) is signal.SIG_IGN]
    blocked = sorted(s.name for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    if (ignored or blocked) and os.environ.get("REFLOW_TERMINAL_SIGNALS_LOG"):
        with open(os.environ["REFLOW_TERMINAL_SIGNALS_LOG"], "a") as log:
            log.write(f"pid {os.getppid()}: ignored {ignored} blocked {blocked}\n")
    for s in TERMINAL_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


class Terminal:
    def __init__(self, argv: list[str], *, cols: int, rows: int, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.cols, self.rows = cols, rows
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = b""
        env = {k: v for k, v in (env or os.environ).items() if k not in ("COLUMNS", "LINES")}
        env.setdefault("TERM", "xterm-256color")
        pid, fd = pty.fork()
        if pid == 0:  # the child: size the terminal before anything asks for it
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                _default_signals()
                if cwd:
                    os.chdir(cwd)
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.returncode: int | None = None
        # A second screen fed only whole drawings (see frames()), and where in the stream the window was resized.
        self._frame_screen = pyte.Screen(cols, rows)
        self._frame_stream = pyte.ByteStream(self._frame_screen)
        self._framed = 0
        self._resizes: list[tuple[int, int, int]] = []

    def read(self, timeout: float = 0.1) -> bool:
        """Feed what the child wrote within *timeout* to the screen; False once the child closed the pty."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child exited and the pty is closed
            return False
        if not data:
            return False
        self.raw += data
        self.stream.feed(data)
        return True

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def text(self) -> str:
        return "\n".join(self.lines()).rstrip()

    def frames(self, start: bytes) -> Iterator[list[str]]:
        """The screen as each drawing completed since the last call left it, one drawing at a time.

        A read hands over whatever the child has written so far, which can end in the middle
        of a redraw (old lines erased, new ones not drawn yet): the live screen may show half a
        drawing. A program that redraws in place begins every drawing with the same control
        sequence, *start*; whatever comes before the last *start* read is whole drawings.
        """
        while (end := self.raw.find(start, self._framed + 1)) > 0:
            for offset, cols, rows in self._resizes:  # a resize between two drawings applies where it happened
                if self._framed <= offset < end:
                    self._frame_stream.feed(self.raw[self._framed:offset])
                    self._frame_screen.resize(rows, cols)
                    self._framed = offset
            self._frame_stream.feed(self.raw[self._framed:end])
            self._framed = end
            yield [line.rstrip() for line in self._frame_screen.display]

    def wait_for(self, condition: Callable[[Terminal], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition(self):
                return
            if not self.read(0.1):
                if condition(self):
                    return
                break
        raise AssertionError(f"timed out waiting for {what}; screen:\n{self.text()}")

    def resize(self, cols: int, rows: int) -> None:
        """What a terminal window does when it is resized: new size, SIGWINCH to the child."""
        self.cols, self.rows = cols, rows
        self._resizes.append((len(self.raw), cols, rows))
        self.screen.resize(rows, cols)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def interrupt(self) -> None:
        os.write(self.fd, b"\x03")  # Ctrl-C, as typed: the line discipline sends SIGINT

    def finish(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.read(0.1):
            pass
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                os.close(self.fd)
                return self.returncode
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"command did not end within {timeout} s; screen:\n{self.text()}")

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
