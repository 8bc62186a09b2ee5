"""What a worker's connections share: limits, timeouts, upstreams, routes, buffers, the
ring, and the listener each connection came in on. One thread, no locks."""

from __future__ import annotations

import mmap
import os

from forkproxy.config import config_dir
from forkproxy.context import encoder
from forkproxy.http.ids import IdGenerator, RequestIds
from forkproxy.http.request import Limits
from forkproxy.http.tracecontext import ratio_threshold
from forkproxy.http2.limits import Http2Limits
from forkproxy.osutil import lazy_buffer
from forkproxy.shm.limitzone import ClientLimits
from forkproxy.worker.heldsends import HeldSends
from forkproxy.worker.router import Router
from forkproxy.worker.splice import PipePool
from forkproxy.worker.upstream import build_upstreams

#: relay buffers kept for reuse: at most POOLED_BUFFERS_MAX (the peak of responses in
#: flight), down to POOLED_BUFFERS_IDLE once the load fell (WorkerState.trim_buffers)
POOLED_BUFFERS_MAX = 1024
POOLED_BUFFERS_IDLE = 64


class ListenerRuntime:
    """What a connection needs to know about the listener it came in on."""

    __slots__ = ("name", "default_upstream", "scheme", "host_fallback", "tls_context",
                 "proxy_protocol", "h2c")

    def __init__(self, name: str, default_upstream, scheme: bytes, tls_context=None,
                 proxy_protocol: bool = False, h2c: bool = False):
        self.name = name
        self.default_upstream = default_upstream
        self.scheme = scheme
        self.host_fallback = name.encode()
        self.tls_context = tls_context
        self.proxy_protocol = proxy_protocol
        #: a plain listener that accepts HTTP/2 with prior knowledge next to HTTP/1.1
        self.h2c = h2c


class WorkerState:
    """Per-worker state shared by all its connections (no locks: one thread)."""

    def __init__(self, spec, hub=None, unpark=None):
        cfg = spec.cfg
        srv = cfg.server
        self.spec = spec
        self.pid = os.getpid()
        self.hub = hub  # the gevent hub (the read watchers are made on its loop)
        self.unpark = unpark  # libev callback: a parked connection became readable
        #: upstream request heads held until the loop turn ends (none without a hub)
        self.held_sends = HeldSends(hub.loop if hub is not None else None)
        self.limits = Limits(srv.max_request_line, srv.max_header_size, srv.max_header_count,
                             srv.max_headers_total, srv.max_body_size)
        self.keepalive_timeout = srv.keepalive_timeout
        self.header_timeout = srv.client_header_timeout
        self.body_timeout = srv.client_body_timeout
        self.send_timeout = srv.send_timeout
        self.buffer_size = srv.buffer_size
        self.upstreams = build_upstreams(cfg.upstream, spec.health, spec.resolved,
                                         config_dir(cfg))
        self.router = Router(cfg.route, self.upstreams)
        self.rbuf = lazy_buffer(65536)  # resident as far as reads fill it
        self.rview = memoryview(self.rbuf)
        self._buffers: list[mmap.mmap] = []
        #: the HTTP/2 streams' exchange buffers (forkproxy/worker/h2stream.py), made by
        #: the worker's first HTTP/2 connection
        self.stream_buffers = None
        self.draining = False
        self.connections: set = set()  # front ends with a deadline (swept) and a drain
        #: HTTP/2 streams being served: front ends with a deadline, swept like connections
        self.streams: set = set()
        h2 = cfg.http2
        self.h2limits = Http2Limits(
            h2.max_concurrent_streams, h2.initial_window_size, h2.max_frame_size,
            h2.max_header_list_size, h2.header_table_size, h2.max_continuations,
            h2.reset_burst, h2.reset_rate, h2.control_frame_burst, h2.control_frame_rate,
            send_buffer=h2.send_buffer)
        #: [http2] drain_timeout: between a drain's first and final GOAWAY
        self.h2_drain_timeout = h2.drain_timeout
        self.h2_connections = 0  # HTTP/2 client connections open
        #: running totals for the gauges record: connections by "listener protocol",
        #: HTTP/2 errors by reason
        self.client_conns: dict[str, int] = {}
        self.http2_errors: dict[str, int] = {}
        self.requests = 0
        self.stats_errors = 0
        #: X-Request-Id values (the C writer when http/ids.py is compiled)
        self.new_request_id = RequestIds().next
        #: trace and span ids (W3C trace context), and the head-sampling threshold of
        #: the traces this worker starts ([tracing] sample_ratio)
        self.ids = IdGenerator()
        self.trace_threshold = ratio_threshold(cfg.tracing.sample_ratio)
        self.ring = spec.ring
        #: the ring's push as one callable (the C push when shm/ringpush.py is compiled)
        self.push_record = spec.ring.pusher() if spec.ring is not None else None
        self.pipes = PipePool() if srv.splice else None
        self.encbuf = bytearray(512)  # the ring records are encoded into it
        self.client_limits = None
        if spec.limit_zone is not None:
            spec.limit_zone.bind(spec.index)
            self.client_limits = ClientLimits(spec.limit_zone, cfg.limits)

    def count_connection(self, listener: str, protocol: str) -> None:
        key = f"{listener} {protocol}"
        self.client_conns[key] = self.client_conns.get(key, 0) + 1

    def count_http2_errors(self, errors: dict[str, int]) -> None:
        """Add (and clear) an HTTP/2 session's error counts."""
        totals = self.http2_errors
        for reason, n in errors.items():
            totals[reason] = totals.get(reason, 0) + n
        errors.clear()

    def get_buffer(self) -> mmap.mmap:
        """A relay buffer of buffer_size: its pages are resident once a response has
        filled them, so tiny answers do not each pin buffer_size bytes in the pool."""
        return self._buffers.pop() if self._buffers else lazy_buffer(self.buffer_size)

    def put_buffer(self, buf: mmap.mmap) -> None:
        """Pool it, up to POOLED_BUFFERS_MAX: the pool grows to the peak of responses in
        flight, so a busy worker maps no buffer per request (an mmap, page faults and a
        munmap each: +8 µs/request at 1,000 connections), and a buffer costs only the
        pages responses filled. :meth:`trim_buffers` shrinks it after the load fell."""
        if len(self._buffers) < POOLED_BUFFERS_MAX:
            self._buffers.append(buf)

    def trim_buffers(self) -> None:
        """Unmap the pooled buffers beyond POOLED_BUFFERS_IDLE (called with the heap
        trim, once the connection count fell well below its peak)."""
        del self._buffers[POOLED_BUFFERS_IDLE:]

    def push(self, record) -> None:
        """Encode a record into the worker's ring (never blocks; the ring drops and
        counts when full). One reused buffer: no allocation per record."""
        buf = self.encbuf
        encoder.encode_into(record, buf)
        self.push_record(buf)
