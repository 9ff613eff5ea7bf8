"""Every shell command and code sample in README.md and docs/*.md runs, so the docs cannot drift from the code.

The convention (also on the site's home page, docs/index.md):

* ``sh``/``bash`` blocks run with bash, in order, one scratch directory per page
  holding the repository's ``examples/`` and the files of ``docs/examples/``,
  with the test's virtual environment as ``.venv`` (active, that is on ``PATH``,
  for the pages under docs/, which say so; not for the README, which starts
  from a plain shell and must activate it or name ``.venv/bin/...``), a private
  HOME and runtime directory (so a private reflowd socket, state and config).
  ``RUN_ID`` stands for the newest run's id. The README's set-up prefix
  (``python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' &&``) is
  what the test command itself ran, so it is dropped rather than run twice.
* ``python`` blocks run as scripts (not as ``__main__``) and each ``Workflow``
  they define must pass ``validate()``; a block that only includes files from
  ``docs/examples/`` (``--8<-- "file[:section]"``) runs those files instead.
* ``toml`` blocks must be accepted by ``reflow_client.config.parse_config``.
* ``<!-- docs-test: skip REASON -->`` on the line before a fence skips that
  block; the reason is required and shown in the report.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from reflow_client.config import parse_config

from .support import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
SHELL, PYTHON, TOML = ("sh", "bash", "shell"), ("python", "py"), ("toml",)
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\b\s*(?P<reason>.*?)\s*-->$")
SNIPPET = re.compile(r'^--8<--\s+"(?P<file>[^":]+)(?::(?P<section>[\w-]+))?"$')
SETUP_PREFIX = re.compile(r"python3 -m venv \.venv && \.venv/bin/pip install -q -e '\.\[[\w,]+\]'(?: && |\s*$)")
NEWEST_RUN = ("newest_run() { python -c 'from reflow_client.client import Client; "
              "print(Client(timeout=30).runs(limit=1)[0].id)'; }")


@dataclass
class Block:
    page: Path
    line: int          # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None   # reason, when marked

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def extract_blocks(text: str, page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, with the skip marker on the line before each."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, start = match["fence"], i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.match(previous)
        if marker and not marker["reason"]:
            raise AssertionError(f"{page}:{start + 1}: a docs-test skip marker needs a reason")
        blocks.append(Block(page, start + 1, match["lang"].lower(), "\n".join(body) + "\n",
                            marker["reason"] if marker else None))
        i += 1
    return blocks


def included_files(block: Block) -> list[Path] | None:
    """The docs/examples files a block consists of, or None if it has code of its own."""
    lines = [line.strip() for line in block.text.splitlines() if line.strip()]
    matches = [SNIPPET.match(line) for line in lines]
    if not lines or not all(matches):
        return None
    return [EXAMPLES / m["file"] for m in matches if m]


def shell_script(block: Block) -> str:
    text = SETUP_PREFIX.sub("", block.text)
    text = re.sub(r"\bRUN_ID\b", '"$(newest_run)"', text)
    return f"set -eo pipefail\n{NEWEST_RUN}\n{text}"


def workspace(tmp_path: Path, *, venv_active: bool) -> tuple[Path, dict[str, str]]:
    ws = tmp_path / "ws"
    shutil.copytree(ROOT / "examples", ws / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    for sample in EXAMPLES.glob("*.py"):
        shutil.copy(sample, ws / sample.name)
    (ws / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REFLOW_", "XDG_", "VIRTUAL_ENV", "NOTIFY_", "LISTEN_", "WATCHDOG_", "JOURNAL_"))}
    venv_bin = str(Path(sys.executable).parent)
    path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p and p != venv_bin]
    env.update(HOME=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(runtime), PYTHONUNBUFFERED="1",
               PATH=os.pathsep.join([venv_bin, *path] if venv_active else path))
    (tmp_path / "home").mkdir()
    return ws, env


def run_python_file(path: Path, ws: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = ("import runpy, sys\nfrom reflow import Workflow\nns = runpy.run_path(sys.argv[1], run_name='docs_sample')\n"
            "for value in list(ns.values()):\n    if isinstance(value, Workflow):\n        value.validate()\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=120)


def check(block: Block, result: subprocess.CompletedProcess[str]) -> None:
    if result.returncode != 0:
        raise AssertionError(f"{block.where}: the {block.lang} sample exited {result.returncode}\n--- sample:\n"
                             f"{block.text}--- stdout:\n{result.stdout[-4000:]}\n--- stderr:\n{result.stderr[-4000:]}")


def stop_daemon(env: dict[str, str], ws: Path) -> None:
    subprocess.run([sys.executable, "-m", "reflow_client.cli", "shutdown"], cwd=ws, env=env, capture_output=True,
                   timeout=60)


def runnable(page: Path) -> list[Block]:
    return [b for b in extract_blocks(page.read_text(), page) if b.lang in SHELL + PYTHON + TOML and not b.skip]


PAGES_WITH_SAMPLES = [p for p in PAGES if runnable(p)]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_SAMPLES, ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_SAMPLES])
def test_page_samples_run(page: Path, tmp_path: Path) -> None:
    # The README starts from a plain shell, so its commands must activate the venv themselves (or name .venv/bin/...);
    # the pages under docs/ say up front that the venv is active.
    ws, env = workspace(tmp_path, venv_active=page.name != "README.md")
    try:
        for block in runnable(page):
            if block.lang in TOML:
                try:
                    parse_config(tomllib.loads(block.text))
                except Exception as exc:
                    raise AssertionError(f"{block.where}: the configuration sample is refused: {exc}") from None
            elif block.lang in PYTHON:
                files = included_files(block)
                if files is None:
                    sample = ws / f"_sample_{block.line}.py"
                    sample.write_text(block.text)
                    files = [sample]
                for file in files:
                    assert file.exists(), f"{block.where}: includes {file}, which does not exist"
                    check(block, run_python_file(file, ws, env))
            else:
                check(block, subprocess.run(["bash", "-c", shell_script(block)], cwd=ws, env=env, capture_output=True,
                                            text=True, timeout=600))
    finally:
        stop_daemon(env, ws)


def test_extraction_convention(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    text = ("intro\n\n```sh\necho one\n```\n\n<!-- docs-test: skip needs a cluster -->\n```sh\nsbatch x\n```\n\n"
            "~~~python\n--8<-- \"wordcount.py:count\"\n~~~\n\n```\nplain\n```\n")
    blocks = extract_blocks(text, page)
    assert [(b.line, b.lang, b.skip) for b in blocks] == [(3, "sh", None), (8, "sh", "needs a cluster"),
                                                          (12, "python", None), (16, "", None)]
    assert included_files(blocks[2]) == [EXAMPLES / "wordcount.py"]
    with pytest.raises(AssertionError, match="needs a reason"):
        extract_blocks("<!-- docs-test: skip -->\n```sh\nx\n```\n", page)
    script = shell_script(Block(page, 1, "sh", "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && "
                                "reflow-client status RUN_ID\n", None))
    assert "pip install" not in script and 'reflow-client status "$(newest_run)"' in script


def test_every_page_is_in_the_site_and_every_skip_has_a_reason() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.glob("*.md"):
        assert f" {page.name}" in nav, f"{page.name} is not in mkdocs.yml's nav"
    for page in PAGES:
        for block in extract_blocks(page.read_text(), page):
            if block.lang in SHELL + PYTHON:
                assert block.skip is None or len(block.skip) > 5, f"{block.where}: say why the sample is skipped"


def test_architecture_names_only_files_in_the_repository() -> None:
    text = (DOCS / "architecture.md").read_text()
    assert "/work/" not in text and "shared/design" not in text, "architecture.md points outside the repository"
    files = set()
    for top, dirs, names in os.walk(ROOT):  # not into the virtual environment or git's objects: 10 s under load
        dirs[:] = [d for d in dirs if d not in (".venv", ".git", "__pycache__")]
        files.update((Path(top) / name).relative_to(ROOT).as_posix() for name in names)
    for ref in set(re.findall(r"`([\w./-]+\.(?:py|md|sh|toml))(?::\w+)?`", text)):
        if "<" in ref:
            continue
        assert any(f == ref or f.endswith("/" + ref) for f in files), f"architecture.md names {ref}, which is not in the repo"
