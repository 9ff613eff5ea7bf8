"""The manifest: everything the daemon knows about a workflow.

The user's process builds it from decorated functions (``Workflow.describe``);
the daemon receives it as JSON and never imports user code. ``from_dict``
checks every field so a malformed manifest is refused with a message naming
the field, instead of failing later inside the engine.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from . import retry
from .pack import parse_pack
from .resources import parse_mem, parse_time

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
#: What can feed each kind of task (``reflow.wiring.infer_mode`` never makes anything else).
ARRAY_TASK_MODES = ("fanout", "chain", "chain_flatten", "broadcast")
SINGLE_TASK_MODES = ("direct", "gather", "gather_flatten")


class ManifestError(ValueError):
    """A manifest is malformed; the message names the field."""


# Limits checked at the door (``Manifest.from_dict(strict=True)``): beyond them a value is a mistake
# that would only fail later, on a cluster or inside the engine.
#: Task names, as ``reflow.flow.TASK_NAME_RE`` makes them (they become file names and job names).
TASK_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
MAX_NAME = 128
MAX_PATH = 4096
MAX_TASKS = 100_000
MAX_CPUS = 1_000_000
MAX_RETRIES = 1000
MAX_ARRAY_PARALLELISM = 100_000_000
MAX_TIME_SECONDS = 366 * 86400
MAX_MEM_MB = 1024**3  # 1 PiB
INT64 = 2**63
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Scheduler option values: what ``JobConfig.check`` lets through.
_OPTION_SCALARS = (str, int, float, bool, type(None))


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
    def from_dict(cls, data: Any, *, strict: bool = True) -> Manifest:
        """Parse and check a manifest. ``strict`` (the daemon's door) also checks values and ranges,
        so nothing accepted here can fail later inside the engine; ``strict=False`` checks types
        only (reading back what an older reflowd stored)."""
        manifest = cls._parse(data)
        if strict:
            check_manifest(manifest)
        return manifest

    @classmethod
    def _parse(cls, data: Any) -> Manifest:
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


# ---------------------------------------------------------------------------- value checks (strict)


def _text(value: str, where: str, *, empty: bool = False, limit: int = MAX_PATH, control: bool = False) -> None:
    """Refuse text that cannot travel: lone surrogates, NUL, control characters, empty or huge."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"{where}: text is not valid Unicode (an undecodable byte in a file name?): "
                            f"{value.encode('utf-8', 'backslashreplace').decode()[:80]!r}") from None
    if not empty and not value.strip():
        raise ManifestError(f"{where}: must not be empty")
    if len(value) > limit:
        raise ManifestError(f"{where}: {len(value)} characters is more than the {limit} allowed")
    if "\0" in value:
        raise ManifestError(f"{where}: must not contain a NUL byte")
    if not control and _CONTROL.search(value):
        raise ManifestError(f"{where}: must not contain control characters (newline, tab, ...): {value[:80]!r}")


def _identifier(value: str, where: str) -> None:
    _text(value, where, limit=MAX_NAME)
    if not value.isidentifier():
        raise ManifestError(f"{where}: {value[:80]!r} is not a valid parameter name (a Python identifier)")


def _whole(value: Any, where: str, low: int, high: int, *, none: bool = False) -> None:
    if value is None and none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise ManifestError(f"{where}: expected a whole number, got {type(value).__name__} {_short(value)}")
    if not low <= value <= high:
        raise ManifestError(f"{where}: {_short(value)} is out of range ({low} to {high})")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_option(key: Any, value: Any, where: str) -> None:
    if not isinstance(key, str):
        raise ManifestError(f"{where}: option names must be strings")
    _text(key, f"{where}[{key!r}]", limit=MAX_NAME)
    if any(c.isspace() for c in key) or key.startswith("-"):
        raise ManifestError(f"{where}[{key!r}]: write the option name without dashes or spaces, like 'partition'")
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, _OPTION_SCALARS):
            raise ManifestError(f"{where}[{key!r}]: {_short(item)} must be a string, number, bool or a list of those")
        if isinstance(item, str):
            _text(item, f"{where}[{key!r}]", empty=True)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ManifestError(f"{where}[{key!r}]: {item!r} is not a finite number")
        elif isinstance(item, int) and not isinstance(item, bool) and not -INT64 <= item < INT64:
            raise ManifestError(f"{where}[{key!r}]: {_short(item)} does not fit in 64 bits")


