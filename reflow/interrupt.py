"""How a running task learns that its job is being stopped.

A scheduler stops a job with a signal: SIGTERM at the time limit or on
``scancel``/``cancel`` (SIGINT by hand), and some send a warning first
(Slurm's ``--signal=USR1@60``, Grid Engine's ``-notify``, LSF's job warning
action: SIGUSR1 or SIGUSR2). The worker turns each of these into
``TaskInterrupted`` raised inside the task, an ``Exception`` the task may
catch to save a checkpoint or clean up::

    @wf.job()
    def simulate(run_dir: RunDir) -> Path:
        try:
            ...
        except TaskInterrupted:
            save_checkpoint(run_dir)
            raise

After a stop signal (TERM, INT) the instance is recorded as interrupted even
if the task swallows the exception and returns: its output would be that of
a stopped job. A task that swallows it and carries on is stopped for good
(``WorkerInterrupted``, which ``except Exception`` does not catch) after
``STOP_GRACE`` seconds, inside the scheduler's own grace before SIGKILL. A
warning signal (USR1, USR2) only raises ``TaskInterrupted``: a task that
handles it and finishes in time succeeds.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

#: Signals that stop the job: the result is a failure naming the signal.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Signals schedulers send as a warning before stopping a job.
WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
#: Seconds a task may keep running after catching a stop signal's TaskInterrupted
#: (the local scheduler sends SIGKILL 10 s after SIGTERM, Slurm's KillWait defaults to 30 s).
STOP_GRACE = 5.0


class TaskInterrupted(Exception):  # noqa: N818 - the reference's name
    """The job running this task is being stopped (or warned that it will be) by a signal."""

    #: Set by a task that saved a checkpoint before re-raising (``stop.checkpoint = str(path)``): the worker
    #: notes it in the result, and ``status`` shows it with the instance's cause.
    checkpoint: str | None = None

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signame = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signame}")


class WorkerInterrupted(BaseException):
    """A stopped task did not return in time (BaseException: ``except Exception`` must not eat it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signame = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signame}")


#: The handler table itself: ``signal.getsignal`` converts every answer through an enum (slow, and a
#: packed worker checks its handlers around each element); ``_signal`` answers with the object as set.
_raw_signal = getattr(signal, "_signal", signal)

#: The installed Interrupts of this process (for the fork hook below).
_active: Interrupts | None = None


def _after_fork_in_child() -> None:
    """A forked child (multiprocessing) keeps our handlers and wakeup fd: its signals are not the worker's."""
    interrupts = _active
    if interrupts is None or interrupts._pipe is None:
        return
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # forked from another thread: not this interpreter's main thread
        pass
    for fd in interrupts._pipe:
        try:
            os.close(fd)
        except OSError:
            pass
    interrupts._pipe = None


os.register_at_fork(after_in_child=_after_fork_in_child)


