"""The command line generated from task signatures (``wf.cli()``, ``reflow.cli.build_parser``)."""

from __future__ import annotations

import argparse
import datetime as dt
import enum
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import pytest

from reflow import Param, Result, Workflow
from reflow.cli import build_parser, parse_args, workflow_parameters
from reflow.loader import load_workflow

WORKFLOWS = Path(__file__).resolve().parent / "workflows"


class Mode(enum.Enum):
    FAST = "fast"
    EXACT = "exact"


def make_workflow() -> Workflow:
    wf = Workflow("clitest")

    @wf.job()
    def prepare(
        name: str,
        count: Annotated[int, Param(help="how many chunks (100% of them)", short="c")] = 3,
        ratio: float = 0.5,
        out: Path = Path("/scratch/out"),
        start: dt.datetime = dt.datetime(2025, 1, 1, 6, 0),
        day: dt.date = dt.date(2025, 1, 2),
        dry: bool = False,
        upload: bool = True,
        kind: Literal["grib", "netcdf"] = "grib",
        level: Literal[1, 2, 3] = 2,
        mode: Mode = Mode.FAST,
        tags: list[str] = ["x", "y"],
        sizes: Optional[list[int]] = None,
        limit: Optional[int] = None,
        paths: list[Path] | None = None,
    ) -> list[int]:
        return [1]

    @wf.array_job()
    def convert(
        x: Annotated[int, Result(step="prepare")],
        level: Annotated[int, Param(namespace="local", help="compression level")] = 4,
        threads: Annotated[int, Param(namespace="local", short="t")] = 1,
    ) -> int:
        return x

    return wf


@pytest.fixture(scope="module")
def wf() -> Workflow:
    return make_workflow()


@pytest.fixture(scope="module")
def parser(wf: Workflow) -> argparse.ArgumentParser:
    return build_parser(wf, prog="pipeline.py")


RUN = ["run", "--run-dir", "/scratch/run1"]


def flat(args: argparse.Namespace) -> argparse.Namespace:
    """reflow's options and the workflow's parameters in one namespace (the tests here never mix their names)."""
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "params"}, **args.params)


def parse(parser: argparse.ArgumentParser, *argv: str) -> argparse.Namespace:
    return flat(parse_args(make_workflow(), [*RUN, "--name", "n", *argv]))


