"""The command line generated from task signatures: ``wf.cli()``.

    python pipeline.py run    --run-dir DIR [workflow flags]   run here, in this process
    python pipeline.py submit --run-dir DIR [workflow flags]   hand the run to reflowd
    python pipeline.py status RUN_ID | cancel RUN_ID | retry RUN_ID | runs
    python pipeline.py dag [--format text|mermaid|dot] | describe

Workflow flags come from the tasks' run parameters: their types, defaults
and ``Param`` metadata. Building the parser is separate from running the
command so the parsing can be tested on its own.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import enum
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from reflow_client import codec

from .typeinfo import list_element, strip_optional, type_repr

if TYPE_CHECKING:
    from .flow import RunParam
    from .workflow import Workflow

_TRUE = {"yes", "true", "1", "on", "y"}
_FALSE = {"no", "false", "0", "off", "n"}


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected yes/no/true/false, got {text!r}")


def parse_datetime(text: str) -> _dt.datetime:
    try:
        return _dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO date/time like 2025-01-31 or 2025-01-31T12:00:00, got {text!r}"
        ) from None


def parse_date(text: str) -> _dt.date:
    try:
        return _dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO date like 2025-01-31, got {text!r}") from None


def _named(func: Any, name: str) -> Any:
    func.__name__ = name  # argparse names the type in "invalid <name> value" messages
    return func


def _enum_parser(cls: type[enum.Enum]) -> Any:
    def parse(text: str) -> enum.Enum:
        for member in cls:
            if text in (member.name, str(member.value)):
                return member
        choices = ", ".join(str(m.value) for m in cls)
        raise argparse.ArgumentTypeError(f"expected one of {choices}, got {text!r}")

    return _named(parse, cls.__name__)


def _literal_parser(choices: tuple[Any, ...]) -> Any:
    def parse(text: str) -> Any:
        for choice in choices:
            if text == str(choice):
                return choice
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(str(c) for c in choices)}, got {text!r}")

    return _named(parse, "choice")


def value_parser(tp: Any) -> tuple[Any, list[str] | None]:
    """(argparse ``type=`` callable, choices shown in help) for a scalar type."""
    tp, _ = strip_optional(tp)
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        return _literal_parser(choices), [str(c) for c in choices]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum_parser(tp), [str(m.value) for m in tp]
    if tp is bool:
        return _named(parse_bool, "bool"), None
    if tp is int:
        return int, None
    if tp is float:
        return float, None
    if isinstance(tp, type) and issubclass(tp, Path):
        return Path, None
    if tp is _dt.datetime:
        return _named(parse_datetime, "datetime"), None
    if tp is _dt.date:
        return _named(parse_date, "date"), None
    if tp is str or tp is Any:
        return str, None
    raise TypeError(f"parameters of type {type_repr(tp)} cannot be given on the command line")


def _help_text(rp: RunParam, tp_text: str, required: bool, default: Any) -> str:
    parts = [rp.marker.help] if rp.marker.help else []
    parts.append(f"[{tp_text}]")
    if required:
        parts.append("(required)")
    elif default is not None:
        shown = default.value if isinstance(default, enum.Enum) else default
        if isinstance(shown, list):
            shown = " ".join(str(v) for v in shown)
        parts.append(f"(default: {shown})")
    return " ".join(parts).replace("%", "%%")


def add_param_flags(parser: argparse.ArgumentParser, wf: Workflow) -> list[str]:
    """Add one flag per merged run parameter; returns the dests (= parameter keys)."""
    group = parser.add_argument_group("workflow parameters")
    keys = []
    for key, rps in wf._merged_params().items():
        rp = rps[0]
        default_rp = next((r for r in rps if r.has_default), None)
        required = default_rp is None
        default = default_rp.default if default_rp is not None else None
        names = [rp.flag] + ([f"-{s}"] if (s := next((r.marker.short for r in rps if r.marker.short), None)) else [])
        base = rp.base_type
        elem = list_element(base)
        tp_text = type_repr(rp.annotation)
        help_text = _help_text(rp, tp_text, required, default)
        try:
            if strip_optional(base)[0] is bool:
                # One of the pair is required, so --no-flag alone satisfies a required bool.
                pair = group.add_mutually_exclusive_group(required=required)
                pair.add_argument(
                    *names,
                    dest=key,
                    nargs="?",
                    const=True,
                    type=_named(parse_bool, "bool"),
                    default=default,
                    metavar="yes|no",
                    help=help_text,
                )
                pair.add_argument(
                    "--no-" + rp.flag[2:], dest=key, action="store_false", help=f"same as {rp.flag} no"
                )
            elif elem is not None:
                parse, choices = value_parser(elem)
                group.add_argument(
                    *names,
                    dest=key,
                    nargs="+",
                    type=parse,
                    required=required,
                    default=default,
                    metavar=(choices and "{" + ",".join(choices) + "}") or type_repr(elem).upper(),
                    help=help_text,
                )
            else:
                parse, choices = value_parser(base)
                group.add_argument(
                    *names,
                    dest=key,
                    type=parse,
                    required=required,
                    default=default,
                    metavar=(choices and "{" + ",".join(choices) + "}") or type_repr(strip_optional(base)[0]).upper(),
                    help=help_text,
                )
        except argparse.ArgumentError as exc:
            raise ValueError(f"parameter {key!r}: {exc}") from None
        except TypeError as exc:
            if not required:  # not settable from the command line; its default applies
                continue
            raise TypeError(f"task {rp.task!r} parameter {rp.name!r}: {exc}") from None
        keys.append(key)
    return keys


def _add_daemon_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, help="reflowd socket (default: $REFLOW_SOCKET or the XDG runtime dir)")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, required=True, help="shared working directory for this run")
    parser.add_argument("--force", action="store_true", help="ignore cached results and run every task")
    parser.add_argument("--force-tasks", nargs="+", metavar="TASK", default=None, help="run these tasks even if cached")
    parser.add_argument("--verify", action="store_true", help="verify cached outputs (files exist, verify=...)")


def build_parser(wf: Workflow, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description=f"Workflow {wf.name!r}: {len(wf.tasks)} task(s).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", allow_abbrev=False, help="run the whole workflow on this machine, in this process")
    _add_run_flags(run)
    run.add_argument("--max-workers", type=int, default=None, help="parallel task processes (default: CPU count)")
    run.add_argument("--on-error", choices=["stop", "continue"], default="stop",
                     help="after a failure: stop starting new tasks, or continue independent ones (default: stop)")
    add_param_flags(run, wf)

    submit = sub.add_parser("submit", allow_abbrev=False, help="submit a run to reflowd (started in the background if needed)")
    _add_run_flags(submit)
    submit.add_argument("--cluster", help="cluster name from ~/.config/reflow/config.toml (default: local)")
    submit.add_argument("--no-daemon", action="store_true", help="fail instead of starting reflowd when none answers")
    submit.add_argument("--wait", action="store_true", help="follow progress until the run ends")
    submit.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_daemon_flags(submit)
    add_param_flags(submit, wf)

    status = sub.add_parser("status", allow_abbrev=False, help="show a run's progress")
    status.add_argument("run_id", metavar="RUN_ID")
    status.add_argument("--task", help="show this task's instances")
    status.add_argument("--json", action="store_true")
    _add_daemon_flags(status)

    cancel = sub.add_parser("cancel", allow_abbrev=False, help="cancel a run or one of its tasks")
    cancel.add_argument("run_id", metavar="RUN_ID")
    cancel.add_argument("--task", help="cancel only this task")
    cancel.add_argument("--json", action="store_true")
    _add_daemon_flags(cancel)

    retry = sub.add_parser("retry", allow_abbrev=False, help="retry failed or cancelled instances")
    retry.add_argument("run_id", metavar="RUN_ID")
    retry.add_argument("--task", help="retry only this task")
    retry.add_argument("--no-verify", dest="verify", action="store_false", help="trust cached upstream outputs")
    retry.add_argument("--json", action="store_true")
    _add_daemon_flags(retry)

    runs = sub.add_parser("runs", allow_abbrev=False, help="list this workflow's runs")
    runs.add_argument("--state", help="only runs in this state (running, succeeded, failed, cancelled)")
    runs.add_argument("--limit", type=int, default=20)
    runs.add_argument("--json", action="store_true")
    _add_daemon_flags(runs)

    dag = sub.add_parser("dag", allow_abbrev=False, help="print the task graph")
    dag.add_argument("--format", choices=["text", "mermaid", "dot"], default="text")

    sub.add_parser("describe", allow_abbrev=False, help="print the manifest (JSON) the daemon runs from")
    return parser


def parse_args(wf: Workflow, argv: list[str] | None = None) -> argparse.Namespace:
    wf.validate()
    return build_parser(wf).parse_args(argv)


def workflow_parameters(wf: Workflow, args: argparse.Namespace) -> dict[str, Any]:
    """The run parameters given on the command line (keys as in ``Workflow.submit``)."""
    return {key: getattr(args, key) for key in wf._merged_params() if hasattr(args, key)}


def run_command(wf: Workflow, args: argparse.Namespace) -> int:
    from .dag import RENDERERS

    if args.command == "dag":
        sys.stdout.write(RENDERERS[args.format](wf.describe_typed()))
        return 0
    if args.command == "describe":
        print(json.dumps(wf.describe(), indent=2, default=str))
        return 0
    from . import commands

    return commands.dispatch(wf, args, workflow_parameters(wf, args))


def main(wf: Workflow, argv: list[str] | None = None) -> int:
    try:
        args = parse_args(wf, argv)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_command(wf, args)


def encode_for_display(value: Any) -> str:
    try:
        return json.dumps(codec.encode(value))
    except codec.CodecError:
        return repr(value)
