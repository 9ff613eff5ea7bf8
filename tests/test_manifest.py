"""The manifest: the JSON the daemon runs from, round trips and refusal of malformed ones."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from reflow.loader import load_workflow
from reflow_client.manifest import (
    ELEMENT_MODES,
    MANIFEST_VERSION,
    WIRING_MODES,
    CliParamManifest,
    InputSource,
    Manifest,
    ManifestError,
    TaskManifest,
)

WORKFLOWS = Path(__file__).resolve().parent / "workflows"


@pytest.fixture(scope="module")
def described() -> dict[str, Any]:
    return load_workflow(WORKFLOWS / "described.py").describe()


@pytest.fixture(scope="module")
def wiring() -> dict[str, Any]:
    return load_workflow(WORKFLOWS / "wiring_modes.py").describe()


@pytest.fixture
def data(described: dict[str, Any]) -> dict[str, Any]:
    """A fresh, mutable copy of a valid manifest."""
    return copy.deepcopy(described)


def task_index(data: dict[str, Any], name: str) -> int:
    return [t["name"] for t in data["tasks"]].index(name)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("which", ["described", "wiring"])
def test_from_dict_of_describe_round_trips_exactly(which: str, request: pytest.FixtureRequest) -> None:
    original = request.getfixturevalue(which)
    manifest = Manifest.from_dict(original)
    assert manifest.to_manifest_dict() == original
    assert manifest.to_dict() == original


@pytest.mark.parametrize("which", ["described", "wiring"])
def test_json_round_trip(which: str, request: pytest.FixtureRequest) -> None:
    original = request.getfixturevalue(which)
    text = json.dumps(original)
    assert json.loads(text) == original, "describe() is JSON-safe without a default= hook"
    again = Manifest.from_dict(json.loads(text))
    assert again.to_manifest_dict() == original
    assert json.dumps(again.to_manifest_dict()) == text


def test_typed_view(described: dict[str, Any]) -> None:
    manifest = Manifest.from_dict(described)
    assert manifest.version == MANIFEST_VERSION and manifest.name == manifest.workflow == "described"
    convert = manifest.task("convert")
    assert isinstance(convert, TaskManifest)
    assert convert.is_array and convert.version == "2" and convert.retries == 1 and convert.array_parallelism == 2
    assert convert.cache is True and manifest.task("report").cache is False
    assert convert.inputs == {"chunk": [InputSource(step="prepare", mode="fanout")]}
    assert convert.result_deps == {"chunk": {"steps": ["prepare"]}}
    assert convert.params == {"scale": "scale", "mode": "mode", "level": "convert_level"}
    assert convert.run_dir_params == ["out_dir"]
    assert all(isinstance(p, CliParamManifest) for p in manifest.cli_params)
    level = next(p for p in manifest.cli_params if p.key == "convert_level")
    assert level.task == "convert" and level.flag == "--convert-level"
    count = next(p for p in manifest.cli_params if p.key == "count")
    assert count.task is None, "a global parameter belongs to no single task"
    with pytest.raises(KeyError):
        manifest.task("nope")


def test_mode_tables() -> None:
    assert set(ELEMENT_MODES) <= set(WIRING_MODES)
    assert set(WIRING_MODES) == {
        "direct", "fanout", "gather", "gather_flatten", "chain", "chain_flatten", "broadcast"
    }


def test_optional_fields_default_when_absent(data: dict[str, Any]) -> None:
    for task in data["tasks"]:
        for key in ("inputs", "params", "run_dir_params", "return_type", "source_hash", "has_verify"):
            task.pop(key)
        task["dependencies"] = []
    data.pop("cli_params")
    manifest = Manifest.from_dict(data)
    prepare = manifest.task("prepare")
    assert prepare.inputs == {} and prepare.params == {} and prepare.return_type is None
    assert prepare.source_hash == "" and prepare.has_verify is False and manifest.cli_params == []


# ---------------------------------------------------------------------------- refusals


def edit(data: dict[str, Any], path: list[Any], value: Any = None, *, delete: bool = False) -> dict[str, Any]:
    target = data
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    "path, message",
    [
        (["workflow"], r"manifest: missing field 'workflow'"),
        (["version"], r"manifest: missing field 'version'"),
        (["tasks"], r"manifest: missing field 'tasks'"),
        (["entrypoint"], r"manifest: missing field 'entrypoint'"),
        (["python"], r"manifest: missing field 'python'"),
        (["working_dir"], r"manifest: missing field 'working_dir'"),
        (["tasks", 0, "name"], r"tasks\[0\]: missing field 'name'"),
        (["tasks", 1, "is_array"], r"tasks\['convert'\]: missing field 'is_array'"),
        (["tasks", 1, "config"], r"tasks\['convert'\]: missing field 'config'"),
        (["tasks", 1, "inputs", "chunk", 0, "mode"], r"tasks\['convert'\]\.inputs\['chunk'\]\[0\]: missing field 'mode'"),
        (["tasks", 1, "inputs", "chunk", 0, "step"], r"tasks\['convert'\]\.inputs\['chunk'\]\[0\]: missing field 'step'"),
        (["cli_params", 0, "flag"], r"cli_params\['start'\]: missing field 'flag'"),
        (["cli_params", 0, "required"], r"cli_params\['start'\]: missing field 'required'"),
        (["cli_params", 2, "key"], r"cli_params\[2\]: missing field 'key'"),
    ],
)
def test_missing_field_is_named(data: dict[str, Any], path: list[Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(edit(data, path, delete=True))


@pytest.mark.parametrize(
    "path, value, message",
    [
        (["version"], "1", r"manifest\.version: expected int, got str"),
        (["version"], True, r"manifest\.version: expected int, got bool"),
        (["workflow"], 5, r"manifest\.workflow: expected str, got int"),
        (["tasks"], {}, r"manifest\.tasks: expected list, got dict"),
        (["entrypoint"], None, r"manifest\.entrypoint: expected str, got NoneType"),
        (["tasks", 0], "prepare", r"tasks\[0\]: expected an object, got str"),
        (["tasks", 0, "name"], 1, r"tasks\[0\]\.name: expected str, got int"),
        (["tasks", 1, "is_array"], "yes", r"tasks\['convert'\]\.is_array: expected bool, got str"),
        (["tasks", 1, "config"], [], r"tasks\['convert'\]\.config: expected dict, got list"),
        (["tasks", 1, "config", "cpus"], "2", r"tasks\['convert'\]\.config\.cpus: expected int, got str"),
        (["tasks", 1, "config", "cpus"], True, r"tasks\['convert'\]\.config\.cpus: expected int, got bool"),
        (["tasks", 1, "config", "time"], 3600, r"tasks\['convert'\]\.config\.time: expected str, got int"),
        (["tasks", 1, "config", "version"], 2, r"tasks\['convert'\]\.config\.version: expected str, got int"),
        (["tasks", 1, "dependencies"], "prepare", r"tasks\['convert'\]\.dependencies: expected list, got str"),
        (["tasks", 1, "dependencies"], [7], r"tasks\['convert'\]\.dependencies\[0\]: expected str, got int"),
        (["tasks", 1, "inputs"], [], r"tasks\['convert'\]\.inputs: expected dict, got list"),
        (["tasks", 1, "inputs", "chunk"], [], r"tasks\['convert'\]\.inputs\['chunk'\]: expected a non-empty list"),
        (["tasks", 1, "params", "scale"], 1, r"tasks\['convert'\]\.params\['scale'\]: expected str, got int"),
        (["tasks", 1, "run_dir_params"], ["out_dir", 1], r"tasks\['convert'\]\.run_dir_params\[1\]: expected str"),
        (["tasks", 1, "has_verify"], "no", r"tasks\['convert'\]\.has_verify: expected bool, got str"),
        (["cli_params"], {}, r"manifest\.cli_params: expected list, got dict"),
        (["cli_params", 0, "required"], "yes", r"cli_params\['start'\]\.required: expected bool, got str"),
        (["cli_params", 0, "tasks"], ["prepare", 3], r"cli_params\['start'\]\.tasks\[1\]: expected str, got int"),
    ],
)
def test_wrong_type_is_named(data: dict[str, Any], path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(edit(data, path, value))


def test_unknown_wiring_mode(data: dict[str, Any]) -> None:
    data["tasks"][1]["inputs"]["chunk"][0]["mode"] = "zip"
    with pytest.raises(ManifestError, match=r"tasks\['convert'\]\.inputs\['chunk'\]\[0\]\.mode: unknown wiring mode 'zip'"):
        Manifest.from_dict(data)


def test_dependency_not_in_topological_order(data: dict[str, Any]) -> None:
    data["tasks"].reverse()
    with pytest.raises(ManifestError, match=r"tasks\['report'\]\.dependencies: 'convert' is unknown or not before it"):
        Manifest.from_dict(data)


def test_unknown_dependency(data: dict[str, Any]) -> None:
    data["tasks"][2]["dependencies"].append("ghost")
    with pytest.raises(ManifestError, match=r"tasks\['report'\]\.dependencies: 'ghost' is unknown"):
        Manifest.from_dict(data)


def test_input_step_must_be_a_dependency(data: dict[str, Any]) -> None:
    data["tasks"][2]["dependencies"] = ["prepare"]
    with pytest.raises(ManifestError, match=r"tasks\['report'\]\.inputs\['converted'\]: step 'convert' is not a dependency"):
        Manifest.from_dict(data)


def test_duplicate_task(data: dict[str, Any]) -> None:
    data["tasks"].append(copy.deepcopy(data["tasks"][0]))
    with pytest.raises(ManifestError, match=r"task 'prepare' appears twice"):
        Manifest.from_dict(data)


def test_newer_version_is_refused_with_upgrade_hint(data: dict[str, Any]) -> None:
    data["version"] = MANIFEST_VERSION + 1
    with pytest.raises(ManifestError, match=rf"version {MANIFEST_VERSION + 1} is newer .* upgrade reflowd"):
        Manifest.from_dict(data)


def test_version_zero_is_refused(data: dict[str, Any]) -> None:
    data["version"] = 0
    with pytest.raises(ManifestError, match=r"manifest\.version: 0 is not a valid version"):
        Manifest.from_dict(data)


@pytest.mark.parametrize("not_a_manifest", [None, [], "manifest", 3])
def test_not_an_object(not_a_manifest: Any) -> None:
    with pytest.raises(ManifestError, match=r"manifest: expected an object"):
        Manifest.from_dict(not_a_manifest)


def test_manifest_error_is_a_value_error() -> None:
    assert issubclass(ManifestError, ValueError)
