"""reflow: describe an HPC pipeline once with decorated functions; reflowd runs it."""

from reflow_client.config import Config, load_config
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


def __getattr__(name: str) -> object:
    """``Run`` is imported on first use: it brings the client (anyio), which a worker never needs,
    and every array element's worker pays for what ``import reflow`` loads."""
    if name == "Run":
        from .run import Run

        globals()["Run"] = Run  # from now on an ordinary attribute (vars(reflow) has it, as before)
        return Run
    raise AttributeError(f"module 'reflow' has no attribute {name!r}")
