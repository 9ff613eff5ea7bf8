"""One driver per cluster: its queues, its budget and poll policy, its submit and observe loops."""

from .driver import Driver, DriverSettings, Host
from .submit import log_paths_for

__all__ = ["Driver", "DriverSettings", "Host", "log_paths_for"]
