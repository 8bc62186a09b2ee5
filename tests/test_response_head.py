"""The response-head fast path (forkproxy.http.response.fast_head) against the full
httptools parser: whatever the fast path takes, the full parser accepts with the same
status, framing and keep-alive, and the relayed head carries the same fields; whatever
the full parser refuses, the fast path leaves alone (so it is refused all the same)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_smuggling import BROKEN_BODIES, CONNECTION_NAMED, EXTRA, RESPONSES

from forkproxy.http.response import BadResponse, ResponseParser, fast_head

NGINX = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 05:22:00 GMT\r\n"
         b"Content-Type: application/octet-stream\r\nContent-Length: 2\r\n"
         b"Connection: keep-alive\r\nETag: \"6740-2\"\r\nAccept-Ranges: bytes\r\n\r\n")

TAKEN = {
    "nginx": NGINX,
    "no-connection": b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\n",
    "close": b"HTTP/1.1 200 OK\r\nCONNECTION:  Close \r\ncontent-length:0\r\n\r\n",
    "http10-keepalive": b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\n",
    "http10": b"HTTP/1.0 503 Busy\r\nContent-Length: 3\r\nX-Obs: caf\xc3\xa9\t!\r\n\r\n",
    "empty-reason": b"HTTP/1.1 204 \r\nContent-Length: 0\r\n\r\n",
}

LEFT = {  # valid, but for the full parser
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    "until-close": b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n",
    "keep-alive-field": b"HTTP/1.0 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 1\r\n\r\n",
    "connection-token": b"HTTP/1.1 200 OK\r\nConnection: x-trace\r\nContent-Length: 1\r\n\r\n",
    "two-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
    "upgrade": b"HTTP/1.1 200 OK\r\nUpgrade: h2c\r\nContent-Length: 1\r\n\r\n",
    "interim": b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
    "no-reason": b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\n",
}


def _head(raw: bytes) -> bytes:
    return raw[: raw.index(b"\r\n\r\n") + 4]


def _full(head: bytes):
    return ResponseParser().parse_head(head)


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head[:-4].split(b"\r\n")[1:]
    return [(n.lower(), v.strip(b" \t")) for n, v in (ln.split(b":", 1) for ln in lines)]


def _agree(head: bytes) -> None:
    fast = fast_head(head)
    if fast is None:
        return
    status, length, keep, out = fast
    full = _full(head)  # raises if the fast path took something the parser refuses
    assert (status, length, keep) == (full.status, full.content_length, full.keep_alive)
    assert out.startswith(b"HTTP/1.1 %d %s\r\n" % (full.status, full.reason))
    relayed = [f for f in _fields(out) if f[0] != b"content-length"]
    assert relayed == [(n.lower(), v.strip(b" \t")) for n, v in full.headers]  # OWS aside
    assert (b"content-length", b"%d" % length) in _fields(out)


@pytest.mark.parametrize("name", sorted(TAKEN))
def test_common_heads_take_the_fast_path(name):
    head = TAKEN[name]
    assert fast_head(head) is not None
    _agree(head)


def test_connection_line_is_dropped_and_the_rest_kept_byte_for_byte():
    status, length, keep, out = fast_head(NGINX)
    assert (status, length, keep) == (200, 2, True)
    assert out == NGINX.replace(b"Connection: keep-alive\r\n", b"")
    assert fast_head(TAKEN["http10-keepalive"])[3].startswith(b"HTTP/1.1 200 OK\r\n")
    assert fast_head(TAKEN["http10"])[2] is False  # HTTP/1.0 without keep-alive


@pytest.mark.parametrize("name", sorted(LEFT))
def test_other_heads_are_left_to_the_full_parser(name):
    assert fast_head(LEFT[name]) is None


@pytest.mark.parametrize("name", sorted({**RESPONSES, **BROKEN_BODIES, **EXTRA}))
def test_malformed_heads_never_take_the_fast_path(name):
    raw = {**RESPONSES, **BROKEN_BODIES, **EXTRA}[name]
    head = _head(raw)
    try:
        _full(head)
    except BadResponse:
        assert fast_head(head) is None
    else:
        _agree(head)


@pytest.mark.parametrize("name", sorted(CONNECTION_NAMED))
def test_fields_named_in_connection_are_dropped_on_both_paths(name):
    """RFC 9110 section 7.6.1: the fast path declines such a head, the parser drops the
    named fields and keeps the others."""
    head = _head(CONNECTION_NAMED[name])
    assert fast_head(head) is None
    names = [n.lower() for n, _ in _full(head).headers]
    assert b"x-kept" in names and b"x-up" not in names and b"x-down" not in names, names


_FIELD = st.tuples(
    st.sampled_from([b"Content-Length", b"content-length", b"Connection", b"X-A", b"Te",
                     b"Transfer-Encoding", b"Keep-Alive", b"Set-Cookie", b"X(A)", b"X A", b""]),
    st.sampled_from([b":", b" :", b": ", b":\t"]),
    st.sampled_from([b"2", b"02", b"-1", b"keep-alive", b"close", b"chunked", b"a b",
                     b"\x00", b"\x7f", b"a\rb", b"a\nb", b"\xff", b"1, 1", b" 2 "]),
)


@settings(max_examples=400, deadline=None)
@given(status=st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 99 X",
                               b"HTTP/1.1 204 ", b"HTTP/1.2 200 OK", b"HTTP/1.1 600 X",
                               b"HTTP/1.1 200 O\x01K", b"HTTP/1.1 101 Up"]),
       fields=st.lists(_FIELD, max_size=5))
def test_property_fast_path_agrees_with_the_full_parser(status, fields):
    head = status + b"\r\n" + b"".join(n + c + v + b"\r\n" for n, c, v in fields) + b"\r\n"
    _agree(head)
