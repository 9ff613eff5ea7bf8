"""Live progress of a run: one line per task, fitted to the terminal, redrawn in place.

The same display follows a run through reflowd (``submit --wait``, ``watch``)
and an embedded run (``python pipeline.py run``): both feed it the engine's
transition events. Three layers:

* :class:`Progress` is the bookkeeping (counts by state, when each task
  started and finished, what was already done when we attached);
* :func:`task_rows` and :func:`fit_line` are pure: rows for a moment in
  time, and one row laid out for a given width;
* :class:`ProgressDisplay` draws. On a terminal it uses rich's ``Live``
  (in-place redraw at the terminal's current width, colour only where the
  terminal has it, ``NO_COLOR`` honoured); elsewhere (a log file, CI) it
  prints plain snapshot lines at a modest interval, never control codes.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

from .client import InstanceStatus, RunStatus

#: Order in which states appear in bars and counts (finished first, failures last).
STATE_ORDER = (
    "succeeded", "cached", "running", "queued", "submitting", "ready", "pending",
    "failed", "timeout", "out_of_memory", "node_fail", "submit_failed", "upstream_failed", "cancelled",
)
DONE = frozenset({"succeeded", "cached"})
FAILED = frozenset({"failed", "timeout", "out_of_memory", "node_fail", "submit_failed"})
FINISHED = DONE | FAILED | {"upstream_failed", "cancelled"}
ACTIVE = frozenset({"submitting", "queued", "running"})

_BAR_CHARS = {"succeeded": "#", "cached": "#", "running": ">", "queued": ".", "submitting": ".", "ready": " ",
              "pending": " ", "failed": "X", "timeout": "T", "out_of_memory": "M", "node_fail": "N",
              "submit_failed": "S", "upstream_failed": "-", "cancelled": "c"}
_STYLES = {"succeeded": "green", "cached": "green", "running": "cyan", "queued": "yellow", "submitting": "yellow",
           "ready": "bright_black", "pending": "bright_black", "failed": "red", "timeout": "red",
           "out_of_memory": "red", "node_fail": "red", "submit_failed": "red", "upstream_failed": "magenta",
           "cancelled": "magenta"}
_SHORT = {"succeeded": "ok", "cached": "cached", "running": "run", "queued": "queued", "submitting": "submit",
          "ready": "ready", "pending": "pending", "failed": "failed", "timeout": "timeout",
          "out_of_memory": "oom", "node_fail": "node_fail", "submit_failed": "refused",
          "upstream_failed": "upstream_failed", "cancelled": "cancelled"}

#: Seconds between snapshots when the output is not a terminal (REFLOW_PROGRESS_INTERVAL overrides).
PLAIN_INTERVAL = 10.0


def clock(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def ordered_counts(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(((s, n) for s, n in counts.items() if n),
                  key=lambda kv: STATE_ORDER.index(kv[0]) if kv[0] in STATE_ORDER else 99)


# ---------------------------------------------------------------------- bookkeeping


@dataclass
class TaskProgress:
    name: str
    is_array: bool
    expanded: bool
    counts: dict[str, int]
    blocked: str | None = None
    #: when the task's first element became active (None: not seen yet)
    started: float | None = None
    #: when its last element finished (set once nothing is left)
    ended: float | None = None
    #: elements already done when timing began (attached mid-run), so the rate counts only what we saw
    baseline: int = 0
    #: when timing began for the rate: ``started``, or when we attached
    rate_from: float | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return sum(n for s, n in self.counts.items() if s in DONE)

    @property
    def finished(self) -> int:
        return sum(n for s, n in self.counts.items() if s in FINISHED)

    @property
    def complete(self) -> bool:
        return self.blocked is not None or (self.expanded and self.total > 0 and self.finished == self.total)


class Progress:
    """A run's per-task counts, kept up to date from watch events (thread-safe)."""

    def __init__(self, run_id: str, tasks: Iterable[TaskProgress], *, created_at: float | None = None,
                 state: str = "running", attached_at: float | None = None) -> None:
        self.run_id = run_id
        self.tasks: dict[str, TaskProgress] = {t.name: t for t in tasks}
        self.created_at = created_at or time.time()
        self.state = state
        self.ended_at: float | None = None
        self.attached_at = attached_at or time.time()
        self.lock = threading.Lock()
        self.changed = True

    @classmethod
    def from_status(cls, status: RunStatus) -> Progress:
        tasks = [TaskProgress(t.name, t.is_array, t.expanded, dict(t.counts), t.blocked) for t in status.tasks]
        progress = cls(status.run.id, tasks, created_at=status.run.created_at, state=status.run.state)
        progress.ended_at = status.run.ended_at
        for t in progress.tasks.values():
            if t.done or any(t.counts.get(s) for s in ACTIVE):  # work already under way: time it from now
                t.baseline, t.rate_from = t.done, progress.attached_at
        return progress

    @classmethod
    def from_tasks(cls, run_id: str, tasks: Iterable[tuple[str, bool]]) -> Progress:
        """A fresh run: ``(name, is_array)`` per task, nothing started."""
        return cls(run_id, [TaskProgress(name, is_array, not is_array, {} if is_array else {"pending": 1})
                            for name, is_array in tasks])

    def seed_times(self, task: str, instances: Iterable[InstanceStatus]) -> None:
        """Refine a task's timing from its instances' timestamps (after attaching to a running run)."""
        with self.lock:
            t = self.tasks.get(task)
            if t is None:
                return
            starts = [i.started_at or i.submitted_at for i in instances if i.started_at or i.submitted_at]
            if starts:
                t.started = min(starts)
                t.baseline, t.rate_from = 0, t.started

    def apply(self, event: dict[str, Any]) -> None:
        with self.lock:
            self._apply(event)
            self.changed = True

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        at = event.get("at") or time.time()
        if kind == "run":
            self.state = event.get("to") or self.state
            if self.state in ("succeeded", "failed", "cancelled"):
                self.ended_at = at
            return
        if kind == "end":
            self.state = event.get("state") or self.state
            return
        t = self.tasks.get(event.get("task") or "")
        if t is None:
            return
        if kind == "expanded":
            t.expanded = True
            size = event.get("size") or 0
            t.counts = {"pending": size} if size else {}
            if not size:
                t.ended = at
            return
        if kind != "transition":
            return
        new = event.get("to")
        if event.get("task_level"):
            t.counts = {new: 1} if new else {}
            t.blocked = new
            t.ended = at
            return
        old = event.get("from")
        if old in t.counts:
            t.counts[old] -= 1
            if t.counts[old] <= 0:
                del t.counts[old]
        if new:
            t.counts[new] = t.counts.get(new, 0) + 1
        if new in ACTIVE or new in FINISHED:
            if t.started is None:
                t.started = at
            if t.rate_from is None:
                t.rate_from = at
        if t.complete:
            t.ended = at
        elif new not in FINISHED:
            t.ended = None  # a retry re-opened it


