"""Task definition: ``Flow``, ``JobConfig`` and the per-task ``TaskSpec``.

Everything a user can get wrong about one task (a bad name, a time limit
typo, two parameters whose flags would clash) is refused here, when the
decorator runs, with a message naming the task and the fix. No parameter name
is reserved: the generated CLIs move their own options aside instead
(``reflow_client.cli_parser``).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import marshal
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, get_type_hints

from reflow_client import retry
from reflow_client.pack import OFF, parse_pack
from reflow_client.resources import format_mem, parse_mem, parse_time

from .params import Param, Result, RunDir
from .typeinfo import split_annotated, strip_optional, type_repr

TASK_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
#: A parameter of this name receives the run directory, with or without the RunDir marker.
RUN_DIR_PARAM = "run_dir"

_OPTION_VALUE_TYPES = (str, int, float, bool, type(None))


@dataclass(init=False)
class JobConfig:
    """Resource and dependency configuration of one task (a dataclass: ``dataclasses.asdict`` works).

    ``submit_options``, then ``extra``, then ``**scheduler_options`` are merged
    (later wins) into ``submit_options``: scheduler-native options stored verbatim.
    ``extra`` is kept only as a read alias of that merged mapping, so it is not a field.
    """

    cpus: int = 1
    time: str = "00:30:00"
    mem: str = "4G"
    array: bool = False
    after: list[str] = field(default_factory=list)
    array_parallelism: int | None = None
    submit_options: dict[str, Any] = field(default_factory=dict)
    version: str = "1"
    cache: bool = True
    backend: str | None = None
    retries: int = 0
    # ``retry_policy`` (which failure causes are retried and how, see docs/failures.md) is set in __init__ but
    # is not a dataclass field: ``asdict`` stays the reference's, and ``to_dict`` adds it only when set.
    #: Array elements per scheduler job (``reflow_client.pack``): None follows the cluster's ``pack``.
    pack: int | str | bool | None = None

    def __init__(
        self,
        cpus: int = 1,
        time: str = "00:30:00",
        mem: str = "4G",
        array: bool = False,
        after: list[str] | None = None,
        array_parallelism: int | None = None,
        submit_options: dict[str, Any] | None = None,
        version: str = "1",
        cache: bool = True,
        backend: str | None = None,
        extra: dict[str, Any] | None = None,
        retries: int = 0,
        retry_policy: dict[str, Any] | None = None,
        pack: int | str | bool | None = None,
        **scheduler_options: Any,
    ) -> None:
        if isinstance(after, str):  # list("prepare") would silently become ['p', 'r', ...]
            raise TypeError(f"after takes a list of task names, not the string {after!r}; write after=[{after!r}]")
        merged = dict(submit_options or {})
        if extra:
            merged.update(extra)
        merged.update(scheduler_options)
        self.cpus = cpus
        self.time = time
        self.mem = mem
        self.array = array
        self.after = list(after or [])
        self.array_parallelism = array_parallelism
        self.submit_options = merged
        self.version = version
        self.cache = cache
        self.backend = backend
        self.retries = retries
        self.retry_policy: dict[str, Any] | None = retry_policy
        self.pack = pack

    @property
    def extra(self) -> dict[str, Any]:
        """Backward-compatible alias for ``submit_options`` (the same mapping, not a copy)."""
        return self.submit_options

    def to_dict(self) -> dict[str, Any]:
        """``dataclasses.asdict(self)``: what the manifest carries as the task's ``config``
        (without ``retry_policy`` when none is set, so manifests without one stay as they were)."""
        data = asdict(self)
        if self.retry_policy is not None:
            data["retry_policy"] = copy.deepcopy(self.retry_policy)
        return data

    def check(self, task: str) -> None:
        """Raise ValueError for values no scheduler could take."""
        where = f"task {task!r}"
        if not isinstance(self.cpus, int) or isinstance(self.cpus, bool) or self.cpus < 1:
            raise ValueError(f"{where}: cpus must be a positive whole number, not {self.cpus!r}")
        try:
            parse_time(self.time)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        try:
            parse_mem(self.mem)
            self.mem = format_mem(self.mem)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if self.array_parallelism is not None and (
            not isinstance(self.array_parallelism, int)
            or isinstance(self.array_parallelism, bool)
            or self.array_parallelism < 1
        ):
            raise ValueError(
                f"{where}: array_parallelism must be a positive whole number or None, not {self.array_parallelism!r}"
            )
        if self.array_parallelism is not None and not self.array:
            raise ValueError(f"{where}: array_parallelism only applies to array tasks (array=True or array_job)")
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ValueError(f"{where}: retries must be a whole number >= 0, not {self.retries!r}")
        try:
            retry.check(self.retry_policy, f"{where}: retry_policy")
        except retry.RetryPolicyError as exc:
            raise ValueError(str(exc)) from None
        if self.pack is not None:
            try:
                parse_pack(self.pack, f"{where}: pack")
            except ValueError as exc:
                raise ValueError(str(exc)) from None
            if not self.array and parse_pack(self.pack) not in (None, OFF):
                raise ValueError(f"{where}: pack only applies to array tasks (array=True or array_job)")
        if not isinstance(self.version, str):
            raise ValueError(f"{where}: version must be a string such as '2', not {self.version!r}")
        for dep in self.after:
            if not isinstance(dep, str):
                raise ValueError(f"{where}: after=[...] takes task names, not {dep!r}")
        for key, value in self.submit_options.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if not all(isinstance(v, _OPTION_VALUE_TYPES) for v in values):
                raise ValueError(
                    f"{where}: submit option {key}={value!r} must be a string, number, bool or a list of those"
                )


@dataclass
class RunParam:
    """One run parameter consumed by one task (before merging across tasks)."""

    task: str
    name: str
    annotation: Any
    base_type: Any
    optional: bool
    default: Any
    marker: Param

    @property
    def has_default(self) -> bool:
        return self.default is not inspect.Parameter.empty

    @property
    def key(self) -> str:
        """Key in the run's parameter mapping (and the CLI dest)."""
        if self.marker.namespace == "local":
            return f"{self.task}_{self.name}"
        return self.name

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def keys(self) -> list[str]:
        """Every dest-like name its flags take: a bool also gets ``--no-<flag>``."""
        return [self.key, "no_" + self.key] if strip_optional(self.base_type)[0] is bool else [self.key]