def parse_error(parser: argparse.ArgumentParser, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------- parameter flags


def test_defaults(parser: argparse.ArgumentParser, wf: Workflow) -> None:
    args = parse_args(wf, [*RUN, "--name", "n"])
    assert args.command == "run" and args.run_dir == Path("/scratch/run1")
    assert workflow_parameters(wf, args) == {
        "name": "n",
        "count": 3,
        "ratio": 0.5,
        "out": Path("/scratch/out"),
        "start": dt.datetime(2025, 1, 1, 6, 0),
        "day": dt.date(2025, 1, 2),
        "dry": False,
        "upload": True,
        "kind": "grib",
        "level": 2,
        "mode": Mode.FAST,
        "tags": ["x", "y"],
        "sizes": None,
        "limit": None,
        "paths": None,
        "convert_level": 4,
        "convert_threads": 1,
    }


def test_scalar_types_are_converted(parser: argparse.ArgumentParser) -> None:
    args = parse(parser, "--count", "7", "--ratio", "1e-3", "--out", "rel/dir", "--start", "2025-02-03T04:05:06",
                 "--day", "2024-02-29", "--limit", "9")
    assert args.count == 7 and isinstance(args.count, int)
    assert args.ratio == 0.001
    assert args.out == Path("rel/dir") and isinstance(args.out, Path)
    assert args.start == dt.datetime(2025, 2, 3, 4, 5, 6)
    assert args.day == dt.date(2024, 2, 29)
    assert args.limit == 9


def test_datetime_accepts_a_plain_date_and_a_timezone(parser: argparse.ArgumentParser) -> None:
    assert parse(parser, "--start", "2025-03-01").start == dt.datetime(2025, 3, 1)
    aware = parse(parser, "--start", "2025-03-01T12:00:00+02:00").start
    assert aware.utcoffset() == dt.timedelta(hours=2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--start", "yesterday"], r"argument --start: expected an ISO date/time like 2025-01-31.*got 'yesterday'"),
        (["--day", "2025-02-30"], r"argument --day: expected an ISO date"),
        (["--count", "many"], r"argument --count/-c: invalid int value: 'many'"),
        (["--ratio", "half"], r"argument --ratio: invalid float value: 'half'"),
        (["--kind", "zarr"], r"argument --kind: expected one of grib, netcdf, got 'zarr'"),
        (["--level", "4"], r"argument --level: expected one of 1, 2, 3, got '4'"),
        (["--mode", "slow"], r"argument --mode: expected one of fast, exact, got 'slow'"),
        (["--dry", "maybe"], r"argument --dry: expected yes/no/true/false, got 'maybe'"),
        (["--sizes", "1", "two"], r"argument --sizes: invalid int value: 'two'"),
        (["--tags"], r"argument --tags: expected at least one argument"),
        (["--unknown", "1"], r"unrecognized arguments: --unknown 1"),
        (["--cou", "5"], r"unrecognized arguments: --cou"),  # no abbreviations: they break as flags are added
    ],
)
def test_bad_values_give_argparse_errors(parser: argparse.ArgumentParser, capsys: pytest.CaptureFixture[str],
                                         argv: list[str], message: str) -> None:
    err = parse_error(parser, [*RUN, "--name", "n", *argv], capsys)
    assert re.search(message, err), err
    assert err.startswith("usage: pipeline.py")


@pytest.mark.parametrize(
    "argv, dry",
    [
        ([], False),
        (["--dry"], True),
        (["--no-dry"], False),
        (["--dry", "yes"], True),
        (["--dry", "no"], False),
        (["--dry", "true"], True),
        (["--dry", "FALSE"], False),
        (["--dry", "1"], True),
        (["--dry", "off"], False),
    ],
)
def test_bool_flags(parser: argparse.ArgumentParser, argv: list[str], dry: bool) -> None:
    assert parse(parser, *argv).dry is dry


def test_bool_defaulting_to_true_can_be_switched_off(parser: argparse.ArgumentParser) -> None:
    assert parse(parser).upload is True
    assert parse(parser, "--no-upload").upload is False
    assert parse(parser, "--upload", "no").upload is False


def test_bool_flag_followed_by_another_flag(parser: argparse.ArgumentParser) -> None:
    args = parse(parser, "--dry", "--count", "2")
    assert args.dry is True and args.count == 2


