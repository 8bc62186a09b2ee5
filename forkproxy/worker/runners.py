"""Greenlets that serve one client connection after another.

Spawning a greenlet per connection costs ~11 µs on this machine: the greenlet, its first
switch, and the 16 KiB block of Python frames CPython maps for a new greenlet's first
frame and unmaps when it ends (an mmap and a munmap per connection under `Connection:
close`, docs/BENCHMARKS.md). Waking a parked one is one loop callback (~0.8 µs). So a
greenlet whose connection closed or parked waits in the hub (no timer, no watcher) for
the next connection, up to IDLE_KEPT of them; beyond that it ends.

A runner is a plain greenlet whose parent is the hub, as ``gevent.spawn_raw`` makes.
What it runs must not leave anything that could switch into it later: a connection's
``greenlet`` is cleared before the runner waits (the sweeper throws Deadline into it).
"""

from __future__ import annotations

from gevent import getcurrent
from greenlet import greenlet

#: runners kept waiting for a connection (~7 KiB each: the frames' block and the saved
#: stack). With 32, wrk -c64's bursts of closes and connects still spawned for 36% of
#: the connections; the heap trim ends them after the load fell.
IDLE_KEPT = 128


class Runners:
    """Run ``fn(conn)`` in a waiting runner, or in a new one when none waits."""

    __slots__ = ("hub", "idle", "kept")

    def __init__(self, hub, kept: int = IDLE_KEPT):
        self.hub = hub
        self.idle: list = []
        self.kept = kept

    def run(self, fn, conn) -> None:
        """Start serving ``conn`` from the hub's next callbacks (like spawn: the caller
        goes on first)."""
        idle = self.idle
        g = idle.pop() if idle else greenlet(self._serve, self.hub)
        self.hub.loop.run_callback(g.switch, fn, conn)

    def _serve(self, fn, conn) -> None:
        idle = self.idle
        switch = self.hub.switch
        while True:
            fn(conn)
            if len(idle) >= self.kept:
                return
            idle.append(getcurrent())
            try:
                fn, conn = switch()
            except BaseException:  # thrown into a waiting runner (GreenletExit, a bug)
                if getcurrent() in idle:
                    idle.remove(getcurrent())
                return

    def clear(self) -> None:
        """End the waiting runners (each gets GreenletExit), e.g. when the worker's
        memory is trimmed after the load fell."""
        idle, self.idle = self.idle, []
        run_callback = self.hub.loop.run_callback
        for g in idle:
            run_callback(g.throw)  # from the hub: the runner's end returns there
