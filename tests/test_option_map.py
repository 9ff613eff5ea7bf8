"""Submit options on every scheduler: one set of portable keys, one refusal format (reflowd/schedulers/option_map.py).

Each system's own mappings are tested beside its parsers (tests/test_*_parsers.py);
here the contract they share: every portable key is either mapped or refused
with the reason, a refusal names the key, the system and the keys it accepts,
the same value checks apply everywhere, and native_args passes scheduler flags
through unchanged except the ones reflow sets itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from reflowd.schedulers import flux_commands, lsf_commands, option_map, pbs_commands, sge_commands, slurm_commands
from reflowd.schedulers.base import OptionError

SPECS = {"sge": sge_commands.OPTIONS, "pbs": pbs_commands.OPTIONS, "lsf": lsf_commands.OPTIONS,
         "flux": flux_commands.OPTIONS}
VALIDATE: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "slurm": slurm_commands.validate_options, "sge": sge_commands.validate_options,
    "pbs": pbs_commands.validate_options, "lsf": lsf_commands.validate_options,
    "flux": flux_commands.validate_options,
}
LABEL = {"slurm": slurm_commands.SYSTEM, "sge": sge_commands.SYSTEM, "pbs": pbs_commands.SYSTEM,
         "lsf": lsf_commands.SYSTEM, "flux": flux_commands.SYSTEM}
#: How each system's submit command is told the job name (reflow sets it: the tag).
NAME_FLAG = {"slurm": "--job-name=x", "sge": "-N", "pbs": "-N", "lsf": "-J", "flux": "--job-name=x"}
#: Accepted by every system.
EVERYWHERE = {"partition": "short", "native_args": ["-x"]}


def refused(scheduler: str, options: Mapping[str, Any]) -> str:
    with pytest.raises(OptionError) as info:
        VALIDATE[scheduler](options)
    return str(info.value)


@pytest.mark.parametrize("scheduler", SPECS)
def test_every_portable_key_is_mapped_or_refused_with_the_reason(scheduler: str) -> None:
    spec = SPECS[scheduler]
    for key in option_map.PORTABLE_OPTIONS:
        if key in spec.renderers:
            continue
        message = refused(scheduler, {key: "x"})
        assert spec.lacks[key] in message, message
    with pytest.raises(ValueError, match="qos"):
        option_map.OptionSpec("Nothing", "none", "nsub", renderers={}, lacks={})


@pytest.mark.parametrize("scheduler", VALIDATE)
def test_one_refusal_format_names_the_key_the_system_and_what_it_accepts(scheduler: str) -> None:
    VALIDATE[scheduler](EVERYWHERE)
    assert LABEL[scheduler].endswith(f"(scheduler '{scheduler}')")
    message = refused(scheduler, {"partiton": "short"})
    assert message.startswith(f"submit option 'partiton' is not available on {LABEL[scheduler]}"), message
    assert "it accepts: " in message and "partition" in message and "native_args" in message
    assert message.endswith("did you mean 'partition'?"), message
    assert refused(scheduler, {"job_name": "x"}) == \
        f"submit option 'job_name' cannot be set here on {LABEL[scheduler]}: reflow names jobs after their submission tag"


@pytest.mark.parametrize("scheduler", VALIDATE)
@pytest.mark.parametrize("value,problem", [("a\nb", "one non-empty line"), ("", "one non-empty line"),
                                           ({"x": 1}, "must be a string or number")])
def test_values_are_checked_alike(scheduler: str, value: Any, problem: str) -> None:
    message = refused(scheduler, {"partition": value})
    assert message.startswith("submit option 'partition' on ") and problem in message, message


@pytest.mark.parametrize("scheduler", VALIDATE)
def test_native_args_pass_through_except_what_reflow_sets(scheduler: str) -> None:
    message = refused(scheduler, {"native_args": [NAME_FLAG[scheduler], "x"]})
    assert message.startswith(f"submit option 'native_args' on {LABEL[scheduler]}: ") and "cannot be set here" in message
    assert "submission tag" in message, message
    assert "native_args" in refused(scheduler, {"native_args": "-l 'unclosed"})
    assert "expected a list of strings" in refused(scheduler, {"native_args": {"-l": "x"}})


def test_two_keys_for_one_flag_are_refused() -> None:
    for scheduler, flag in (("sge", "qsub -q"), ("pbs", "qsub -q"), ("lsf", "bsub -q"), ("flux", "flux submit --queue")):
        message = refused(scheduler, {"partition": "a", "queue": "b"})
        assert f"both set {flag}" in message and "keep one" in message, message


def test_mail_types_and_signals_share_their_parsing() -> None:
    assert option_map.mail_types("X", "END, FAIL", {"NONE": "n", "END": "e", "FAIL": "a"}) == ["e", "a"]
    assert option_map.mail_types("X", "ea", {"NONE": "n", "END": "e"}, letters="aen") == ["e", "a"]
    with pytest.raises(OptionError, match="NONE cannot be combined"):
        option_map.mail_types("X", "NONE,END", {"NONE": (), "END": ("-N",)})
    with pytest.raises(OptionError, match="NONE cannot be combined"):
        option_map.mail_types("X", "ne", {"NONE": "n", "END": "e"}, letters="en")
    assert option_map.parse_signal("X", "B:USR1@90") == ("USR1", 90)
    assert option_map.parse_signal("X", "SIGTERM") == ("TERM", 60)
    with pytest.raises(OptionError, match="must look like USR1@90"):
        option_map.parse_signal("X", "now please")
