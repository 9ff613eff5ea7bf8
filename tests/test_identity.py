"""Merkle identity of task instances: the cache key the daemon computes without user code."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reflow_client import codec
from reflow_client.identity import instance_identity

BASE: dict[str, Any] = {
    "workflow": "climate",
    "task": "convert",
    "version": "1",
    "params": {"start": codec.encode(dt.datetime(2025, 1, 1)), "n": 4, "names": ["a", "b"]},
    "inputs": {"path": codec.encode(Path("/scratch/in/0001.grib")), "lookup": codec.encode({1: "x", 2: "y"})},
    "upstream_hashes": ["a" * 64, "b" * 64],
}


def ident(**changes: Any) -> str:
    return instance_identity(**{**BASE, **changes})


def test_same_inputs_same_identity() -> None:
    assert ident() == ident()
    assert len(ident()) == 64 and int(ident(), 16) >= 0


def test_param_and_input_key_order_does_not_matter() -> None:
    params = dict(reversed(list(BASE["params"].items())))
    inputs = dict(reversed(list(BASE["inputs"].items())))
    assert ident(params=params, inputs=inputs) == ident()


def test_non_string_dict_key_order_does_not_matter() -> None:
    swapped = {**BASE["inputs"], "lookup": codec.encode({2: "y", 1: "x"})}
    assert ident(inputs=swapped) == ident()


@pytest.mark.parametrize(
    "changes",
    [
        {"params": {**BASE["params"], "n": 5}},
        {"params": {**BASE["params"], "start": codec.encode(dt.datetime(2025, 1, 2))}},
        {"params": {**BASE["params"], "names": ["b", "a"]}},
        {"params": {**BASE["params"], "extra": None}},
        {"params": {k: v for k, v in BASE["params"].items() if k != "n"}},
        {"inputs": {**BASE["inputs"], "path": codec.encode(Path("/scratch/in/0002.grib"))}},
        {"inputs": {**BASE["inputs"], "path": "/scratch/in/0001.grib"}},  # a str is not a Path
        {"upstream_hashes": ["a" * 64, "c" * 64]},
        {"upstream_hashes": ["b" * 64, "a" * 64]},
        {"upstream_hashes": ["a" * 64]},
        {"version": "2"},
        {"task": "convert2"},
        {"workflow": "weather"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_any_change_changes_the_identity(changes: dict[str, Any]) -> None:
    assert ident(**changes) != ident()


def test_param_and_input_with_the_same_value_are_not_interchangeable() -> None:
    a = instance_identity(workflow="w", task="t", version="1", params={"x": 1}, inputs={}, upstream_hashes=[])
    b = instance_identity(workflow="w", task="t", version="1", params={}, inputs={"x": 1}, upstream_hashes=[])
    assert a != b


def test_version_is_compared_as_text() -> None:
    assert ident(version=1) == ident(version="1")  # type: ignore[arg-type]


SCRIPT = """
import json, sys
from reflow_client.identity import instance_identity
args = json.loads(sys.stdin.read())
print(instance_identity(**args))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("reflow", "reflowd"))))
"""


def test_identity_is_the_same_in_another_process_without_reflow_or_reflowd() -> None:
    env = dict(os.environ, PYTHONHASHSEED="987")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], input=json.dumps(BASE), capture_output=True, text=True, env=env, check=True
    )
    digest, modules = out.stdout.splitlines()
    assert digest == ident()
    assert json.loads(modules) == [], "computing an identity must not import the user API or the daemon"


def test_identity_of_values_that_went_through_json_is_unchanged() -> None:
    round_tripped = json.loads(json.dumps(BASE))
    assert instance_identity(**round_tripped) == ident()
