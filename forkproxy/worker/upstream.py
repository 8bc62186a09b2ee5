"""Upstream servers, balancing, health and per-worker connection pools.

Everything here is per worker process (no sharing, no locks), except the active health
verdicts, which the helper process publishes in the shared health table
(forkproxy/shm/health.py) and each worker reads in :meth:`Upstream.refresh`.

Pool tiers, per worker and server (nginx's ``keepalive*`` plus HAProxy's ``maxconn``):

* ``keepalive``: idle connections kept; a LIFO list, so the most recently used
  (warmest) socket is reused and the oldest age out;
* ``max_connections``: connections open at once, lent and idle; a request that finds
  them all lent waits up to ``queue_timeout`` (:class:`PoolTimeout`: the client gets 503);
* ``keepalive_timeout`` (idle), ``keepalive_requests`` (uses), ``max_connection_age``
  (since connect): a connection past any of them is closed instead of reused, and idle
  ones are swept once a second (no CLOSE_WAIT pile-up when origins close first);
* TCP keep-alive probes on every upstream socket (``tcp_keepalive``).

Server state in a worker (what /status shows, see :meth:`Server.gauge`):

* ``down``: the active health check says so (shared by all workers; servers found
  through DNS are checked too, their table entries assigned by the helper a moment
  after DNS lists them: until then, and until their first verdict, they are served);
* ``ejected``: passive health: ``max_fails`` failures within ``fail_timeout`` in this
  worker took it out for ``fail_timeout`` (nginx's semantics, per worker like nginx
  without a shared zone; never for a single-server upstream, also like nginx);
* ``slow_start``: back after down/ejected, its effective weight ramps up linearly over
  ``slow_start`` (from when the check saw it up: the same ramp in every worker);
* ``up``.

Hot path cost: ``pick`` (one pass over the servers), ``acquire``/``release`` (a list pop
and append), ``failed`` only on failures. Health and weights change in ``refresh``,
every SWEEP_INTERVAL, not per request.
"""

from __future__ import annotations

import time

from forkproxy.config import UpstreamConfig, dns_tls_name
from forkproxy.context import WEIGHT_SCALE
from forkproxy.shm.health import DOWN, KEY, STATE, UP, WORDS, server_key
from forkproxy.tls.client import client_context
from forkproxy.worker.balancer import KeySpec, RetryBudget, make_balancer
from forkproxy.worker.discovered import DnsFollower
from forkproxy.worker.protocols import PROTOCOLS
from forkproxy.worker.server import Server

#: idle connections are swept (timeouts, age) this often
REAP_INTERVAL = 1.0
#: servers without a health table entry yet (just found through DNS) look for it this often
ENTRY_LOOKUP_INTERVAL = 0.5

_monotonic = time.monotonic


