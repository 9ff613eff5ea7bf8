"""Shared test configuration.

Cluster-backed tests (marked ``slurm``/``ssh``/``sge``) skip where the cluster cannot
be started, but under CI (``CI`` or ``REFLOW_CI`` set) a skipped cluster test
fails the session: the suite must not go green without the real cluster.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

pytest_plugins = [
    "tests.cluster.fixtures_slurm",
    "tests.cluster.fixtures_ssh",
    "tests.cluster.fixtures_sge",
    "tests.cluster.wlm",
]

CLUSTER_MARKS = ("slurm", "slurm_accounting", "ssh", "sge")


def in_ci() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("REFLOW_CI"))


def pytest_configure(config: pytest.Config) -> None:
    """The whole session (each xdist worker) gets a private $XDG_STATE_HOME before any fixture runs:
    session-scoped daemons and clusters must not share the user's result cache either."""
    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="reflow-test-state-")


@pytest.fixture(scope="module", autouse=True)
def _module_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each module its own $XDG_STATE_HOME, for its module-scoped runs (they start before the per-test one)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-module-state")))
        yield


@pytest.fixture(autouse=True)
def _private_state_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own $XDG_STATE_HOME: local runs share the user's result cache there, and a test
    must neither reuse another test's results nor write into the real home directory."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_itemcollected(item: pytest.Item) -> None:
    """Every cluster test in one xdist group: the clusters are machine-wide singletons, so one worker
    runs them all in order while the other workers run the rest of the suite beside them.

    Marked as each item is collected: xdist's worker reads ``xdist_group`` marks in its own
    ``pytest_collection_modifyitems`` (turning them into a ``@cluster`` node-id suffix), which ran before
    a conftest hook of that name (even ``tryfirst``), so the marks came too late and the cluster tests
    were spread over both workers, each switching and reconfiguring the one Slurm under the other."""
    if any(item.get_closest_marker(m) for m in CLUSTER_MARKS):
        item.add_marker(pytest.mark.xdist_group("cluster"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Refuse to run cluster tests on a worker whose xdist did not group them (two workers would drive the
    one cluster at once). pytest 9.2 keeps node ids in ``Node._id``; pytest-xdist 3.8 still writes the
    group suffix to ``_nodeid``, where 9.2 no longer reads it: hence the ``pytest<9.2`` pin."""
    if not (os.environ.get("PYTEST_XDIST_WORKER") and session.config.getvalue("loadgroup")):
        return
    ungrouped = [i.nodeid for i in session.items
                 if any(i.get_closest_marker(m) for m in CLUSTER_MARKS) and not i.nodeid.endswith("@cluster")]
    if ungrouped:
        raise pytest.UsageError(
            f"pytest-xdist did not put {ungrouped[0]} in the 'cluster' group (pytest {pytest.__version__}): "
            "the cluster tests would run on two workers at once; install the pytest the [test] extra pins")


_skipped_cluster_tests: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and any(m in report.keywords for m in CLUSTER_MARKS):
        _skipped_cluster_tests.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if in_ci() and _skipped_cluster_tests:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"CI: {len(_skipped_cluster_tests)} cluster test(s) were skipped; under CI that is a failure:",
                red=True,
            )
            for nodeid in _skipped_cluster_tests[:20]:
                reporter.write_line(f"  {nodeid}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
