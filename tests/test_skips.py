"""Issue 17: nothing is skipped silently. A test skipped for a missing tool says which one
and how to get it, and fails instead under FORKPROXY_REQUIRE_TOOLS=1 (which .ci/run sets).
Run for real: pytest in a subprocess with a PATH that has no logrotate on it."""

from __future__ import annotations

import os
import subprocess
import sys

from fp import ROOT

TARGET = "tests/test_deploy.py::test_logrotate_snippet_parses"


def _pytest(require: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))  # no logrotate here
    env.pop("FORKPROXY_REQUIRE_TOOLS", None)
    if require is not None:
        env["FORKPROXY_REQUIRE_TOOLS"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           TARGET], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_missing_tool_skip_says_why():
    r = _pytest(None)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 skipped" in r.stdout, r.stdout
    assert "SKIPPED" in r.stdout and "tool missing: logrotate (scripts/setup installs it)" \
        in r.stdout, r.stdout


def test_missing_tool_fails_when_tools_are_required():
    r = _pytest("1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 error" in r.stdout, r.stdout  # failed in set-up, where skipif markers act
    assert "FORKPROXY_REQUIRE_TOOLS=1" in r.stdout and "tool missing: logrotate" in r.stdout


def test_ci_requires_every_tool():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        text = f.read()
    assert "export FORKPROXY_REQUIRE_TOOLS=1" in text and "exec scripts/test" in text
