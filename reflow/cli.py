"""The command line generated from task signatures: ``wf.cli()``.

    python pipeline.py run    --run-dir DIR [workflow parameters]   run here, in this process
    python pipeline.py submit --run-dir DIR [workflow parameters]   hand the run to reflowd
    python pipeline.py status RUN | watch RUN | results RUN | logs RUN TASK | cancel RUN | retry RUN | runs
    python pipeline.py dag [--format text|mermaid|dot] | describe

Workflow parameters come from the tasks' run parameters: their types,
defaults and ``Param`` metadata. They win their plain names: reflow's own
options (``--run-dir``, ``--wait``, ...) step aside to ``--reflow-<name>``
where a parameter takes the same flag (``reflow_client.cli_parser``). The
same builder serves ``reflow-client submit FILE``. Building the parser is
separate from running the command so the parsing can be tested on its own.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import enum
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from reflow_client import cli_errors
from reflow_client.cli_errors import CliError, fail
from reflow_client.cli_parser import (
    COMMAND_DEST,
    OWN_OPTIONS_NOTE,
    RUN_OPTIONS,
    OwnOption,
    Parser,
    add_own_options,
    check_required,
    flags_taken,
    split_namespace,
    submit_options,
)

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
    group = parser.add_argument_group("workflow parameters", f"the parameters of workflow {wf.name!r}")
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


@dataclass
class CommandParser:
    """A run/submit parser with what is needed to finish parsing (own options, parameter keys)."""

    parser: argparse.ArgumentParser
    options: list[OwnOption]
    keys: list[str]
    shown: dict[str, str]

    def parse(self, argv: list[str]) -> argparse.Namespace:
        return self.finish(self.parser.parse_args(argv))

    def finish(self, ns: argparse.Namespace) -> argparse.Namespace:
        check_required(self.parser, ns, self.options, self.shown)
        return split_namespace(ns, self.keys)


def _with_params(parser: argparse.ArgumentParser, wf: Workflow, options: list[OwnOption]) -> CommandParser:
    keys = add_param_flags(parser, wf)
    group = parser.add_argument_group("options", "reflow's own options")
    shown = add_own_options(group, options, flags_taken(parser))
    return CommandParser(parser, options, keys, shown)


def _describe(wf: Workflow) -> str:
    return f"Workflow {wf.name!r}: {len(wf.tasks)} task(s): {', '.join(wf.tasks)}."


def submit_parser(wf: Workflow, prog: str, *, client: bool) -> CommandParser:
    """The parser of ``reflow-client submit FILE`` (client=True) or of ``pipeline.py submit``."""
    parser = Parser(prog=prog, add_help=False, description=f"{_describe(wf)} Submit a run to reflowd (started in "
                    "the background if none answers).", epilog=f"{OWN_OPTIONS_NOTE} {cli_errors.EXIT_CODES_HELP}.")
    return _with_params(parser, wf, submit_options(run_dir_required=not client, client=client))


def build_parser(wf: Workflow, prog: str | None = None) -> Parser:
    parser = Parser(
        prog=prog,
        description=_describe(wf),
        epilog=f"RUN is a run id, any unambiguous prefix of one, or 'last' (this workflow's newest run). "
               f"{cli_errors.EXIT_CODES_HELP}.",
    )
    from reflow_client.cli import add_run_commands, version

    parser.add_argument("--version", action="version", version=f"%(prog)s (reflow {version()})")
    sub = parser.add_subparsers(dest=COMMAND_DEST, required=True, metavar="COMMAND", parser_class=Parser)
    commands: dict[str, CommandParser] = {}

    run = sub.add_parser("run", add_help=False, help="run the whole workflow on this machine, in this process",
                         description=f"{_describe(wf)} Run it here, in this process, with reflow's engine (no "
                                     "daemon); cached results from earlier runs in the same run directory are reused.",
                         epilog=f"{OWN_OPTIONS_NOTE} {cli_errors.EXIT_CODES_HELP}.")
    commands["run"] = _with_params(run, wf, RUN_OPTIONS)
    submit = sub.add_parser("submit", add_help=False, help="submit a run to reflowd (started in the background if "
                            "needed)", description=f"{_describe(wf)} Submit a run to reflowd (started in the "
                            "background if none answers).", epilog=f"{OWN_OPTIONS_NOTE} {cli_errors.EXIT_CODES_HELP}.")
    commands["submit"] = _with_params(submit, wf, submit_options(run_dir_required=True, client=False))

    add_run_commands(sub, workflow_scoped=True)

    dag = sub.add_parser("dag", help="print the task graph", description="Print the task graph.")
    dag.add_argument("--format", choices=["text", "mermaid", "dot"], default="text",
                     help="text (default), a mermaid flowchart, or graphviz dot")
    sub.add_parser("describe", help="print the manifest (JSON) reflowd runs from",
                   description="Print the manifest (JSON) reflowd runs from.")
    parser.set_defaults(**{"reflow:parsers": commands})
    return parser


def parse_args(wf: Workflow, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a workflow CLI's arguments: ``.command``, reflow's options by name, the parameters in ``.params``."""
    wf.validate()
    parser = build_parser(wf)
    ns = parser.parse_args(argv)
    commands: dict[str, CommandParser] = vars(ns).pop("reflow:parsers")
    command = vars(ns).pop(COMMAND_DEST)
    if command in commands:
        args = commands[command].finish(ns)
    else:
        args = argparse.Namespace(**vars(ns))
        args.params = {}
    args.command = command
    return args


