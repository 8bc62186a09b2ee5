"""Active health checks, run once for all workers by the helper (manager) process.

For every server of an upstream with ``health_check = {...}``, one greenlet sends
``GET path`` every ``interval`` on a fresh connection (``Connection: close``); a 2xx or
3xx status line within ``timeout`` (connect included) is a success. ``type = "grpc"``
makes a gRPC health call instead (forkproxy/manager/grpccheck.py): SERVING is a success. An upstream with
``tls`` is checked through TLS with its context: a certificate that does not verify
fails the check (status "TLS handshake failed", the reason in the "upstream server
down" log line). ``rise`` consecutive successes bring a down server up, ``fall`` consecutive failures take it
down (:class:`Verdict`, sans-IO). Every result is published in the shared health
table (forkproxy/shm/health.py), which the workers read every SWEEP_INTERVAL: a
verdict reaches every worker within about 0.1 s, and no worker sends a single check.

A server starts "unknown" (served like an up one); the first success makes it "up"
without a slow start, ``fall`` failures make it "down". A restarted helper, or a reload
that keeps a server, continues from the verdict in the table.

Servers found through DNS (``resolve`` entries, forkproxy/manager/discovery.py) are
checked like configured ones when their upstream has ``health_check``: the helper
follows the resolved-servers table (forkproxy/shm/resolved.py) every FOLLOW_INTERVAL,
gives each server DNS lists an entry in the health table's discovered region, starts
its check, and stops the check of a server DNS no longer lists (its entry keeps the
verdict, should it come back). Through TLS, such a server is verified against the DNS
name it was found through unless ``server_name`` says otherwise, as the workers do.

The checks restart on every reload (the helper re-reads the config on HUP).
"""

from __future__ import annotations

import time
from _random import Random  # random.Random's C generator (balancer.py says why)

import gevent
from gevent import socket

from forkproxy import tlsnames
from forkproxy.config import config_dir, dns_tls_name, parse_hostport, resolved_spec
from forkproxy.shm.health import (
    DOWN,
    ST_BAD,
    ST_CONNECT,
    ST_TIMEOUT,
    ST_TLS,
    UNKNOWN,
    UP,
    server_key,
)
from forkproxy.shm.resolved import format_address, slot_key
from forkproxy.tls.client import TLSHandshakeFailed, client_context, handshake, server_name
from forkproxy.tls.client import shutdown as tls_shutdown

#: the gRPC health call, registered by forkproxy/manager/grpccheck.py ("call", and
#: "not_serving": the status reported for NOT_SERVING). The module speaks HTTP/2 through
#: libnghttp2, so it is imported only for configs with HTTP/2 upstreams, which gRPC
#: checks require (manager/process.py HTTP2_MODULES, master/features.py)
GRPC: dict[str, object] = {}

MAX_STATUS_LINE = 4096
#: how often the checker looks for servers DNS added or dropped (one load per entry)
FOLLOW_INTERVAL = 0.25


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


class Verdict:
    """The rise/fall state machine of one server (no sockets, no clocks)."""

    __slots__ = ("rise", "fall", "state", "since_ms", "ok_run", "fail_run")

    def __init__(self, rise: int, fall: int, state: int = UNKNOWN, since_ms: int = 0):
        self.rise = rise
        self.fall = fall
        self.state = state
        self.since_ms = since_ms
        self.ok_run = 0
        self.fail_run = 0

    def observe(self, ok: bool, now_ms: int) -> bool:
        """Count one check; True if the state changed."""
        if ok:
            self.ok_run += 1
            self.fail_run = 0
            if self.state == UNKNOWN:
                self.state, self.since_ms = UP, 0  # never down: no slow start
                return True
            if self.state == DOWN and self.ok_run >= self.rise:
                self.state, self.since_ms = UP, now_ms
                return True
            return False
        self.fail_run += 1
        self.ok_run = 0
        if self.state != DOWN and self.fail_run >= self.fall:
            self.state, self.since_ms = DOWN, now_ms
            return True
        return False


