"""``Run``: a handle to a run kept by reflowd."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflow_client import render
from reflow_client.client import Client, RunStatus

if TYPE_CHECKING:
    from .workflow import Workflow


class Run:
    """Bound handle to a submitted run (``store`` is the daemon connection or its socket path)."""

    def __init__(self, workflow: Workflow, run_id: str, run_dir: Path, store: Client | str | Path | None) -> None:
        self.workflow = workflow
        self.run_id = run_id
        self.run_dir = Path(run_dir)
        self.store = store

    @property
    def client(self) -> Client:
        if not isinstance(self.store, Client):
            self.store = Client(self.store) if self.store is not None else Client(self.workflow.config.socket)
        return self.store

    def __repr__(self) -> str:
        return f"Run({self.run_id!r}, run_dir={str(self.run_dir)!r})"

    def status(self, task: str | None = None, as_dict: bool = False) -> dict[str, Any] | None:
        """Print the run's status, or return it as a dict with ``as_dict=True``."""
        status = self.client.status(self.run_id, task)
        if as_dict:
            return status.raw
        print(render.format_status(status), end="")
        return None

    def cancel(self, task: str | None = None, executor: Any = None) -> int:
        n = self.client.cancel(self.run_id, task)
        print(f"Cancelled {n} task instance(s).")
        return n

    def retry(self, task: str | None = None, executor: Any = None, verify: bool = True) -> int:
        n = self.client.retry(self.run_id, task, verify)
        print(f"Marked {n} task instance(s) for retry.")
        return n

    def wait(self, timeout: float | None = None) -> RunStatus:
        """Block until the run ends; raises TimeoutError after *timeout* seconds."""
        return self.client.wait(self.run_id, timeout=timeout)

    def logs(self, task: str, index: int | None = None) -> dict[str, Any]:
        return self.client.logs(self.run_id, task, index)
