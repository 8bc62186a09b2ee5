"""Shared fixtures: a built-in origin and a factory of real forkproxy masters, each
stopped (and checked for leftovers) at the end of the test.

Also the one policy for skips. A test that needs an external tool (nginx, openssl, atheris,
...) calls :func:`skip_missing_tool` or is marked with :func:`needs_tools` instead of
calling pytest.skip itself: every such skip says which tool and how to get it, and with
FORKPROXY_REQUIRE_TOOLS=1 (set by .ci/run) it is a failure instead, so CI proves it ran
everything. Skips for running as non-root (:func:`needs_root`) stay skips; pytest's -ra
prints every skip's reason in the summary."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest
from fp import Origin, Proxy

REQUIRE_TOOLS_ENV = "FORKPROXY_REQUIRE_TOOLS"
TOOL_MISSING = "tool missing: "
SETUP_HINT = "scripts/setup installs it"


def require_tools() -> bool:
    return os.environ.get(REQUIRE_TOOLS_ENV, "") not in ("", "0")


def missing_tools(*names: str) -> list[str]:
    return [n for n in names if shutil.which(n) is None]


def skip_missing_tool(what: str, how: str = SETUP_HINT) -> NoReturn:
    """Skip (or, with FORKPROXY_REQUIRE_TOOLS=1, fail) because `what` is not installed."""
    pytest.skip(f"{TOOL_MISSING}{what} ({how})")


def needs_tools(*names: str, how: str = SETUP_HINT) -> pytest.MarkDecorator:
    """A skipif marker for commands on PATH, with the tool-missing reason."""
    missing = missing_tools(*names)
    return pytest.mark.skipif(bool(missing), reason=f"{TOOL_MISSING}{', '.join(missing)} ({how})")


def needs_root(why: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(os.geteuid() != 0, reason=f"needs root: {why}")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With FORKPROXY_REQUIRE_TOOLS=1 a "tool missing" skip is reported as a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and require_tools() and TOOL_MISSING in _skip_reason(report):
        report.outcome = "failed"
        report.longrepr = (f"{REQUIRE_TOOLS_ENV}=1 and this test would be skipped: "
                           f"{_skip_reason(report)}")


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} skipped: the reasons are listed above (SKIPPED lines). "
            f"{REQUIRE_TOOLS_ENV}=1 turns a missing tool into a failure.", yellow=True)


@pytest.fixture
def origin():
    o = Origin()
    yield o
    o.stop()


@pytest.fixture
def proxies():
    """Call proxies(tmp_path, upstreams, ...) -> Proxy; all are cleaned up."""
    started: list[Proxy] = []

    def make(*args, start: bool = True, **kwargs) -> Proxy:
        p = Proxy(*args, start=False, **kwargs)
        started.append(p)  # registered before start: a failed start is cleaned up too
        if start:
            p.start()
        return p

    yield make
    for p in started:
        p.kill_all()