@dataclass
class TaskSpec:
    """A registered task: the function and everything derived from its signature."""

    name: str
    func: Callable[..., Any]
    config: JobConfig
    verify: Callable[[Any], bool] | None = None
    result_deps: dict[str, Result] = field(default_factory=dict)
    run_params: dict[str, RunParam] = field(default_factory=dict)
    run_dir_params: list[str] = field(default_factory=list)
    param_types: dict[str, Any] = field(default_factory=dict)
    return_type: Any = Any

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.func)

    @property
    def dependencies(self) -> list[str]:
        """Upstream task names: result steps first (in parameter order), then ``after``."""
        deps: list[str] = []
        for result in self.result_deps.values():
            deps.extend(s for s in result.steps if s not in deps)
        deps.extend(d for d in self.config.after if d not in deps)
        return deps

    def source_hash(self) -> str:
        try:
            source = inspect.getsource(self.func)
        except (OSError, TypeError):  # no source file (exec, some REPLs): hash the whole code object
            code = getattr(self.func, "__code__", None)
            if code is None:
                return hashlib.sha256(repr(self.func).encode("utf-8")).hexdigest()
            return hashlib.sha256(marshal.dumps(code)).hexdigest()  # co_code alone ignores constants
        return hashlib.sha256(source.encode("utf-8")).hexdigest()

    def renamed(self, new_name: str, mapping: dict[str, str]) -> TaskSpec:
        spec = copy.copy(self)
        spec.name = new_name
        spec.config = copy.deepcopy(self.config)
        spec.config.after = [mapping.get(d, d) for d in self.config.after]
        spec.result_deps = {p: r.renamed(mapping) for p, r in self.result_deps.items()}
        spec.run_params = {p: _retask(rp, new_name) for p, rp in self.run_params.items()}
        return spec


