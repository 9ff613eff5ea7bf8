"""Checking that cached or earlier outputs are still good.

Paths inside an output must exist (checked through the cluster's transport,
all at once). A task's own ``verify=`` callable is user code, so it runs in
a worker process (``python -m reflow.worker --verify``), never in the daemon.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import TYPE_CHECKING, Any

import structlog

from reflow_client import codec, jobfiles

from ..transports.base import TransportError
from .model import Instance, Run

if TYPE_CHECKING:
    from ..clusters import ClusterRuntime

log = structlog.get_logger("reflowd.verify")


async def verify_outputs(cluster: ClusterRuntime, run: Run, items: list[tuple[Instance, Any]]) -> dict[str, str | None]:
    """``{identity: None if good else the problem}`` for each (instance, encoded output)."""
    problems: dict[str, str | None] = {}
    timeout = cluster.config.command_timeout
    paths = sorted({p for _, output in items for p in codec.encoded_paths(output)})
    exists: dict[str, bool] = {}
    if paths:
        try:
            exists = await cluster.metered.exists(paths, timeout=timeout)
        except (TransportError, TimeoutError) as exc:
            return {inst.identity_hex or "": f"cannot check output files: {exc}" for inst, _ in items}
    custom = []
    for inst, output in items:
        key = inst.identity_hex or ""
        missing = [p for p in codec.encoded_paths(output) if not exists.get(p, False)]
        problems[key] = f"output file {missing[0]} is missing" if missing else None
        if not missing and run.tasks[inst.task].manifest.has_verify:
            custom.append((inst, output))
    if custom:
        answers = await _run_custom(cluster, run, custom)
        for (inst, _), answer in zip(custom, answers):
            if answer is not None:
                problems[inst.identity_hex or ""] = answer
    return problems


async def _run_custom(cluster: ClusterRuntime, run: Run, items: list[tuple[Instance, Any]]) -> list[str | None]:
    base = os.path.join(jobfiles.run_files_dir(run.run_dir, run.id), "verify")
    name = secrets.token_hex(6)
    request_path, response_path = f"{base}/{name}.json", f"{base}/{name}.out.json"
    entry = run.manifest.entrypoint
    if cluster.remote:
        entry = os.path.join(jobfiles.run_files_dir(run.run_dir, run.id), "workflow", os.path.basename(entry))
    request = {
        "entrypoint": entry,
        "workflow": run.workflow,
        "items": [{"task": inst.task, "output": output} for inst, output in items],
    }
    timeout = cluster.config.command_timeout * 4
    python = cluster.python_for(run.manifest.python)
    try:
        await cluster.metered.write_files({request_path: jobfiles.dumps(request)}, timeout=timeout)
        result = await cluster.metered.run(
            [python, "-m", "reflow.worker", "--verify", request_path, "--out", response_path],
            timeout=timeout,
        )
        if not result.ok:
            raise TransportError(f"verify worker exited {result.returncode}: {result.stderr.strip()[-500:]}")
        raw = await cluster.metered.read_file(response_path, timeout=timeout)
        answers = json.loads(raw or b"{}").get("answers", [])
    except (TransportError, TimeoutError, ValueError) as exc:
        log.warning("custom verification could not run", run_id=run.id, error=str(exc))
        return [f"verify could not run: {exc}"] * len(items)
    out: list[str | None] = []
    for i in range(len(items)):
        answer = answers[i] if i < len(answers) else {"ok": False, "error": "no answer"}
        out.append(None if answer.get("ok") else (answer.get("error") or "verify returned False"))
    return out
