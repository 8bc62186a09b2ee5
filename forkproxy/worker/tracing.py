"""The worker's part of W3C Trace Context: give each forwarded request forkproxy's span.

Once per request, on the hot path: no system call (ids from the worker's IdGenerator),
one regex match when the client sent a traceparent, one header line more upstream. The
spans themselves are built by the manager from the ring record (trace_id, span_id,
parent_span_id, trace_flags, tracestate).
"""

from __future__ import annotations

from forkproxy.http.tracecontext import format_traceparent, parse_traceparent, parse_tracestate


def start_span(req, ws) -> bytes:
    """Continue the client's trace (a valid traceparent) or start one, with a new span
    for forkproxy (``req.trace``, for the ring record); returns the header lines that
    carry it upstream (our span as the parent of the upstream's). A tracestate goes on
    unchanged when valid, and is dropped when invalid or when there is no valid
    traceparent to go with it."""
    tp = req.traceparent
    if tp:
        parsed = parse_traceparent(tp)
        if parsed is not None:
            return _continue_trace(req, ws, parsed)
    req.trace, line = ws.ids.new_trace(ws.trace_threshold)
    return line


def _continue_trace(req, ws, parsed: tuple[bytes, bytes, int]) -> bytes:
    trace_id, parent, flags = parsed
    span_id = ws.ids.span_id()
    line = b"traceparent: %s\r\n" % format_traceparent(trace_id, span_id, flags)
    state = req.tracestate
    if state:
        state = parse_tracestate([state])
        if state:
            req.trace = (trace_id, span_id, parent, flags, state)
            return line + b"tracestate: %s\r\n" % state.encode()
    req.trace = (trace_id, span_id, parent, flags, "")
    return line
