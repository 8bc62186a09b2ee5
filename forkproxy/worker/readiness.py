"""A read watcher that stays armed between waits, for the two waits of every request.

gevent's socket wait (``sock._wait(sock._read_event)``) starts the socket's libev watcher,
switches to the hub, and stops the watcher again. Stopping takes the fd's interest out of
libev, so the next start costs an ``epoll_ctl`` (1.9 per tiny request, measured with
perf) plus a Waiter and a callback tuple per wait. A keep-alive client connection and a
pooled upstream connection wait for "readable" once per request for their whole life:
this watcher is started once and left armed. Level-triggered: if the socket becomes
readable while nobody waits (pipelined bytes, an EOF while the response is relayed, an
idle pooled connection the upstream closes), the callback disarms it until the next wait,
so it never spins. ``close()`` before the socket is closed.
"""

from __future__ import annotations

from gevent import getcurrent


def wait_writable(sock, timeout: float) -> bool:
    """Block the calling greenlet until the gevent socket ``sock`` is writable (a
    non-blocking connect finished, either way): True, or False after ``timeout``
    seconds. The socket's own write watcher and one timer, both switching straight back
    to the greenlet; stopped on the way out whatever ends the wait."""
    hub = sock.hub
    io = sock._write_event
    timer = hub.loop.timer(timeout)
    switch = getcurrent().switch
    io.start(switch, True)
    timer.start(switch, False)
    try:
        return hub.switch()
    finally:
        io.stop()
        timer.close()


class ReadWatch:
    __slots__ = ("_io", "_hub", "_waiter")

    def __init__(self, hub, fd: int):
        self._hub = hub
        self._io = hub.loop.io(fd, 1)
        self._waiter = None

    def wait(self) -> None:
        """Block the calling greenlet until the socket is readable (or something is
        thrown into it: the worker's deadline sweeper raises Deadline this way)."""
        io = self._io
        if not io.active:
            io.start(self._ready)
        self._waiter = getcurrent()
        try:
            self._hub.switch()
        finally:
            self._waiter = None

    def _ready(self) -> None:
        """libev callback, in the hub."""
        g = self._waiter
        if g is None:
            self._io.stop()  # readable with nobody waiting: disarmed until the next wait
        else:
            self._waiter = None
            g.switch()

    def close(self) -> None:
        io = self._io
        io.stop()
        io.close()