class CheckTLS:
    """How a check reaches a server through TLS: the upstream's context and name. The
    last session is offered again, as the workers do (a check every few seconds would
    otherwise cost the server a full handshake each time)."""

    __slots__ = ("ctx", "name", "session", "error")

    def __init__(self, ctx, name: str):
        self.ctx = ctx
        self.name = name
        self.session = None
        self.error = ""  # why the last handshake failed ("" = it did not)


def check_once(host: str, port: int, path: str, host_header: str,
               timeout: float, tls: CheckTLS | None = None,
               service: str | None = None) -> tuple[bool, int]:
    """One check: (success, status) with status an HTTP status or ST_* code.
    ``service``: not None for a gRPC check (forkproxy/manager/grpccheck.py)."""
    sock = None
    try:
        with gevent.Timeout(timeout):
            sock = socket.create_connection((host, port))
            if tls is not None:
                sock = _start_tls(sock, tls, timeout)
            if service is not None:
                serving = GRPC["call"](sock, host_header, service,
                                       b"http" if tls is None else b"https")
                return serving, 200 if serving else GRPC["not_serving"]
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n"
                         "User-Agent: forkproxy-health-check\r\nAccept: */*\r\n"
                         "Connection: close\r\n\r\n".encode("latin-1"))
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(1024)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_STATUS_LINE:
                    break
    except (gevent.Timeout, socket.timeout):  # the latter: the TLS handshake's own
        return False, ST_TIMEOUT
    except TLSHandshakeFailed as e:
        tls.error = e.detail
        return False, ST_TLS
    except OSError:
        return False, ST_CONNECT
    finally:
        if sock is not None:
            if isinstance(sock, tlsnames.SSLSocket):
                tls.session = sock.session or tls.session
                tls_shutdown(sock)
            else:
                sock.close()
    parts = data.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return False, ST_BAD
    status = int(parts[1])
    return 200 <= status < 400, status


def _start_tls(sock, tls: CheckTLS, timeout: float):
    """The handshake of a check (the plain socket is closed when it fails)."""
    try:
        ssock = handshake(sock, tls.ctx, tls.name, tls.session, timeout)
    except BaseException:
        sock.close()
        raise
    tls.error = ""
    return ssock


def slot_key_of(upstream: str, entry) -> int:
    """The resolved-table key of one ``resolve`` entry."""
    return slot_key(upstream, resolved_spec(entry))


