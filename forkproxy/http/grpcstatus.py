"""gRPC status codes, and how the proxy's own failures are said to a gRPC client.

Sans-IO, below both the HTTP/2 session (which refuses a malformed or too large request
before any exchange exists) and the worker's exchange (forkproxy/worker/grpc.py): each
answers a gRPC request's failure HTTP 200, trailers-only, with the same fields."""

from __future__ import annotations

# status codes (grpc/doc/statuscodes.md)
(OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS,
 PERMISSION_DENIED, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE,
 UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS, UNAUTHENTICATED) = range(17)

#: the proxy's own answers: its HTTP status -> the gRPC status that says the same
PROXY_CODES = {
    400: INTERNAL, 403: PERMISSION_DENIED, 408: DEADLINE_EXCEEDED, 413: RESOURCE_EXHAUSTED,
    414: RESOURCE_EXHAUSTED, 417: INTERNAL, 429: RESOURCE_EXHAUSTED, 431: RESOURCE_EXHAUSTED,
    500: INTERNAL, 501: UNIMPLEMENTED, 502: UNAVAILABLE, 503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}
#: the grpc-message of each (a 400's is the reason the proxy gives)
MESSAGES = {
    403: "forbidden", 408: "request body timed out", 413: "request too large",
    414: "request too large", 429: "rate limited", 431: "request headers too large",
    500: "internal error", 501: "not implemented", 502: "upstream unavailable",
    503: "no upstream available", 504: "upstream timed out",
}
#: what a gRPC client makes of a non-200 HTTP status without grpc-status
#: (grpc/doc/http-grpc-status-mapping.md); any other: UNKNOWN
HTTP_CODES = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: UNIMPLEMENTED,
              429: UNAVAILABLE, 502: UNAVAILABLE, 503: UNAVAILABLE, 504: UNAVAILABLE}

#: grpc-message bytes sent as they are (gRPC percent-encodes the rest, and '%')
_PLAIN = frozenset(range(0x20, 0x7f)) - {0x25}


def percent_encode(message: str) -> bytes:
    """A grpc-message value: UTF-8, bytes outside printable ASCII and '%' as %XX."""
    return b"".join([bytes((b,)) if b in _PLAIN else b"%%%02X" % b
                     for b in message.encode("utf-8")])


def proxy_answer(content_type: bytes, status: int, detail: str
                 ) -> tuple[int, list[tuple[bytes, bytes]]]:
    """The gRPC code and the trailers-only fields that say the proxy's failure
    ``status`` (0: the request's grpc-timeout passed) to a gRPC client."""
    if not status:
        code, message = DEADLINE_EXCEEDED, "deadline exceeded (grpc-timeout)"
    else:
        code = PROXY_CODES.get(status, UNKNOWN)
        message = detail if status == 400 else MESSAGES.get(status, f"HTTP {status}")
    return code, [(b"content-type", content_type), (b"grpc-status", b"%d" % code),
                  (b"grpc-message", percent_encode("forkproxy: " + message))]