def _retask(rp: RunParam, task: str) -> RunParam:
    new = copy.copy(rp)
    new.task = task
    return new


def analyse_function(task: str, func: Callable[..., Any]) -> tuple[dict[str, Result], dict[str, RunParam], list[str], dict[str, Any], Any]:
    """Classify each parameter of a task function by its annotation."""
    try:
        hints = get_type_hints(func, include_extras=True)
    except Exception:  # forward references the module cannot resolve: fall back to raw annotations
        hints = dict(getattr(func, "__annotations__", {}))
    sig = inspect.signature(func)
    results: dict[str, Result] = {}
    run_params: dict[str, RunParam] = {}
    run_dir_params: list[str] = []
    param_types: dict[str, Any] = {}
    for pname, param in sig.parameters.items():
        where = f"task {task!r} parameter {pname!r}"
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ValueError(f"{where}: *args/**kwargs cannot be filled by reflow; name each parameter")
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise ValueError(f"{where}: positional-only parameters cannot be passed by name; remove the '/'")
        annotation = hints.get(pname, param.annotation)
        base, markers = split_annotated(annotation)
        if len(markers) > 1:
            raise ValueError(f"{where}: use one of Param, Result or RunDir, not several")
        marker = markers[0] if markers else None
        param_types[pname] = base
        if isinstance(marker, Result):
            if task in marker.steps:
                raise ValueError(f"{where}: a task cannot take its own result")
            results[pname] = marker
        elif isinstance(marker, RunDir) or pname == RUN_DIR_PARAM:  # by name too, as the reference injects it
            run_dir_params.append(pname)
        else:
            inner, optional = strip_optional(base)
            run_params[pname] = RunParam(
                task=task,
                name=pname,
                annotation=base,
                base_type=inner,
                optional=optional,
                default=param.default,
                marker=marker if isinstance(marker, Param) else Param(),
            )
    return_type = hints.get("return", sig.return_annotation)
    if return_type is inspect.Signature.empty:
        return_type = Any
    return results, run_params, run_dir_params, param_types, return_type


def check_param_names(spec: TaskSpec, others: list[TaskSpec]) -> None:
    """Refuse run parameters whose flags would clash or be silently dropped."""
    for rp in spec.run_params.values():
        where = f"task {spec.name!r} parameter {rp.name!r}"
        for other in [*others, spec]:
            for orp in other.run_params.values():
                if orp is rp:
                    continue
                same_flag = orp.key == rp.key
                clash = [] if same_flag else sorted(set(rp.keys) & set(orp.keys))
                if clash:
                    raise ValueError(
                        f"{where}: its flag --{clash[0].replace('_', '-')} collides with parameter {orp.name!r} of "
                        f"task {other.name!r}; rename one of them"
                    )
                if same_flag and not (rp.marker.namespace == orp.marker.namespace == "global"):
                    raise ValueError(
                        f"{where}: its flag {rp.flag} collides with parameter {orp.name!r} of task {other.name!r}; "
                        "rename one of them"
                    )
                same_type = rp.annotation == orp.annotation or type_repr(rp.annotation) == type_repr(orp.annotation)
                if same_flag and not same_type:  # Optional[int] == int | None though their reprs differ
                    raise TypeError(
                        f"{where}: global parameter {rp.name!r} is {type_repr(rp.annotation)} here but "
                        f"{type_repr(orp.annotation)} in task {other.name!r}; use one type or Param(namespace='local')"
                    )
                if (
                    same_flag
                    and rp.has_default
                    and orp.has_default
                    and rp.default != orp.default
                ):
                    raise ValueError(
                        f"{where}: global parameter {rp.name!r} defaults to {rp.default!r} here but to "
                        f"{orp.default!r} in task {other.name!r}; use one default or Param(namespace='local')"
                    )
                if (
                    not same_flag
                    and rp.marker.short
                    and rp.marker.short == orp.marker.short
                ):
                    raise ValueError(
                        f"{where}: short flag -{rp.marker.short} is already used by parameter {orp.name!r} "
                        f"of task {other.name!r}"
                    )