class HealthChecker:
    """The check greenlets of one config; stop() before starting the next config's."""

    def __init__(self, cfg, table, logger=None, resolved=None):
        self.cfg = cfg
        self.table = table
        self.log = logger
        self.resolved = resolved  # servers found through DNS (forkproxy.shm.resolved)
        self.greenlets: list[gevent.Greenlet] = []
        self.contexts: dict = {}  # upstream name -> client TLS context
        #: the checks of servers found through DNS: (upstream, address) -> greenlet
        self.found: dict[tuple[str, str], gevent.Greenlet] = {}

    def targets(self) -> list[tuple[str, str, object, int]]:
        """[(upstream, address, HealthCheckConfig, table entry)] to check."""
        out = []
        index = self.table.index()
        for name, up in self.cfg.upstream.items():
            hc = up.health_check
            if hc is None:
                continue
            for s in up.servers:
                if s.resolve:  # found through DNS: follow_dns() checks them
                    continue
                i = index.get(server_key(name, s.address), -1)
                if i >= 0:
                    out.append((name, s.address, hc, i))
                elif self.log is not None:
                    self.log.error("no health table entry for a server: not checked",
                                   upstream=name, server=s.address)
        return out

    def dns_slots(self) -> list[tuple[str, int]]:
        """[(upstream, resolved-table slot)] of the ``resolve`` entries to follow."""
        if self.resolved is None:
            return []
        index = self.resolved.index()
        out = []
        for name, up in self.cfg.upstream.items():
            if up.health_check is None:
                continue
            for s in up.servers:
                if s.resolve:
                    i = index.get(slot_key_of(name, s), -1)
                    if i >= 0:
                        out.append((name, i))
        return out

    def start(self) -> tuple[int, int]:
        """Start the checks: (configured servers checked, DNS entries followed: their
        servers are checked as they appear)."""
        targets = self.targets()
        for name, address, hc, i in targets:
            self.greenlets.append(gevent.spawn(self._loop, name, address, hc, i))
        slots = self.dns_slots()
        if slots:
            self.greenlets.append(gevent.spawn(self._follow_dns, slots))
        return len(targets), len(slots)

    def stop(self) -> None:
        gevent.killall(self.greenlets + list(self.found.values()), block=False)
        self.greenlets = []
        self.found = {}

    def _follow_dns(self, slots: list[tuple[str, int]]) -> None:
        """Check the servers DNS lists now; re-read when a slot's sequence moved."""
        seen = [-1] * len(slots)
        while True:
            seqs = [self.resolved.seq(i) for _, i in slots]
            if seqs != seen:
                seen = self.sync_dns(slots)
            gevent.sleep(FOLLOW_INTERVAL)

    def sync_dns(self, slots: list[tuple[str, int]]) -> list[int]:
        """Start the checks of servers DNS added, stop those of servers it dropped;
        returns the sequences read (all -1 when a slot was caught mid-write: nothing
        changed, read again at the next look)."""
        wanted: dict[tuple[str, str], int] = {}
        done = []
        for name, i in slots:
            got = self.resolved.read(i)
            if got is None:
                return [-1] * len(slots)
            done.append(got[0])
            for host, port, _ in got[1]:
                wanted[(name, format_address(host, port))] = 0
        for key in [k for k in self.found if k not in wanted]:
            self.found.pop(key).kill(block=False)
        keys = {k: server_key(*k) for k in wanted}
        room = self.table.discovered
        if len(keys) > room:  # the rest are served unchecked (passive health only)
            if self.log is not None:
                self.log.error("more servers found through DNS than the health table holds: "
                               "some are not checked", servers=len(keys), checked=room)
            keys = dict(list(keys.items())[:room])
        index = self.table.assign_discovered(list(keys.values()))
        for key, hkey in keys.items():
            if key not in self.found:
                name, address = key
                tls_name = dns_tls_name(self.cfg.upstream[name])
                self.found[key] = gevent.spawn(self._loop, name, address,
                                               self.cfg.upstream[name].health_check,
                                               index[hkey], tls_name)
        return done

    def _tls(self, name: str, host: str) -> CheckTLS | None:
        """The TLS of upstream ``name``'s checks (one context per upstream), or None."""
        up = self.cfg.upstream[name]
        tls = up.tls
        if tls is None:
            return None
        ctx = self.contexts.get(name)
        if ctx is None:
            ctx = self.contexts[name] = client_context(tls, config_dir(self.cfg))
            if up.protocol == "h2":  # as the workers connect to it
                ctx.set_alpn_protocols(["h2"])
        return CheckTLS(ctx, server_name(tls, host))

    def _loop(self, name: str, address: str, hc, i: int, dns_name: str = "") -> None:
        """Check one server forever; ``dns_name``: the name it was found through (what
        TLS verifies when ``server_name`` is empty, as in the workers)."""
        table = self.table
        host, port = parse_hostport(address)
        host_header = hc.host or address
        tls = self._tls(name, dns_name or host)
        service = hc.service if hc.type == "grpc" else None
        state, since = table.state(i)
        verdict = Verdict(hc.rise, hc.fall, state, since)
        # spread the first checks a little (many servers, one helper)
        gevent.sleep(Random().random() * min(hc.interval, 1.0) * 0.2)
        while True:
            t0 = time.monotonic()
            ok, status = check_once(host, port, hc.path, host_header, hc.timeout, tls,
                                    service)
            now_ms = _now_ms()
            changed = verdict.observe(ok, now_ms)
            table.publish(i, verdict.state, verdict.since_ms, changed, ok,
                          int((time.monotonic() - t0) * 1e6), status, now_ms)
            if changed and self.log is not None:
                if verdict.state == DOWN:
                    extra = {"error": tls.error} if status == ST_TLS else {}
                    self.log.warning("upstream server down", upstream=name, server=address,
                                     status=status, **extra)
                elif verdict.since_ms:  # back after being down (a first verdict is quiet)
                    self.log.warning("upstream server up", upstream=name, server=address)
            gevent.sleep(max(0.0, hc.interval - (time.monotonic() - t0)))
