"""Servers found through DNS: resolved by the manager, once per host, for all workers.

Every server entry with ``resolve`` (``{ address = "NAME:PORT", resolve = "30s" }``: A and
AAAA records, or ``{ srv = "_http._tcp.NAME", resolve = "30s" }``: SRV records, then the
A and AAAA records of their targets) gets one greenlet here that resolves it every
``resolve`` interval and publishes the servers in the shared resolved-servers table
(forkproxy/shm/resolved.py); the workers follow the table in their periodic refresh.

The resolver is dnspython's synchronous one, run in the hub's thread pool: the greenlet
waits, the hub does not (a resolution against a nameserver that never answers stalls
the hub by a few milliseconds at most, tests/test_discovery.py measures it). There is no
cache: every interval asks the nameservers again, whatever the records' TTL.

A failed resolution (timeout, SERVFAIL/REFUSED, NXDOMAIN, no records, a malformed SRV
answer) keeps the last good set: a DNS mistake does not take an upstream's servers
away. Each failure is counted by result; a change of result, and every change of the
set, is logged once.

SRV: only the records of the lowest priority value are used (RFC 2782: the others are
for when those are unreachable); a record's weight is the server's weight (0 counts as
1); a target that does not resolve is skipped (logged) while others do.
"""

from __future__ import annotations

import threading
import time

import gevent

from forkproxy.config import parse_hostport, resolved_spec
from forkproxy.shm.resolved import MAX_RECORDS, format_address, slot_key

#: every result a resolution can have (the metric's label values)
RESULTS = ("ok", "nxdomain", "no_records", "malformed", "timeout", "nameservers_failed", "error")


class Answer:
    """One resolution: a result from RESULTS, the servers (when ok) and why (when not)."""

    __slots__ = ("result", "servers", "detail")

    def __init__(self, result: str, servers=None, detail: str = ""):
        self.result = result
        self.servers = sorted(set(servers or ()))
        self.detail = detail


def prime(cfg, table, logger=None) -> int:
    """Resolve at once the entries whose slot has no servers yet (a start, a reload that
    adds entries), so that the workers about to be forked start with servers instead of
    answering 503 until the manager's first resolution. Run by the master before it
    forks them; the entries are resolved in parallel threads, all joined before it goes
    on (dnspython's lifetime, [resolver] timeout, bounds each query). Returns how many
    entries got servers."""
    disc = Discovery(cfg, table, logger, run_blocking=lambda fn, args: fn(*args))
    empty = [src for src in disc.sources if not src.servers]
    threads = [threading.Thread(target=disc.resolve_once, args=(src,), daemon=True)
               for src in empty]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(1 for src in empty if src.servers)


class Source:
    """One ``resolve`` entry: what to ask, where to publish, what happened so far."""

    def __init__(self, upstream: str, entry, slot: int):
        self.upstream = upstream
        self.spec = resolved_spec(entry)
        self.srv = entry.srv
        self.host, self.port = ("", 0) if entry.srv else parse_hostport(entry.address)
        self.weight = entry.weight
        self.interval = entry.resolve
        self.slot = slot
        self.servers: list[tuple[str, int, int]] = []  # (ip, port, weight)
        self.results = dict.fromkeys(RESULTS, 0)
        self.last_result = ""
        self.last_detail = ""
        self.last_change = 0.0  # wall time the set last changed
        self.last_ok = 0.0  # wall time of the last good resolution

    def lookup(self, lookups, res) -> Answer:
        """One resolution (in a pool thread): ``lookups`` is forkproxy.manager.dnslookup."""
        if self.srv:
            return Answer(*lookups.lookup_srv(res, self.srv))
        return Answer(*lookups.lookup_address(res, self.host, self.port, self.weight))

    def status(self) -> dict:
        return {
            "name": self.spec,
            "type": "SRV" if self.srv else "A/AAAA",
            "resolve": self.interval,
            "servers": [{"address": format_address(h, p), "weight": w}
                        for h, p, w in self.servers],
            "last_result": self.last_result or None,
            "last_detail": self.last_detail or None,
            "last_ok": self.last_ok or None,
            "last_change": self.last_change or None,
            "resolutions": dict(self.results),
        }


def in_thread_pool(fn, args):
    """fn(*args) in the hub's thread pool, which gevent creates (importing
    gevent.threadpool) on first use: a config without DNS servers never loads it."""
    return gevent.get_hub().threadpool.apply(fn, args)


