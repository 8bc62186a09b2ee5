"""Trailer fields relayed across protocols (RFC 9110 section 6.5, RFC 9112 section 7.1.2,
RFC 9113 section 8.1).

A trailer section comes from an HTTP/1.1 chunked body (the response parser, or an
HTTP/1.1 client's request) or from an HTTP/2 HEADERS frame after the DATA. Either way it
is handed on as a list of ``(name, value)`` byte pairs with lower-case names, filtered
here: fields that must not be in a trailer section (framing, routing, connection
options, authentication, content handling: RFC 9110 section 6.5.1) and pseudo-header
fields are dropped, the rest pass. Values were checked for CR, LF, NUL and other
controls by the parser that read them. The whole section is bounded by
:data:`MAX_TRAILER_BYTES` (counted like an HTTP/1.1 head: name, value and 4 bytes per
field); a longer one is the sender's fault.
"""

from __future__ import annotations

from forkproxy.http.messages import HOP_BY_HOP

#: the largest trailer section read or relayed (bytes, as an HTTP/1.1 block)
MAX_TRAILER_BYTES = 16384

#: fields never relayed in a trailer section: hop-by-hop and framing (HOP_BY_HOP has
#: transfer-encoding, content-length, te, trailer...), routing, request modifiers,
#: authentication, response control data and content handling (RFC 9110 section 6.5.1)
NOT_IN_TRAILERS = HOP_BY_HOP | frozenset({
    b"host", b"authorization", b"www-authenticate", b"cookie", b"set-cookie",
    b"cache-control", b"expect", b"max-forwards", b"pragma", b"range", b"if-match",
    b"if-none-match", b"if-modified-since", b"if-unmodified-since", b"if-range",
    b"age", b"expires", b"date", b"location", b"retry-after", b"vary",
    b"content-encoding", b"content-type", b"content-range",
})


class TrailersTooLarge(ValueError):
    """A trailer section over MAX_TRAILER_BYTES."""


class _Last:
    """The last section filtered and what came of it: an HTTP/2 upstream's client
    session gives the same list object again for a section the same as before
    (forkproxy/http2/client.py: gRPC's ``grpc-status: 0`` call after call). Both lists
    are never changed once made, by their makers or their users."""

    fields: list | None = None
    out: list | None = None


def relayable_trailers(fields) -> list[tuple[bytes, bytes]]:
    """The fields of a trailer section that may be relayed, names lower-cased (an empty
    list: nothing to relay; the list is shared, not to be changed). Raises
    TrailersTooLarge."""
    if fields is _Last.fields:
        return _Last.out
    out = []
    size = 0
    for name, value in fields:
        size += len(name) + len(value) + 4
        if size > MAX_TRAILER_BYTES:
            raise TrailersTooLarge("trailer section too large")
        name = name.lower()
        if name not in NOT_IN_TRAILERS and not name.startswith(b":"):
            out.append((name, value))
    _Last.fields, _Last.out = fields, out
    return out


def last_chunk(fields) -> bytes:
    """The end of a chunked body (RFC 9112 section 7.1): the last chunk and the trailer
    section with ``fields`` (already filtered by relayable_trailers)."""
    return b"0\r\n%s\r\n" % b"".join([b"%s: %s\r\n" % f for f in fields])