# ---------------------------------------------------------------------- pure rows and layout


@dataclass(frozen=True)
class Row:
    label: str
    counts: tuple[tuple[str, int], ...]
    done: int
    total: int
    waiting: bool
    elapsed: float | None
    eta: float | None
    complete: bool


def task_rows(progress: Progress, now: float) -> list[Row]:
    rows = []
    with progress.lock:
        for t in progress.tasks.values():
            elapsed = None
            if t.started is not None:
                elapsed = (t.ended if t.complete and t.ended else now) - t.started
            eta = None
            remaining = t.total - t.finished
            if t.expanded and remaining > 0 and t.rate_from is not None and now > t.rate_from:
                seen = t.done - t.baseline
                if seen > 0:
                    eta = remaining * (now - t.rate_from) / seen
            rows.append(Row(label=t.name + ("[]" if t.is_array else ""), counts=tuple(ordered_counts(t.counts)),
                            done=t.done, total=t.total if t.expanded else 0, waiting=not t.expanded and not t.blocked,
                            elapsed=elapsed, eta=eta, complete=t.complete))
    return rows


@dataclass(frozen=True)
class Segment:
    text: str
    style: str = ""


def bar_segments(counts: Iterable[tuple[str, int]], width: int, *, unicode: bool) -> list[Segment]:
    """A bar of exactly *width* cells, one coloured run per state (distinct characters without colour)."""
    items = [(s, n) for s, n in counts if n]
    total = sum(n for _, n in items)
    if width <= 0:
        return []
    if total == 0:
        return [Segment(("─" if unicode else " ") * width, "bright_black")]
    cells = [(s, n * width / total) for s, n in items]
    sizes = [int(c) for _, c in cells]
    for i in sorted(range(len(cells)), key=lambda i: cells[i][1] - sizes[i], reverse=True)[: width - sum(sizes)]:
        sizes[i] += 1
    out = []
    for (state, _), size in zip(cells, sizes):
        if size:
            char = ("━" if state not in ("pending", "ready") else "─") if unicode else _BAR_CHARS.get(state, "?")
            out.append(Segment(char * size, _STYLES.get(state, "")))
    return out


