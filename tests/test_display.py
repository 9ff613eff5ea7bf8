"""The live progress display: pure layout, and what a real terminal shows (a pseudo-terminal read through pyte)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reflow_client import codec, values
from reflow_client.display import Progress, ProgressDisplay, Row, fit_line, plain_lines, task_rows

from .support import ROOT
from .terminal import Terminal

EXAMPLE = ROOT / "examples" / "etl.py"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]")
COLOUR = re.compile(r"\x1b\[[0-9;]*(3[0-9]|9[0-7]|4[0-9]|38;[0-9;]+)m")


# ---------------------------------------------------------------------------- pure parts


def _event(task: str, index: int | None, old: str, new: str, at: float) -> dict:
    return {"type": "transition", "run_id": "r1", "task": task, "index": index, "from": old, "to": new, "at": at}


def test_progress_counts_elapsed_and_eta_from_finished_elements() -> None:
    p = Progress.from_tasks("r1", [("prep", False), ("work", True)])
    p.created_at = 1000.0
    p.apply(_event("prep", None, "pending", "running", 1000.0))
    p.apply(_event("prep", None, "running", "succeeded", 1002.0))
    p.apply({"type": "expanded", "run_id": "r1", "task": "work", "size": 10, "at": 1002.0})
    for i in range(10):
        p.apply(_event("work", i, "pending", "queued", 1002.0))
    for i in range(4):
        p.apply(_event("work", i, "queued", "running", 1002.0))
        p.apply(_event("work", i, "running", "succeeded", 1002.0 + 2 * (i + 1)))
    rows = {r.label: r for r in task_rows(p, now=1010.0)}
    assert rows["prep"].complete and rows["prep"].elapsed == 2.0 and rows["prep"].eta is None
    work = rows["work[]"]
    assert (work.done, work.total) == (4, 10)
    assert dict(work.counts) == {"succeeded": 4, "queued": 6}
    assert work.elapsed == 8.0
    assert work.eta == pytest.approx(6 * 8.0 / 4), "time left = remaining elements at the observed rate"


def test_attaching_mid_run_times_only_what_it_saw() -> None:
    from reflow_client.client import RunStatus

    status = RunStatus.from_dict({"run": {"id": "r1", "workflow": "w", "state": "running", "cluster": "local",
                                          "run_dir": "/x", "created_at": 0.0},
                                  "tasks": [{"name": "work", "is_array": True, "expanded": True, "size": 10,
                                             "counts": {"succeeded": 5, "running": 5}}], "failures": []})
    p = Progress.from_status(status)
    p.attached_at = p.tasks["work"].rate_from = 100.0
    assert task_rows(p, now=110.0)[0].eta is None, "nothing finished since attaching: no estimate yet"
    p.apply(_event("work", 5, "running", "succeeded", 105.0))
    assert task_rows(p, now=110.0)[0].eta == pytest.approx(4 * 10.0 / 1)


@pytest.mark.parametrize("width", [20, 40, 79, 120, 199])
def test_a_task_line_never_exceeds_the_width(width: int) -> None:
    row = Row(label="a_rather_long_task_name_that_goes_on[]", counts=(("succeeded", 12345), ("running", 80),
              ("queued", 4000), ("failed", 3), ("upstream_failed", 7)), done=12345, total=16435, waiting=False,
              elapsed=4000.0, eta=7000.0, complete=False)
    for unicode in (True, False):
        text = "".join(s.text for s in fit_line(row, width, unicode=unicode, name_width=40))
        assert len(text) <= width
        if width >= 40:
            assert "12345/16435" in text


def test_plain_lines_have_no_control_codes() -> None:
    p = Progress.from_tasks("r1", [("prep", False), ("work", True)])
    out = "\n".join(plain_lines(p, now=p.created_at + 5))
    assert "\x1b" not in out and "prep  0/1  pending=1" in out and "work[]  waiting" in out


def test_display_on_a_pipe_prints_snapshots_and_failures_plainly() -> None:
    p = Progress.from_tasks("r1", [("work", False)])
    buf = io.StringIO()
    with ProgressDisplay(p, buf, live=False, interval=0.0) as display:
        display.update(_event("work", None, "pending", "running", 1.0))
        display.update({**_event("work", None, "running", "failed", 2.0), "error": "ValueError: bad\nmore"})
    text = buf.getvalue()
    assert "\x1b" not in text
    assert "work failed: ValueError: bad" in text and "more" not in text
    assert "work  0/1  failed=1" in text


def test_values_are_shown_and_made_plain_without_importing_user_classes() -> None:
    encoded = {"__reflow__": "dataclass", "cls": "some_module_not_here:Stats",
               "fields": {"n": 3, "path": {"__reflow__": "path", "value": "/data/x.nc"},
                          "when": {"__reflow__": "date", "value": "2025-01-02"},
                          "pair": {"__reflow__": "tuple", "items": [1, 2]}}}
    assert values.show(encoded) == "Stats(n=3, path=Path('/data/x.nc'), when=date('2025-01-02'), pair=(1, 2))"
    assert values.plain(encoded) == {"n": 3, "path": "/data/x.nc", "when": "2025-01-02", "pair": [1, 2]}
    assert "some_module_not_here" not in sys.modules
    many = codec.encode(list(range(100)))
    assert values.show(many, max_items=3) == "[0, 1, 2, ... (100 items)]"
    assert values.show("x" * 500, limit=50).endswith("...") and len(values.show("x" * 500, limit=50)) == 50


# ---------------------------------------------------------------------------- a real terminal


def _etl_run(tmp_path: Path, chunks: int = 12) -> list[str]:
    return [sys.executable, str(EXAMPLE), "run", "--run-dir", str(tmp_path / "run"), "--chunks", str(chunks),
            "--rows", "200", "--force", "--max-workers", "2"]


def _printed_lines(raw: bytes) -> list[str]:
    """What the program printed, line by line, with control sequences removed."""
    text = ANSI.sub("", raw.decode("utf-8", "replace"))
    return [line.split("\r")[-1] for line in text.split("\n")]


# rich's Live begins every redraw by going back over what it drew (carriage return, erase line, then up and erase):
# whatever was read before the last such start is whole drawings.
REDRAW = b"\r\x1b[2K"


def _assert_one_drawing(lines: list[str]) -> None:
    text = "\n".join(lines).rstrip()
    for label in ("extract", "summarise[]", "merge"):
        drawn = [line for line in lines if line.startswith(label + " ")]
        assert len(drawn) == 1, f"{label} is drawn {len(drawn)} times:\n{text}"
    headers = [line for line in lines if re.match(r"^(run etl-\S+  (running|succeeded)|starting)  ", line)]
    assert len(headers) == 1, text


def _running(lines: list[str]) -> bool:
    text = "\n".join(lines)
    return "summarise[]" in text and "results:" not in text


@pytest.mark.parametrize("cols", [80, 200])
def test_live_display_in_a_terminal(tmp_path: Path, cols: int) -> None:
    term = Terminal(_etl_run(tmp_path), cols=cols, rows=30, cwd=str(tmp_path))
    drawings = 0
    try:
        term.wait_for(lambda t: "summarise[]" in t.text(), 120, "the display")
        while term.read(0.2):  # every redraw while it runs: one copy of each line, never wider than the screen
            for lines in term.frames(REDRAW):
                if _running(lines):
                    _assert_one_drawing(lines)
                    drawings += 1
        code = term.finish(60)
    finally:
        term.kill()
    assert code == 0, term.text()
    assert drawings >= 2, "the display was redrawn while the run went on"
    _assert_one_drawing(term.lines())
    screen = term.text()
    assert re.search(r"summarise\[\] +\[━+\] +12/12 ", screen), screen
    assert "results:" in screen and "merge = {'chunks': 12" in screen
    assert all(len(line) <= cols for line in _printed_lines(term.raw)), "a line wider than the terminal wraps"
    assert COLOUR.search(term.raw.decode("utf-8", "replace")), "colour on a colour terminal"


def test_live_display_follows_a_resize_without_stale_lines(tmp_path: Path) -> None:
    term = Terminal(_etl_run(tmp_path, chunks=30), cols=200, rows=30, cwd=str(tmp_path))
    narrow = 0
    try:
        term.wait_for(lambda t: "summarise[]" in t.text(), 120, "the display")
        list(term.frames(REDRAW))  # the drawings at 200 columns
        term.resize(80, 30)
        while term.read(0.2):  # every whole drawing at 80 columns while it runs: one copy of each line
            for lines in term.frames(REDRAW):
                if _running(lines) and all(len(line) < 80 for line in lines):
                    _assert_one_drawing(lines)
                    narrow += 1
        code = term.finish(120)
    finally:
        term.kill()
    assert code == 0, term.text()
    assert narrow >= 1, "a redraw at 80 columns while the run went on"
    _assert_one_drawing(term.lines())
    after = term.raw.decode("utf-8", "replace").split("\x1b[2J")[-1]
    assert all(len(line) <= 80 for line in _printed_lines(after.encode())), "lines after the resize fit 80 columns"


def test_no_color_and_dumb_terminals(tmp_path: Path) -> None:
    env = dict(os.environ, NO_COLOR="1")
    term = Terminal(_etl_run(tmp_path, chunks=4), cols=100, rows=30, env=env, cwd=str(tmp_path))
    try:
        code = term.finish(120)
    finally:
        term.kill()
    assert code == 0
    assert not COLOUR.search(term.raw.decode("utf-8", "replace")), "NO_COLOR: no colour codes"
    assert "summarise[]" in term.text()


def test_not_a_terminal_gets_plain_progress_lines(tmp_path: Path) -> None:
    proc = subprocess.run(_etl_run(tmp_path, chunks=4), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=dict(os.environ, REFLOW_PROGRESS_INTERVAL="0"))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout, "never control codes in a log file"
    assert re.search(r"^\[\d\d:\d\d:\d\d\] run etl-\S+  succeeded", proc.stdout, re.M), proc.stdout
    assert "  summarise[]  4/4  succeeded=4  elapsed " in proc.stdout
    assert proc.stderr == "", "no log lines without -v"
