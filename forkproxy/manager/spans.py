"""Spans from ring records: one SERVER span per request, a child span per phase that
happened (TLS handshake, request head, upstream connect, request send, waiting for the
first byte, response body), with the OpenTelemetry HTTP semantic-convention attributes,
as OTLP protobuf (the ``opentelemetry-proto`` classes; serialised by protobuf itself).

Timestamps: a record's times are the worker's monotonic clock and ``ts`` is the wall
clock at the response's end, so a time t is ``ts - (times[T_END] - t)`` in Unix time.

Cost: a request's spans are written from a template of its shape (spantemplate.py: the
protobuf classes' bytes, serialised once per shape, with the request's ids and times
packed in) followed by its cached path, client and size attributes. :meth:`SpanEncoder.add`
builds them with the protobuf classes instead: for shapes without a template, and as the
reference the templates are tested against.
"""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from forkproxy import __version__
from forkproxy.context import (
    N_TIMES,
    PHASES,
    T_ACCEPT,
    T_END,
    T_HEADERS,
    RequestContext,
)
from forkproxy.manager.rawspans import RawFiller
from forkproxy.manager.spanfill import COMPILED, MAX_BODY, shape_key
from forkproxy.manager.spantemplate import Templates, child_span_id, field_tag

SERVER = Span.SpanKind.SPAN_KIND_SERVER
INTERNAL = Span.SpanKind.SPAN_KIND_INTERNAL
ERROR = Status.StatusCode.STATUS_CODE_ERROR
#: the child spans, in the order they happen (tls_handshake lies inside request_head)
CHILDREN = (("tls_handshake", "tls_handshake"), ("request_head", "accept_to_headers"),
            ("upstream_connect", "upstream_connect"), ("request_send", "request_send"),
            ("upstream_first_byte", "upstream_first_byte"), ("response_body", "response_body"))
