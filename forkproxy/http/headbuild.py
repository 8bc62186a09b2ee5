"""The request head sent upstream, written in one piece (compiled: setup.py's COMPILED,
headbuild.pxd).

:func:`~forkproxy.http.forward.upstream_head` decides what goes into the head (which
fields are dropped, how the body is framed); this writes it. As plain Python that is a
bytes format with ten ``%s`` and a header line formatted per field, ~0.6 µs for a
request with one field and ~0.15 µs more per field; compiled, the lengths are added up
and the parts copied into one bytes object (~0.15 µs, a few ns per field). A part that
is not what the C writer takes (a method that is not ASCII, a field that is not a pair
of bytes) makes it return None, and the Python format writes that head. The same bytes
either way (tests/test_forward.py).
"""

from __future__ import annotations

try:
    import cython

    COMPILED = cython.compiled
except ImportError:  # pragma: no cover - plain Python without Cython installed
    COMPILED = False


def request_head(method: str, path: bytes, host: bytes, headers: list, forwarded_for: bytes,
                 remote: bytes, scheme: bytes, rid: bytes, extra: bytes, tail: bytes) -> bytes:
    """``METHOD PATH HTTP/1.1``, Host, the fields, X-Forwarded-For (``forwarded_for``,
    then ``remote``), X-Forwarded-Proto, X-Request-Id, ``extra`` (whole lines), ``tail``
    (the framing line and the blank line)."""
    if COMPILED:
        head = fp_request_head(method, path, host, headers, forwarded_for,  # noqa: F821
                               remote, scheme, rid, extra, tail)
        if head is not None:
            return head
    return (b"%s %s HTTP/1.1\r\nHost: %s\r\n%sX-Forwarded-For: %s%s\r\n"
            b"X-Forwarded-Proto: %s\r\nX-Request-Id: %s\r\n%s%s") % (
        method.encode(), path, host,
        b"".join([b"%s: %s\r\n" % h for h in headers]) if headers else b"",
        forwarded_for + b", " if forwarded_for else b"", remote, scheme, rid, extra, tail)
