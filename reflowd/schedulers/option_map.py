"""Scheduler-agnostic submit options mapped onto one batch system's own flags (pure).

Users write the seed's portable keys (``partition``/``queue``, ``account``,
``project``, ``qos``, ``mail_user``, ``mail_type``, ``signal``) in
``submit_options``; each adapter (PBS, LSF, Flux) declares which of them it
can express and how. A key the system lacks is refused when the run is
submitted, naming the key, the system and the keys it does take. Anything else
goes through the one pass-through key :data:`NATIVE_KEY`, whose words are
handed to the submit command unchanged (as separate arguments, never through
a shell).
"""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import OptionError

#: The documented pass-through key: ``submit_options = { native_args = ["-l", "place=scatter"] }``.
NATIVE_KEY = "native_args"

#: Render one option's value as a list of native arguments (``["-q", "short"]``).
Renderer = Callable[[str], list[str]]

#: Slurm-style mail types (the seed's spelling) -> what each system calls them is per adapter.
MAIL_TYPES = ("NONE", "BEGIN", "END", "FAIL", "ALL")


@dataclass(frozen=True)
class OptionSpec:
    """What one batch system accepts."""

    system: str
    renderers: Mapping[str, Renderer]
    #: Keys a user may reasonably try that reflow sets itself, with what to do instead.
    reserved: Mapping[str, str] = field(default_factory=dict)

    @property
    def accepted(self) -> list[str]:
        return sorted({*self.renderers, NATIVE_KEY})


def normalise_key(key: str) -> str:
    return str(key).strip().lstrip("-").replace("-", "_").lower()


def _check_value(system: str, key: str, value: Any) -> None:
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, (str, int, float, bool)) or item is None:
            raise OptionError(f"{system} option {key!r}: value {item!r} must be a string or number")
        if isinstance(item, str) and any(c in item for c in "\n\r\0"):
            raise OptionError(f"{system} option {key!r}: value must be a single line")


def native_words(system: str, value: Any) -> list[str]:
    """The pass-through value as argument words: a list as given, a string split like a shell would."""
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise OptionError(f"{system} option {NATIVE_KEY!r}: cannot split {value!r}: {exc}") from None
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise OptionError(f"{system} option {NATIVE_KEY!r}: expected a list of arguments like [\"-x\", \"y\"], "
                      f"not {value!r}")


def validate(spec: OptionSpec, options: Mapping[str, Any]) -> None:
    """Raise OptionError for the first option *spec* cannot express."""
    for key, value in options.items():
        name = normalise_key(key)
        if name in spec.reserved:
            raise OptionError(f"{spec.system} option {key!r} cannot be set here: {spec.reserved[name]}")
        if name == NATIVE_KEY:
            native_words(spec.system, value)
            _check_value(spec.system, key, value)
            continue
        if name not in spec.renderers:
            close = difflib.get_close_matches(name, spec.accepted, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise OptionError(f"{spec.system} has no submit option {key!r} (accepted: {', '.join(spec.accepted)}; "
                              f"pass other {spec.system} flags through {NATIVE_KEY!r}){hint}")
        if value is None or value is False:
            continue
        _check_value(spec.system, key, value)
        spec.renderers[name](_as_text(value))  # a renderer raises OptionError on a value it cannot map


def _as_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def render(spec: OptionSpec, options: Mapping[str, Any]) -> tuple[list[list[str]], list[str]]:
    """``(option argument groups in key order, native words)``; validate first."""
    validate(spec, options)
    groups: list[list[str]] = []
    native: list[str] = []
    for key in sorted(options, key=normalise_key):
        value = options[key]
        name = normalise_key(key)
        if name == NATIVE_KEY:
            native.extend(native_words(spec.system, value))
            continue
        if value is None or value is False:
            continue
        groups.append(spec.renderers[name](_as_text(value)))
    return groups, native


def mail_types(system: str, value: str, letters: Mapping[str, Sequence[str]], joiner: str = "") -> str:
    """Map Slurm-style ``mail_type`` (``END,FAIL``) onto a system's own letters or words."""
    out: list[str] = []
    for part in value.replace(" ", "").split(","):
        word = part.upper()
        if word not in letters:
            raise OptionError(f"{system}: mail_type {part!r} is not one of {', '.join(sorted(letters))}")
        for piece in letters[word]:
            if piece not in out:
                out.append(piece)
    return joiner.join(out)