class Discovery:
    """The resolving greenlets of one config; stop() before starting the next config's."""

    def __init__(self, cfg, table, logger=None, run_blocking=None):
        self.table = table
        self.log = logger
        #: runs a blocking call off the hub (the hub's thread pool by default)
        self.run_blocking = run_blocking or in_thread_pool
        self.lookups = None
        self.resolver = None
        self.resolver_error = ""
        self.sources: list[Source] = []
        index = table.index() if table is not None else {}
        for name, up in cfg.upstream.items():
            for entry in up.servers:
                if not entry.resolve:
                    continue
                slot = index.get(slot_key(name, resolved_spec(entry)), -1)
                if slot < 0:
                    self._log("error", "no resolved-servers slot for a DNS entry: not resolved",
                              upstream=name, name=resolved_spec(entry))
                    continue
                src = Source(name, entry, slot)
                got = table.read(slot)  # the last good set (a restarted manager, a reload)
                if got is not None:
                    src.servers = sorted(got[1])
                self.sources.append(src)
        self.greenlets: list[gevent.Greenlet] = []
        if self.sources:
            self._make_resolver(cfg.resolver)

    def _make_resolver(self, rcfg) -> None:
        # imported here, not at the top: dnspython is ~13 MiB resident, only for configs
        # that resolve (the master preloads it before fork for them)
        from forkproxy.manager import dnslookup

        self.lookups = dnslookup
        try:
            self.resolver = dnslookup.make_resolver(rcfg)
        except dnslookup.DNSException as e:
            self.resolver_error = f"no nameservers: {e}"

    def carry_over(self, previous: Discovery) -> None:
        """Keep the counters and history of the entries a reload kept (the metric is a
        counter: it should not restart on every HUP)."""
        old = {(src.upstream, src.spec): src for src in previous.sources}
        for src in self.sources:
            before = old.get((src.upstream, src.spec))
            if before is not None:
                src.results = dict(before.results)
                src.last_result, src.last_detail = before.last_result, before.last_detail
                src.last_ok, src.last_change = before.last_ok, before.last_change

    def _log(self, level: str, event: str, **kw) -> None:
        if self.log is not None:
            getattr(self.log, level)(event, **kw)

    def start(self) -> int:
        if self.sources and self.resolver is None:
            self._log("error", "DNS servers not resolved: " + self.resolver_error,
                      entries=len(self.sources))
        for src in self.sources:
            self.greenlets.append(gevent.spawn(self._loop, src))
        return len(self.greenlets)

    def stop(self) -> None:
        gevent.killall(self.greenlets, block=False)
        self.greenlets = []

    def _loop(self, src: Source) -> None:
        while True:
            t0 = time.monotonic()
            self.resolve_once(src)
            gevent.sleep(max(0.0, src.interval - (time.monotonic() - t0)))

    def resolve_once(self, src: Source) -> Answer:
        """Resolve one entry, publish a changed set, count and log the result."""
        if self.resolver is None:
            answer = Answer("error", detail=self.resolver_error)
        else:
            try:
                answer = self.run_blocking(src.lookup, (self.lookups, self.resolver))
            except Exception as e:  # never let a resolver bug end the loop
                answer = Answer("error", detail=f"{type(e).__name__}: {e}")
        src.results[answer.result] += 1
        if answer.result == "ok":
            self._accept(src, answer)
        elif answer.result != src.last_result or answer.detail != src.last_detail:
            self._log("warning", "DNS resolution failed: keeping the last servers",
                      upstream=src.upstream, name=src.spec, result=answer.result,
                      detail=answer.detail, servers=len(src.servers))
        src.last_result, src.last_detail = answer.result, answer.detail
        return answer

    def _accept(self, src: Source, answer: Answer) -> None:
        now = time.time()
        src.last_ok = now
        if src.last_result and src.last_result != "ok":
            self._log("info", "DNS resolution recovered", upstream=src.upstream,
                      name=src.spec, servers=len(answer.servers))
        if answer.detail and answer.detail != src.last_detail:
            self._log("warning", "DNS answer partly unusable", upstream=src.upstream,
                      name=src.spec, detail=answer.detail)
        servers = answer.servers[:MAX_RECORDS]
        if servers == src.servers:
            return
        if len(answer.servers) > MAX_RECORDS:
            self._log("warning", f"DNS gave more servers than a slot holds: the first "
                      f"{MAX_RECORDS} are used", upstream=src.upstream, name=src.spec,
                      servers=len(answer.servers))
        old, new = set(src.servers), set(servers)
        self.table.publish(src.slot, servers)
        self._log("info", "DNS servers changed", upstream=src.upstream, name=src.spec,
                  added=[format_address(h, p) for h, p, _ in sorted(new - old)],
                  removed=[format_address(h, p) for h, p, _ in sorted(old - new)],
                  servers=len(servers))
        src.servers = servers
        src.last_change = now

    # -- what /status and /metrics show -------------------------------------------------

    def status(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for src in self.sources:
            out.setdefault(src.upstream, []).append(src.status())
        return out

    def servers(self) -> dict[str, list[tuple[str, int]]]:
        """{upstream: [(address, weight)]} of the servers DNS lists now."""
        out: dict[str, list[tuple[str, int]]] = {}
        for src in self.sources:
            out.setdefault(src.upstream, []).extend(
                (format_address(h, p), w) for h, p, w in src.servers)
        return out