class Upstream:
    """A named group of servers, its balancer, retry policy and health settings."""

    split = False  # see forkproxy.worker.balancer.Split (a route's target is one or the other)

    __slots__ = ("name", "servers", "cfg", "balancer", "keyspec", "single", "max_fails",
                 "fail_timeout", "slow_start", "retries", "retry_connect", "retry_kinds",
                 "retry_statuses", "budget", "health", "next_reap", "tunnel_timeout",
                 "total_weight", "watch", "fixed", "dns", "tls_ctx", "dns_name", "protocol",
                 "make_head", "relay", "htable", "entries_missing", "next_lookup")

    def __init__(self, name: str, cfg: UpstreamConfig, health=None, resolved=None,
                 base: str = "."):
        self.name = name
        self.cfg = cfg
        # one context per upstream: its servers' sessions; DNS-found servers verify the name
        self.tls_ctx = client_context(cfg.tls, base) if cfg.tls is not None else None
        # how a try is made and the servers' pool class: chosen here, once
        self.protocol = proto = PROTOCOLS[cfg.protocol]
        self.make_head = proto.make_head
        self.relay = proto.relay
        if self.tls_ctx is not None and proto.alpn is not None:
            self.tls_ctx.set_alpn_protocols(proto.alpn)
        self.dns_name = dns_tls_name(cfg) if cfg.tls is not None else ""
        #: the servers given by address; servers found through DNS are added by follow()
        self.fixed = [self._server(s.address, s.weight) for s in cfg.servers
                      if not s.resolve]
        self._set_servers(list(self.fixed))
        self.balancer = make_balancer(cfg.balance)
        self.keyspec = KeySpec(cfg.hash, b"fp-balance") if cfg.balance == "hash" else None
        self.max_fails = cfg.max_fails
        self.fail_timeout = cfg.fail_timeout
        self.slow_start = cfg.slow_start
        self.retries = cfg.retries
        on = set(cfg.retry_on)
        self.retry_connect = "connect_failure" in on
        kinds = set()
        if "reset" in on:
            kinds.add("reset")
        if "timeout" in on:
            kinds.add("timeout")
        statuses = frozenset(int(s) for s in on if s.isdigit())
        if statuses:
            kinds.add("status")
        self.retry_kinds = frozenset(kinds)
        self.retry_statuses = statuses or None
        self.budget = RetryBudget(cfg.retry_budget, cfg.retry_budget_min)
        self.tunnel_timeout = cfg.tunnel_timeout
        self.next_reap = 0.0
        self.health = None
        self.htable = None
        self.entries_missing = False  # a server waits for its health table entry
        self.next_lookup = 0.0
        # refresh() has per-server work to do (verdicts, ejections, ramps): skipped otherwise
        self.watch = cfg.health_check is not None or cfg.slow_start > 0
        if health is not None and cfg.health_check is not None:
            self.health = health.q
            self.htable = health
            self._find_entries(self.servers, health.index())
        entries = [s for s in cfg.servers if s.resolve]
        self.dns = DnsFollower(resolved, name, entries) if entries and resolved else None
        if self.dns is not None:
            self.follow(0.0)

    def _server(self, address: str, weight: int, name: str = "") -> Server:
        """A server of this upstream, through TLS if it has ``tls``; ``name``: the DNS
        name it was found through (what TLS verifies unless server_name says)."""
        if self.tls_ctx is None:
            return self.protocol.server(self, address, weight, self.cfg)
        return self.protocol.tls_server(self, address, weight, self.cfg, self.tls_ctx, name)

    def _find_entries(self, servers, index: dict[int, int]) -> None:
        """Point servers without one at their health table entry (if it has one yet)."""
        missing = False
        for s in servers:
            if s.hidx < 0:
                s.hkey = server_key(self.name, s.address)
                s.hidx = index.get(s.hkey, -1)
                missing = missing or s.hidx < 0
        self.entries_missing = missing

    def _set_servers(self, servers: list[Server]) -> None:
        self.servers = servers
        self.total_weight = sum(s.weight for s in servers)
        self.single = len(servers) == 1

    def pick(self, key: int | None = None, exclude=None) -> Server | None:
        if self.single:
            s = self.servers[0]
            return s if s.usable and (exclude is None or s not in exclude) else None
        return self.balancer.pick(self.servers, exclude, key)

    def refresh(self, now: float) -> None:
        """Apply health verdicts, ejection ends and slow start; sweep idle connections.

        Called by the worker every SWEEP_INTERVAL (not per request)."""
        if self.dns is not None and self.dns.changed():
            self.follow(now)
        if self.entries_missing and now >= self.next_lookup:
            self.next_lookup = now + ENTRY_LOOKUP_INTERVAL
            self._find_entries(self.servers, self.htable.index())
        if self.watch:
            self._apply(now)
        if now >= self.next_reap:
            self.next_reap = now + REAP_INTERVAL
            for s in self.servers:
                s.reap(now)

    def follow(self, now: float) -> None:
        """Swap in the servers DNS lists now: known ones stay (pools, balancing state),
        new ones are added (slow-starting after the first set), vanished ones retire."""
        found = self.dns.read()
        if found is None:
            return  # a slot was being written: the next refresh reads it
        old = {s.address: s for s in self.servers}
        servers = list(self.fixed)
        seen = {s.address for s in servers}
        for address, weight in found:
            if address in seen:
                continue
            seen.add(address)
            s = old.pop(address, None)
            if s is None:
                s = self._server(address, weight, self.dns_name)
                if now and self.slow_start:
                    s.ramp_start = now
            elif s.weight != weight:
                s.weight = weight
                s.eff_weight = weight * WEIGHT_SCALE  # refresh() re-ramps a slow start
            servers.append(s)
        for address, s in old.items():
            if address not in seen:
                s.retire()
        self._set_servers(servers)
        if self.htable is not None:
            self._find_entries(servers, self.htable.discovered_index())

    def _apply(self, now: float) -> None:
        q = self.health
        slow = self.slow_start
        for s in self.servers:
            since = 0.0
            if s.hidx >= 0 and q[s.hidx * WORDS + KEY] != s.hkey:
                s.hidx = -1  # the entry went to another server: no verdict until found again
                s.hdown = False
                self.entries_missing = True
            if s.hidx >= 0:
                word = q[s.hidx * WORDS + STATE]
                st = word & 3
                down = st == DOWN
                if st == UP:
                    since = (word >> 2) / 1000.0
                    if since != s.hsince:
                        s.hsince = since
                        if since and s.ejected_until:
                            s.ejected_until = 0.0  # a check that saw it recover unejects it
                if down != s.hdown:
                    s.hdown = down
                    if down:
                        s.close_idle()
            if s.ejected_until and now >= s.ejected_until:
                s.ejected_until = 0.0
                s.ramp_start = now
            usable = not s.hdown and not s.ejected_until
            full = s.weight * WEIGHT_SCALE
            eff = full
            if slow and usable:
                start = max(since, s.ramp_start)
                if start and now - start < slow:
                    eff = max(1, int(full * (now - start) / slow))
                elif s.ramp_start:
                    s.ramp_start = 0.0
            s.usable = usable
            s.eff_weight = eff
        if q is None and not slow:  # only passive ejections to watch: until they end
            self.watch = any(s.ejected_until for s in self.servers)

    def available(self) -> bool:
        return any(s.usable for s in self.servers)

    def close_idle(self) -> None:
        for s in self.servers:
            s.close_idle()


def build_upstreams(cfg_upstreams: dict[str, UpstreamConfig], health=None,
                    resolved=None, base: str = ".") -> dict[str, Upstream]:
    """The worker's upstreams; ``base``: the directory TLS file names are relative to."""
    return {name: Upstream(name, ucfg, health, resolved, base)
            for name, ucfg in cfg_upstreams.items()}
