"""A worker imports only what it needs to run a task: every array element pays for it at start."""

from __future__ import annotations

import json
import subprocess
import sys

import reflow

#: Modules a worker never uses before it runs the user's function: the configuration (TOML parsing)
#: and the client's async stack. They must load on first use only.
_NOT_IN_WORKER = ("reflow_client.config", "tomllib", "anyio", "reflow.run", "reflow_client.client", "tempfile")


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_importing_the_worker_leaves_config_tomllib_and_anyio_unloaded() -> None:
    loaded = _loaded_after("import reflow.worker")
    assert "reflow.worker" in loaded
    unwanted = sorted(m for m in loaded if m.split(".")[0] in {"tomllib", "anyio"} or m in _NOT_IN_WORKER)
    assert unwanted == [], f"import reflow.worker pulled in {unwanted}; import them where they are used"


def test_the_public_names_still_import_from_reflow() -> None:
    loaded = _loaded_after("from reflow import Config, Workflow, load_config, SlurmExecutor")
    assert "reflow_client.config" in loaded  # the lazy names load on first use ...
    assert reflow.Config is reflow.__getattr__("Config")  # ... and are the configuration's own classes
    from reflow_client.config import Config, load_config

    assert reflow.Config is Config and reflow.load_config is load_config
    assert {"Config", "load_config", "Run"} <= set(dir(reflow))
