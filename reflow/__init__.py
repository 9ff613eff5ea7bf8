"""reflow: describe an HPC pipeline once with decorated functions; reflowd runs it."""

from reflow_client.manifest import CliParamDescription, TaskDescription, WorkflowDescription

from .executors import (
    Executor,
    FluxExecutor,
    LocalExecutor,
    LSFExecutor,
    PBSExecutor,
    SGEExecutor,
    SlurmExecutor,
)
from .flow import Flow, JobConfig, TaskSpec
from .interrupt import TaskInterrupted
from .params import Param, Result, RunDir
from .states import RunState, TaskState
from .workflow import Workflow

__all__ = [
    "CliParamDescription",
    "Config",
    "Executor",
    "Flow",
    "FluxExecutor",
    "JobConfig",
    "LSFExecutor",
    "LocalExecutor",
    "PBSExecutor",
    "Param",
    "Result",
    "Run",
    "RunDir",
    "RunState",
    "SGEExecutor",
    "SlurmExecutor",
    "TaskDescription",
    "TaskInterrupted",
    "TaskSpec",
    "TaskState",
    "Workflow",
    "WorkflowDescription",
    "load_config",
]
__version__ = "0.1.0"


#: Names imported on first use, and the module that defines each. A worker runs ``import reflow``
#: before every task, so what it never needs stays out of that import: ``Run`` brings the client
#: (anyio), ``Config``/``load_config`` bring TOML parsing (tomllib) and the configuration schema.
_LAZY = {
    "Run": "reflow.run",
    "Config": "reflow_client.config",
    "load_config": "reflow_client.config",
}


def __getattr__(name: str) -> object:
    """Import a name of ``_LAZY`` on first use."""
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'reflow' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # from now on an ordinary attribute (vars(reflow) has it, as before)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
