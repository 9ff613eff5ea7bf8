"""Time and memory strings converted to each batch system's units (reflow_client/resources.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reflow_client.resources import format_hms, format_pbs_size, mem_in_unit, minutes_ceil, parse_time


def test_hms_keeps_hours_past_a_day() -> None:
    assert format_hms(parse_time("00:30:00")) == "00:30:00"  # type: ignore[arg-type]
    assert format_hms(parse_time("2-00:00:01")) == "48:00:01"  # type: ignore[arg-type]


def test_minutes_round_up_so_limits_never_shrink() -> None:
    assert minutes_ceil(60) == 1 and minutes_ceil(61) == 2 and minutes_ceil(1) == 1
    assert minutes_ceil(parse_time("1-00:00:00")) == 1440  # type: ignore[arg-type]


@pytest.mark.parametrize("text,unit,expected", [
    ("4G", "KB", 4 * 1024 * 1024), ("4G", "MB", 4096), ("4G", "GB", 4), ("500M", "GB", 1),
    ("1536M", "GB", 2), ("2048", "MB", 2048), ("1T", "GB", 1024), ("100K", "MB", 1), ("4GB", "mb", 4096),
])
def test_memory_in_lsf_units(text: str, unit: str, expected: int) -> None:
    assert mem_in_unit(text, unit) == expected


def test_unknown_unit_and_bad_request_are_refused() -> None:
    with pytest.raises(ValueError, match="unit"):
        mem_in_unit("4G", "parsecs")
    with pytest.raises(ValueError, match="memory"):
        mem_in_unit("lots", "MB")


def test_pbs_size_syntax() -> None:
    assert format_pbs_size("4G") == "4gb" and format_pbs_size("500M") == "500mb" and format_pbs_size("2048") == "2048mb"


@given(st.integers(min_value=1, max_value=10**7), st.sampled_from(["KB", "MB", "GB", "TB"]))
def test_converted_memory_is_never_less_than_asked(mb: int, unit: str) -> None:
    factor = {"KB": 1 / 1024, "MB": 1, "GB": 1024, "TB": 1024 * 1024}[unit]
    assert mem_in_unit(f"{mb}M", unit) * factor >= mb
