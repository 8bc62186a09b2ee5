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
    """While a greenlet waits, the watcher's callback is that greenlet's own ``switch``
    (libev calls it straight from C: no Python frame per wake-up, and a shallower hub
    stack to copy at the switch); between waits it is the watcher's own ``stop``: readable
    with nobody waiting (pipelined bytes, an EOF while the response is relayed) disarms
    it until the next wait, so it never spins (stopping clears the callback: no cycle
    is left)."""

    __slots__ = ("_io", "_hub", "_owner", "_switch", "_idle")

    def __init__(self, hub, fd: int):
        self._hub = hub
        self._io = hub.loop.io(fd, 1)
        self._owner = None  # the greenlet whose bound switch is kept in _switch
        self._switch = None
        self._idle = self._io.stop

    def wait(self) -> None:
        """Block the calling greenlet until the socket is readable (or something is
        thrown into it: the worker's deadline sweeper raises Deadline this way)."""
        io = self._io
        g = getcurrent()
        if g is not self._owner:  # another greenlet than last time (a pooled upstream)
            self._owner = g
            self._switch = g.switch
        if io.active:
            io.callback = self._switch
        else:
            io.start(self._switch)
        try:
            self._hub.switch()
        finally:
            io.callback = self._idle

    def waiter(self):
        """The greenlet waiting now, or None (a wake-up from elsewhere: worker/client.py
        finishing a held response)."""
        return self._owner if self._io.callback is self._switch else None

    def close(self) -> None:
        io = self._io
        io.stop()
        io.close()
        self._owner = self._switch = None
