"""Submit options: the keys that mean the same on every scheduler, and how each system takes them (pure).

Users write the seed's portable keys (:data:`PORTABLE_OPTIONS`) in a task's
``submit_options``; each adapter declares in an :class:`OptionSpec` which flag
each key becomes on its system, or why the system has no such thing. A key a
system cannot take is refused when the run is submitted, with one message
format everywhere (:func:`refusal`): the key, the system, the keys it does
accept. Anything else goes through the one pass-through key
:data:`NATIVE_OPTION`, whose words are handed to the submit command unchanged
(as separate arguments, never through a shell). Slurm, whose every ``sbatch``
long option is a key of its own, uses the same messages and value checks.
"""

from __future__ import annotations

import difflib
import re
import shlex
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import OptionError

#: The seed's scheduler-agnostic submit option keys. Every adapter maps each of them to its own
#: flag or says why its system has none (:attr:`OptionSpec.lacks`).
PORTABLE_OPTIONS = ("partition", "account", "qos", "mail_user", "mail_type", "signal")

#: The one documented submit option that passes scheduler-native command-line flags through
#: unchanged: a list of strings, or one string split like a shell would (``"-l gpu=1"``).
NATIVE_OPTION = "native_args"

#: Keys every system refuses because reflow sets the thing itself, with what to do instead.
RESERVED_OPTIONS: Mapping[str, str] = {
    "job_name": "reflow names jobs after their submission tag",
    "name": "reflow names jobs after their submission tag",
    "output": "reflow writes logs to <run_dir>/logs/",
    "error": "reflow writes logs to <run_dir>/logs/",
    "array": "array tasks become job arrays by themselves (array_parallelism= limits how many run at once)",
    "time": "use job(time=...)",
    "mem": "use job(mem=...)",
    "cpus": "use job(cpus=...)",
}

#: Render one option's value (lists joined with commas) as argument words (``["-q", "short"]``).
Renderer = Callable[[str], list[str]]


@dataclass(frozen=True)
class OptionSpec:
    """What one batch system accepts, and how."""

    #: The system as messages name it ("PBS Professional").
    system: str
    #: The ``scheduler =`` value that selects it ("pbs").
    scheduler: str
    #: The submit command native flags go to ("qsub").
    command: str
    #: Key -> the argument words its value becomes.
    renderers: Mapping[str, Renderer]
    #: Portable keys the system has no equivalent for -> why (told to the user).
    lacks: Mapping[str, str]
    #: Keys reflow sets itself -> what to use instead (on top of :data:`RESERVED_OPTIONS`).
    reserved: Mapping[str, str] = field(default_factory=dict)
    #: Native flags reflow sets itself -> why (refused inside :data:`NATIVE_OPTION`).
    reserved_flags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = set(PORTABLE_OPTIONS) - set(self.renderers) - set(self.lacks)
        if missing:
            raise ValueError(f"{self.system}: say how the portable option(s) {sorted(missing)} map, or why not")

    @property
    def label(self) -> str:
        return system_label(self.system, self.scheduler)

    @property
    def accepted(self) -> list[str]:
        return sorted({*self.renderers, NATIVE_OPTION})

    def why_reserved(self, name: str) -> str | None:
        return self.reserved.get(name) or RESERVED_OPTIONS.get(name)


def system_label(system: str, scheduler: str) -> str:
    return f"{system} (scheduler {scheduler!r})"


def normalise_key(key: str) -> str:
    return str(key).strip().lstrip("-").replace("-", "_").lower()


# ---------------------------------------------------------------------- messages


def refusal(key: str, label: str, accepted: Collection[str] | str, *, why: str = "", command: str = "",
            close: Collection[str] = ()) -> OptionError:
    """The one message for a key a system cannot take: the key, the system, the keys it accepts."""
    accepts = accepted if isinstance(accepted, str) else ", ".join(sorted(accepted))
    native = f" (other {command} flags go in {NATIVE_OPTION}=[...])" if command else ""
    hint = difflib.get_close_matches(normalise_key(key), list(close), n=1, cutoff=0.6) if close else []
    return OptionError(f"submit option {key!r} is not available on {label}{': ' + why if why else ''}; "
                       f"it accepts: {accepts}{native}" + (f"; did you mean {hint[0]!r}?" if hint else ""))


def reserved_refusal(key: str, label: str, why: str) -> OptionError:
    return OptionError(f"submit option {key!r} cannot be set here on {label}: {why}")


def value_error(key: str, label: str, problem: str) -> OptionError:
    return OptionError(f"submit option {key!r} on {label}: {problem}")


# ---------------------------------------------------------------------- values


