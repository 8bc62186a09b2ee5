"""The error log (forkproxy/log.py): the lines structlog wrote, without the package."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import pytest

from forkproxy import log as log_mod


@pytest.fixture(autouse=True)
def _restore_settings():
    """The settings are process-global: give the other tests in this process theirs back."""
    st = log_mod._settings
    saved = (st.sink, st.level, st.render)
    yield
    st.sink, st.level, st.render = saved


def _lines(path) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def test_json_lines_keep_structlogs_keys_and_order(tmp_path):
    path = tmp_path / "error.log"
    logger = log_mod.setup(str(path), "info", "json", "master")
    logger.info("master started", workers=2, listeners=["127.0.0.1:1"], raw=b"x",
                odd=object())
    logger.debug("not at level info")
    lines = _lines(path)
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert list(event) == ["process", "pid", "workers", "listeners", "raw", "odd", "event",
                           "level", "timestamp"]
    assert event["process"] == "master" and event["pid"] == os.getpid()
    assert event["raw"] == "b'x'" and event["odd"].startswith("<object object at ")
    assert event["event"] == "master started" and event["level"] == "info"
    assert event["timestamp"].endswith("Z")
    stamp = datetime.datetime.fromisoformat(event["timestamp"])
    assert abs(stamp.timestamp() - datetime.datetime.now(datetime.UTC).timestamp()) < 60


def test_exception_and_exc_info_carry_the_traceback(tmp_path):
    path = tmp_path / "error.log"
    logger = log_mod.setup(str(path), "info", "json", "manager")
    try:
        raise ValueError("bad record")
    except ValueError as e:
        logger.exception("processing failed", error=str(e))
        caught = e
    logger.error("request failed", exc_info=caught)  # an exception passed on, as workers do
    first, second = (json.loads(line) for line in _lines(path))
    assert first["level"] == "error" and first["error"] == "bad record"
    assert list(first)[-1] == "exception"
    assert first["exception"].startswith("Traceback (most recent call last):")
    assert first["exception"].endswith("ValueError: bad record")
    assert "exc_info" not in second and second["exception"].endswith("ValueError: bad record")


def test_console_lines(tmp_path):
    path = tmp_path / "error.log"
    logger = log_mod.setup(str(path), "warning", "console", "worker")
    logger.info("below the level")
    logger.warning("ring full", name="a b", count=3)
    (line,) = _lines(path)
    ts, rest = line.split(" ", 1)
    assert ts.endswith("Z")
    assert rest.startswith("[warning  ] ring full" + " " * 22 + "count=3 name='a b' pid=")
    assert rest.endswith(" process=worker")


def test_loggers_bound_before_a_reconfiguration_follow_it(tmp_path):
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    logger = log_mod.setup(str(first), "error", "json", "master").bind(role="test")
    logger.info("dropped: level error")
    log_mod.setup(str(second), "info", "json", "master")  # HUP: new file, new level
    logger.info("kept")
    assert _lines(first) == []
    (line,) = _lines(second)
    assert json.loads(line)["role"] == "test"


def test_reopen_after_rotation(tmp_path):
    path = tmp_path / "error.log"
    logger = log_mod.setup(str(path), "info", "json", "master")
    logger.info("before")
    os.rename(path, tmp_path / "error.log.1")
    log_mod.reopen()
    logger.info("after")
    assert [json.loads(x)["event"] for x in _lines(tmp_path / "error.log.1")] == ["before"]
    assert [json.loads(x)["event"] for x in _lines(path)] == ["after"]


def test_proxy_processes_do_not_import_structlog_or_asyncio():
    # the master's module imports everything its children run (forked, not exec'd)
    code = ("import sys, forkproxy.master.arbiter; "
            "print(sorted(m for m in ('structlog', 'asyncio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"