def counts_phrase(counts: Iterable[tuple[str, int]], short: bool) -> str:
    names = _SHORT if short else {}
    return " ".join(f"{names.get(s, s)} {n}" if short else f"{s}={n}" for s, n in counts)


def fit_line(row: Row, width: int, *, unicode: bool, name_width: int, show_timing: bool = True) -> list[Segment]:
    """One task's line, never wider than *width* (the terminal's columns minus one)."""
    name_w = max(6, min(name_width, 28, width // 4))
    label = row.label if len(row.label) <= name_w else row.label[: name_w - 1] + "…" if unicode else \
        row.label[: name_w - 1] + "~"
    tally = "waiting" if row.waiting else f"{row.done}/{row.total}"
    timing = clock(row.elapsed) if row.elapsed is not None else ""
    if row.eta is not None and not row.complete:
        timing += f" eta {clock(row.eta)}"
    timing_w = 16 if width >= 70 and show_timing else 0
    tally_w = max(len(tally), 11 if width >= 60 else 7)
    rest = width - name_w - 1 - 2 - tally_w - 1 - (timing_w + 1 if timing_w else 0)
    bar_w = max(4, min(40, rest // 2 if rest > 30 else rest - 8 if rest > 16 else rest))
    counts_w = rest - bar_w - 2 - 1
    segs = [Segment(f"{label:<{name_w}} ", "bold")]
    segs.append(Segment("["))
    segs.extend(bar_segments(row.counts, bar_w, unicode=unicode))
    segs.append(Segment("]"))
    segs.append(Segment(f" {tally:>{tally_w}}"))
    if timing_w:
        segs.append(Segment(f" {timing[:timing_w]:<{timing_w}}", "bright_black"))
    if counts_w > 3:
        text = counts_phrase(row.counts, short=True)
        if len(text) > counts_w:
            text = text[: counts_w - 1] + ("…" if unicode else "~")
        segs.append(Segment(" " + text))
    line, used = [], 0
    for seg in segs:  # a hard guarantee, whatever the arithmetic above did
        room = width - used
        if room <= 0:
            break
        piece = seg.text[:room]
        line.append(Segment(piece, seg.style))
        used += len(piece)
    return line


def header_text(progress: Progress, now: float) -> str:
    end = progress.ended_at if progress.ended_at and progress.state != "running" else now
    if not progress.run_id:
        return f"starting  {clock(end - progress.created_at)}"
    return f"run {progress.run_id}  {progress.state}  {clock(end - progress.created_at)}"


def plain_lines(progress: Progress, now: float) -> list[str]:
    """A snapshot for logs and pipes: no bars, no control codes."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    lines = [f"[{stamp}] {header_text(progress, now)}"]
    for row in task_rows(progress, now):
        tally = "waiting" if row.waiting else f"{row.done}/{row.total}"
        timing = "" if row.elapsed is None else f"  elapsed {clock(row.elapsed)}"
        if row.eta is not None and not row.complete:
            timing += f"  eta {clock(row.eta)}"
        lines.append(f"  {row.label}  {tally}  {counts_phrase(row.counts, short=False)}{timing}".rstrip())
    return lines


# ---------------------------------------------------------------------- drawing


class _Renderable:
    """What rich's Live draws: recomputed at the console's current width on every refresh."""

    def __init__(self, progress: Progress, unicode: bool) -> None:
        self.progress = progress
        self.unicode = unicode

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.text import Text

        now = time.time()
        width = max(20, options.max_width - 1)  # never the last column: some terminals wrap there
        rows = task_rows(self.progress, now)
        name_width = max((len(r.label) for r in rows), default=8)
        head = header_text(self.progress, now)
        yield Text(head[:width], style="bold", no_wrap=True, overflow="crop")
        for row in rows:
            text = Text(no_wrap=True, overflow="crop")
            for seg in fit_line(row, width, unicode=self.unicode, name_width=name_width):
                text.append(seg.text, style=seg.style or None)
            yield text


def _live_class() -> type:
    from rich.control import Control
    from rich.live import Live

    class ResizingLive(Live):
        """rich's Live, plus a clean slate when the terminal's width changes.

        Terminals re-wrap (or cut) what is on screen when they are resized,
        so the lines of the previous drawing no longer match what Live
        would erase: clear the screen once and draw again from the top.
        """

        _last_width: int | None = None

        def refresh(self) -> None:
            width = self.console.size.width
            if self._last_width is not None and width != self._last_width and self.console.is_terminal:
                with self._lock:
                    self.console.control(Control.clear(), Control.home())
            self._last_width = width
            super().refresh()

    return ResizingLive


def _is_terminal(out: TextIO) -> bool:
    try:
        return out.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


class ProgressDisplay:
    """Draws a :class:`Progress` while a run goes on; ``with ProgressDisplay(p) as d: d.update(event)``."""

    def __init__(self, progress: Progress, out: TextIO | None = None, *, live: bool | None = None,
                 interval: float | None = None) -> None:
        self.progress = progress
        self.out = out or sys.stdout
        self.live_mode = _is_terminal(self.out) if live is None else live
        env_interval = os.environ.get("REFLOW_PROGRESS_INTERVAL")
        self.interval = interval if interval is not None else float(env_interval) if env_interval else PLAIN_INTERVAL
        self._live: Any = None
        self._console: Any = None
        self._last_plain = 0.0

    def __enter__(self) -> ProgressDisplay:
        if self.live_mode:
            from rich.console import Console

            # COLUMNS/LINES left over in the environment would freeze the width: ask the terminal instead.
            environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
            self._console = Console(file=self.out, highlight=False, soft_wrap=False, _environ=environ)
            unicode = (self._console.encoding or "").lower().startswith("utf")
            self._live = _live_class()(_Renderable(self.progress, unicode), console=self._console,
                                       refresh_per_second=4, transient=False, redirect_stdout=True,
                                       redirect_stderr=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(None, None, None)
            self._live = None
        else:
            self._plain(force=True)

    def update(self, event: dict[str, Any]) -> None:
        self.progress.apply(event)
        if event.get("type") == "transition" and event.get("to") in FAILED and not event.get("task_level"):
            label = event["task"] if event.get("index") is None else f"{event['task']}[{event['index']}]"
            first = (event.get("error") or event.get("reason") or "").strip().splitlines()
            self.note(f"{label} {event['to']}" + (f": {first[0]}" if first else ""), style="red")
        if self._live is None:
            self._plain()

    def note(self, text: str, style: str = "") -> None:
        """A line printed above the live display (or in sequence with the plain snapshots)."""
        if self._live is not None:
            from rich.text import Text

            self._console.print(Text(text, style=style or None, no_wrap=True, overflow="ellipsis"))
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def _plain(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (now - self._last_plain < self.interval or not self.progress.changed):
            return
        self.progress.changed = False
        self._last_plain = now
        self.out.write("\n".join(plain_lines(self.progress, time.time())) + "\n")
        self.out.flush()


def follow(progress: Progress, events: Iterable[dict[str, Any]], out: TextIO | None = None, *,
           live: bool | None = None) -> Progress:
    """Draw *progress* while consuming *events* (the daemon's watch stream after its snapshot)."""
    with ProgressDisplay(progress, out, live=live) as display:
        for event in events:
            if event.get("type") == "end":
                progress.apply(event)
                break
            display.update(event)
    return progress
