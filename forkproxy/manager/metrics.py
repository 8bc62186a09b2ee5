"""Aggregation of request contexts and worker gauges, and the Prometheus text exposition.

Everything is aggregated in the manager, over all workers: a worker only pushes one
request context per request and a gauges record about once a second. Counters live in
plain dicts keyed by label tuples; histograms keep one count per bucket (not cumulative:
an observation is one bisect and one increment) and are made cumulative when rendered.

Process-level values that have no per-request source (workers in the table, their RSS,
ring drops, TCP sockets by state from netlink sock_diag) are sampled at scrape time by
:class:`Sampler`; the manager passes them to :meth:`Metrics.render`.

Counters restart from zero when the manager process is restarted (Prometheus' ``rate()``
handles counter resets); ``forkproxy_ring_dropped_total`` lives in shared memory and
does not.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable

import msgspec

from forkproxy.context import (
    N_TIMES,
    PHASES,
    T_ACCEPT,
    T_END,
    T_HEADERS,
    RequestContext,
    WorkerGauges,
    padded_times,
)
from forkproxy.manager.histogram import (  # noqa: F401 (re-exported: tests, phases.py)
    DURATION_BUCKETS,
    FINE_BUCKETS,
    FINE_TO_PHASE,
    PHASE_BUCKETS,
    Histogram,
    PhaseGroup,
)
from forkproxy.manager.jsonline import phases_ms
from forkproxy.manager.recordpass import count_batch, time_batch

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Linux TCP states (include/net/tcp_states.h), index = state number
TCP_STATES = ("", "established", "syn_sent", "syn_recv", "fin_wait1", "fin_wait2",
              "time_wait", "close", "close_wait", "last_ack", "listen", "closing",
              "new_syn_recv")


def request_duration(ctx: RequestContext) -> float:
    """Seconds from the request head being complete (else accepted) to the response's end."""
    t = ctx.times
    if len(t) != N_TIMES:
        t = padded_times(t)
    end = t[T_END]
    start = t[T_HEADERS] or t[T_ACCEPT]
    if end and start and end >= start:
        return end - start
    return 0.0


def phases(ctx: RequestContext) -> dict[str, float]:
    """Seconds per phase that happened (the same as context.phase_durations, inlined)."""
    t = ctx.times
    out = {}
    for name, (a, b) in _PHASE_LIST:
        ta = t[a]
        tb = t[b]
        if ta and tb and tb >= ta:
            out[name] = tb - ta
    return out


_PHASE_LIST = list(PHASES.items())

class MetricsState(msgspec.Struct, array_like=True, gc=False):
    """A Metrics' counters as plain data (msgpack), for a shard to hand to the manager."""

    requests: list[tuple[str, str, int, int]]  # listener, upstream, code, count
    durations: list[tuple[str, str, list[int], float]]  # listener, upstream, counts, sum
    phases: dict[str, tuple[list[int], float]]  # name -> counts, sum
    tls: list[tuple[bool, int]]
    reuse: list[tuple[str, bool, int]]
    bytes_in: dict[str, int]
    bytes_out: dict[str, int]
    rejected: dict[str, int]
    retries: dict[str, int]
    tunnels: dict[str, int]
    gauges: list[WorkerGauges]
    records: int
    gauge_records: int
    decode_errors: int
    #: the critical-path report's histograms: (route, upstream, PhaseGroup.state())
    groups: list[tuple[str, str, list[tuple[list[int], float, float]]]] = []
    #: gRPC requests: listener, upstream, grpc status, count
    grpc: list[tuple[str, str, int, int]] = []


