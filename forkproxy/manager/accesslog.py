"""The access log, written by the manager from request contexts.

Formats:

* ``json`` (docs/OPERATIONS.md, "Access log fields"): one object per line with at least ``ts``, ``request_id``,
  ``remote``, ``method``, ``path``, ``status``, ``bytes_out``, ``upstream``,
  ``upstream_addr``, ``duration_ms``, ``phases`` (phase name -> milliseconds, only the
  phases that happened), ``tls_resumed`` (null on plain-text listeners) and ``worker``
  (pid); also ``listener``, ``bytes_in``, ``upstream_reused``, ``tls_version``,
  ``error`` (empty unless the proxy answered an upstream failure itself), ``protocol``
  (``HTTP/1.1``, ``HTTP/2``) and, for HTTP/2 requests, ``stream`` (the stream id); for
  gRPC requests ``grpc_method`` (the path) and ``grpc_status``.
* ``console``: one human-readable line, nginx-like::

    2025-01-02T03:04:05.678Z 127.0.0.1 "GET /x" 200 1234B 12.3ms app=127.0.0.1:9000 \
rid=6f1c...01 w=4242 connect=0.2 first_byte=11.8 body=0.1

``ts`` is the end of the response, UTC, ISO 8601 with milliseconds. ``duration_ms``
runs from the complete request head to the end of the response (nginx's
``$request_time`` starts at the first byte read; a keep-alive connection's idle time is
not part of a request).

Lines are buffered in memory (a list of chunks, one per batch) and written with one
``writev(2)`` when the buffer passes ``BUFFER_BYTES`` or when :meth:`AccessLog.flush` is
called (the manager does so at least
twice a second and on exit). ``off`` keeps nothing. :meth:`AccessLog.reopen` (USR1)
writes what is buffered to the old file, then opens the path again (logrotate renamed
it). A regular file keeps at most a few ``write_behind`` windows in the page cache
(manager/writebehind.py; 0 = the kernel's usual caching). Writes to a regular file never
wait on a reader; ``-`` (stdout) may block the manager if whatever reads stdout stops
reading: point ``access_log`` at a file under load.
"""

from __future__ import annotations

import errno
import os
import time

from forkproxy.context import RequestContext
from forkproxy.manager.jsonline import (  # noqa: F401 (JsonLine, json_line: re-exported)
    JsonLine,
    _Clock,
    _clock,
    json_batch,
    json_line,
    json_lines,
    phases_ms,
)
from forkproxy.manager.metrics import request_duration
from forkproxy.manager.writebehind import WriteBehind

BUFFER_BYTES = 64 * 1024
#: the [log] access_log_write_behind default (config.py), for callers without a config
WRITE_BEHIND = 16 * 1024 * 1024
#: more buffered chunks than this are joined and written with write(2) (IOV_MAX is 1024)
WRITEV_MAX = 512

#: short phase names for the console format
_SHORT = {
    "accept_to_headers": "headers",
    "tls_handshake": "tls",
    "upstream_connect": "connect",
    "request_send": "send",
    "upstream_first_byte": "first_byte",
    "response_body": "body",
}
_CONSOLE_ESCAPES = {c: f"\\x{c:02x}" for c in range(32)}
_CONSOLE_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", 127: "\\x7f"})


def console_line(ctx: RequestContext, ms: dict[str, float]) -> bytes:
    """One human-readable access log line (with the trailing newline); ``ms``: phases."""
    path = ctx.path.translate(_CONSOLE_ESCAPES)
    method = ctx.method.translate(_CONSOLE_ESCAPES)
    parts = [
        _clock.iso(ctx.ts), ctx.remote or "-", f'"{method} {path}"', str(ctx.status),
        f"{ctx.bytes_out}B", f"{request_duration(ctx) * 1000.0:.1f}ms",
        f"{ctx.upstream or '-'}={ctx.upstream_addr or '-'}" + ("+" if ctx.reused else ""),
        f"rid={ctx.request_id}", f"w={ctx.worker}",
    ]
    if ctx.tls_resumed is not None:
        parts.append(f"tls={ctx.tls_version or '?'}{'/resumed' if ctx.tls_resumed else ''}")
    if ctx.stream:
        parts.append(f"h2_stream={ctx.stream}")
    for name, v in ms.items():
        parts.append(f"{_SHORT.get(name, name)}={v:.1f}")
    if ctx.error:
        parts.append(f'error="{ctx.error.translate(_CONSOLE_ESCAPES)}"')
    if ctx.trace_id:
        parts.append(f"trace={ctx.trace_id.hex()}")
    if ctx.grpc_status is not None:
        parts.append(f"grpc_status={ctx.grpc_status}")
    return (" ".join(parts) + "\n").encode("utf-8", "backslashreplace")


def console_lines(entries: list[tuple[RequestContext, dict[str, float]]]) -> bytes:
    return b"".join([console_line(c, ms) for c, ms in entries])


def console_batch(items: list) -> tuple[bytes, int]:
    """The console lines of the request contexts in a batch of ring records, and their number."""
    entries = [(c, phases_ms(c)) for c in items if type(c) is RequestContext]
    return console_lines(entries), len(entries)


#: format -> (lines of [(context, phases in ms)], lines of a batch of ring records)
FORMATTERS = {"json": (json_lines, json_batch), "console": (console_lines, console_batch)}


