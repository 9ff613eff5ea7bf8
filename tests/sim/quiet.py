"""Silence the daemon's logs while simulating (thousands of scenarios), and restore them after."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import structlog


def _drop(*args: object) -> None:
    raise structlog.DropEvent


@contextlib.contextmanager
def quiet_logs(verbose: bool = False) -> Iterator[None]:
    if verbose:
        yield
        return
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
                        processors=[_drop], cache_logger_on_first_use=False)
    try:
        yield
    finally:
        structlog.configure(**old)
