"""The error log: JSON or console lines, to stderr or a file reopened on USR1.

Only the master, the manager and rare worker events log; nothing on a request's path.

A logger is ``log.info("event", key=value, ...)`` on a logger bound to its process
(``bind``). The lines are those structlog wrote here before (same keys in the same order:
the bound keys, the call's, ``event``, ``level``, ``timestamp``, then ``exception`` with
the traceback; the console layout likewise), but the module is written out: structlog's
package imports its stdlib, Twisted and console modules, and through them asyncio, ~3 MiB
of Python objects in every proxy process for five processors (docs/BENCHMARKS.md,
"Memory"). Settings are process-global and read at each call, so loggers bound before a
reconfiguration (HUP) follow it.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class ReopenableFile:
    """A line-buffered append-mode file that can be reopened in place (logrotate)."""

    def __init__(self, path: str):
        self.path = path
        self.file = sys.stderr if path == "-" else self._open()

    def _open(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return os.fdopen(fd, "a", buffering=1)

    def reopen(self) -> None:
        if self.path == "-":
            return
        old = self.file
        self.file = self._open()
        try:
            old.close()
        except OSError:
            pass

    def write(self, text: str) -> int:
        try:
            return self.file.write(text)
        except (OSError, ValueError):
            return 0

    def flush(self) -> None:
        try:
            self.file.flush()
        except (OSError, ValueError):
            pass


def render_json(event: dict) -> str:
    """One JSON object; what JSON cannot hold is written as its repr()."""
    return json.dumps(event, default=repr)


def _console_value(value) -> str:
    if isinstance(value, str) and value and not any(c.isspace() for c in value):
        return value
    return repr(value)


def render_console(event: dict) -> str:
    """``TIMESTAMP [level    ] event   key=value ...`` (keys sorted), the traceback after."""
    event = dict(event)
    ts = event.pop("timestamp", "")
    level = event.pop("level", "")
    text = str(event.pop("event", ""))
    exc = event.pop("exception", None)
    parts = [ts, f"[{level:<9}]", f"{text:<30}"]
    parts += [f"{k}={_console_value(event[k])}" for k in sorted(event)]
    line = " ".join(parts).rstrip(" ")
    return line if exc is None else f"{line}\n{exc}"


class _Settings:
    """What :func:`setup` configured for this process."""

    __slots__ = ("sink", "level", "render")

    def __init__(self):
        self.sink: ReopenableFile | None = None
        self.level = LEVELS["info"]
        self.render = render_json


_settings = _Settings()


class Logger:
    """A logger with bound key-values; every call reads the process's settings."""

    __slots__ = ("context",)

    def __init__(self, context: dict | None = None):
        self.context = context or {}

    def bind(self, **kw) -> Logger:
        return Logger({**self.context, **kw})

    def _log(self, level: str, event: str, kw: dict, exc_info=False) -> None:
        """``exc_info`` (a keyword of every method): an exception, or True for the one
        being handled; its traceback goes into ``exception``."""
        st = _settings
        if LEVELS[level] < st.level:
            return
        exc_info = kw.pop("exc_info", exc_info)
        entry = {**self.context, **kw, "event": event, "level": level,
                 "timestamp": datetime.datetime.now(tz=datetime.UTC).isoformat()
                 .replace("+00:00", "Z")}
        exc = exc_info if isinstance(exc_info, BaseException) else (
            sys.exception() if exc_info else None)
        if exc is not None:
            entry["exception"] = "".join(traceback.format_exception(exc)).rstrip("\n")
        sink = st.sink if st.sink is not None else _stderr_sink()
        sink.write(st.render(entry) + "\n")

    def debug(self, event: str, **kw) -> None:
        self._log("debug", event, kw)

    def info(self, event: str, **kw) -> None:
        self._log("info", event, kw)

    def warning(self, event: str, **kw) -> None:
        self._log("warning", event, kw)

    def error(self, event: str, **kw) -> None:
        self._log("error", event, kw)

    def critical(self, event: str, **kw) -> None:
        self._log("critical", event, kw)

    def exception(self, event: str, **kw) -> None:
        """An error with the exception being handled (its traceback in ``exception``)."""
        self._log("error", event, kw, exc_info=True)


def _stderr_sink() -> ReopenableFile:
    """Before :func:`setup` (tests, tools): stderr, the error log's default destination."""
    _settings.sink = ReopenableFile("-")
    return _settings.sink


def get_logger(**kw) -> Logger:
    """A logger with the given keys bound (none: a bare one)."""
    return Logger(kw)


def setup(path: str = "-", level: str = "info", fmt: str = "json", process: str = "master"):
    """Configure this process's error log; returns a logger bound to it."""
    st = _settings
    if st.sink is None or st.sink.path != path:
        st.sink = ReopenableFile(path)
    st.level = LEVELS.get(level, LEVELS["info"])
    st.render = render_json if fmt == "json" else render_console
    return rebind(process)


def reopen() -> None:
    if _settings.sink is not None:
        _settings.sink.reopen()


def rebind(process: str) -> Logger:
    """A logger for a forked child (new pid, same sink)."""
    return Logger({"process": process, "pid": os.getpid()})