def test_contradicting_bool_flags_are_refused(parser: argparse.ArgumentParser,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(parser, [*RUN, "--name", "n", "--dry", "--no-dry"], capsys)
    assert "not allowed with argument" in err


def test_required_bool_is_satisfied_by_its_negative_flag(capsys: pytest.CaptureFixture[str]) -> None:
    wf = Workflow("reqbool")

    @wf.job()
    def a(overwrite: bool) -> int:
        return 1

    p = build_parser(wf)
    assert parse_args(wf, [*RUN, "--no-overwrite"]).params["overwrite"] is False
    assert parse_args(wf, [*RUN, "--overwrite"]).params["overwrite"] is True
    err = parse_error(p, RUN, capsys)
    assert "--overwrite" in err and "required" in err


def test_choices(parser: argparse.ArgumentParser) -> None:
    assert parse(parser, "--kind", "netcdf").kind == "netcdf"
    level = parse(parser, "--level", "3").level
    assert level == 3 and isinstance(level, int), "Literal[int] choices come back as ints"
    assert parse(parser, "--mode", "exact").mode is Mode.EXACT
    assert parse(parser, "--mode", "EXACT").mode is Mode.EXACT, "an enum member's name works too"


def test_lists_take_several_values(parser: argparse.ArgumentParser) -> None:
    args = parse(parser, "--tags", "a", "b", "c", "--sizes", "1", "2", "--paths", "/a", "b/c")
    assert args.tags == ["a", "b", "c"]
    assert args.sizes == [1, 2]
    assert args.paths == [Path("/a"), Path("b/c")]


def test_short_flags(parser: argparse.ArgumentParser) -> None:
    args = parse(parser, "-c", "11", "-t", "8")
    assert args.count == 11 and args.convert_threads == 8


def test_local_namespace_flags(parser: argparse.ArgumentParser) -> None:
    args = parse(parser, "--convert-level", "9", "--level", "1")
    assert args.convert_level == 9 and args.level == 1, "a local flag does not clash with a global of the same name"


def test_missing_required_parameter(parser: argparse.ArgumentParser, capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(parser, RUN, capsys)
    assert "the following arguments are required: --name" in err


def test_parse_args_and_cli_exit_2_on_missing_parameter(wf: Workflow, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(wf, RUN)
    assert exc.value.code == 2
    assert wf.cli(["submit", "--run-dir", "/x"]) == 2, "wf.cli(argv) returns the exit code"
    assert "the following arguments are required: --name" in capsys.readouterr().err


def test_help_shows_types_defaults_help_and_short_flags(parser: argparse.ArgumentParser,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["run", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "workflow parameters:" in out
    assert "--name STR [str] (required)" in out
    assert "--count INT, -c INT how many chunks (100% of them) [int] (default: 3)" in out
    assert "--ratio FLOAT [float] (default: 0.5)" in out
    assert "--out PATH [Path] (default: /scratch/out)" in out
    assert "--start DATETIME [datetime] (default: 2025-01-01 06:00:00)" in out
    assert "--dry [yes|no] [bool] (default: False)" in out
    assert "--no-dry same as --dry no" in out
    assert "--kind {grib,netcdf}" in out and "(default: grib)" in out
    assert "--mode {fast,exact}" in out and "(default: fast)" in out
    assert "--tags STR [STR ...] [list[str]] (default: x y)" in out
    assert "--convert-level INT compression level [int] (default: 4)" in out
    assert "--convert-threads INT, -t INT" in out


def test_unsupported_parameter_type_with_a_default_is_left_off_the_command_line() -> None:
    wf = Workflow("dictparam")

    @wf.job()
    def a(options: dict[str, int] = {"x": 1}, n: int = 2) -> int:  # noqa: B006
        return n

    args = parse_args(wf, [*RUN, "--n", "3"])
    assert workflow_parameters(wf, args) == {"n": 3}, "the default of 'options' applies"
    assert wf.resolve_parameters(workflow_parameters(wf, args)) == {"options": {"x": 1}, "n": 3}


def test_unsupported_required_parameter_type_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    wf = Workflow("dictparam2")

    @wf.job()
    def a(options: dict[str, int]) -> int:
        return 1

    with pytest.raises(TypeError, match=r"task 'a' parameter 'options': parameters of type dict\[str, int\] cannot be given"):
        build_parser(wf)
    assert wf.cli(["dag"]) == 2
    assert "cannot be given on the command line" in capsys.readouterr().err


# ---------------------------------------------------------------------------- subcommands


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "--run-dir", "d", "--name", "n", "--max-workers", "3", "--on-error", "continue", "--force",
          "--force-tasks", "prepare", "convert", "--verify"],
         {"command": "run", "run_dir": Path("d"), "max_workers": 3, "on_error": "continue", "force": True,
          "force_tasks": ["prepare", "convert"], "verify": True}),
        (["submit", "--run-dir", "d", "--name", "n", "--cluster", "levante", "--no-daemon", "--wait", "--json",
          "--socket", "/tmp/s.sock"],
         {"command": "submit", "cluster": "levante", "no_daemon": True, "wait": True, "json": True,
          "socket": Path("/tmp/s.sock"), "force": False, "verify": False}),
        (["status", "run-123"], {"command": "status", "run_id": "run-123", "task": None, "json": False}),
        (["status", "run-123", "--task", "convert", "--json"], {"run_id": "run-123", "task": "convert", "json": True}),
        (["cancel", "run-123"], {"command": "cancel", "run_id": "run-123", "task": None}),
        (["cancel", "run-123", "--task", "convert"], {"task": "convert"}),
        (["retry", "run-123"], {"command": "retry", "run_id": "run-123", "verify": True}),
        (["retry", "run-123", "--task", "convert", "--no-verify"], {"task": "convert", "verify": False}),
        (["runs"], {"command": "runs", "state": None, "limit": 20, "json": False}),
        (["runs", "--state", "failed", "--limit", "5", "--json"], {"state": "failed", "limit": 5, "json": True}),
        (["dag"], {"command": "dag", "format": "text"}),
        (["dag", "--format", "mermaid"], {"format": "mermaid"}),
        (["dag", "--format", "dot"], {"format": "dot"}),
        (["describe"], {"command": "describe"}),
    ],
)
def test_subcommands_parse(wf: Workflow, argv: list[str], expected: dict[str, Any]) -> None:
    args = vars(flat(parse_args(wf, argv)))
    assert {k: args[k] for k in expected} == expected


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: COMMAND"),
        (["launch"], "invalid choice: 'launch'"),
        (["status"], "the following arguments are required: RUN"),
        (["cancel"], "the following arguments are required: RUN"),
        (["retry"], "the following arguments are required: RUN"),
        (["dag", "--format", "png"], "invalid choice: 'png'"),
        (["run", "--run-dir", "d", "--name", "n", "--on-error", "ignore"], "invalid choice: 'ignore'"),
    ],
)
def test_subcommand_errors(parser: argparse.ArgumentParser, capsys: pytest.CaptureFixture[str], argv: list[str],
                           message: str) -> None:
    assert message in parse_error(parser, argv, capsys)


