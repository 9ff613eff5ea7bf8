"""The manifest: everything the daemon knows about a workflow.

The user's process builds it from decorated functions (``Workflow.describe``);
the daemon receives it as JSON and never imports user code. ``from_dict``
checks every field so a malformed manifest is refused with a message naming
the field, instead of failing later inside the engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_VERSION = 1

#: How an upstream output reaches a downstream parameter.
WIRING_MODES = (
    "direct",  # singleton -> singleton, value as is
    "fanout",  # singleton list[T] -> array task taking T
    "gather",  # array (or several singletons) -> list[T]
    "gather_flatten",  # array returning list[T] -> list[T]
    "chain",  # array -> array, element i to element i
    "chain_flatten",  # array returning list[T] -> array taking T
    "broadcast",  # whole value to every element of an array
)

#: Modes that decide how many elements an array task has.
ELEMENT_MODES = ("fanout", "chain", "chain_flatten")


class ManifestError(ValueError):
    """A manifest is malformed; the message names the field."""


def _req(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected an object, got {type(data).__name__}")
    if key not in data:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ManifestError(f"{where}.{key}: expected {names}, got {type(value).__name__}")
    return value


def _opt(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any) -> Any:
    if data.get(key) is None:
        return default
    return _req(data, key, kind, where)


def _str_list(data: dict[str, Any], key: str, where: str) -> list[str]:
    items = _opt(data, key, list, where, [])
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ManifestError(f"{where}.{key}[{i}]: expected str, got {type(item).__name__}")
    return list(items)


@dataclass(frozen=True)
class InputSource:
    """One upstream step feeding one parameter, and how."""

    step: str
    mode: str

    @classmethod
    def from_dict(cls, data: Any, where: str) -> InputSource:
        step = _req(data, "step", str, where)
        mode = _req(data, "mode", str, where)
        if mode not in WIRING_MODES:
            raise ManifestError(f"{where}.mode: unknown wiring mode {mode!r} (known: {', '.join(WIRING_MODES)})")
        return cls(step=step, mode=mode)


@dataclass
class TaskManifest:
    """One task: its scheduler config, its wiring, and how to call it."""

    name: str
    is_array: bool
    config: dict[str, Any]
    dependencies: list[str]
    inputs: dict[str, list[InputSource]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    run_dir_params: list[str] = field(default_factory=list)
    return_type: str | None = None
    source_hash: str = ""
    has_verify: bool = False

    @property
    def result_deps(self) -> dict[str, dict[str, list[str]]]:
        """The seed's shape: ``{param: {"steps": [...]}}``."""
        return {p: {"steps": [s.step for s in srcs]} for p, srcs in self.inputs.items()}

    @property
    def version(self) -> str:
        return str(self.config.get("version", "1"))

    @property
    def cache(self) -> bool:
        return bool(self.config.get("cache", True))

    @property
    def retries(self) -> int:
        return int(self.config.get("retries", 0) or 0)

    @property
    def array_parallelism(self) -> int | None:
        value = self.config.get("array_parallelism")
        return int(value) if value else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = {p: [asdict(s) for s in srcs] for p, srcs in self.inputs.items()}
        data["result_deps"] = self.result_deps  # the seed's key, beside the wire modes
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TaskManifest:
        name = _req(data, "name", str, where)
        where = f"tasks[{name!r}]"
        raw_inputs = _opt(data, "inputs", dict, where, {})
        inputs: dict[str, list[InputSource]] = {}
        for pname, srcs in raw_inputs.items():
            if not isinstance(srcs, list) or not srcs:
                raise ManifestError(f"{where}.inputs[{pname!r}]: expected a non-empty list of sources")
            inputs[pname] = [InputSource.from_dict(s, f"{where}.inputs[{pname!r}][{i}]") for i, s in enumerate(srcs)]
        params = _opt(data, "params", dict, where, {})
        for pname, key in params.items():
            if not isinstance(key, str):
                raise ManifestError(f"{where}.params[{pname!r}]: expected str, got {type(key).__name__}")
        config = _req(data, "config", dict, where)
        for key, kind in (("cpus", int), ("time", str), ("mem", str), ("version", str)):
            if key in config and (not isinstance(config[key], kind) or isinstance(config[key], bool)):
                raise ManifestError(f"{where}.config.{key}: expected {kind.__name__}, got {type(config[key]).__name__}")
        return cls(
            name=name,
            is_array=_req(data, "is_array", bool, where),
            config=config,
            dependencies=_str_list(data, "dependencies", where),
            inputs=inputs,
            params=dict(params),
            run_dir_params=_str_list(data, "run_dir_params", where),
            return_type=_opt(data, "return_type", str, where, None),
            source_hash=_opt(data, "source_hash", str, where, ""),
            has_verify=_opt(data, "has_verify", bool, where, False),
        )


