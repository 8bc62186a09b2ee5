"""The error log: structlog, JSON or console lines, to stderr or a file reopened on USR1.

Only the master, the manager and rare worker events log; nothing on a request's path.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import types


class AsyncioOnFirstUse(types.ModuleType):
    """What structlog's modules hold as ``asyncio`` until they use it.

    structlog's package imports asyncio (~1.8 MiB of the master's heap, which every forked
    child maps and partly copies) only for its async methods (``ainfo``,
    ``AsyncBoundLogger``), which look the module up when called:
    ``asyncio.get_running_loop()``. forkproxy runs on gevent and never calls them; if
    anything does, this stand-in imports the real asyncio then and answers from it.
    """

    def __getattr__(self, name: str):
        if sys.modules.get("asyncio") is self:
            del sys.modules["asyncio"]
        return getattr(importlib.import_module("asyncio"), name)


def import_structlog():
    """structlog, with asyncio left to the first call of an async logging method."""
    if "asyncio" in sys.modules or "structlog" in sys.modules:
        return importlib.import_module("structlog")
    stand_in = sys.modules["asyncio"] = AsyncioOnFirstUse("asyncio")
    try:
        return importlib.import_module("structlog")
    finally:
        if sys.modules.get("asyncio") is stand_in:
            del sys.modules["asyncio"]


structlog = import_structlog()

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


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


_sink: ReopenableFile | None = None


def setup(path: str = "-", level: str = "info", fmt: str = "json", process: str = "master"):
    """Configure structlog for this process; returns a bound logger."""
    global _sink
    if _sink is None or _sink.path != path:
        _sink = ReopenableFile(path)
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=_sink),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger().bind(process=process, pid=os.getpid())


def reopen() -> None:
    if _sink is not None:
        _sink.reopen()


def rebind(process: str):
    """A logger for a forked child (new pid, same sink)."""
    return structlog.get_logger().bind(process=process, pid=os.getpid())