_CHILD_PLAN = tuple((span_name, *PHASES[phase]) for span_name, phase in CHILDREN)
RESOURCE_SPANS_TAG = field_tag(ExportTraceServiceRequest, "resource_spans")
SCOPE_SPANS_TAG = field_tag(ResourceSpans, "scope_spans")
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

    def __init__(self, service_name: str, compiled: bool = COMPILED):
        self.resource = Resource(attributes=[
            _kv("service.name", service_name), _kv("service.version", __version__),
            _kv("telemetry.sdk.name", "forkproxy"), _kv("telemetry.sdk.language", "python")])
        self.scope = InstrumentationScope(name="forkproxy", version=__version__)
        self.resource_field = ResourceSpans(resource=self.resource).SerializeToString()
        self.scope_field = ScopeSpans(scope=self.scope).SerializeToString()
        self._shapes: dict[tuple, bytes] = {}
        self._children = {name: Span(name=name, kind=INTERNAL).SerializeToString()
                          for name, _ in CHILDREN}
        self.templates = Templates(self.spans_for)
        self.value = self.templates.value
        self.filler = RawFiller(self.templates) if compiled else None
        #: requests encoded by the struct fill and by the slow builder (tests,
        #: scripts/tracecost; the compiled fill counts its own: ``fast``)
        self._fast = self.slow = 0
        #: the open export request: its requests (``count``: the fill's when there is
        #: one), and its spans written outside the compiled fill's buffer (the struct
        #: fill's and the slow builder's)
        self._count = 0
        self.pieces: list[bytes] = []

    @property
    def count(self) -> int:
        """Requests in the open export request."""
        return self.filler.count if self.filler is not None else self._count

    @count.setter
    def count(self, n: int) -> None:
        if self.filler is not None:
            self.filler.count = n
        else:
            self._count = n

    def encode(self, batch: list[RequestContext]) -> bytes:
        """One export request: the spans of every request in ``batch`` (with no batch
        open: append and finish)."""
        self.append(batch)
        body = self.finish()
        data = bytes(body)
        self.recycle(body)
        return data

    def append(self, batch: list[RequestContext]) -> None:
        """Writes the spans of the requests in ``batch`` into the open export request."""
        slow = self.encode_fast(batch, self.pieces)
        self.slow += len(slow)
        if slow:
            ss = ScopeSpans()  # serialised without its scope: the spans' entries only
            for ctx in slow:
                self.add(ss.spans, ctx)
            data = ss.SerializeToString()
            if self.filler is not None:
                self.filler.add(data)
            else:
                self.pieces.append(data)
        self.count += len(batch)

    def finish(self) -> bytes | memoryview:
        """The open export request's bytes (compiled: a view of the fill's buffer, to
        give back with recycle once sent); the next one starts empty."""
        # ExportTraceServiceRequest{resource_spans: [{resource, scope_spans: [{scope,
        # spans}]}]}: the lengths of the two enclosing messages before the spans
        pieces = self.pieces
        filler = self.filler
        varint = self.templates.varint
        ss_len = len(self.scope_field) + (filler.written() if filler is not None
                                          else sum(map(len, pieces)))
        ss_head = SCOPE_SPANS_TAG + varint(ss_len)
        rs_len = len(self.resource_field) + len(ss_head) + ss_len
        prefix = b"".join((RESOURCE_SPANS_TAG, varint(rs_len), self.resource_field, ss_head,
                           self.scope_field))
        self.count = 0
        if filler is not None:
            return filler.take(prefix)
        self.pieces = []
        return b"".join((prefix, *pieces))

    def recycle(self, body: bytes | memoryview) -> None:
        """Gives finish()'s buffer back once its bytes were sent."""
        if self.filler is not None and type(body) is memoryview:
            self.filler.recycle(body)

    def discard(self) -> int:
        """Drops the open export request; returns how many requests it held."""
        n = self.count
        if self.filler is not None:
            self.filler.discard()
        self.pieces = []
        self.count = 0
        return n

    @property
    def fast(self) -> int:
        """Requests encoded from a template."""
        return self._fast + (self.filler.fast if self.filler is not None else 0)

    def encode_slow(self, batch: list[RequestContext]) -> bytes:
        """``encode`` with the protobuf classes only (the reference for tests)."""
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        rs.resource.CopyFrom(self.resource)
        ss = rs.scope_spans.add()
        ss.scope.CopyFrom(self.scope)
        for ctx in batch:
            self.add(ss.spans, ctx)
        return req.SerializeToString()

    def encode_fast(self, batch: list[RequestContext], out: list[bytes]) -> list:
        """Appends the serialised spans of the requests that have a template to ``out``;
        returns the others. The compiled fill (spanfill.Filler) when this is the compiled
        build, the generated ``struct`` fill otherwise (``compiled`` chooses in tests)."""
        if self.filler is not None:
            slow: list = []
            self.filler.encode_fast(batch, slow)  # into its own buffer (see finish)
            return slow
        return self.encode_packed(batch, out)

    def encode_packed(self, batch: list[RequestContext], out: list[bytes]) -> list:
        """encode_fast's pure-Python way. Per request: the shape's key, one template fill
        (generated code, one struct.pack call), the cached variable attributes."""
        tpls = self.templates
        templates = tpls.templates
        make = tpls.make
        paths, clients, sizes, varints = tpls.paths, tpls.clients, tpls.sizes, tpls.varints
        miss = tpls.miss
        from_bytes = int.from_bytes
        append = out.append
        slow = []
        for ctx in batch:
            times = ctx.times
            if len(times) != N_TIMES:  # never from this version's workers
                slow.append(ctx)
                continue
            t0, t1, t2, t3, t4, t5, t6, t7 = times
            sid = ctx.span_id
            key = shape_key(ctx, times)
            tpl = templates.get(key)
            if tpl is None:
                tpl = make(ctx, key)
            base = from_bytes(sid, "little")
            if not tpl or base < 8:  # base < 8: a child id would be 0 (base ^ i)
                slow.append(ctx)
                continue
            # the variable attributes, serialised (cached by value)
            path = ctx.path
            remote = ctx.remote
            extra = (paths.get(path) or tpls.path_miss(path)) + (
                clients.get(remote) or miss(clients, "client.address", remote))
            size = ctx.bytes_out
            if size:
                extra += sizes.get(size) or miss(sizes, "http.response.body.size", size)
            size = ctx.bytes_in
            if size:
                extra += (sizes.get(-size) or
                          miss(sizes, "http.request.body.size", size, -size))
            if ctx.tracestate:
                extra += tpls.value(None, ctx.tracestate)
            n = tpl.body_len + len(extra)
            if n >= MAX_BODY:  # more than the template's 2-byte varint holds
                slow.append(ctx)
                continue
            append(tpl.fill(ctx, t0, t1, t2, t3, t4, t5, t6, t7, base,
                            varints.get(n) or tpls.varint(n)))
            append(extra)
        self._fast += len(batch) - len(slow)
        return slow

    def shape(self, ctx: RequestContext) -> bytes:
        """The serialised name, kind, status and attributes shared by every request of
        the same shape."""
        key = (ctx.listener, ctx.route, ctx.upstream, ctx.upstream_addr, ctx.method,
               ctx.status, ctx.error, ctx.tls_version, ctx.tls_resumed, ctx.reused,
               ctx.retries, ctx.protocol)
        data = self._shapes.get(key)
        if data is not None:
            return data
        scheme = "https" if ctx.tls_version else "http"
        host, port = _split_address(ctx.listener)
        attrs = [_kv("http.request.method", ctx.method), _kv("url.scheme", scheme),
                 _kv("server.address", host), _kv("server.port", port),
                 _kv("network.protocol.name", "http"),
                 _kv("network.protocol.version", "2" if ctx.protocol == "HTTP/2" else "1.1")]
        if ctx.status:
            attrs.append(_kv("http.response.status_code", ctx.status))
        name = ctx.method
        if ctx.route:
            name = f"{name} {ctx.route.partition(' ')[2]}"
            attrs.append(_kv("http.route", ctx.route.partition(" ")[2]))
            attrs.append(_kv("forkproxy.route", ctx.route))
        if ctx.upstream:
            attrs.append(_kv("forkproxy.upstream", ctx.upstream))
        if ctx.upstream_addr:
            up_host, up_port = _split_address(ctx.upstream_addr)
            attrs += [_kv("forkproxy.upstream.address", up_host),
                      _kv("forkproxy.upstream.port", up_port),
                      _kv("forkproxy.upstream.connection_reused", ctx.reused)]
        if ctx.retries:
            attrs.append(_kv("http.request.resend_count", ctx.retries))
        if ctx.tls_version:
            attrs.append(_kv("tls.protocol.version", ctx.tls_version.removeprefix("TLSv")))
        if ctx.tls_resumed is not None:
            attrs.append(_kv("tls.resumed", ctx.tls_resumed))
        span = Span(name=name, kind=SERVER, attributes=attrs)
        if ctx.status >= 500 or ctx.error:
            span.status.code = ERROR
            span.status.message = ctx.error
            span.attributes.append(_kv("error.type", str(ctx.status) if ctx.status >= 500
                                       else ctx.error))
        data = span.SerializeToString()
        if len(self._shapes) >= MAX_CACHED:
            self._shapes.clear()
        self._shapes[key] = data
        return data

    def spans_for(self, ctx: RequestContext, vals: dict) -> tuple[Span, list[Span]]:
        """ctx's server span and phase spans with the ids and times in ``vals`` (the
        templates' slots: spantemplate.SLOT_FORMATS)."""
        tid, sid = vals["tid"], vals["sid"]
        server = Span(trace_id=tid, span_id=sid, start_time_unix_nano=vals["start"],
                      end_time_unix_nano=vals["end"])
        if ctx.parent_span_id:
            server.parent_span_id = vals["psid"]
        server.MergeFromString(self.shape(ctx))
        t = ctx.times
        children = []
        for i, (child, a_idx, b_idx) in enumerate(_CHILD_PLAN, 1):
            ta = t[a_idx]
            tb = t[b_idx]
            if ta and tb and tb >= ta:
                span = Span(trace_id=tid, span_id=vals[f"c{i}"].to_bytes(8, "little"),
                            parent_span_id=sid, start_time_unix_nano=vals[f"n{a_idx}"],
                            end_time_unix_nano=vals[f"n{b_idx}"])
                span.MergeFromString(self._children[child])
                children.append(span)
        return server, children

    def add(self, spans, ctx: RequestContext) -> None:
        """The server span of one request and a child span per phase that happened,
        built with the protobuf classes."""
        t = ctx.times
        if len(t) != N_TIMES:  # a phase without its time did not happen
            t = (list(t) + [0.0] * N_TIMES)[:N_TIMES]
        end = t[T_END]
        start = t[T_ACCEPT] or t[T_HEADERS] or end
        # wall clock minus the worker's monotonic clock; the server span ends as its
        # response_body span does (``ts`` itself may round to another nanosecond)
        offset = ctx.ts - end
        trace_id = ctx.trace_id
        span_id = ctx.span_id
        s = spans.add(trace_id=trace_id, span_id=span_id,
                      start_time_unix_nano=int((start + offset) * 1e9),
                      end_time_unix_nano=int((end + offset) * 1e9))
        if ctx.parent_span_id:
            s.parent_span_id = ctx.parent_span_id
        if ctx.tracestate:
            s.trace_state = ctx.tracestate
        merge = s.MergeFromString
        value = self.value
        merge(self.shape(ctx))
        merge(self.templates.path(ctx.path))
        merge(value("client.address", ctx.remote))
        if ctx.bytes_out:
            merge(value("http.response.body.size", ctx.bytes_out))
        if ctx.bytes_in:
            merge(value("http.request.body.size", ctx.bytes_in))
        children = self._children
        for i, (child, a_idx, b_idx) in enumerate(_CHILD_PLAN, 1):
            ta = t[a_idx]
            tb = t[b_idx]
            if ta and tb and tb >= ta:
                spans.add(trace_id=trace_id, span_id=child_span_id(span_id, i),
                          parent_span_id=span_id, start_time_unix_nano=int((ta + offset) * 1e9),
                          end_time_unix_nano=int((tb + offset) * 1e9)).MergeFromString(
                              children[child])
