"""Merkle identity of a task instance.

The identity names *what* an instance computes: same workflow, task, version,
parameter values, resolved inputs and upstream outputs give the same identity
in any process on any day, so a verified earlier result can stand in for a new
run. It works on encoded values only, so the daemon computes it without user
code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from .codec import canonical_json

IDENTITY_SCHEME = 1


def instance_identity(
    *,
    workflow: str,
    task: str,
    version: str,
    params: Mapping[str, Any],
    inputs: Mapping[str, Any],
    upstream_hashes: Sequence[str],
) -> str:
    """Hex digest identifying one task instance by everything it depends on."""
    payload = {
        "scheme": IDENTITY_SCHEME,
        "workflow": workflow,
        "task": task,
        "version": str(version),
        "params": dict(params),
        "inputs": dict(inputs),
        "upstream": list(upstream_hashes),
    }
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()
