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

import signal
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


class Interrupts:
    """The worker's signal handlers; ``stopped`` is the first stop signal received, if any."""

    def __init__(self, grace: float = STOP_GRACE) -> None:
        self.grace = grace
        self.stopped: int | None = None
        #: A warning signal arrived: a packed worker starts no further element.
        self.warned: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in (*STOP_SIGNALS, *WARNING_SIGNALS):
            self._previous[signum] = signal.signal(signum, self._on_signal)
        self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_grace_over)

    def quiet(self) -> None:
        """From here on (writing the result) no signal may interrupt the worker."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum in self._previous:
            signal.signal(signum, signal.SIG_IGN)

    def hold(self) -> None:
        """Between two elements of a packed job: a signal is noted (no further element starts), not raised."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum in (*STOP_SIGNALS, *WARNING_SIGNALS):
            signal.signal(signum, self._note)

    def resume(self) -> None:
        """The next element starts: signals interrupt it again."""
        for signum in (*STOP_SIGNALS, *WARNING_SIGNALS):
            signal.signal(signum, self._on_signal)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if signum in WARNING_SIGNALS:
            self.warned = signum
        elif self.stopped is None:
            self.stopped = signum

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum in WARNING_SIGNALS:
            self.warned = signum
            raise TaskInterrupted(signum)
        if self.stopped is not None:  # a second stop signal: no more politeness
            raise WorkerInterrupted(self.stopped)
        self.stopped = signum
        signal.setitimer(signal.ITIMER_REAL, self.grace)
        raise TaskInterrupted(signum)

    def _on_grace_over(self, signum: int, frame: FrameType | None) -> None:
        if self.stopped is not None:
            raise WorkerInterrupted(self.stopped)
