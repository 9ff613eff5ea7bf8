"""Rendering a workflow's graph as text, Mermaid or Graphviz dot (pure functions of the manifest)."""

from __future__ import annotations

from reflow_client.manifest import Manifest, TaskManifest


def _edges(manifest: Manifest) -> list[tuple[str, str, str]]:
    """(upstream, downstream, label) for every dependency; data edges labelled by mode."""
    edges: list[tuple[str, str, str]] = []
    for task in manifest.tasks:
        labelled: dict[str, list[str]] = {}
        for pname, sources in task.inputs.items():
            for src in sources:
                labelled.setdefault(src.step, []).append(f"{pname}: {src.mode}")
        for dep in task.dependencies:
            edges.append((dep, task.name, ", ".join(labelled.get(dep, ["after"]))))
    return edges


def _node_label(task: TaskManifest) -> str:
    return f"{task.name}[]" if task.is_array else task.name


def render_text(manifest: Manifest) -> str:
    lines = [f"workflow {manifest.workflow} ({len(manifest.tasks)} tasks, [] = array task)"]
    incoming: dict[str, list[tuple[str, str]]] = {}
    for up, down, label in _edges(manifest):
        incoming.setdefault(down, []).append((up, label))
    for task in manifest.tasks:
        lines.append(f"  {_node_label(task)}")
        for up, label in incoming.get(task.name, []):
            lines.append(f"    <- {up} ({label})")
    return "\n".join(lines) + "\n"


def _mermaid_id(name: str) -> str:
    return "t_" + name


def render_mermaid(manifest: Manifest) -> str:
    lines = ["flowchart TD"]
    for task in manifest.tasks:
        shape = f'[["{_node_label(task)}"]]' if task.is_array else f'["{task.name}"]'
        lines.append(f"    {_mermaid_id(task.name)}{shape}")
    for up, down, label in _edges(manifest):
        lines.append(f'    {_mermaid_id(up)} -->|"{label}"| {_mermaid_id(down)}')
    return "\n".join(lines) + "\n"


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_dot(manifest: Manifest) -> str:
    lines = [f"digraph {_dot_quote(manifest.workflow)} {{", "    rankdir=TB;", "    node [shape=box];"]
    for task in manifest.tasks:
        attrs = ' style="rounded,bold" peripheries=2' if task.is_array else ""
        lines.append(f"    {_dot_quote(task.name)} [label={_dot_quote(_node_label(task))}{attrs}];")
    for up, down, label in _edges(manifest):
        style = " style=dashed" if label == "after" else ""
        lines.append(f"    {_dot_quote(up)} -> {_dot_quote(down)} [label={_dot_quote(label)}{style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


RENDERERS = {"text": render_text, "mermaid": render_mermaid, "dot": render_dot}
