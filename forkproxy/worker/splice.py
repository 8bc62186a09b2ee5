"""Zero-copy relay of a Content-Length body: upstream socket -> pipe -> client socket
with os.splice, for plain-text clients when `[server] splice = true`.

docs/ARCHITECTURE.md: measured 1.84 vs 1.27 GiB/s and 30% less CPU when the proxy has a core to
itself (they tie when everything shares 2 cores). Pitfalls handled here: EAGAIN from
splice is ambiguous (empty socket or full pipe) so the bytes in the pipe are tracked;
a pipe left with data after an error is closed, never reused; pipes are pooled per
worker (2 fds each) and enlarged to 1 MiB where the kernel allows.
"""

from __future__ import annotations

import fcntl
import os

from gevent.socket import wait_read, wait_write

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
#: bodies shorter than this are copied (splice set-up costs more than it saves)
SPLICE_MIN = 64 * 1024
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_FLAGS_MORE = _FLAGS | os.SPLICE_F_MORE


class PipePool:
    """Per-worker pool of (read_fd, write_fd, capacity)."""

    def __init__(self, keep: int = 16):
        self.free: list[tuple[int, int, int]] = []
        self.keep = keep

    def get(self) -> tuple[int, int, int]:
        if self.free:
            return self.free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            size = fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            size = 65536  # pipe-max-size / pipe-user-pages-soft: keep the default
        return r, w, size

    def put(self, pipe: tuple[int, int, int], clean: bool) -> None:
        if clean and len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])


class SpliceError(Exception):
    """The upstream failed mid-body (the client sees a truncated response)."""


def splice_body(conn, pool: PipePool, up_fd: int, client_fd: int, remaining: int,
                read_timeout: float, send_timeout: float, now) -> int:
    """Move `remaining` bytes from the upstream to the client; returns bytes sent.

    Blocking waits go through gevent; `conn.deadline` bounds each one (the worker's
    deadline sweeper raises into this greenlet). Raises SpliceError (upstream side) or
    OSError/timeout from the client side."""
    pipe = pool.get()
    r, w, cap = pipe
    in_pipe = 0
    sent = 0
    try:
        while remaining or in_pipe:
            if remaining and in_pipe < cap:
                try:
                    n = os.splice(up_fd, w, min(remaining, cap - in_pipe), flags=_FLAGS)
                except BlockingIOError:
                    n = -1
                except OSError as e:
                    raise SpliceError(f"upstream body: {e.strerror}")
                if n == 0:
                    raise SpliceError("upstream closed mid-body")
                if n > 0:
                    remaining -= n
                    in_pipe += n
                elif not in_pipe:
                    conn.deadline = now() + read_timeout
                    try:
                        wait_read(up_fd)
                    except OSError as e:
                        raise SpliceError(f"upstream body: {e}")
                    continue
            if in_pipe:
                try:
                    n = os.splice(r, client_fd, in_pipe,
                                  flags=_FLAGS_MORE if remaining else _FLAGS)
                except BlockingIOError:
                    conn.deadline = now() + send_timeout
                    wait_write(client_fd)
                    continue
                in_pipe -= n
                sent += n
    finally:
        pool.put(pipe, in_pipe == 0)
    return sent