class Flow:
    """A reusable collection of task definitions; attach it to a Workflow with ``include``."""

    def __init__(self, name: str) -> None:
        self.name: str = name
        self.tasks: dict[str, TaskSpec] = {}
        self._registration_order: list[str] = []

    def _register(
        self,
        task_name: str,
        func: Callable[..., Any],
        config: JobConfig,
        verify: Callable[[Any], bool] | None = None,
    ) -> TaskSpec:
        if not isinstance(task_name, str) or not TASK_NAME_RE.match(task_name):
            raise ValueError(
                f"invalid task name {task_name!r}: use letters, digits and underscores, starting with a letter"
            )
        if task_name in self.tasks:
            raise ValueError(f"task {task_name!r} is already registered in {self.name!r}; task names must be unique")
        if not callable(func):
            raise TypeError(f"task {task_name!r}: the decorated object is not callable")
        if verify is not None and not callable(verify):
            raise TypeError(f"task {task_name!r}: verify must be a callable taking the output and returning bool")
        config.check(task_name)
        results, run_params, run_dir_params, param_types, return_type = analyse_function(task_name, func)
        spec = TaskSpec(
            name=task_name,
            func=func,
            config=config,
            verify=verify,
            result_deps=results,
            run_params=run_params,
            run_dir_params=run_dir_params,
            param_types=param_types,
            return_type=return_type,
        )
        check_param_names(spec, list(self.tasks.values()))
        self.tasks[task_name] = spec
        self._registration_order.append(task_name)
        return spec

    def job(
        self,
        name: str | None = None,
        *,
        array: bool = False,
        array_parallelism: int | None = None,
        cpus: int = 1,
        time: str = "00:30:00",
        mem: str = "4G",
        after: list[str] | None = None,
        submit_options: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        version: str = "1",
        cache: bool = True,
        verify: Callable[[Any], bool] | None = None,
        backend: str | None = None,
        retries: int = 0,
        pack: int | str | bool | None = None,
        **scheduler_options: Any,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a task, singleton or array job; the function is returned unchanged."""
        if callable(name):
            raise TypeError("use @flow.job() with parentheses")

        def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
            self._register(
                func.__name__ if name is None else name,
                func,
                JobConfig(
                    cpus=cpus,
                    time=time,
                    mem=mem,
                    after=after,
                    array=array,
                    array_parallelism=array_parallelism,
                    submit_options=submit_options,
                    extra=extra,
                    version=version,
                    cache=cache,
                    backend=backend,
                    retries=retries,
                    pack=pack,
                    **scheduler_options,
                ),
                verify=verify,
            )
            return func

        return decorator

    def array_job(
        self,
        name: str | None = None,
        *,
        cpus: int = 1,
        time: str = "00:30:00",
        mem: str = "4G",
        after: list[str] | None = None,
        array_parallelism: int | None = None,
        submit_options: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        version: str = "1",
        cache: bool = True,
        verify: Callable[[Any], bool] | None = None,
        backend: str | None = None,
        retries: int = 0,
        pack: int | str | bool | None = None,
        **scheduler_options: Any,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register an array task (one instance per element of its fan-out input)."""
        return self.job(
            name,
            array=True,
            array_parallelism=array_parallelism,
            cpus=cpus,
            time=time,
            mem=mem,
            after=after,
            submit_options=submit_options,
            extra=extra,
            version=version,
            cache=cache,
            verify=verify,
            backend=backend,
            retries=retries,
            pack=pack,
            **scheduler_options,
        )

    def _prefixed_tasks(self, prefix: str | None) -> tuple[dict[str, TaskSpec], list[str]]:
        """Copies of this flow's tasks renamed ``<prefix>_<name>``, internal references rewritten."""
        if not prefix:
            return {n: self.tasks[n] for n in self._registration_order}, list(self._registration_order)
        if not TASK_NAME_RE.match(prefix):
            raise ValueError(f"invalid prefix {prefix!r}: use letters, digits and underscores, starting with a letter")
        mapping = {n: f"{prefix}_{n}" for n in self._registration_order}
        tasks = {mapping[n]: self.tasks[n].renamed(mapping[n], mapping) for n in self._registration_order}
        return tasks, [mapping[n] for n in self._registration_order]
