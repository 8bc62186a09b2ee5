"""Replacing a worker whose memory grew past ``[server] max_worker_rss`` (uWSGI's
reload-on-rss, gunicorn's max_requests), without losing a request.

The master checks each ready worker's resident set (/proc/PID/statm, one read per worker)
at most once every CHECK_INTERVAL. A worker above the limit gets a replacement in its slot
first (same generation, same listening sockets); once the replacement is ready, the old
worker is retired like after a reload (SIGQUIT: it stops accepting, finishes in-flight
requests, closes idle keep-alive connections, exits). Each replacement is counted in the
master's shared counters, shown as ``forkproxy_worker_recycles_total{reason="rss"}``.

Nothing here runs during a reload or a stop: the generation change retires workers anyway.
"""

from __future__ import annotations

import time

from forkproxy.manager.metrics import rss_bytes
from forkproxy.shm.table import M_RECYCLES_RSS

#: seconds between two looks at the workers' memory
CHECK_INTERVAL = 1.0


class Recycler:
    """State of the replacements in progress: old worker pid -> its replacement's pid."""

    def __init__(self) -> None:
        self.pending: dict[int, int] = {}
        self.next_check = 0.0

    def check(self, arbiter, now: float | None = None) -> None:
        """One turn of the master's loop: finish ready replacements, start new ones."""
        now = time.monotonic() if now is None else now
        if now < self.next_check:
            return
        self.next_check = now + CHECK_INTERVAL
        limit = arbiter.cfg.server.max_worker_rss
        if arbiter.stopping or arbiter.winched or arbiter.pending_generation is not None:
            self.pending.clear()
            return
        self._finish(arbiter)
        if not limit:
            return
        replacing = set(self.pending.values())
        for w in list(arbiter.workers.values()):
            if (w.kind != "worker" or not w.ready or w.retiring or w.pid in self.pending
                    or w.pid in replacing or w.generation != arbiter.generation):
                continue
            rss = rss_bytes(w.pid)
            if rss is None or rss <= limit:
                continue
            if arbiter.slot_next_spawn.get(w.slot, 0.0) > now:
                continue  # its slot's replacements keep failing: back-off first
            before = set(arbiter.workers)
            arbiter.spawn_worker(w.slot, w.generation)
            new = set(arbiter.workers) - before
            if new:
                self.pending[w.pid] = new.pop()
                arbiter.log.warning("worker above max_worker_rss, replacing it", pid=w.pid,
                                    slot=w.slot, rss=rss, max_worker_rss=limit)

    def _finish(self, arbiter) -> None:
        for old_pid, new_pid in list(self.pending.items()):
            old = arbiter.workers.get(old_pid)
            new = arbiter.workers.get(new_pid)
            if old is None or new is None or old.retiring:
                del self.pending[old_pid]  # gone, or the replacement died: look again
            elif new.ready:
                del self.pending[old_pid]
                arbiter._retire(old)
                arbiter.table.count_master(M_RECYCLES_RSS)
                arbiter.log.info("worker replaced for its memory, old one draining",
                                 pid=old_pid, replacement=new_pid, slot=old.slot)