class Metrics:
    """Aggregates over all workers; one instance per manager process."""

    def __init__(self):
        #: called with each request context whose ``error`` is set (the manager's upstream
        #: TLS failure log, forkproxy/manager/errorlog.py); None: nobody asks
        self.on_error = None
        self.requests: dict[tuple[str, str, int], int] = {}
        self.durations: dict[tuple[str, str], Histogram] = {}
        self.phases: dict[str, Histogram] = {name: Histogram(PHASE_BUCKETS) for name in PHASES}
        self.tls: dict[bool, int] = {}
        self.reuse: dict[tuple[str, bool], int] = {}
        self.bytes_in: dict[str, int] = {}
        self.bytes_out: dict[str, int] = {}
        self.gauges: dict[int, WorkerGauges] = {}
        self.records = 0
        self.gauge_records = 0
        self.decode_errors = 0
        self.rejected: dict[str, int] = {}
        self.retries: dict[str, int] = {}  # by upstream (rendered by manager/upstreams.py)
        self.tunnels: dict[str, int] = {}  # by upstream, counted when a tunnel closes
        #: gRPC requests by (listener, upstream, grpc status)
        self.grpc: dict[tuple[str, str, int], int] = {}
        #: the critical-path report's histograms per (route, upstream) (phases.py)
        self.groups: dict[tuple[str, str], PhaseGroup] = {}
        #: counters the workers report as running totals in their gauges records: the
        #: sums of their increments (so a worker that exits keeps its share)
        self.client_connections: dict[tuple[str, str], int] = {}
        self.http2_errors: dict[str, int] = {}
        self._last_totals: dict[int, tuple[dict, dict]] = {}

    # -- input ------------------------------------------------------------------------

    def observe(self, ctx: RequestContext, ms: dict[str, float] | None = None) -> None:
        """Count one request context. If ``ms`` is a dict, it receives the phases that
        happened in milliseconds (what the access log shows)."""
        self.observe_batch([ctx])
        if ms is not None:
            ms.update(phases_ms(ctx))

    def observe_batch(self, items: list) -> None:
        """Count a batch of records (request contexts and gauges records).

        The manager's cost per record is mostly this, so the work is two tight passes over
        the batch (counters, then timings) with everything in local variables; see
        docs/BENCHMARKS.md, "The manager's record path".
        """
        reqs = [r for r in items if type(r) is RequestContext]
        if len(reqs) != len(items):
            for r in items:
                if type(r) is not RequestContext:
                    self.observe_gauges(r)
        count_batch(self, reqs)
        time_batch(self, reqs)

    def count_rare(self, ctx: RequestContext) -> None:
        """What few requests have: an error, a reject, retries, a tunnel, a gRPC status."""
        if ctx.error and self.on_error is not None:
            self.on_error(ctx)
        if ctx.reject:
            self.rejected[ctx.reject] = self.rejected.get(ctx.reject, 0) + 1
        upstream = ctx.upstream
        if ctx.retries:
            self.retries[upstream] = self.retries.get(upstream, 0) + ctx.retries
        if ctx.tunnel:
            self.tunnels[upstream] = self.tunnels.get(upstream, 0) + 1
        if ctx.grpc_status is not None:
            key = (ctx.listener, upstream, ctx.grpc_status)
            self.grpc[key] = self.grpc.get(key, 0) + 1

    # -- shards (manager/shards.py) ------------------------------------------------------

    def state(self) -> MetricsState:
        """Everything counted so far, to be added to another process's Metrics."""
        return MetricsState(
            [(*k, n) for k, n in self.requests.items()],
            [(*k, h.counts, h.sum) for k, h in self.durations.items()],
            {name: (h.counts, h.sum) for name, h in self.phases.items()},
            list(self.tls.items()), [(*k, n) for k, n in self.reuse.items()],
            self.bytes_in, self.bytes_out, self.rejected, self.retries, self.tunnels,
            list(self.gauges.values()), self.records, self.gauge_records, self.decode_errors,
            [(*k, g.state()) for k, g in self.groups.items()],
            [(*k, n) for k, n in self.grpc.items()])

    def add(self, st: MetricsState) -> None:
        """Add another process's counters (a shard's) to these."""
        for listener, upstream, code, n in st.requests:
            key = (listener, upstream, code)
            self.requests[key] = self.requests.get(key, 0) + n
        for listener, upstream, counts, total in st.durations:
            h = self.durations.get((listener, upstream))
            if h is None:
                h = self.durations[(listener, upstream)] = Histogram(DURATION_BUCKETS)
            h.add(counts, total)
        for name, (counts, total) in st.phases.items():
            if name in self.phases:
                self.phases[name].add(counts, total)
        for upstream, reused, n in st.reuse:
            self.reuse[(upstream, reused)] = self.reuse.get((upstream, reused), 0) + n
        for mine, theirs in ((self.tls, dict(st.tls)), (self.bytes_in, st.bytes_in),
                             (self.bytes_out, st.bytes_out), (self.rejected, st.rejected),
                             (self.retries, st.retries), (self.tunnels, st.tunnels)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n
        for g in st.gauges:
            self.gauges[g.worker] = g
        self.records += st.records
        self.gauge_records += st.gauge_records
        self.decode_errors += st.decode_errors
        for route, upstream, state in st.groups:
            g = self.groups.get((route, upstream))
            if g is None:
                g = self.groups[(route, upstream)] = PhaseGroup()
            g.add(state)
        for listener, upstream, code, n in st.grpc:
            key = (listener, upstream, code)
            self.grpc[key] = self.grpc.get(key, 0) + n

    def observe_gauges(self, g: WorkerGauges) -> None:
        self.gauge_records += 1
        self.gauges[g.worker] = g
        last_conns, last_errors = self._last_totals.get(g.worker, ({}, {}))
        totals = self.client_connections
        for key, n in g.client_connections.items():
            listener, _, protocol = key.rpartition(" ")
            k = (listener, protocol)
            totals[k] = totals.get(k, 0) + n - last_conns.get(key, 0)
        errors = self.http2_errors
        for reason, n in g.http2_errors.items():
            errors[reason] = errors.get(reason, 0) + n - last_errors.get(reason, 0)
        self._last_totals[g.worker] = (g.client_connections, g.http2_errors)

    def forget_workers(self, live_pids: Iterable[int]) -> None:
        live = set(live_pids)
        for pid in [p for p in self.gauges if p not in live]:
            del self.gauges[pid]
            self._last_totals.pop(pid, None)

    # -- output -----------------------------------------------------------------------

    def _render_grpc(self, w) -> None:
        w.family("forkproxy_grpc_requests_total", "counter",
                 "gRPC requests (content-type application/grpc...), by listener, upstream and "
                 "gRPC status code (0 OK, 4 DEADLINE_EXCEEDED, 14 UNAVAILABLE, ...).")
        for (listener, upstream, code), n in sorted(self.grpc.items()):
            w.sample("forkproxy_grpc_requests_total", (("listener", listener),
                     ("upstream", upstream), ("grpc_status", str(code))), n)

    def _render_protocols(self, w) -> None:
        """Client connections by protocol and HTTP/2 errors (totals the workers report)."""
        w.family("forkproxy_client_connections_total", "counter",
                 "Client connections accepted, by listener and protocol (http/1.1, h2, h2c).")
        for (listener, protocol), n in sorted(self.client_connections.items()):
            w.sample("forkproxy_client_connections_total",
                     (("listener", listener), ("protocol", protocol)), n)
        w.family("forkproxy_http2_stream_errors_total", "counter",
                 "HTTP/2 streams refused or reset and connections ended by the proxy, by "
                 "reason (malformed_headers, refused_stream, rapid_reset, ping_flood, ...).")
        for reason, n in sorted(self.http2_errors.items()):
            w.sample("forkproxy_http2_stream_errors_total", (("reason", reason),), n)

    def render(self, sample: Sample | None = None) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        w = TextWriter()
        w.family("forkproxy_requests_total", "counter",
                 "Requests answered, by listener, upstream and status code.")
        for (listener, upstream, code), n in sorted(self.requests.items()):
            w.sample("forkproxy_requests_total",
                     (("listener", listener), ("upstream", upstream), ("code", str(code))), n)
        w.family("forkproxy_request_duration_seconds", "histogram",
                 "Time from the complete request head to the end of the response "
                 "(requests refused before their head was parsed are not observed).")
        for (listener, upstream), h in sorted(self.durations.items()):
            w.histogram("forkproxy_request_duration_seconds",
                        (("listener", listener), ("upstream", upstream)), h)
        w.family("forkproxy_phase_duration_seconds", "histogram",
                 "Time spent per request phase (upstream_connect: new connections only).")
        for name, h in self.phases.items():
            w.histogram("forkproxy_phase_duration_seconds", (("phase", name),), h)
        w.family("forkproxy_tls_handshakes_total", "counter",
                 "TLS handshakes of connections that carried a request, by session resumption.")
        for resumed in (False, True):
            w.sample("forkproxy_tls_handshakes_total",
                     (("resumed", "true" if resumed else "false"),), self.tls.get(resumed, 0))
        w.family("forkproxy_upstream_reuse_total", "counter",
                 "Requests sent upstream, by whether the connection came from the pool.")
        for (upstream, reused), n in sorted(self.reuse.items()):
            w.sample("forkproxy_upstream_reuse_total",
                     (("upstream", upstream), ("reused", "true" if reused else "false")), n)
        w.family("forkproxy_received_bytes_total", "counter",
                 "Request body bytes received from clients, by listener.")
        for listener, n in sorted(self.bytes_in.items()):
            w.sample("forkproxy_received_bytes_total", (("listener", listener),), n)
        w.family("forkproxy_sent_bytes_total", "counter",
                 "Response bytes sent to clients, by listener.")
        for listener, n in sorted(self.bytes_out.items()):
            w.sample("forkproxy_sent_bytes_total", (("listener", listener),), n)
        w.family("forkproxy_rejected_total", "counter",
                 "Requests and connections the proxy refused itself, by reason (framing, "
                 "bad_request, headers_too_large, uri_too_long, body_too_large, "
                 "header_timeout, body_timeout, rate_limited, conn_limit, ...).")
        for reason, n in sorted(self.rejected.items()):
            w.sample("forkproxy_rejected_total", (("reason", reason),), n)
        self._render_grpc(w)
        self._render_protocols(w)

        live = self.gauges
        if sample is not None:
            live = {pid: g for pid, g in self.gauges.items() if pid in sample.worker_pids}
        conns: dict[tuple[str, str], int] = {}
        for g in live.values():
            for u in g.upstreams:
                for state, n in (("active", u.active), ("idle", u.idle)):
                    key = (u.upstream, state)
                    conns[key] = conns.get(key, 0) + n
        w.family("forkproxy_upstream_connections", "gauge",
                 "Upstream connections in all workers, by state (active: in an exchange, "
                 "idle: in the keep-alive pool).")
        for (upstream, state), n in sorted(conns.items()):
            w.sample("forkproxy_upstream_connections",
                     (("upstream", upstream), ("state", state)), n)
        w.family("forkproxy_worker_greenlets", "gauge",
                 "Greenlets alive per worker (a steady rise is a leak).")
        for pid, g in sorted(live.items()):
            if g.greenlets >= 0:
                w.sample("forkproxy_worker_greenlets", (("pid", str(pid)),), g.greenlets)
        w.family("forkproxy_worker_client_connections", "gauge",
                 "Client connections open per worker.")
        for pid, g in sorted(live.items()):
            w.sample("forkproxy_worker_client_connections", (("pid", str(pid)),), g.connections)

        if sample is not None:
            sample.render_into(w)
        w.family("forkproxy_collector_records_total", "counter",
                 "Records the manager read from the rings, by kind.")
        w.sample("forkproxy_collector_records_total", (("kind", "request"),), self.records)
        w.sample("forkproxy_collector_records_total", (("kind", "gauges"),), self.gauge_records)
        w.family("forkproxy_collector_decode_errors_total", "counter",
                 "Ring records that did not decode (version skew or corruption).")
        w.sample("forkproxy_collector_decode_errors_total", (), self.decode_errors)
        return w.text()


class Sample:
    """Values read at scrape time from the worker table, the rings, /proc and netlink."""

    def __init__(self, *, master_pid: int = 0, generation: int = 0,
                 workers: list[dict] | None = None, ring_dropped: int = 0, ring_lost: int = 0,
                 tcp: dict[tuple[str, str], int] | None = None, access_log_errors: int = 0,
                 access_log_lines: int = 0):
        self.master_pid = master_pid
        self.generation = generation
        self.workers = workers or []
        self.worker_pids = {w["pid"] for w in self.workers}
        self.ring_dropped = ring_dropped
        self.ring_lost = ring_lost
        self.tcp = tcp
        self.access_log_errors = access_log_errors
        self.access_log_lines = access_log_lines

    def render_into(self, w: TextWriter) -> None:
        w.family("forkproxy_workers", "gauge", "Worker processes in the worker table.")
        w.sample("forkproxy_workers", (), len(self.workers))
        w.family("forkproxy_workers_by_generation", "gauge", "Worker processes by generation.")
        gens: dict[int, int] = {}
        for wk in self.workers:
            gens[wk["generation"]] = gens.get(wk["generation"], 0) + 1
        for gen, n in sorted(gens.items()):
            w.sample("forkproxy_workers_by_generation", (("generation", str(gen)),), n)
        w.family("forkproxy_generation", "gauge", "The master's current configuration generation.")
        w.sample("forkproxy_generation", (), self.generation)
        w.family("forkproxy_worker_resident_bytes", "gauge", "Resident set size per worker.")
        for wk in sorted(self.workers, key=lambda x: x["pid"]):
            if wk.get("rss") is not None:
                w.sample("forkproxy_worker_resident_bytes", (("pid", str(wk["pid"])),),
                         wk["rss"])
        w.family("forkproxy_worker_cpu_seconds_total", "counter",
                 "CPU time (user + system) per worker.")
        for wk in sorted(self.workers, key=lambda x: x["pid"]):
            if wk.get("cpu_seconds") is not None:
                w.sample("forkproxy_worker_cpu_seconds_total", (("pid", str(wk["pid"])),),
                         wk["cpu_seconds"])
        w.family("forkproxy_worker_requests_total", "counter",
                 "Requests per worker (from its heartbeat, about once a second).")
        for wk in sorted(self.workers, key=lambda x: x["pid"]):
            w.sample("forkproxy_worker_requests_total", (("pid", str(wk["pid"])),),
                     wk["requests"])
        w.family("forkproxy_ring_dropped_total", "counter",
                 "Request contexts dropped because a worker's ring was full.")
        w.sample("forkproxy_ring_dropped_total", (), self.ring_dropped)
        w.family("forkproxy_ring_lost_total", "counter",
                 "Ring resynchronisations after an invalid record (e.g. a worker killed "
                 "mid-write).")
        w.sample("forkproxy_ring_lost_total", (), self.ring_lost)
        w.family("forkproxy_access_log_lines_total", "counter", "Access log lines written.")
        w.sample("forkproxy_access_log_lines_total", (), self.access_log_lines)
        w.family("forkproxy_access_log_write_errors_total", "counter",
                 "Access log writes that failed (lines lost).")
        w.sample("forkproxy_access_log_write_errors_total", (), self.access_log_errors)
        if self.tcp is not None:
            w.family("forkproxy_tcp_connections", "gauge",
                     "TCP sockets on each listener's port by state (netlink sock_diag).")
            for (listener, state), n in sorted(self.tcp.items()):
                w.sample("forkproxy_tcp_connections",
                         (("listener", listener), ("state", state)), n)


# -- sampling at scrape time -------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process from /proc/PID/statm (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process from /proc/PID/stat (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


#: netlink sock_diag (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h)
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x001 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
#: inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid: sport and
#: dport (network byte order), src[16], dst[16], if, cookie[2]
_INET_DIAG_REQ = struct.Struct("=BBBxI")
_INET_DIAG_SOCKID = struct.Struct(">HH16s16sI8s")


def tcp_states(listeners: list[tuple[str, int]], sock_type=socket.socket,
               timeout: float | None = 5.0) -> dict[tuple[str, str], int]:
    """{(listener, state): sockets} for the local ports of the listeners (netlink dump).

    ``listeners`` is [(listen text, port)]. Every state is reported, zeros included, so
    dashboards see a stable set of series. One sock_diag dump per port and address
    family, filtered by the kernel on the local port; only each socket's state byte is
    read. ``sock_type`` is ``gevent.socket.socket`` in the manager (the dump then waits
    cooperatively). No third-party netlink library: pyroute2 costs ~9 MiB per process.
    """
    out: dict[tuple[str, str], int] = {}
    for name, _ in listeners:
        for state in TCP_STATES[1:]:
            out[(name, state)] = 0
    with sock_type(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                   _NETLINK_SOCK_DIAG) as s:
        s.settimeout(timeout)
        s.bind((0, 0))
        seq = 0
        for name, port in listeners:
            if not port:
                continue
            for fam in (socket.AF_INET, socket.AF_INET6):
                seq += 1
                for st in _sock_diag_states(s, seq, fam, port):
                    if 0 < st < len(TCP_STATES):
                        key = (name, TCP_STATES[st])
                        out[key] = out.get(key, 0) + 1
    return out


def _sock_diag_states(s, seq: int, family: int, sport: int):
    """The TCP state of every socket of ``family`` whose local port is ``sport``."""
    body = (_INET_DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0xFFF)
            + _INET_DIAG_SOCKID.pack(sport, 0, b"", b"", 0, b""))
    s.sendall(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(body), _SOCK_DIAG_BY_FAMILY,
                              _NLM_F_REQUEST_DUMP, seq, 0) + body)
    hdr = _NLMSG_HDR
    while True:
        data = s.recv(65536)  # the kernel's dump messages are at most 32 KiB
        if not data:
            raise OSError("sock_diag: netlink socket closed")
        off = 0
        while off + hdr.size <= len(data):
            length, mtype, _flags, mseq, _pid = hdr.unpack_from(data, off)
            if length < hdr.size:
                raise OSError("sock_diag: malformed netlink message")
            if mseq == seq:
                if mtype == _NLMSG_DONE:
                    return
                if mtype == _NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, off + hdr.size)[0]
                    if err:
                        raise OSError(err, f"sock_diag: {os.strerror(err)}")
                    return
                if mtype == _SOCK_DIAG_BY_FAMILY:
                    yield data[off + hdr.size + 1]  # inet_diag_msg: family, state, ...
            off += (length + 3) & ~3


# -- text exposition ---------------------------------------------------------------------

_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})


def _labels(pairs) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{str(v).translate(_ESCAPES)}"' for k, v in pairs) + "}"


def _num(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "NaN"
    if v == float("inf"):
        return "+Inf"
    if v == float("-inf"):
        return "-Inf"
    return repr(float(v))


class TextWriter:
    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels, value) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_num(value)}")

    def histogram(self, name: str, labels, h: Histogram) -> None:
        labels = tuple(labels)
        for bound, acc in h.cumulative():
            self.lines.append(f"{name}_bucket{_labels(labels + (('le', _num(bound)),))} {acc}")
        self.lines.append(f"{name}_sum{_labels(labels)} {_num(h.sum)}")
        self.lines.append(f"{name}_count{_labels(labels)} {h.count}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