class Interrupts:
    """The worker's signal handlers; ``stopped`` is the first stop signal received, if any.

    Python runs a signal's handler in the main thread between two bytecodes, so a
    signal that lands just before the main thread enters a blocking call (``sleep``,
    ``read``...) waits, unhandled, until that call returns: for a task sleeping an
    hour, an hour, with no ``TaskInterrupted`` and no grace. So a watcher thread
    learns of a stop signal at once (through the wakeup fd, which the C-level handler
    writes) and keeps the grace itself: it interrupts the main thread (``SIGALRM``,
    whose handler does nothing before the grace is over) until the stop signal's
    handler has run, and again once ``grace`` seconds are over until
    ``WorkerInterrupted`` has been raised.
    """

    NUDGE_EVERY = 0.25

    def __init__(self, grace: float = STOP_GRACE) -> None:
        self.grace = grace
        self.stopped: int | None = None  # set by the stop signal's Python-level handler
        self._received: int | None = None  # the first stop signal, as soon as the watcher sees it
        self._grace_over = False
        self._fired = False  # WorkerInterrupted was raised: the grace is done with
        self._done = threading.Event()
        #: A warning signal arrived: a packed worker starts no further element.
        self.warned: int | None = None
        self._previous: dict[int, object] = {}
        self._pipe: tuple[int, int] | None = None
        self._main = threading.get_ident()
        #: Between two elements of a packed job (``hold``): a signal is noted, not raised.
        self._holding = False
        self._handler = self._dispatch  # one bound method: the handler table holds this very object
        #: Warning signals whose Python-level handler has run (the watcher nudges until it has).
        self._warnings_handled = 0

    def install(self) -> None:
        handled = (*STOP_SIGNALS, *WARNING_SIGNALS, signal.SIGALRM)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)  # a mask inherited from our parent must not hide them
        for signum in (*STOP_SIGNALS, *WARNING_SIGNALS):
            self._previous[signum] = signal.signal(signum, self._handler)
        self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_grace_over)
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        self._pipe = (read_end, write_end)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self._main = threading.get_ident()
        global _active
        _active = self
        watcher = threading.Thread(target=self._watch, args=(read_end,), name="reflow-stop-grace", daemon=True)
        # The watcher inherits a mask blocking every signal, so the kernel hands them all to the main thread.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            watcher.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def quiet(self) -> None:
        """From here on (writing the result) no signal may interrupt the worker."""
        for signum in self._previous:
            signal.signal(signum, signal.SIG_IGN)
        self._done.set()
        if self._pipe is not None:
            signal.set_wakeup_fd(-1)
            os.close(self._pipe[1])  # the watcher's read sees the end
            self._pipe = None
        global _active
        if _active is self:
            _active = None

    def hold(self) -> None:
        """Between two elements of a packed job: a signal is noted (no further element starts), not raised."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        self._holding = True
        self._reinstall()

    def resume(self) -> None:
        """The next element starts: signals interrupt it again."""
        self._holding = False
        self._reinstall()

    def _reinstall(self) -> None:
        """Take our handlers back from a task that replaced them (its own element is over)."""
        for signum in (*STOP_SIGNALS, *WARNING_SIGNALS):
            if _raw_signal.getsignal(signum) is not self._handler:
                signal.signal(signum, self._handler)

    def _dispatch(self, signum: int, frame: FrameType | None) -> None:
        if self._holding:
            self._note(signum, frame)
        else:
            self._on_signal(signum, frame)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if signum in WARNING_SIGNALS:
            self.warned = signum
            self._warnings_handled += 1
        elif self.stopped is None:
            self.stopped = signum

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum in WARNING_SIGNALS:
            self.warned = signum
            self._warnings_handled += 1
            raise TaskInterrupted(signum)
        if self.stopped is not None:  # a second stop signal: no more politeness
            raise WorkerInterrupted(self.stopped)
        self.stopped = signum
        if self._pipe is not None:  # the task may have replaced the wakeup fd: tell the watcher ourselves
            try:
                os.write(self._pipe[1], bytes([signum]))
            except OSError:
                pass
        raise TaskInterrupted(signum)

    def _on_grace_over(self, signum: int, frame: FrameType | None) -> None:
        stopped = self.stopped or self._received
        if self._grace_over and stopped is not None and not self._fired:
            self._fired = True
            raise WorkerInterrupted(stopped)

    def _watch(self, read_end: int) -> None:
        try:
            if self._wait_for_a_stop(read_end):
                self._keep_the_grace()
        finally:
            self._done.wait()  # the wakeup fd writes here until quiet(): keep the pipe open until then
            os.close(read_end)

    def _wait_for_a_stop(self, read_end: int) -> bool:
        stops = {int(s) for s in STOP_SIGNALS}
        warns = {int(s) for s in WARNING_SIGNALS}
        handled = 0
        while True:
            try:
                data = os.read(read_end, 64)
            except OSError:
                return False
            if not data:  # quiet(): the task is over
                return False
            first = next((b for b in data if b in stops), None)
            if first is not None:
                self._received = first
                return True
            warnings = sum(1 for b in data if b in warns)
            if warnings:
                self._nudge_until_warned(handled + warnings)
                handled += warnings

    def _nudge_until_warned(self, count: int) -> None:
        """A warning's handler, like a stop's, waits for the main thread to leave a blocking call it
        entered just as the signal landed: interrupt that call until the handler has run (a warned task
        that sleeps an hour must still hear of it now)."""
        deadline = time.monotonic() + min(self.grace, 2.0)  # (two warnings at once are handled once)
        while self._warnings_handled < count and time.monotonic() < deadline:
            try:
                signal.pthread_kill(self._main, signal.SIGALRM)
            except OSError:
                return
            if self._done.wait(self.NUDGE_EVERY):
                return

    def _keep_the_grace(self) -> None:
        deadline = time.monotonic() + self.grace
        while not self._fired:
            left = deadline - time.monotonic()
            if left <= 0:
                self._grace_over = True
            elif self.stopped is not None:  # handled in time: nothing to do until the grace is over
                if self._done.wait(left):
                    return
                continue
            try:
                signal.pthread_kill(self._main, signal.SIGALRM)  # interrupts what the main thread waits in
            except OSError:  # the main thread is gone
                return
            if self._done.wait(self.NUDGE_EVERY):
                return
