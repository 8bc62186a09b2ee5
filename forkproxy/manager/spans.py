"""Spans from ring records: one SERVER span per request, a child span per phase that
happened (TLS handshake, request head, upstream connect, request send, waiting for the
first byte, response body), with the OpenTelemetry HTTP semantic-convention attributes,
as OTLP protobuf (the ``opentelemetry-proto`` classes; serialised by protobuf itself).

Timestamps: a record's times are the worker's monotonic clock and ``ts`` is the wall
clock at the response's end, so a time t is ``ts - (times[T_END] - t)`` in Unix time.

Cost: attributes that only depend on (listener, route, upstream, server, method, status,
scheme, protocol) are built once and copied (``extend``) into each span; what changes per
request (path, client, sizes, request id, ids and times) is set per span.
"""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from forkproxy import __version__
from forkproxy.context import (
    PHASES,
    T_ACCEPT,
    T_END,
    T_HEADERS,
    RequestContext,
)

SERVER = Span.SpanKind.SPAN_KIND_SERVER
INTERNAL = Span.SpanKind.SPAN_KIND_INTERNAL
ERROR = Status.StatusCode.STATUS_CODE_ERROR
#: the child spans, in the order they happen (tls_handshake lies inside request_head)
CHILDREN = (("tls_handshake", "tls_handshake"), ("request_head", "accept_to_headers"),
            ("upstream_connect", "upstream_connect"), ("request_send", "request_send"),
            ("upstream_first_byte", "upstream_first_byte"), ("response_body", "response_body"))
_CHILD_PLAN = tuple((span_name, *PHASES[phase]) for span_name, phase in CHILDREN)
_M64 = (1 << 64) - 1
#: attribute lists kept at most (cleared when full: labels are bounded by the config)
MAX_CACHED = 4096


def _kv(key: str, value) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


class SpanEncoder:
    """Turns batches of request contexts into ExportTraceServiceRequest bytes."""

    def __init__(self, service_name: str):
        self.resource = Resource(attributes=[
            _kv("service.name", service_name), _kv("service.version", __version__),
            _kv("telemetry.sdk.name", "forkproxy"), _kv("telemetry.sdk.language", "python")])
        self.scope = InstrumentationScope(name="forkproxy", version=__version__)
        self._common: dict[tuple, list[KeyValue]] = {}

    def encode(self, batch: list[RequestContext]) -> bytes:
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        rs.resource.CopyFrom(self.resource)
        ss = rs.scope_spans.add()
        ss.scope.CopyFrom(self.scope)
        spans = ss.spans
        for ctx in batch:
            self.add(spans, ctx)
        return req.SerializeToString()

    def common(self, ctx: RequestContext) -> list[KeyValue]:
        """The attributes shared by every request of the same shape."""
        scheme = "https" if ctx.tls_version else "http"
        key = (ctx.listener, ctx.route, ctx.upstream, ctx.upstream_addr, ctx.method,
               ctx.status, scheme, ctx.tls_version)
        attrs = self._common.get(key)
        if attrs is not None:
            return attrs
        host, port = _split_address(ctx.listener)
        attrs = [_kv("http.request.method", ctx.method), _kv("url.scheme", scheme),
                 _kv("server.address", host), _kv("server.port", port),
                 _kv("network.protocol.name", "http"), _kv("network.protocol.version", "1.1")]
        if ctx.status:
            attrs.append(_kv("http.response.status_code", ctx.status))
        if ctx.route:
            attrs.append(_kv("http.route", ctx.route.partition(" ")[2]))
            attrs.append(_kv("forkproxy.route", ctx.route))
        if ctx.upstream:
            attrs.append(_kv("forkproxy.upstream", ctx.upstream))
        if ctx.upstream_addr:
            up_host, up_port = _split_address(ctx.upstream_addr)
            attrs += [_kv("forkproxy.upstream.address", up_host),
                      _kv("forkproxy.upstream.port", up_port)]
        if ctx.tls_version:
            attrs.append(_kv("tls.protocol.version", ctx.tls_version.removeprefix("TLSv")))
        if ctx.status >= 500:
            attrs.append(_kv("error.type", str(ctx.status)))
        if len(self._common) >= MAX_CACHED:
            self._common.clear()
        self._common[key] = attrs
        return attrs

    def add(self, spans, ctx: RequestContext) -> None:
        """The server span of one request and a child span per phase that happened."""
        t = ctx.times
        end = t[T_END]
        start = t[T_ACCEPT] or t[T_HEADERS] or end
        offset = ctx.ts - end  # wall clock minus the worker's monotonic clock
        trace_id = ctx.trace_id
        span_id = ctx.span_id
        name = ctx.method
        if ctx.route:
            name = f"{name} {ctx.route.partition(' ')[2]}"
        s = spans.add(trace_id=trace_id, span_id=span_id, name=name, kind=SERVER,
                      start_time_unix_nano=int((start + offset) * 1e9),
                      end_time_unix_nano=int(ctx.ts * 1e9))
        if ctx.parent_span_id:
            s.parent_span_id = ctx.parent_span_id
        if ctx.tracestate:
            s.trace_state = ctx.tracestate
        a = s.attributes
        a.extend(self.common(ctx))
        a.add(key="url.path", value=AnyValue(string_value=ctx.path))
        a.add(key="client.address", value=AnyValue(string_value=ctx.remote))
        a.add(key="forkproxy.request_id", value=AnyValue(string_value=ctx.request_id))
        if ctx.upstream_addr:
            a.add(key="forkproxy.upstream.connection_reused",
                  value=AnyValue(bool_value=ctx.reused))
        if ctx.retries:
            a.add(key="http.request.resend_count", value=AnyValue(int_value=ctx.retries))
        if ctx.bytes_out:
            a.add(key="http.response.body.size", value=AnyValue(int_value=ctx.bytes_out))
        if ctx.bytes_in:
            a.add(key="http.request.body.size", value=AnyValue(int_value=ctx.bytes_in))
        if ctx.tls_resumed is not None:
            a.add(key="tls.resumed", value=AnyValue(bool_value=ctx.tls_resumed))
        if ctx.status >= 500 or ctx.error:
            s.status.code = ERROR
            if ctx.error:
                s.status.message = ctx.error
                if ctx.status < 500:
                    a.add(key="error.type", value=AnyValue(string_value=ctx.error))
        base = int.from_bytes(span_id, "big")
        for i, (child, a_idx, b_idx) in enumerate(_CHILD_PLAN, 1):
            ta = t[a_idx]
            tb = t[b_idx]
            if ta and tb and tb >= ta:
                spans.add(trace_id=trace_id, span_id=((base + i) & _M64 or i).to_bytes(8, "big"),
                          parent_span_id=span_id, name=child, kind=INTERNAL,
                          start_time_unix_nano=int((ta + offset) * 1e9),
                          end_time_unix_nano=int((tb + offset) * 1e9))
