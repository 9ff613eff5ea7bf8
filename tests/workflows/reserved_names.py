"""A workflow whose run parameters take the names of the CLIs' own options.

Every one of them must reach the task as given; reflow's own options move
aside to ``--reflow-<name>`` (``tests/test_cli_reserved.py``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from reflow import Param, Workflow

wf = Workflow("reserved")


@wf.job()
def echo(
    name: str,
    format: Literal["csv", "json"] = "csv",
    index: int = 0,
    json: bool = False,
    wait: float = 0.0,
    task: str = "t",
    verify: bool = False,
    cluster: str = "c",
    force: int = 0,
    workflow: str = "w",
    socket: str = "s",
    command: str = "cmd",
    debug: bool = False,
    hours: Annotated[int, Param(short="h", help="a short flag -h of its own")] = 1,
) -> dict:
    return {"name": name, "format": format, "index": index, "json": json, "wait": wait, "task": task,
            "verify": verify, "cluster": cluster, "force": force, "workflow": workflow, "socket": socket,
            "command": command, "debug": debug, "hours": hours}


if __name__ == "__main__":
    wf.cli()