def workflow_parameters(wf: Workflow, args: argparse.Namespace) -> dict[str, Any]:
    """The run parameters given on the command line (keys as in ``Workflow.submit``)."""
    return dict(getattr(args, "params", {}))


def run_command(wf: Workflow, args: argparse.Namespace) -> int:
    from .dag import RENDERERS

    if args.command == "dag":
        sys.stdout.write(RENDERERS[args.format](wf.describe_typed()))
        return 0
    if args.command == "describe":
        print(json.dumps(wf.describe(), indent=2, default=str))
        return 0
    from . import commands

    return commands.dispatch(wf, args)


def main(wf: Workflow, argv: list[str] | None = None) -> int:
    """``wf.cli()``: run the CLI; as a program (argv None) a failure also ends the process with its exit code."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "reflow"
    given = list(sys.argv[1:] if argv is None else argv)
    code = cli_errors.guarded(prog, lambda: run_command(wf, parse_args(wf, given)),
                              debug=cli_errors.debug_enabled(given))
    if argv is None and code != 0:
        raise SystemExit(code)
    return code


# ---------------------------------------------------------------------- reflow-client submit FILE


def load_for_cli(path: str, name: str | Callable[[], str | None] | None = None) -> Workflow:
    """The workflow in *path*, or a CliError that says what is wrong with the file and how to fix it.

    *name* picks one of several workflows; a callable is asked only when the file defines several.
    """
    import os

    from .loader import WorkflowLoadError, load_module
    from .workflow import Workflow

    file = Path(path).expanduser()
    if not file.exists():
        fail(f"workflow file {path} does not exist; give the path of the Python file that defines the workflow")
    if file.is_dir():
        scripts = sorted(p.name for p in file.glob("*.py"))[:5]
        fail(f"{path} is a directory; give the Python file that defines the workflow"
             + (f" (it has: {', '.join(scripts)})" if scripts else ""))
    if not os.access(file, os.R_OK):
        fail(f"cannot read workflow file {path}; check its permissions")
    try:
        module = load_module(file)
    except SyntaxError as exc:
        where = f"{exc.filename or path}:{exc.lineno}" if exc.lineno else str(exc.filename or path)
        raise CliError(f"{where}: syntax error: {exc.msg}; fix the file and try again") from exc
    except WorkflowLoadError as exc:
        raise CliError(str(exc)) from exc
    except ImportError as exc:
        raise CliError(f"{path} could not be imported: {exc}; install what it imports (or put it on PYTHONPATH)") \
            from exc
    except Exception as exc:  # noqa: BLE001 - the user's module raised while being imported
        raise CliError(f"{path} raised {type(exc).__name__} while being imported: {exc} (--debug shows the "
                       "traceback)") from exc
    found = list({id(v): v for v in vars(module).values() if isinstance(v, Workflow)}.values())
    if not found:
        fail(f"{path} defines no Workflow when imported; create it at the top level of the file (not inside a "
             "function or under 'if __name__ == \"__main__\":'), for example wf = Workflow(\"name\")")
    if callable(name):
        name = name() if len(found) > 1 else None  # --workflow matters only where there is a choice
    if name is not None:
        named = [w for w in found if w.name == name]
        if not named:
            fail(f"{path} defines no workflow named {name!r} (it defines: {', '.join(sorted(w.name for w in found))})")
        found = named
    if len(found) > 1:
        fail(f"{path} defines several workflows ({', '.join(sorted(w.name for w in found))}); pick one with "
             "--workflow NAME")
    wf = found[0]
    wf.entrypoint = file.resolve()
    return wf


def client_submit(path: str, argv: list[str], *, socket: Path | None,
                  workflow: Callable[[], str | None] | None) -> int:
    """``reflow-client submit FILE [options] [workflow parameters]``."""
    wf = load_for_cli(path, workflow)
    wf.validate()
    cp = submit_parser(wf, f"reflow-client submit {path}", client=True)
    args = cp.parse(argv)
    chosen = getattr(args, "workflow", None)
    if chosen is not None and chosen != wf.name:
        fail(f"{path} defines workflow {wf.name!r}, not {chosen!r}")
    if args.socket is None:
        args.socket = socket
    args.command = "submit"
    from . import commands

    return commands.cmd_submit(wf, args, prog="reflow-client")