def check_config(config: dict[str, Any], is_array: bool, where: str) -> None:
    """The scheduler settings of one task, as ``reflow.flow.JobConfig.check`` would accept them."""
    where = f"{where}.config"
    if config.get("cpus") is not None:
        _whole(config["cpus"], f"{where}.cpus", 1, MAX_CPUS)
    if "time" in config:
        try:
            seconds = parse_time(config["time"])
        except ValueError as exc:
            raise ManifestError(f"{where}.time: {exc}") from None
        if seconds is not None and seconds > MAX_TIME_SECONDS:
            raise ManifestError(f"{where}.time: {config['time']!r} is more than 366 days; use 'UNLIMITED' for no limit")
    if "mem" in config:
        mem = config["mem"]
        if isinstance(mem, str) and len(mem) > 40:
            raise ManifestError(f"{where}.mem: {_short(mem)} is not a memory size like '4G'")
        try:
            megabytes = parse_mem(mem)
        except ValueError as exc:
            raise ManifestError(f"{where}.mem: {exc}") from None
        if megabytes > MAX_MEM_MB:
            raise ManifestError(f"{where}.mem: {mem!r} is more than 1 PiB")
    if config.get("array_parallelism") is not None:
        _whole(config["array_parallelism"], f"{where}.array_parallelism", 1, MAX_ARRAY_PARALLELISM)
        if not is_array:
            raise ManifestError(f"{where}.array_parallelism: only applies to array tasks")
    if config.get("retries") is not None:
        _whole(config["retries"], f"{where}.retries", 0, MAX_RETRIES)
    if config.get("retry_policy") is not None:
        try:
            retry.check(config["retry_policy"], f"{where}.retry_policy")
        except retry.RetryPolicyError as exc:
            raise ManifestError(str(exc)) from None
    if config.get("pack") is not None:
        try:
            parse_pack(config["pack"], f"{where}.pack")
        except ValueError as exc:
            raise ManifestError(str(exc)) from None
    if "version" in config:
        if not isinstance(config["version"], str):
            raise ManifestError(f"{where}.version: expected str, got {type(config['version']).__name__}")
        _text(config["version"], f"{where}.version", limit=MAX_NAME)
    for key in ("cache", "array"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise ManifestError(f"{where}.{key}: expected true or false, got {_short(config[key])}")
    if config.get("backend") is not None:
        if not isinstance(config["backend"], str):
            raise ManifestError(f"{where}.backend: expected str, got {type(config['backend']).__name__}")
        _text(config["backend"], f"{where}.backend", limit=MAX_NAME)
    if config.get("after") is not None:
        if not isinstance(config["after"], list) or not all(isinstance(a, str) for a in config["after"]):
            raise ManifestError(f"{where}.after: expected a list of task names")
    options = config.get("submit_options")
    if options is not None:
        if not isinstance(options, dict):
            raise ManifestError(f"{where}.submit_options: expected an object, got {type(options).__name__}")
        for key, value in options.items():
            _check_option(key, value, f"{where}.submit_options")


def _check_task(task: TaskManifest, kinds: dict[str, bool]) -> None:
    """One task's names, config and wiring; *kinds* maps each earlier task to is_array."""
    where = f"tasks[{task.name!r}]"
    _text(task.name, f"{where}.name", limit=MAX_NAME)
    if not TASK_NAME_RE.match(task.name):
        raise ManifestError(f"{where}.name: use letters, digits and underscores, starting with a letter")
    check_config(task.config, task.is_array, where)
    if len(set(task.dependencies)) != len(task.dependencies):
        raise ManifestError(f"{where}.dependencies: a task is listed twice")
    for pname, key in task.params.items():
        _identifier(pname, f"{where}.params")
        _text(key, f"{where}.params[{pname!r}]", limit=MAX_NAME)
    for pname in task.run_dir_params:
        _identifier(pname, f"{where}.run_dir_params")
    for pname, sources in task.inputs.items():
        _identifier(pname, f"{where}.inputs")
        here = f"{where}.inputs[{pname!r}]"
        modes = [s.mode for s in sources]
        allowed = ARRAY_TASK_MODES if task.is_array else SINGLE_TASK_MODES
        wrong = [m for m in modes if m not in allowed]
        if wrong:
            kind = "an array task" if task.is_array else "a single (non-array) task"
            raise ManifestError(f"{here}: mode {wrong[0]!r} cannot feed {kind} (use one of {', '.join(allowed)})")
        element = [m for m in modes if m in ELEMENT_MODES]
        if element and len(element) != len(modes):
            raise ManifestError(f"{here}: mixes element-wise ({', '.join(element)}) and whole-value modes")
        if ("direct" in modes or "broadcast" in modes) and len(modes) > 1:
            raise ManifestError(f"{here}: a {modes[0]!r} parameter takes exactly one step")
        for src in sources:
            upstream_array = kinds.get(src.step)
            if upstream_array is None:
                continue  # Manifest._parse already named the unknown step
            if src.mode in ("fanout", "direct") and upstream_array:
                raise ManifestError(f"{here}: mode {src.mode!r} needs a single (non-array) step, "
                                    f"but {src.step!r} is an array")
            if src.mode in ("chain", "chain_flatten") and not upstream_array:
                raise ManifestError(f"{here}: mode {src.mode!r} needs an array step, but {src.step!r} is not one")
    if task.return_type is not None:
        _text(task.return_type, f"{where}.return_type", empty=True, control=True)
    _text(task.source_hash, f"{where}.source_hash", empty=True, limit=MAX_NAME)


def check_manifest(manifest: Manifest) -> None:
    """Everything the daemon will rely on, checked once: names, paths, ranges, wiring."""
    _text(manifest.workflow, "manifest.workflow", limit=MAX_NAME)
    if any(c.isspace() or c in "/\\" for c in manifest.workflow):
        raise ManifestError("manifest.workflow: use a short name without spaces or slashes")
    if not manifest.tasks:
        raise ManifestError("manifest.tasks: a workflow needs at least one task")
    if len(manifest.tasks) > MAX_TASKS:
        raise ManifestError(f"manifest.tasks: {len(manifest.tasks)} tasks is more than the {MAX_TASKS} allowed")
    _text(manifest.entrypoint, "manifest.entrypoint")
    if not os.path.isabs(manifest.entrypoint):
        raise ManifestError(f"manifest.entrypoint: {manifest.entrypoint!r} must be an absolute path")
    _text(manifest.python, "manifest.python")
    _text(manifest.working_dir, "manifest.working_dir", empty=True)
    kinds: dict[str, bool] = {}
    for task in manifest.tasks:
        _check_task(task, kinds)
        kinds[task.name] = task.is_array
    keys: set[str] = set()
    for param in manifest.cli_params:
        where = f"cli_params[{param.key!r}]"
        _text(param.key, f"{where}.key", limit=MAX_NAME)
        if param.key in keys:
            raise ManifestError(f"{where}: listed twice")
        keys.add(param.key)
        for name in ("name", "flag", "type_repr", "namespace"):
            _text(getattr(param, name), f"{where}.{name}", limit=MAX_NAME * 4, control=name == "type_repr")
        _text(param.help, f"{where}.help", empty=True, limit=65536, control=True)
        if param.short is not None:
            _text(param.short, f"{where}.short", limit=MAX_NAME)
        unknown = [t for t in param.tasks if t not in kinds]
        if unknown:
            raise ManifestError(f"{where}.tasks: unknown task {unknown[0]!r}")


def run_param_keys(manifest: Manifest) -> set[str]:
    """Every run-parameter key the workflow can use (its CLI parameters and what tasks consume)."""
    return {p.key for p in manifest.cli_params} | {k for t in manifest.tasks for k in t.params.values()}


# Names used by the seed's API reference.
WorkflowDescription = Manifest
TaskDescription = TaskManifest
CliParamDescription = CliParamManifest
