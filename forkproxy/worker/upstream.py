"""Upstream servers, balancing and per-worker keep-alive connection pools.

Everything here is per worker process (no sharing, no locks): a pool is a LIFO list of
idle connections per server, so the most recently used (warmest) socket is reused and
the oldest ones age out through keepalive_timeout.
"""

from __future__ import annotations

import socket as pysocket
import time

from gevent import socket

from forkproxy.config import UpstreamConfig, parse_hostport


class UpstreamConn:
    """One TCP connection to an upstream server."""

    __slots__ = ("sock", "server", "requests", "created", "idle_since", "reused", "reusable")

    def __init__(self, sock, server: Server):
        self.sock = sock
        self.server = server
        self.requests = 0
        self.created = time.monotonic()
        self.idle_since = 0.0
        self.reused = False
        self.reusable = False  # set by the exchange once the response ended cleanly

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Server:
    """One upstream server with its idle pool and balancing state."""

    __slots__ = ("upstream", "host", "port", "address", "weight", "current_weight", "idle",
                 "active", "cfg", "connects", "reuses")

    def __init__(self, upstream: Upstream, address: str, weight: int, cfg: UpstreamConfig):
        self.upstream = upstream
        self.host, self.port = parse_hostport(address)
        self.address = address
        self.weight = weight
        self.current_weight = 0
        self.idle: list[UpstreamConn] = []
        self.active = 0
        self.cfg = cfg
        self.connects = 0
        self.reuses = 0

    def acquire(self) -> UpstreamConn:
        """A pooled idle connection if a fresh one is there, else a new connection.

        Raises OSError (refused, unreachable) or socket.timeout (connect_timeout)."""
        idle = self.idle
        now = time.monotonic()
        cfg = self.cfg
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < cfg.keepalive_timeout:
                conn.reused = True
                conn.reusable = False
                self.active += 1
                self.reuses += 1
                return conn
            conn.close()
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.settimeout(cfg.connect_timeout)
        try:
            sock.connect((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
        sock.settimeout(None)  # later steps are bounded by the connection's deadline
        self.connects += 1
        self.active += 1
        return UpstreamConn(sock, self)

    def release(self, conn: UpstreamConn, reusable: bool) -> None:
        """Return a connection after an exchange; it is pooled only if fully clean."""
        self.active -= 1
        conn.requests += 1
        cfg = self.cfg
        if reusable and conn.requests < cfg.keepalive_requests and len(self.idle) < cfg.keepalive:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        else:
            conn.close()

    def close_idle(self) -> None:
        while self.idle:
            self.idle.pop().close()


class Upstream:
    """A named group of servers balanced by smooth weighted round-robin (nginx's)."""

    __slots__ = ("name", "servers", "cfg", "total_weight")

    def __init__(self, name: str, cfg: UpstreamConfig):
        self.name = name
        self.cfg = cfg
        self.servers = [Server(self, s.address, s.weight, cfg) for s in cfg.servers]
        self.total_weight = sum(s.weight for s in self.servers)

    def pick(self, exclude: Server | None = None) -> Server | None:
        servers = self.servers
        if len(servers) == 1:
            s = servers[0]
            return None if s is exclude else s
        best = None
        total = 0
        for s in servers:
            if s is exclude:
                continue
            s.current_weight += s.weight
            total += s.weight
            if best is None or s.current_weight > best.current_weight:
                best = s
        if best is not None:
            best.current_weight -= total
        return best

    def close_idle(self) -> None:
        for s in self.servers:
            s.close_idle()


def build_upstreams(cfg_upstreams: dict[str, UpstreamConfig]) -> dict[str, Upstream]:
    return {name: Upstream(name, ucfg) for name, ucfg in cfg_upstreams.items()}
