"""argparse pieces shared by ``reflow-client``, ``reflowd`` and the workflow CLIs.

* :class:`Parser` adds "did you mean" to argparse's errors (mistyped flags,
  subcommands and choices).
* :func:`add_own_options` adds reflow's own options (``--run-dir``,
  ``--wait``, ...) *beside* a workflow's parameters without ever taking a
  name away from them: a parameter called ``verify`` gets ``--verify``, and
  reflow's option moves aside to ``--reflow-verify``. Every own option also
  answers to its ``--reflow-`` form, so scripts can use that spelling and stay
  correct whatever parameters a workflow grows. Own options are stored under
  ``reflow:<name>`` dests, so they never collide with a parameter's dest.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

OWN_PREFIX = "reflow-"
OWN_DEST = "reflow:"
COMMAND_DEST = "reflow:command"

_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (.*)$")
_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


def edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of neighbours."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to a mistyped *word*, if any is close enough to be what was meant."""
    best = None
    for cand in sorted(set(candidates)):
        dist = edit_distance(word.lower(), cand.lower())
        if dist > max(1, len(cand) // 3) and difflib.SequenceMatcher(None, word, cand).ratio() < 0.75:
            continue
        key = (dist, abs(len(cand) - len(word)), -difflib.SequenceMatcher(None, word, cand).ratio())
        if best is None or key < best[0]:
            best = (key, cand)
    return best[1] if best else None


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors suggest the closest flag, subcommand or choice."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # abbreviations break as soon as a flag is added
        super().__init__(*args, **kwargs)

    def option_strings(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings if action.help is not argparse.SUPPRESS
                or s.startswith("--" + OWN_PREFIX)]

    def with_suggestion(self, message: str) -> str:
        m = _UNRECOGNIZED.match(message)
        if m:
            for word in m.group(1).split():
                if word.startswith("-"):
                    flag = word.split("=", 1)[0]
                    close = suggest(flag, self.option_strings())
                    if close:
                        return f"{message}; did you mean {close}?"
            return message
        m = _INVALID_CHOICE.search(message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            close = suggest(m.group(1), choices)
            if close:
                return f"{message}; did you mean '{close}'?"
        return message

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {self.with_suggestion(message)}\n")


def subparser_for(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


# ---------------------------------------------------------------------- own options beside workflow parameters


@dataclass(frozen=True)
class OwnOption:
    """One of reflow's own options: plain name (``run-dir``), argparse keywords and help."""

    name: str
    help: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    short: str | None = None
    required: bool = False

    @property
    def dest(self) -> str:
        return OWN_DEST + self.name.replace("-", "_")

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")


def flags_taken(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def add_own_options(group: Any, options: Sequence[OwnOption], taken: set[str]) -> dict[str, str]:
    """Add *options* to *group* without using any flag in *taken* (the workflow's parameters).

    Returns ``{option name: the flag shown in help}``. An option whose plain
    flag is taken is shown as ``--reflow-<name>``; if that is taken too, the
    workflow cannot be given a CLI and ValueError says which parameter to rename.
    """
    shown: dict[str, str] = {}
    for opt in options:
        plain, prefixed = f"--{opt.name}", f"--{OWN_PREFIX}{opt.name}"
        if prefixed in taken:
            raise ValueError(f"a workflow parameter takes the flag {prefixed}, which reflow keeps for its own "
                             f"{plain} option; rename that parameter")
        kwargs = dict(opt.kwargs)
        kwargs.setdefault("default", None if kwargs.get("action") not in ("store_true", "store_false") else
                          kwargs["action"] == "store_false")
        text = opt.help + (" (required)" if opt.required else "")
        names = []
        if opt.short and f"-{opt.short}" not in taken:
            names.append(f"-{opt.short}")
        if plain not in taken:
            names.append(plain)
            group.add_argument(*names, dest=opt.dest, help=text, **kwargs)
            hidden = dict(kwargs)
            hidden.pop("default", None)
            group.add_argument(prefixed, dest=opt.dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS,
                               **{k: v for k, v in hidden.items() if k != "required"})
            shown[opt.name] = plain
        else:
            group.add_argument(*names, prefixed, dest=opt.dest,
                               help=f"{text} ({plain} is the workflow's own parameter)", **kwargs)
            shown[opt.name] = prefixed
    return shown


def check_required(parser: argparse.ArgumentParser, args: argparse.Namespace, options: Sequence[OwnOption],
                   shown: dict[str, str]) -> None:
    """argparse cannot require one of two flags of a dest; do it here, with argparse's own wording."""
    missing = [shown[o.name] for o in options if o.required and getattr(args, o.dest, None) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")


def own_values(args: argparse.Namespace) -> dict[str, Any]:
    """``{key: value}`` of every own option in *args* (``reflow:run_dir`` -> ``run_dir``)."""
    return {k[len(OWN_DEST):]: v for k, v in vars(args).items() if k.startswith(OWN_DEST)}


def split_namespace(args: argparse.Namespace, param_keys: Iterable[str]) -> argparse.Namespace:
    """One namespace with the own options under their plain keys and the parameters in ``.params``."""
    keys = list(param_keys)
    values = vars(args)
    out = argparse.Namespace(**own_values(args))
    out.params = {k: values[k] for k in keys if k in values}
    for k, v in values.items():  # subcommand arguments without the prefix (run_id, task, ...)
        if not k.startswith(OWN_DEST) and k not in keys:
            setattr(out, k, v)
    return out


# ---------------------------------------------------------------------- the options of run and submit

HELP = OwnOption("help", "show this help and exit", {"action": "help"}, short="h")
DEBUG = OwnOption("debug", "show Python tracebacks for errors (also REFLOW_DEBUG=1)", {"action": "store_true"})
SOCKET = OwnOption("socket", "reflowd's socket (default: $REFLOW_SOCKET or $XDG_RUNTIME_DIR/reflow/reflowd.sock)",
                   {"type": Path, "metavar": "PATH"})


def _run_dir(required: bool) -> OwnOption:
    return OwnOption("run-dir", "the run's shared working directory" + ("" if required else
                     " (default: ./runs/<workflow>)"), {"type": Path, "metavar": "DIR"}, required=required)


_COMMON = [
    OwnOption("force", "ignore cached results: run every task again", {"action": "store_true"}),
    OwnOption("force-tasks", "run these tasks again even if cached", {"nargs": "+", "metavar": "TASK"}),
    OwnOption("verify", "check cached outputs before reusing them (files exist, verify=...)",
              {"action": "store_true"}),
]
JSON = OwnOption("json", "print machine-readable JSON only (one document)", {"action": "store_true"})

RUN_OPTIONS = [
    _run_dir(required=True),
    *_COMMON,
    OwnOption("on-error", "after a failure: stop starting new tasks, or continue independent ones (default: stop)",
              {"choices": ["stop", "continue"]}),
    OwnOption("max-workers", "parallel task processes (default: the number of CPUs)", {"type": int, "metavar": "N"}),
    OwnOption("verbose", "show the engine's log lines (-vv: debug)", {"action": "count"}, short="v"),
    JSON, DEBUG, HELP,
]


def submit_options(*, run_dir_required: bool, client: bool) -> list[OwnOption]:
    """The options of ``submit`` (``client``: ``reflow-client submit FILE``, which can pick a workflow)."""
    options = [
        _run_dir(required=run_dir_required),
        *_COMMON,
        OwnOption("on-error", "after a failure: stop starting new tasks, or continue independent ones "
                  "(default: continue)", {"choices": ["stop", "continue"]}),
        OwnOption("cluster", "cluster from the configuration file (default: its default, usually local)",
                  {"metavar": "NAME"}),
        OwnOption("wait", "follow the run's progress until it ends, then show its results (exit 1 if it failed)",
                  {"action": "store_true"}),
        OwnOption("cancel-on-interrupt", "with --wait: Ctrl-C cancels the run (by default the run goes on in "
                  "reflowd and Ctrl-C only stops following it)", {"action": "store_true"}),
        OwnOption("no-daemon", "fail instead of starting reflowd when none answers", {"action": "store_true"}),
        JSON, SOCKET, DEBUG, HELP,
    ]
    if client:
        options.insert(1, OwnOption("workflow", "the workflow to submit when the file defines several",
                                    {"metavar": "NAME"}))
    return options


OWN_OPTIONS_NOTE = (
    "Every option above also answers to --reflow-NAME (for example --reflow-wait). When a workflow parameter has "
    "the same name as an option, the parameter keeps the plain flag and the option is shown as --reflow-NAME."
)
