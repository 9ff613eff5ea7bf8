"""``Workflow``: a Flow that can be validated, described, run and submitted."""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from reflow_client import codec
from reflow_client.manifest import (
    ELEMENT_MODES,
    CliParamManifest,
    InputSource,
    Manifest,
    TaskManifest,
    WorkflowDescription,
)

from .flow import Flow, RunParam, TaskSpec, check_param_names
from .loader import assigned_at_import
from .typeinfo import list_element, type_repr
from .param_values import check_value
from .wiring import Edge, check_param_modes, infer_mode

if TYPE_CHECKING:
    from reflow_client.config import Config

    from .executors import Executor
    from .run import Run

#: ``limit`` for reflowd's status call when every instance of a task is wanted.
_ALL_INSTANCES = 10_000_000


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    import difflib  # only for error messages: kept out of every worker's import

    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _choices(tp: Any) -> list[Any] | None:
    inner = list_element(tp) or tp
    if get_origin(inner) is Literal:
        return list(get_args(inner))
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        return [m.value for m in inner]
    return None


class Workflow(Flow):
    """A runnable workflow: validation, manifest, CLI, local runs and daemon submission."""

    def __init__(self, name: str, config: Config | None = None) -> None:
        super().__init__(name)
        if not isinstance(name, str) or not name or any(c.isspace() or c in "/\\" for c in name):
            raise ValueError(f"invalid workflow name {name!r}: use a short name without spaces or slashes")
        self._config = config
        frame = sys._getframe(1)
        caller = frame.f_globals
        #: The function that created this workflow, when not the module's top level (for check_loadable).
        self._created_in: str | None = None if frame.f_code.co_name == "<module>" else frame.f_code.co_name
        entry = caller.get("__file__") or (sys.argv[0] if sys.argv and sys.argv[0] else None)
        #: The file workers load to find this workflow; override for unusual layouts.
        self.entrypoint: Path | None = Path(entry).resolve() if entry else None
        self._module_name: str | None = caller.get("__name__")

    @property
    def config(self) -> Config:
        if self._config is None:
            from reflow_client.config import load_config  # on first use: a worker never reads the configuration

            self._config = load_config()
        return self._config

    @config.setter
    def config(self, value: Config) -> None:
        self._config = value

    # ------------------------------------------------------------------ composition

    def include(self, flow: Flow, prefix: str | None = None) -> None:
        """Add all tasks of *flow*, optionally renamed ``<prefix>_<task>``."""
        new_tasks, new_order = flow._prefixed_tasks(prefix)
        for task_name in new_order:
            if task_name in self.tasks:
                hint = "" if prefix else " (pass prefix=... to include it under other names)"
                raise ValueError(f"cannot include flow {flow.name!r}: task {task_name!r} already exists{hint}")
        existing = list(self.tasks.values())
        for task_name in new_order:
            check_param_names(new_tasks[task_name], existing)
            existing.append(new_tasks[task_name])
        for task_name in new_order:
            self.tasks[task_name] = new_tasks[task_name]
        self._registration_order.extend(new_order)

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Raise ValueError (unknown steps, cycles, arrays without fan-out) or TypeError (wiring)."""
        if not self.tasks:
            raise ValueError(f"workflow {self.name!r} has no tasks; register some with @wf.job()")
        known = list(self.tasks)
        for spec in self.tasks.values():
            for pname, result in spec.result_deps.items():
                for step in result.steps:
                    if step not in self.tasks:
                        raise ValueError(
                            f"task {spec.name!r} parameter {pname!r} references unknown task {step!r}"
                            + _did_you_mean(step, known)
                        )
            for dep in spec.config.after:
                if dep not in self.tasks:
                    raise ValueError(
                        f"task {spec.name!r} after=[{dep!r}] references unknown task {dep!r}" + _did_you_mean(dep, known)
                    )
                if dep == spec.name:
                    raise ValueError(f"task {spec.name!r} lists itself in after=[...]")
        self._topological_order()
        self._wiring_modes()
        specs = list(self.tasks.values())
        for i, spec in enumerate(specs):
            check_param_names(spec, specs[:i])

    def _topological_order(self) -> list[str]:
        """Tasks ordered so every task follows its dependencies; ties keep registration order."""
        order: list[str] = []
        done: set[str] = set()
        remaining = [n for n in self._registration_order if n in self.tasks]
        while remaining:
            # The first task, in registration order, whose dependencies are all placed.
            for name in remaining:
                if all(d in done for d in self.tasks[name].dependencies if d in self.tasks):
                    order.append(name)
                    done.add(name)
                    remaining.remove(name)
                    break
            else:
                raise ValueError(f"dependency cycle: {' -> '.join(self._find_cycle(remaining))}")
        return order

    def _find_cycle(self, candidates: list[str]) -> list[str]:
        graph = {n: [d for d in self.tasks[n].dependencies if d in candidates] for n in candidates}
        for start in candidates:
            path: list[str] = []
            seen: set[str] = set()
            node = start
            while node not in seen:
                seen.add(node)
                path.append(node)
                if not graph[node]:
                    break
                node = graph[node][0]
            if node in path:
                cycle = path[path.index(node):]
                cycle.reverse()  # show data-flow direction: upstream -> downstream
                return [*cycle, cycle[0]]
        return candidates

    def _wiring_modes(self) -> dict[str, dict[str, list[InputSource]]]:
        """``{task: {param: [InputSource(step, mode), ...]}}``, or TypeError."""
        modes: dict[str, dict[str, list[InputSource]]] = {}
        for spec in self.tasks.values():
            per_task: dict[str, list[InputSource]] = {}
            for pname, result in spec.result_deps.items():
                sources = []
                for step in result.steps:
                    upstream = self.tasks[step]
                    edge = Edge(
                        upstream=step,
                        upstream_type=upstream.return_type,
                        upstream_array=upstream.config.array,
                        downstream=spec.name,
                        param=pname,
                        param_type=spec.param_types.get(pname, Any),
                        downstream_array=spec.config.array,
                        broadcast=result.broadcast,
                        n_steps=len(result.steps),
                    )
                    sources.append(InputSource(step=step, mode=infer_mode(edge)))
                check_param_modes(spec.name, pname, [s.mode for s in sources], spec.config.array)
                per_task[pname] = sources
            if spec.config.array and not any(
                s.mode in ELEMENT_MODES for srcs in per_task.values() for s in srcs
            ):
                hint = ("wire a list-returning task into one of its parameters with Annotated[T, Result(step=...)], "
                        "or make it a plain job")
                if per_task:  # something is wired, but only whole values: an incompatible wiring (TypeError)
                    wired = ", ".join(f"{s.step!r} -> {p}" for p, srcs in per_task.items() for s in srcs)
                    raise TypeError(
                        f"array task {spec.name!r} has no input to fan out over: {wired} passes a single value to "
                        f"every element; {hint}"
                    )
                raise ValueError(f"array task {spec.name!r} has no input to fan out over: {hint}")
            modes[spec.name] = per_task
        return modes

    # ------------------------------------------------------------------ parameters

    def _merged_params(self) -> dict[str, list[RunParam]]:
        merged: dict[str, list[RunParam]] = {}
        for name in self._registration_order:
            for rp in self.tasks[name].run_params.values():
                merged.setdefault(rp.key, []).append(rp)
        return merged

    def cli_params(self) -> list[CliParamManifest]:
        out = []
        for key, group in self._merged_params().items():
            first = group[0]
            default_rp = next((rp for rp in group if rp.has_default), None)
            default = codec.encode(default_rp.default) if default_rp is not None else None
            out.append(
                CliParamManifest(
                    key=key,
                    name=first.name,
                    flag=first.flag,
                    type_repr=type_repr(first.annotation),
                    required=default_rp is None,
                    default=default,
                    namespace=first.marker.namespace,
                    help=next((rp.marker.help for rp in group if rp.marker.help), ""),
                    choices=_choices(first.base_type),
                    short=next((rp.marker.short for rp in group if rp.marker.short), None),
                    tasks=[rp.task for rp in group],
                )
            )
        return out

    def resolve_parameters(self, given: dict[str, Any]) -> dict[str, Any]:
        """Encoded run parameters: defaults filled in; unknown, missing and ill-typed ones refused (TypeError).

        Given values follow ``reflow.param_values``' one rule: a value of the parameter's
        type as it is, a string as the command line would parse it.
        """
        merged = self._merged_params()
        unknown = [k for k in given if k not in merged]
        if unknown:
            names = ", ".join(repr(k) for k in unknown)
            raise TypeError(
                f"unknown parameter(s) {names} for workflow {self.name!r}" + _did_you_mean(unknown[0], list(merged))
            )
        resolved: dict[str, Any] = {}
        missing = []
        for key, group in merged.items():
            if key in given:
                value = check_value(key, group[0].annotation, given[key])
            else:
                default_rp = next((rp for rp in group if rp.has_default), None)
                if default_rp is None:
                    missing.append(group[0].flag)
                    continue
                value = default_rp.default
            try:
                with codec.workflow_module(self._module_name):  # classes of this file travel as __workflow__
                    resolved[key] = codec.encode(value)
            except codec.CodecError as exc:
                raise TypeError(f"parameter {key!r}: {exc}") from None
        if missing:
            raise TypeError(f"missing required parameter(s) for workflow {self.name!r}: {', '.join(missing)}")
        return resolved

    # ------------------------------------------------------------------ manifest

    def describe_typed(self) -> WorkflowDescription:
        """The typed description (the manifest the daemon runs from).

        It carries the reference's fields (``name``, ``entrypoint``, ``python``,
        ``working_dir``, ``tasks`` with ``result_deps``, ``cli_params`` with ``task``)
        and ours beside them (wiring modes, parameter keys, source hashes).
        """
        self.validate()
        modes = self._wiring_modes()
        tasks = []
        for name in self._topological_order():
            spec: TaskSpec = self.tasks[name]
            tasks.append(
                TaskManifest(
                    name=name,
                    is_array=spec.config.array,
                    config=spec.config.to_dict(),
                    dependencies=spec.dependencies,
                    inputs=modes[name],
                    params={p: rp.key for p, rp in spec.run_params.items()},
                    run_dir_params=list(spec.run_dir_params),
                    return_type=type_repr(spec.return_type),
                    source_hash=spec.source_hash(),
                    has_verify=spec.verify is not None,
                )
            )
        return Manifest(
            workflow=self.name,
            tasks=tasks,
            cli_params=self.cli_params(),
            entrypoint=str(self.entrypoint) if self.entrypoint else "",
            python=sys.executable,
            working_dir=os.getcwd(),
        )

    def describe(self) -> dict[str, Any]:
        """The description as a JSON-safe dict: the reference's keys plus the manifest's own."""
        return self.describe_typed().to_manifest_dict()

    def check_loadable(self) -> None:
        """Refuse to run when workers could not find this workflow by importing its entry file.

        Workers import the file (without running its ``__main__`` block) and take
        the module-level Workflow. ``validate()``, ``describe()`` and ``dag`` need no
        worker and work wherever the workflow was created.
        """
        if self.entrypoint is None or not self.entrypoint.is_file():
            raise RuntimeError(
                f"workflow {self.name!r}: cannot tell which file defines it (entrypoint={self.entrypoint}); "
                "set wf.entrypoint = Path(__file__)"
            )
        module = sys.modules.get(self._module_name or "")
        if module is None:
            return
        if module.__name__ == "__main__" and not getattr(module, "__file__", None):
            raise RuntimeError(
                f"workflow {self.name!r} is defined interactively, but workers import the workflow from its file; "
                "put it at the top level of a .py file and import it from there (validate(), describe() and dag "
                "work here as they are)"
            )
        holders = {k for k, v in vars(module).items() if v is self}
        fix = (f"create it at the top level of {self.entrypoint} (wf = Workflow({self.name!r}) and its @wf.job() "
               "tasks outside any function), and call wf.cli() or wf.submit(...) under 'if __name__ == \"__main__\":'")
        if not holders:
            where = f"inside function {self._created_in}()" if self._created_in else "somewhere workers cannot see"
            raise RuntimeError(
                f"workflow {self.name!r} is created {where}, not as a module-level variable, so the workers that "
                f"import its file cannot find it; {fix}"
            )
        if module.__name__ == "__main__" and assigned_at_import(self.entrypoint, holders) is False:
            raise RuntimeError(
                f"workflow {self.name!r} is bound to {sorted(holders)[0]!r} only under 'if __name__ == \"__main__\":', "
                f"which workers do not run when they import the file; {fix}"
            )

    # ------------------------------------------------------------------ CLI and execution

    def cli(self, argv: Sequence[str] | None = None) -> int:
        """Run the CLI generated from the task signatures; returns the exit code."""
        from .cli import main

        return main(self, list(argv) if argv is not None else None)

    def run_local(
        self,
        run_dir: str | os.PathLike[str],
        *,
        max_workers: int | None = None,
        on_error: str = "stop",
        force: bool = False,
        force_tasks: list[str] | None = None,
        verify: bool = False,
        store_path: str | os.PathLike[str] | None = None,
        **parameters: Any,
    ) -> Any:
        """Run the whole workflow on this machine, in this process, with the daemon's engine."""
        from .local_run import run_local

        return run_local(
            self,
            run_dir,
            max_workers=max_workers,
            on_error=on_error,
            force=force,
            force_tasks=force_tasks,
            verify=verify,
            store_path=store_path,
            parameters=parameters,
        )

    def submit(
        self,
        run_dir: str | os.PathLike[str],
        *,
        store: Any = None,
        executor: Executor | str | None = None,
        force: bool = False,
        force_tasks: list[str] | None = None,
        verify: bool = False,
        **parameters: Any,
    ) -> Run:
        """Create a run in reflowd (started in the background if none answers) and return its ``Run``.

        ``store``: where runs are kept. Here that is reflowd: None means the
        daemon on the configured socket; a socket path or a connected
        ``reflow_client.Client`` picks another daemon.
        ``executor``: a ``reflow.LocalExecutor()``, ``reflow.SlurmExecutor(partition=...)``
        (or another executor class), a cluster name from the configuration
        (``"local"`` is this machine), or None for the configured default cluster.
        ``force`` skips the cache for every task, ``force_tasks`` for some;
        ``verify`` checks cached outputs before reusing them.
        ``**parameters`` are the run parameters, checked as the command line
        checks them (``reflow.param_values``). Missing or ill-typed parameters raise
        TypeError before anything is submitted.
        """
        from .session import submit

        return submit(
            self,
            run_dir,
            store=store,
            cluster=executor,
            force=force,
            force_tasks=force_tasks,
            verify=verify,
            parameters=parameters,
        )

    def submit_run(
        self,
        run_dir: str | os.PathLike[str],
        parameters: dict[str, Any],
        store: Any = None,
        executor: Executor | str | None = None,
    ) -> str:
        """Lower-level submission (used by CLIs): the same checks as ``submit``; returns the run id."""
        if not isinstance(parameters, dict):
            raise TypeError(f"parameters must be a dict of run parameters, not {type(parameters).__name__}")
        params = dict(parameters)
        given_dir = params.pop("run_dir", None)  # the reference puts the run directory there itself
        if given_dir is not None and Path(given_dir).expanduser().resolve() != Path(run_dir).expanduser().resolve():
            raise ValueError(f"parameters['run_dir'] ({given_dir}) differs from run_dir ({run_dir}); give one of them")
        return self.submit(run_dir, store=store, executor=executor, **params).run_id

    def run_status(
        self, run_id: str, store: Any, task_name: str | None = None, *, instances: bool = True
    ) -> dict[str, Any]:
        """The reference's status dict of a run (see ``reflow.run``); ``instances=False`` leaves them out."""
        from .run import status_dict
        from .session import client_for

        client = client_for(self, store, autostart=True)
        raw = client.call("status", run_id=run_id, task=task_name)
        rows: list[dict[str, Any]] = []
        if instances:
            names = [task_name] if task_name else [t["name"] for t in raw.get("tasks", [])]
            for name in names:
                rows.extend(client.call("status", run_id=run_id, task=name, limit=_ALL_INSTANCES)["instances"])
        return status_dict(raw, rows)

    def cancel_run(
        self, run_id: str, store: Any, task_name: str | None = None, executor: Executor | str | None = None
    ) -> int:
        """Cancel a run's active instances (only ``task_name``'s if given); returns how many."""
        from .session import check_run_executor, client_for

        client = client_for(self, store, autostart=True)
        check_run_executor(self, client, run_id, executor)
        return client.cancel(run_id, task_name)

    def retry_failed(
        self,
        run_id: str,
        store: Any,
        run_dir: str | os.PathLike[str],
        task_name: str | None = None,
        executor: Executor | str | None = None,
        verify: bool = True,
    ) -> int:
        """Retry failed and cancelled instances (and what they block); returns how many were marked.

        ``store`` reaches reflowd as in ``submit``; ``run_dir`` is accepted for the
        reference's signature (reflowd knows each run's directory). With
        ``verify`` (the default) cached upstream outputs are checked and
        produced again where their files are gone or ``verify=`` fails.
        """
        from .session import check_run_executor, client_for

        client = client_for(self, store, autostart=True)
        check_run_executor(self, client, run_id, executor)
        return client.retry(run_id, task_name, verify)
