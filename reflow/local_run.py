"""``Workflow.run_local``: run a workflow here, in this process, with the daemon's engine."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from reflow_client import codec

if TYPE_CHECKING:
    from .workflow import Workflow


@dataclass
class LocalRunResult:
    """How a local run ended, with every task's decoded output."""

    run_id: str
    state: str
    run_dir: Path
    summary: dict[str, dict[str, int]]
    outputs: dict[str, Any] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    #: every instance's encoded output per task (``{"index", "state", "output"}``), for display without decoding
    encoded: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: stderr log file of each listed failure, by label (``task`` or ``task[i]``)
    log_paths: dict[str, str] = field(default_factory=dict)
    #: failed instances in all (``failures`` lists at most 20)
    failures_total: int = 0

    @property
    def ok(self) -> bool:
        return self.state == "succeeded"

    def __getitem__(self, task: str) -> Any:
        return self.outputs[task]


def run_options(
    *, force: bool, force_tasks: list[str] | None, verify: bool, on_error: str
) -> dict[str, Any]:
    if on_error not in ("stop", "continue"):
        raise ValueError(f"on_error must be 'stop' or 'continue', not {on_error!r}")
    return {"force": bool(force), "force_tasks": list(force_tasks or []), "verify": bool(verify), "on_error": on_error}


def run_local(
    wf: Workflow,
    run_dir: str | os.PathLike[str],
    *,
    max_workers: int | None = None,
    on_error: str = "stop",
    force: bool = False,
    force_tasks: list[str] | None = None,
    verify: bool = False,
    store_path: str | os.PathLike[str] | None = None,
    parameters: dict[str, Any],
    on_event: Callable[[dict[str, Any]], None] | None = None,
    log_level: str | None = None,
) -> LocalRunResult:
    """Run *wf* to its end here; engine log lines only at *log_level* (default: $REFLOW_LOG_LEVEL, else errors)."""
    if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
        raise ValueError(f"max_workers must be a positive whole number, not {max_workers!r}")
    options = run_options(force=force, force_tasks=force_tasks, verify=verify, on_error=on_error)
    wf.validate()
    wf.check_loadable()
    manifest = wf.describe_typed()
    unknown = [t for t in options["force_tasks"] if t not in wf.tasks]
    if unknown:
        raise ValueError(f"force_tasks names unknown task(s): {', '.join(unknown)}")
    params = wf.resolve_parameters(parameters)
    rd = Path(run_dir).expanduser().resolve()
    rd.mkdir(parents=True, exist_ok=True)
    db = Path(store_path) if store_path else rd / ".reflow" / "local.sqlite"

    from reflow_client.config import load_config
    from reflowd.cache_store import cache_path
    from reflowd.embedded import failure_log_paths, run_embedded  # the engine, only when running locally

    shared_cache = cache_path(load_config().state_dir)  # the daemon's: read now, as reflowd would at its start
    from reflowd.logging import configure

    configure(log_level or os.environ.get("REFLOW_LOG_LEVEL") or "error", stream=_Stderr())

    async def main() -> dict[str, Any]:
        status = await run_embedded(
            manifest, params, str(rd), options=options, store_path=db, cache_path=shared_cache, max_workers=max_workers,
            on_event=on_event,
        )
        status["log_paths"] = await failure_log_paths(db, status["run"]["id"], status["failures"])
        return status

    status = anyio.run(main)
    outputs: dict[str, Any] = {}
    with codec.workflow_module(wf._module_name):  # another workflow file may have been loaded since
        for name, items in status["outputs"].items():
            decoded = [
                codec.decode(item["output"]) if item["state"] in ("succeeded", "cached") else None for item in items
            ]
            outputs[name] = decoded if wf.tasks[name].config.array else (decoded[0] if decoded else None)
    return LocalRunResult(
        run_id=status["run"]["id"],
        state=status["run"]["state"],
        run_dir=rd,
        summary=status["summary"],
        outputs=outputs,
        failures=status["failures"],
        encoded=status["outputs"],
        log_paths=status["log_paths"],
        failures_total=sum(n for counts in status["summary"].values() for state, n in counts.items()
                           if state in _LISTED_FAILURES),
    )


_LISTED_FAILURES = {"failed", "timeout", "out_of_memory", "node_fail", "submit_failed", "cancelled"}


class _Stderr:
    """Log lines go to whatever ``sys.stderr`` is when they are written (the live display may redirect it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()
