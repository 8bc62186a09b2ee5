"""The request context a worker leaves for every request.

Encoded with msgspec as a msgpack array (array_like: field names are not repeated in
every record) into the worker's shared-memory ring; decoded by the collector, which
derives the access log line and the metrics from it. Times are monotonic seconds taken
in the worker; 0.0 means "that phase did not happen" (no TLS, pooled connection, ...).
"""

from __future__ import annotations

import msgspec

#: index of each timestamp in RequestContext.times
T_ACCEPT, T_TLS, T_HEADERS, T_CONNECT_START, T_CONNECTED, T_SENT, T_FIRST_BYTE, T_END = range(8)
N_TIMES = 8

#: phase name -> (start index, end index); the phases CONTRACT.md names
PHASES = {
    "accept_to_headers": (T_ACCEPT, T_HEADERS),
    "tls_handshake": (T_ACCEPT, T_TLS),
    "upstream_connect": (T_CONNECT_START, T_CONNECTED),
    "request_send": (T_CONNECTED, T_SENT),
    "upstream_first_byte": (T_SENT, T_FIRST_BYTE),
    "response_body": (T_FIRST_BYTE, T_END),
}


class RequestContext(msgspec.Struct, array_like=True, gc=False):
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


encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(RequestContext)


def phase_durations(ctx: RequestContext) -> dict[str, float]:
    """Seconds per phase that happened on this request."""
    t = ctx.times
    out = {}
    for name, (a, b) in PHASES.items():
        if t[a] and t[b] and t[b] >= t[a]:
            out[name] = t[b] - t[a]
    return out