@dataclass
class CliParamManifest:
    """A run parameter as the generated CLI exposes it."""

    key: str
    name: str
    flag: str
    type_repr: str
    required: bool
    default: Any = None
    namespace: str = "global"
    help: str = ""
    choices: list[Any] | None = None
    short: str | None = None
    tasks: list[str] = field(default_factory=list)

    @property
    def task(self) -> str | None:
        """The seed's ``CliParamDescription.task``: the owning task of a local parameter (a global one has none)."""
        return self.tasks[0] if self.namespace == "local" and self.tasks else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "task": self.task}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> CliParamManifest:
        key = _req(data, "key", str, where)
        where = f"cli_params[{key!r}]"
        return cls(
            key=key,
            name=_req(data, "name", str, where),
            flag=_req(data, "flag", str, where),
            type_repr=_req(data, "type_repr", str, where),
            required=_req(data, "required", bool, where),
            default=data.get("default"),
            namespace=_opt(data, "namespace", str, where, "global"),
            help=_opt(data, "help", str, where, ""),
            choices=_opt(data, "choices", list, where, None),
            short=_opt(data, "short", str, where, None),
            tasks=_str_list(data, "tasks", where),
        )


@dataclass
class Manifest:
    """A whole workflow, tasks in topological order."""

    workflow: str
    tasks: list[TaskManifest]
    cli_params: list[CliParamManifest]
    entrypoint: str
    python: str
    working_dir: str
    version: int = MANIFEST_VERSION

    # Seed-compatible spelling.
    @property
    def name(self) -> str:
        return self.workflow

    def task(self, name: str) -> TaskManifest:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)

    def to_manifest_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.workflow,  # the seed's key
            "workflow": self.workflow,
            "tasks": [t.to_dict() for t in self.tasks],
            "cli_params": [p.to_dict() for p in self.cli_params],
            "entrypoint": self.entrypoint,
            "python": self.python,
            "working_dir": self.working_dir,
        }

    to_dict = to_manifest_dict

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        where = "manifest"
        version = _req(data, "version", int, where)
        if version > MANIFEST_VERSION:
            raise ManifestError(
                f"manifest version {version} is newer than this reflow understands ({MANIFEST_VERSION}); "
                "upgrade reflowd to match the client"
            )
        if version < 1:
            raise ManifestError(f"manifest.version: {version} is not a valid version")
        raw_tasks = _req(data, "tasks", list, where)
        tasks = [TaskManifest.from_dict(t, f"tasks[{i}]") for i, t in enumerate(raw_tasks)]
        seen: set[str] = set()
        for task in tasks:
            if task.name in seen:
                raise ManifestError(f"tasks: task {task.name!r} appears twice")
            for dep in task.dependencies:
                if dep not in seen:
                    raise ManifestError(
                        f"tasks[{task.name!r}].dependencies: {dep!r} is unknown or not before it "
                        "(tasks must be in topological order)"
                    )
            for pname, srcs in task.inputs.items():
                for src in srcs:
                    if src.step not in task.dependencies:
                        raise ManifestError(
                            f"tasks[{task.name!r}].inputs[{pname!r}]: step {src.step!r} is not a dependency"
                        )
            seen.add(task.name)
        raw_params = _opt(data, "cli_params", list, where, [])
        return cls(
            version=version,
            workflow=_req(data, "workflow", str, where),
            tasks=tasks,
            cli_params=[CliParamManifest.from_dict(p, f"cli_params[{i}]") for i, p in enumerate(raw_params)],
            entrypoint=_req(data, "entrypoint", str, where),
            python=_req(data, "python", str, where),
            working_dir=_req(data, "working_dir", str, where),
        )


# Names used by the seed's API reference.
WorkflowDescription = Manifest
TaskDescription = TaskManifest
CliParamDescription = CliParamManifest