def test_run_dir_is_required(wf: Workflow, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(wf, ["run", "--name", "n"])
    assert exc.value.code == 2
    assert "the following arguments are required: --run-dir" in capsys.readouterr().err


def test_workflow_flags_only_on_run_and_submit(parser: argparse.ArgumentParser, wf: Workflow,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(wf, ["submit", "--run-dir", "d", "--name", "n", "-c", "2"]).params["count"] == 2
    assert "unrecognized arguments: --name" in parse_error(parser, ["status", "r1", "--name", "n"], capsys)


def test_parse_args_validates_the_workflow_first() -> None:
    wf = Workflow("broken")

    @wf.job()
    def a(x: Annotated[int, Result(step="missing")]) -> int:
        return x

    with pytest.raises(ValueError, match="unknown task 'missing'"):
        parse_args(wf, ["dag"])


def test_cli_reports_an_invalid_workflow_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    wf = Workflow("broken2")

    @wf.job()
    def a() -> str:
        return ""

    @wf.job()
    def b(x: Annotated[int, Result(step="a")]) -> int:
        return x

    assert wf.cli(["dag"]) == 2
    err = capsys.readouterr().err
    assert ": error: incompatible wiring 'a' -> b.x" in err and err.count("\n") == 1, "one line, no traceback"


# ---------------------------------------------------------------------------- dag and describe


@pytest.fixture(scope="module")
def wiring_wf() -> Workflow:
    return load_workflow(WORKFLOWS / "wiring_modes.py")


EDGES = [
    ("src", "double", "x: direct"),
    ("items", "square", "x: fanout"),
    ("square", "plus_one", "x: chain"),
    ("plus_one", "total", "xs: gather"),
    ("pairs", "flat", "xs: gather_flatten"),
    ("pairs", "neg", "x: chain_flatten"),
    ("items", "offset", "x: fanout, everything: broadcast"),
    ("square", "rank", "x: chain, all_squares: broadcast"),
    ("src", "both", "xs: gather"),
    ("double", "both", "xs: gather"),
]


def dag(wf: Workflow, fmt: str, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert wf.cli(["dag", "--format", fmt]) == 0
    return capsys.readouterr().out


def test_dag_text(wiring_wf: Workflow, capsys: pytest.CaptureFixture[str]) -> None:
    out = dag(wiring_wf, "text", capsys)
    assert out.startswith("workflow wiring_modes (21 tasks")
    lines = out.splitlines()
    for up, down, label in EDGES:
        node = next(i for i, line in enumerate(lines) if line.strip() in (down, f"{down}[]"))
        block = []
        for line in lines[node + 1:]:
            if not line.startswith("    <- "):
                break
            block.append(line.strip())
        assert f"<- {up} ({label})" in block, (down, block)
    assert "  square[]" in lines and "  double" in lines, "array tasks are marked"


def test_dag_mermaid(wiring_wf: Workflow, capsys: pytest.CaptureFixture[str]) -> None:
    out = dag(wiring_wf, "mermaid", capsys)
    assert out.startswith("flowchart TD\n")
    for up, down, label in EDGES:
        assert f't_{up} -->|"{label}"| t_{down}' in out
    assert 't_square[["square[]"]]' in out and 't_src["src"]' in out


def test_dag_dot(wiring_wf: Workflow, capsys: pytest.CaptureFixture[str]) -> None:
    out = dag(wiring_wf, "dot", capsys)
    assert out.startswith('digraph "wiring_modes" {') and out.rstrip().endswith("}")
    for up, down, label in EDGES:
        assert f'"{up}" -> "{down}" [label="{label}"];' in out
    assert '"square" [label="square[]" style="rounded,bold" peripheries=2];' in out


@pytest.mark.parametrize("fmt", ["text", "mermaid", "dot"])
def test_dag_shows_after_edges(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    wf = load_workflow(WORKFLOWS / "described.py")
    out = dag(wf, fmt, capsys)
    expected = {
        "text": "<- prepare (after)",
        "mermaid": 't_prepare -->|"after"| t_report',
        "dot": '"prepare" -> "report" [label="after" style=dashed];',
    }[fmt]
    assert expected in out
    assert "gather" in out and "fanout" in out


def test_describe_prints_the_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    wf = load_workflow(WORKFLOWS / "described.py")
    capsys.readouterr()
    assert wf.cli(["describe"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(wf.describe()))
    assert [t["name"] for t in printed["tasks"]] == ["prepare", "convert", "report"]


# ---------------------------------------------------------------------------- the whole thing


def test_run_from_the_command_line(tmp_path: Path) -> None:
    """``python described.py run ...``: flags parsed, the run executed, results printed; the workers do not
    run the file's ``__main__`` block (only the command itself does)."""
    marker = tmp_path / "main-ran.txt"
    env = dict(os.environ, DESCRIBED_MAIN_MARKER=str(marker))
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(WORKFLOWS / "described.py"), "run", "--run-dir", str(run_dir), "--start", "2025-01-31",
         "-n", "2", "--label", "t", "--dry", "--tags", "p", "q", "--fmt", "json", "--mode", "exact",
         "--convert-level", "7", "--max-workers", "2"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "succeeded" in proc.stdout
    line = next(line for line in proc.stdout.splitlines() if line.strip().startswith("report = "))
    report = json.loads(eval(line.split(" = ", 1)[1]))  # the value is printed with repr()
    assert report == {
        "converted": ["t-20250131-0:exact:1.0:7", "t-20250131-1:exact:1.0:7"],
        "dry": True,
        "limit": None,
        "tags": ["p", "q"],
    }
    assert len(marker.read_text().split()) == 1, "only the command itself ran the __main__ block, no worker did"


def test_run_from_the_command_line_reports_a_missing_parameter(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(WORKFLOWS / "described.py"), "run", "--run-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "the following arguments are required: --start" in proc.stderr
    assert not (tmp_path / ".reflow").exists(), "nothing ran"
