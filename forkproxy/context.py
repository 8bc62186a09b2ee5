"""The records a worker leaves in its ring: one request context per request, and a
periodic gauges record.

Encoded with msgspec as msgpack arrays (array_like: field names are not repeated in
every record) into the worker's shared-memory ring; decoded by the collector, which
derives the access log line and the metrics from them. The two record types form a
tagged union: the first array element is the tag (1 = request, 2 = gauges), so one
:data:`decoder` reads both. Times in a request context are monotonic seconds taken in
the worker; 0.0 means "that phase did not happen" (no TLS, pooled connection, ...).

Compatibility: fields are positional. Never reorder or remove one; add new ones at the
end with a default.
"""

from __future__ import annotations

import msgspec

#: index of each timestamp in RequestContext.times
T_ACCEPT, T_TLS, T_HEADERS, T_CONNECT_START, T_CONNECTED, T_SENT, T_FIRST_BYTE, T_END = range(8)
N_TIMES = 8

#: phase name -> (start index, end index); the phases docs/OPERATIONS.md names
PHASES = {
    "accept_to_headers": (T_ACCEPT, T_HEADERS),
    "tls_handshake": (T_ACCEPT, T_TLS),
    "upstream_connect": (T_CONNECT_START, T_CONNECTED),
    "request_send": (T_CONNECTED, T_SENT),
    "upstream_first_byte": (T_SENT, T_FIRST_BYTE),
    "response_body": (T_FIRST_BYTE, T_END),
}


class RequestContext(msgspec.Struct, array_like=True, gc=False, tag=1):
    ts: float  # wall-clock time the response completed
    request_id: str
    worker: int  # worker pid
    listener: str
    remote: str
    method: str
    path: str
    status: int
    bytes_in: int
    bytes_out: int
    upstream: str
    upstream_addr: str
    reused: bool  # upstream connection came from the pool
    tls_resumed: bool | None  # None on plain-text listeners
    tls_version: str
    times: list[float]
    error: str = ""
    #: why the proxy refused the request itself ("" = it did not): the reason label of
    #: forkproxy_rejected_total (framing, headers_too_large, header_timeout, rate_limited, ...)
    reject: str = ""
    #: tries on another server after a failed one (forkproxy_upstream_retries_total);
    #: reconnecting after a stale pooled connection is not counted
    retries: int = 0
    #: the request became a tunnel (Connection: Upgrade, e.g. WebSocket); bytes_in and
    #: bytes_out are the tunnel's bytes each way, the times end when the tunnel closed
    tunnel: bool = False
    #: the client's protocol, as the access log shows it ("HTTP/1.1", "HTTP/2")
    protocol: str = "HTTP/1.1"
    #: the HTTP/2 stream id (0 for HTTP/1.1)
    stream: int = 0
    #: the route that matched, "HOST PATH_PREFIX" as configured ("" = none did: the
    #: listener's default upstream); the critical-path report groups by it
    route: str = ""
    #: W3C trace context (forkproxy/http/tracecontext.py). trace_id (16 bytes) and span_id
    #: (8 bytes: forkproxy's span, the parent of the upstream's) are b"" when the request
    #: carried no trace and none was started (a request refused before routing)
    trace_id: bytes = b""
    span_id: bytes = b""
    #: the client's span (from its traceparent); b"" when forkproxy started the trace
    parent_span_id: bytes = b""
    #: trace-flags; bit 0 (sampled) is the caller's decision, or the worker's head sampling
    trace_flags: int = 0
    #: the client's tracestate, passed on unchanged ("" = none)
    tracestate: str = ""
    #: the gRPC status of a gRPC request (content-type application/grpc...; its method is
    #: the path): from the response's trailers or trailers-only head, or the proxy's own
    #: answer (forkproxy/worker/grpc.py). None: not a gRPC request
    grpc_status: int | None = None


#: configured weights are multiplied by this in the balancer (worker/balancer.py): slow
#: start lowers eff_weight smoothly with integers. It lives here because the gauges
#: carry eff_weight, and the manager divides by it to show a weight.
WEIGHT_SCALE = 100


class UpstreamGauge(msgspec.Struct, array_like=True, gc=False):
    """One upstream server's connection pool in one worker, at the time of the record."""

    upstream: str
    server: str  # "HOST:PORT" as configured
    active: int  # connections lent to an exchange right now
    idle: int  # connections waiting in the keep-alive pool
    #: this worker's view: "up", "down" (active check), "ejected" (passive), "slow_start"
    state: str = ""
    eff_weight: int = 0  # effective weight now (configured weight x WEIGHT_SCALE when ramped up)
    connects: int = 0  # connections opened (counters: since the worker started)
    reuses: int = 0  # requests sent on a pooled connection
    failures: int = 0  # failed tries (connect, reset, timeout, retried status)
    ejections: int = 0  # passive health ejections
    retries: int = 0  # requests retried on another server after failing on this one
    waiting: int = 0  # requests queued for a connection (max_connections reached)
    tunnels: int = 0  # upgraded connections (WebSocket) open now
    tls_full: int = 0  # TLS handshakes to the server in full (counters: since the worker started)
    tls_resumed: int = 0  # TLS handshakes that resumed a session


class WorkerGauges(msgspec.Struct, array_like=True, gc=False, tag=2):
    """Point-in-time values of one worker, pushed about once a second (not per request).

    Built by :func:`forkproxy.worker.profiling.gauges`. The collector keeps the latest
    record per worker pid and forgets it once the worker leaves the worker table.
    """

    worker: int  # worker pid
    mono: float  # time.monotonic() when taken
    greenlets: int  # greenlets alive, -1 when not counted (counting costs a gc walk)
    connections: int  # client connections open
    upstreams: list[UpstreamGauge] = msgspec.field(default_factory=list)
    #: counters since the worker started (the collector adds their increments):
    #: client connections by "listener protocol" (forkproxy_client_connections_total)
    client_connections: dict[str, int] = msgspec.field(default_factory=dict)
    #: HTTP/2 stream and connection errors by reason (forkproxy_http2_stream_errors_total)
    http2_errors: dict[str, int] = msgspec.field(default_factory=dict)
    #: HTTP/2 client connections and streams open now (/status)
    http2_connections: int = 0
    http2_streams: int = 0


#: everything a worker may push into its ring
Record = RequestContext | WorkerGauges

encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Record)


def phase_durations(ctx: RequestContext) -> dict[str, float]:
    """Seconds per phase that happened on this request."""
    t = ctx.times
    out = {}
    for name, (a, b) in PHASES.items():
        if t[a] and t[b] and t[b] >= t[a]:
            out[name] = t[b] - t[a]
    return out


_ZEROS = (0.0,) * N_TIMES


def padded_times(times: list[float]) -> tuple[float, ...]:
    """N_TIMES timestamps from a record that has another number (padded or cut)."""
    return (*times, *_ZEROS)[:N_TIMES]