def check_value(key: str, label: str, value: Any, *, flags: bool = False) -> None:
    """A value is a string or number (a bool only where the key is a flag), one line, not empty; or a list of them."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, bool) and not flags or not isinstance(item, (str, int, float)):
            raise value_error(key, label, f"value {item!r} must be a string or number")
        if isinstance(item, str) and (not item.strip() or any(c in item for c in "\n\r\0")):
            raise value_error(key, label, "value must be one non-empty line")


_SIGNAL = re.compile(r"^(?:[RB]:)?(?:SIG)?([A-Z0-9]+)(?:@(\d+))?$", re.IGNORECASE)


def parse_signal(label: str, value: str) -> tuple[str, int]:
    """Slurm's ``[B:]NAME[@seconds]`` (the seed's spelling) -> (signal name, seconds before the time limit; 60)."""
    match = _SIGNAL.match(str(value).strip())
    if not match:
        raise value_error("signal", label, f"{value!r} must look like USR1@90 (a signal, and how many seconds "
                                           "before the time limit it is sent)")
    return match.group(1).upper(), int(match.group(2) or 60)


def as_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def native_words(label: str, value: Any, *, command: str = "", reserved_flags: Mapping[str, str] | None = None
                 ) -> list[str]:
    """The pass-through value as argument words: a list as given, a string split like a shell would."""
    if isinstance(value, str):
        try:
            words = shlex.split(value)
        except ValueError as exc:
            raise value_error(NATIVE_OPTION, label, f"cannot split {value!r}: {exc}") from None
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                  for v in value):
        words = [str(v) for v in value]
    else:
        raise value_error(NATIVE_OPTION, label, f"expected a list of strings like [\"-l\", \"x\"] or one string, "
                                                f"not {value!r}")
    for word in words:
        if any(c in word for c in "\n\r\0"):
            raise value_error(NATIVE_OPTION, label, f"{word!r} must be a single line")
        flag = word.split("=", 1)[0]
        if reserved_flags and flag in reserved_flags:
            raise value_error(NATIVE_OPTION, label, f"{command} {flag} cannot be set here: {reserved_flags[flag]}")
    return words


# ---------------------------------------------------------------------- validate and render


def validate(spec: OptionSpec, options: Mapping[str, Any]) -> None:
    """Raise OptionError for the first option *spec* cannot take (render does the same, and renders)."""
    render(spec, options)


def render(spec: OptionSpec, options: Mapping[str, Any]) -> tuple[list[list[str]], list[str]]:
    """``(argument groups in key order, native words)``, or OptionError naming the first problem."""
    groups: list[list[str]] = []
    native: list[str] = []
    flag_of: dict[str, str] = {}
    for key in sorted(options, key=normalise_key):
        value = options[key]
        name = normalise_key(key)
        why = spec.why_reserved(name)
        if why:
            raise reserved_refusal(key, spec.label, why)
        if name == NATIVE_OPTION:
            if value is not None:
                native.extend(native_words(spec.label, value, command=spec.command,
                                           reserved_flags=spec.reserved_flags))
            continue
        if name not in spec.renderers:
            raise refusal(key, spec.label, spec.accepted, why=spec.lacks.get(name, ""), command=spec.command,
                          close=spec.accepted)
        if value is None or value is False:
            continue
        check_value(key, spec.label, value)
        group = spec.renderers[name](as_text(value))  # a renderer raises OptionError on a value it cannot map
        if not group:
            continue
        flag = group[0].rsplit("=", 1)[0] if group[0].startswith("--") else group[0]
        if flag in flag_of:
            raise OptionError(f"submit options {flag_of[flag]!r} and {key!r} both set {spec.command} {flag} "
                              f"on {spec.label}; keep one")
        flag_of[flag] = key
        groups.append(group)
    return groups, native


def mail_types(label: str, value: str, words: Mapping[str, Sequence[str]], letters: str = "") -> list[str]:
    """Slurm-style ``mail_type`` (``END,FAIL``) as a system's own pieces; its own *letters* pass as they are.

    ``NONE`` (whatever the system calls "no mail") cannot be combined with anything else.
    """
    pieces: list[str] = []
    none = list(words.get("NONE", ()))
    saw_none = False
    for part in (p.strip() for p in value.split(",")):
        word = part.upper()
        if word in words:
            new = list(words[word])
            saw_none = saw_none or word == "NONE"
        elif part and letters and set(part) <= set(letters):
            new = list(part)
            saw_none = saw_none or bool(none) and set(none) <= set(new)
        else:
            accepted = ", ".join(words) + (f", or letters from {letters!r}" if letters else "")
            raise value_error("mail_type", label, f"{part!r} is not one of its mail types (accepted: {accepted})")
        pieces.extend(p for p in new if p not in pieces)
    if saw_none and set(pieces) - set(none):
        raise value_error("mail_type", label, "NONE cannot be combined with other mail types")
    return pieces
