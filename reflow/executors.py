"""Executors: where a submitted run goes, named the way the reference names them.

reflowd, not the user's process, talks to the workload manager, so an
executor here runs nothing itself. It is a small value naming a scheduler
kind, optionally a configured cluster, and scheduler-native submit options,
and it translates to one ``[clusters.NAME]`` entry of the configuration
(``cluster_config``) plus run-wide submit options that sit between the
cluster's own ``submit_options`` and each task's (a task's options win).

``"local"`` (or any configured cluster name) is accepted wherever an
executor is; ``resolve_executor`` turns each form into the cluster to use.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # the configuration module (and tomllib) loads when an executor is resolved, not on import
    from reflow_client.config import ClusterConfig, Config


class Executor:
    """Base of the executor classes: a scheduler kind, a cluster and submit options.

    ``cluster`` names a ``[clusters.NAME]`` table; without it the executor takes
    the default cluster if that runs its scheduler, else the only configured
    cluster that does. Keyword options are scheduler-native submit options
    (``None`` values are dropped), merged after ``submit_options``.
    """

    scheduler: ClassVar[str] = ""

    def __init__(self, cluster: str | None = None, *, submit_options: dict[str, Any] | None = None,
                 **options: Any) -> None:
        if cluster is not None and not isinstance(cluster, str):
            raise TypeError(f"{type(self).__name__}: cluster must be a cluster name from the configuration, "
                            f"not {type(cluster).__name__}")
        self.cluster = cluster
        merged = dict(submit_options or {})
        merged.update({k: v for k, v in options.items() if v is not None})  # an unset named option keeps the dict's
        self.submit_options: dict[str, Any] = {k: v for k, v in merged.items() if v is not None}

    def __repr__(self) -> str:
        args = [repr(self.cluster)] if self.cluster else []
        args += [f"{k}={v!r}" for k, v in self.submit_options.items()]
        return f"{type(self).__name__}({', '.join(args)})"

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and isinstance(other, Executor) and other.cluster == self.cluster
                and other.submit_options == self.submit_options)

    def __hash__(self) -> int:
        return hash((type(self), self.cluster, tuple(sorted(self.submit_options))))

    def select(self, config: Config) -> ClusterConfig:
        """The configured cluster this executor names (ConfigError when there is none, or several)."""
        from reflow_client.config import ConfigError, config_path

        kind = self.scheduler
        if self.cluster is not None:
            chosen = config.cluster(self.cluster)
            if chosen.scheduler != kind:
                raise ConfigError(
                    f"{type(self).__name__}: cluster {self.cluster!r} runs scheduler {chosen.scheduler!r}, not "
                    f"{kind!r}; pass a {kind} cluster or use the executor for {chosen.scheduler!r}"
                )
            return chosen
        matching = [c for c in config.clusters.values() if c.scheduler == kind]
        for preferred in (config.default_cluster, kind):
            for candidate in matching:
                if candidate.name == preferred:
                    return candidate
        if len(matching) == 1:
            return matching[0]
        where = config.path or config_path()
        if not matching:
            raise ConfigError(
                f"{type(self).__name__}: no cluster with scheduler {kind!r} is configured; add "
                f"[clusters.NAME] with scheduler = \"{kind}\" to {where}"
            )
        names = ", ".join(sorted(c.name for c in matching))
        raise ConfigError(
            f"{type(self).__name__}: several clusters run {kind!r} ({names}); name one, e.g. "
            f"{type(self).__name__}(cluster={matching[0].name!r})"
        )

    def cluster_config(self, config: Config) -> ClusterConfig:
        """The selected cluster's configuration with this executor's submit options on top."""
        chosen = self.select(config)
        return dataclasses.replace(chosen, submit_options={**chosen.submit_options, **self.submit_options})


class LocalExecutor(Executor):
    """Run on this machine, as processes started by reflowd (cluster ``local``)."""

    scheduler = "local"


class SlurmExecutor(Executor):
    """Submit through Slurm (``sbatch``); options become ``--name=value``."""

    scheduler = "slurm"

    def __init__(self, cluster: str | None = None, *, partition: str | None = None, account: str | None = None,
                 qos: str | None = None, submit_options: dict[str, Any] | None = None, **options: Any) -> None:
        super().__init__(cluster, submit_options=submit_options, partition=partition, account=account, qos=qos,
                         **options)


class PBSExecutor(Executor):
    """Submit through PBS Pro / OpenPBS (``qsub``)."""

    scheduler = "pbs"

    def __init__(self, cluster: str | None = None, *, queue: str | None = None, account: str | None = None,
                 submit_options: dict[str, Any] | None = None, **options: Any) -> None:
        super().__init__(cluster, submit_options=submit_options, queue=queue, account=account, **options)


class SGEExecutor(Executor):
    """Submit through (Son of) Grid Engine (``qsub``)."""

    scheduler = "sge"

    def __init__(self, cluster: str | None = None, *, queue: str | None = None, project: str | None = None,
                 submit_options: dict[str, Any] | None = None, **options: Any) -> None:
        super().__init__(cluster, submit_options=submit_options, queue=queue, project=project, **options)


class LSFExecutor(Executor):
    """Submit through IBM Spectrum LSF (``bsub``)."""

    scheduler = "lsf"

    def __init__(self, cluster: str | None = None, *, queue: str | None = None, project: str | None = None,
                 submit_options: dict[str, Any] | None = None, **options: Any) -> None:
        super().__init__(cluster, submit_options=submit_options, queue=queue, project=project, **options)


class FluxExecutor(Executor):
    """Submit through Flux (``flux batch``)."""

    scheduler = "flux"

    def __init__(self, cluster: str | None = None, *, queue: str | None = None, bank: str | None = None,
                 submit_options: dict[str, Any] | None = None, **options: Any) -> None:
        super().__init__(cluster, submit_options=submit_options, queue=queue, bank=bank, **options)


#: One executor class per scheduler kind the configuration knows.
EXECUTORS: dict[str, type[Executor]] = {
    cls.scheduler: cls
    for cls in (LocalExecutor, SlurmExecutor, PBSExecutor, SGEExecutor, LSFExecutor, FluxExecutor)
}


def resolve_executor(executor: Executor | str | None, config: Config) -> tuple[ClusterConfig, dict[str, Any]]:
    """(cluster to submit to, run-wide submit options) for an executor object, a name or None.

    None is the configured default cluster. A string is a configured cluster
    name; ``"local"`` always exists (the reference's shorthand for
    ``LocalExecutor``); a scheduler kind such as ``"slurm"`` that is not also
    a cluster name selects that kind's executor.
    """
    if executor is None:
        return config.cluster(None), {}
    if isinstance(executor, Executor):
        return executor.select(config), dict(executor.submit_options)
    if isinstance(executor, str):
        if executor not in config.clusters and executor in EXECUTORS:
            return EXECUTORS[executor]().select(config), {}
        return config.cluster(executor), {}
    raise TypeError(
        f"executor must be an executor such as reflow.SlurmExecutor(...), a cluster name such as 'local', or None; "
        f"not {type(executor).__name__}"
    )


__all__ = [
    "EXECUTORS",
    "Executor",
    "FluxExecutor",
    "LSFExecutor",
    "LocalExecutor",
    "PBSExecutor",
    "SGEExecutor",
    "SlurmExecutor",
    "resolve_executor",
]
