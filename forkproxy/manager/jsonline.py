"""The ``json`` access log line of a request context: its phases in milliseconds, its
fields (JsonLine) and the lines of a batch, encoded by msgspec.

Split from accesslog.py and compiled (setup.py's COMPILED; jsonline.pxd gives the C
types: the timestamps are C doubles and the rounding to the microsecond is C arithmetic,
the same IEEE operations as Python's). As plain Python the same code runs. A line is the
same bytes either way (tests/test_accesslog*.py, tests/test_manager_aggregation.py).
"""

from __future__ import annotations

import time

import msgspec
from msgspec.structs import astuple

from forkproxy.context import N_TIMES, T_ACCEPT, T_END, T_HEADERS, RequestContext, padded_times

_json = msgspec.json.Encoder()

#: RequestContext's field positions (in ``msgspec.structs.astuple``)
(_TS, _REQUEST_ID, _WORKER, _LISTENER, _REMOTE, _METHOD, _PATH, _STATUS, _BYTES_IN,
 _BYTES_OUT, _UPSTREAM, _UPSTREAM_ADDR, _REUSED, _TLS_RESUMED, _TLS_VERSION, _TIMES, _ERROR,
 _PROTOCOL, _STREAM, _TRACE_ID, _SPAN_ID, _GRPC_STATUS) = (
    RequestContext.__struct_fields__.index(name) for name in (
        "ts", "request_id", "worker", "listener", "remote", "method", "path", "status",
        "bytes_in", "bytes_out", "upstream", "upstream_addr", "reused", "tls_resumed",
        "tls_version", "times", "error", "protocol", "stream", "trace_id", "span_id",
        "grpc_status"))


class _Clock:
    """ISO 8601 UTC timestamps with milliseconds; the seconds part is cached."""

    __slots__ = ("sec", "prefix")

    def __init__(self):
        self.sec = -1
        self.prefix = ""

    def iso(self, ts: float) -> str:
        sec = int(ts)
        if sec != self.sec:
            self.sec = sec
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        ms = int((ts - sec) * 1000)
        return f"{self.prefix}.{ms:03d}Z"


_clock = _Clock()


class JsonLine(msgspec.Struct, gc=False, omit_defaults=True):
    """The fields of a ``json`` access log line, in this order (``stream`` only for
    HTTP/2 requests)."""

    ts: str
    request_id: str
    remote: str
    method: str
    path: str
    status: int
    bytes_out: int
    upstream: str
    upstream_addr: str
    duration_ms: float
    phases: dict[str, float]
    tls_resumed: bool | None
    worker: int
    listener: str
    bytes_in: int
    upstream_reused: bool
    tls_version: str
    error: str
    #: W3C trace context ids in hex ("" when the request had no trace)
    trace_id: str
    span_id: str
    protocol: str
    stream: int | None = None
    #: gRPC requests only: the method (the path, /package.Service/Method) and status
    grpc_method: str = ""
    grpc_status: int | None = None


def phases_ms(ctx: RequestContext) -> dict[str, float]:
    """Milliseconds (rounded to the microsecond) per phase that happened, in PHASES order.

    What the access log shows: it runs for every logged request, hence written out (the
    same conditions as metrics.phases; a test holds the two together). ``us / 1000.0``
    is the same division as Python's ``us / 1000`` for any us below 2**53, and compiled
    it stays C arithmetic.
    """
    t = ctx.times
    ta, tt, th, tcs, tc, tsent, tfb, te = t if len(t) == N_TIMES else padded_times(t)
    ms = {}
    if ta:
        if th and th >= ta:
            us = int((th - ta) * 1e6 + 0.5)
            ms["accept_to_headers"] = us / 1000.0
        if tt and tt >= ta:
            us = int((tt - ta) * 1e6 + 0.5)
            ms["tls_handshake"] = us / 1000.0
    if tcs and tc and tc >= tcs:
        us = int((tc - tcs) * 1e6 + 0.5)
        ms["upstream_connect"] = us / 1000.0
    if tc and tsent and tsent >= tc:
        us = int((tsent - tc) * 1e6 + 0.5)
        ms["request_send"] = us / 1000.0
    if tsent and tfb and tfb >= tsent:
        us = int((tfb - tsent) * 1e6 + 0.5)
        ms["upstream_first_byte"] = us / 1000.0
    if tfb and te and te >= tfb:
        us = int((te - tfb) * 1e6 + 0.5)
        ms["response_body"] = us / 1000.0
    return ms


def json_record(ctx: RequestContext, ms: dict[str, float]) -> JsonLine:
    """The line's fields; ``ms``: the phases in ms. Runs for every logged request, hence
    the timestamp and duration written out here (as :meth:`_Clock.iso` and
    metrics.request_duration, which a test holds it to). The context's fields are read
    from one ``astuple``: compiled, 24 attribute lookups cost more than the tuple."""
    f = astuple(ctx)
    ts = f[_TS]
    sec = int(ts)
    clock = _clock
    if sec != clock.sec:
        clock.iso(ts)
    frac = int((ts - sec) * 1000)
    t = f[_TIMES]
    if len(t) != N_TIMES:
        t = padded_times(t)
    end = t[T_END]
    start = t[T_HEADERS] or t[T_ACCEPT]
    d = end - start if end and start and end >= start else 0.0
    us = int(d * 1e6 + 0.5)
    grpc_status = f[_GRPC_STATUS]
    return JsonLine(
        f"{clock.prefix}.{frac:03d}Z", f[_REQUEST_ID], f[_REMOTE], f[_METHOD], f[_PATH],
        f[_STATUS], f[_BYTES_OUT], f[_UPSTREAM], f[_UPSTREAM_ADDR], us / 1000.0, ms,
        f[_TLS_RESUMED], f[_WORKER], f[_LISTENER], f[_BYTES_IN], f[_REUSED],
        f[_TLS_VERSION], f[_ERROR], f[_TRACE_ID].hex(), f[_SPAN_ID].hex(), f[_PROTOCOL],
        f[_STREAM] or None, f[_PATH] if grpc_status is not None else "", grpc_status)


def json_line(ctx: RequestContext, ms: dict[str, float]) -> bytes:
    """One JSON access log line (with the trailing newline); ``ms``: phases in ms."""
    return _json.encode(json_record(ctx, ms)) + b"\n"


def json_lines(entries: list[tuple[RequestContext, dict[str, float]]]) -> bytes:
    """Many JSON lines in one encoder call."""
    return _json.encode_lines([json_record(c, ms) for c, ms in entries])


def json_batch(items: list) -> tuple[bytes, int]:
    """The lines of the request contexts in a batch of ring records, and their number."""
    lines = []
    for c in items:
        if type(c) is RequestContext:
            lines.append(json_record(c, phases_ms(c)))
    return _json.encode_lines(lines), len(lines)