class AccessLog:
    """Buffered access log file; all methods run in the manager's one thread."""

    def __init__(self, path: str, fmt: str = "json", logger=None,
                 write_behind: int = WRITE_BEHIND):
        self.logger = logger
        self.write_behind = write_behind  # bytes per window; 0 = off
        self.path = path
        self.fmt = fmt
        self.format, self.format_batch = FORMATTERS[fmt]
        self.fd = -1
        self.own_fd = False
        self.behind = WriteBehind(-1, 0)
        self.buf: list[bytes] = []
        self.pending = 0  # lines in buf
        self.size = 0
        self.lines = 0  # written (or handed to write(2)) since start
        self.errors = 0  # lines lost to failed writes
        self.writes = 0  # write(2) calls
        self.write_seconds = 0.0  # wall time inside them (page cache, dirty throttling)
        self._last_error = 0.0
        self._open()

    @property
    def enabled(self) -> bool:
        return self.fd >= 0

    def _open(self) -> None:
        if self.path in ("off", ""):
            self.fd, self.own_fd = -1, False
        elif self.path == "-":
            self.fd, self.own_fd = 1, False
        else:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                              0o640)
            self.own_fd = True
        self.behind = WriteBehind(self.fd, self.write_behind if self.own_fd else 0)

    def write(self, ctx: RequestContext, ms: dict[str, float]) -> None:
        self.write_many([(ctx, ms)])

    def write_batch(self, items: list) -> None:
        """Format the request contexts of a batch of ring records into the buffer."""
        if self.fd >= 0:
            data, n = self.format_batch(items)
            if n:
                self._buffer(data, n)

    def write_lines(self, data: bytes, n_lines: int) -> None:
        """Lines already formatted (manager/rawbatch.py's JSON lines) into the buffer."""
        if self.fd >= 0 and n_lines:
            self._buffer(data, n_lines)

    def write_many(self, entries: list[tuple[RequestContext, dict[str, float]]]) -> None:
        """Format a batch of (request context, phases in ms) into the buffer."""
        if self.fd < 0 or not entries:
            return
        self._buffer(self.format(entries), len(entries))

    def _buffer(self, data: bytes, n_lines: int) -> None:
        self.buf.append(data)
        self.pending += n_lines
        self.size += len(data)
        if self.size >= BUFFER_BYTES:
            self.flush()

    def write_view(self, view: memoryview, n_lines: int) -> None:
        """Whole lines in a buffer the caller reuses after this call (RawBatch's output,
        no copy): written at once, after what is buffered."""
        if self.fd < 0 or not n_lines:
            return
        chunks, size, pending = self.buf, self.size, self.pending
        chunks.append(view)  # the buffered lines first, in the same writev
        self.buf = []
        self.pending = 0
        self.size = 0
        self._write(chunks, size + len(view), pending + n_lines)

    def flush(self) -> None:
        if not self.buf:
            return
        chunks, size, n_lines = self.buf, self.size, self.pending
        self.buf = []
        self.pending = 0
        self.size = 0
        if self.fd >= 0:
            self._write(chunks, size, n_lines)

    def _write(self, chunks: list, size: int, n_lines: int) -> None:
        t0 = time.monotonic()
        rest = None
        try:
            # one writev(2) of the buffered chunks (no copy to join them; O_APPEND makes it
            # one append of whole lines, as one write(2) is); what a short write leaves is
            # joined and written on
            if len(chunks) == 1 or len(chunks) > WRITEV_MAX:
                rest = memoryview(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            else:
                self.writes += 1
                n = os.writev(self.fd, chunks)
                if n < size:
                    rest = memoryview(b"".join(chunks))[n:]
            while rest:
                self.writes += 1
                n = os.write(self.fd, rest)
                rest = rest[n:]
            self.lines += n_lines
            self.behind.wrote(size)
        except OSError as e:
            if e.errno == errno.EINTR:  # pragma: no cover - PEP 475 retries
                return
            if rest is None:  # the writev itself failed: nothing was written
                rest = memoryview(b"".join(chunks))
            lost = bytes(rest).count(b"\n")  # lines not (completely) written
            self.errors += lost
            self.lines += n_lines - lost
            now = time.monotonic()
            if self.logger is not None and now - self._last_error > 10.0:
                self._last_error = now
                self.logger.error("access log write failed, lines lost", path=self.path,
                                  error=e.strerror, lost_so_far=self.errors)
        finally:
            self.write_seconds += time.monotonic() - t0

    def reopen(self) -> None:
        """USR1: flush to the old file, then open the path again (logrotate renamed it)."""
        self.flush()
        if not self.own_fd:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:
            if self.logger is not None:
                self.logger.error("cannot reopen the access log, still writing to the old file",
                                  path=self.path, error=e.strerror)
            return
        self.behind.finish()
        old, self.fd = self.fd, fd
        self.behind = WriteBehind(fd, self.write_behind)
        os.close(old)

    def reconfigure(self, path: str, fmt: str, write_behind: int = WRITE_BEHIND) -> None:
        """HUP: switch file, format and/or write-behind window (flushes to the old
        destination first)."""
        self.fmt = fmt
        self.format, self.format_batch = FORMATTERS[fmt]
        old_window, self.write_behind = self.write_behind, write_behind
        if path == self.path:
            if write_behind != old_window:  # the same file: windows restart from its end
                self.flush()
                self.behind.finish()
                self.behind = WriteBehind(self.fd, write_behind if self.own_fd else 0)
            return
        self.flush()
        old_fd, old_own, old_path, old_behind = self.fd, self.own_fd, self.path, self.behind
        self.path = path
        try:
            self._open()
        except OSError as e:
            if self.logger is not None:
                self.logger.error("cannot open the new access log, keeping the old one",
                                  path=path, error=e.strerror)
            self.fd, self.own_fd, self.path, self.behind = old_fd, old_own, old_path, old_behind
            return
        old_behind.finish()
        if old_own:
            os.close(old_fd)

    def close(self) -> None:
        self.flush()
        self.behind.finish()
        self.behind = WriteBehind(-1, 0)
        if self.own_fd:
            os.close(self.fd)
        self.fd, self.own_fd = -1, False
