"""How a response body is delimited: one named decision (RFC 9112 section 6.3).

h11's ``_body_framing`` is the model: the exchange asks once, gets a :class:`Framing`
member, and picks the body relayer by it. Nothing else in the proxy decides framing.
"""

from __future__ import annotations

import enum


class Framing(enum.IntEnum):
    """How the upstream's response body ends. An IntEnum so that hashing a member and
    indexing a table by it are C-level (an Enum's __hash__ is a Python function: two
    calls of it cost ~0.5 us per request in the in-process A/B, scripts/hotpath-ab)."""

    NONE = 0  # no body: HEAD, 204, 304 (whatever the head says about length)
    LENGTH = 1  # exactly Content-Length bytes
    CHUNKED = 2  # chunked transfer coding, ended by the last chunk
    UNTIL_CLOSE = 3  # no length: the body ends when the upstream closes


def response_framing(method: str, status: int, content_length: int | None,
                     chunked: bool) -> Framing:
    """The framing of a final (non-1xx) upstream response to a ``method`` request."""
    if method == "HEAD" or status == 204 or status == 304:
        return Framing.NONE
    if chunked:
        return Framing.CHUNKED
    if content_length is not None:
        return Framing.LENGTH
    return Framing.UNTIL_CLOSE


#: framings whose body an HTTP/1.0 client can only receive by the connection closing
#: (it knows no chunked coding)
CLOSE_DELIMITED_FOR_HTTP10 = frozenset({Framing.CHUNKED, Framing.UNTIL_CLOSE})


def frame_chunk(data) -> bytes:
    """One chunk of the chunked transfer coding (RFC 9112 7.1) around ``data``."""
    return b"%x\r\n%s\r\n" % (len(data), data)


#: the last chunk with an empty trailer section
LAST_CHUNK = b"0\r\n\r\n"
