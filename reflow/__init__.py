"""reflow: describe an HPC pipeline once with decorated functions; reflowd runs it."""

from reflow_client.config import Config, load_config

from .flow import Flow, JobConfig
from .params import Param, Result, RunDir
from .workflow import Workflow

__all__ = ["Config", "Flow", "JobConfig", "Param", "Result", "RunDir", "Workflow", "load_config"]
__version__ = "0.1.0"
