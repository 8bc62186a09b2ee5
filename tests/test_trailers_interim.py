"""Trailers and interim (1xx) responses through the exchange, for HTTP/1.1 and HTTP/2
clients, through real forked proxies to scripted and recording origins on loopback.

Response trailers of an HTTP/1.1 chunked upstream response go to an HTTP/2 client as a
final HEADERS frame with END_STREAM and to an HTTP/1.1 client in the last chunk; the
fields a trailer section must not carry are dropped; an oversized section breaks the
response off. Request trailers of an HTTP/2 client go upstream in the last chunk.
1xx responses are relayed (not to HTTP/1.0 clients), and Expect: 100-continue is still
answered by the proxy.
"""

from __future__ import annotations

import socket

import pytest
from fp import wait_for
from h2client import RawClient, SocketClient
from hostile import RecordingOrigin, ScriptedOrigin, read_all

from forkproxy.http2.session import END, ServerSession

H2C = 'protocols = ["http/1.1", "h2c"]'

TRAILERS = (b"HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\nGrpc-Status: 0\r\nGrpc-Message: all%20good\r\n"
            b"Host: evil.test\r\nContent-Type: text/html\r\nSet-Cookie: a=b\r\nX-Checksum: abc\r\n\r\n")
NO_TRAILERS = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n0\r\n\r\n")
HUGE_TRAILERS = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
                 + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 1000) for i in range(20)) + b"\r\n")
EARLY_HINTS = (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
               b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
TWO_INTERIM = (b"HTTP/1.1 102 Processing\r\n\r\n"
               b"HTTP/1.1 103 Early Hints\r\nLink: </a.js>; rel=preload\r\nConnection: close\r\n\r\n"
               b"HTTP/1.1 204 No Content\r\n\r\n")


@pytest.fixture(scope="module")
def scripted():
    o = ScriptedOrigin({"trailers": TRAILERS, "none": NO_TRAILERS, "huge": HUGE_TRAILERS,
                        "early": EARLY_HINTS, "two": TWO_INTERIM})
    yield o
    o.stop()


@pytest.fixture
def recording():
    o = RecordingOrigin()
    yield o
    o.stop()


def _get(path: bytes, *extra):
    return [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"origin.test"),
            (b":path", path), *extra]


def _h1(port: int, head: bytes, timeout: float = 3.0) -> tuple[bytes, bool]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        return read_all(s, timeout)


def _h2(port: int, headers) -> dict:
    c = SocketClient(port)
    try:
        return c.wait(c.send(headers))
    finally:
        c.close()


# -- response trailers -------------------------------------------------------------------


def test_trailers_reach_an_http2_client_as_the_final_headers(tmp_path, scripted, proxies):
    p = proxies(tmp_path, scripted.address, listener_extra=H2C)
    out = _h2(p.port, _get(b"/r/trailers", (b"te", b"trailers")))
    assert out["status"] == 200 and out["reset"] is None
    assert out["body"] == b"hello world"
    assert out["headers"][b"content-type"] == b"application/grpc"
    # routing and content-handling fields are dropped from the trailer section, the rest is relayed as is
    assert out["trailers"] == {b"grpc-status": b"0", b"grpc-message": b"all%20good",
                               b"x-checksum": b"abc"}


def test_a_chunked_response_without_trailers_ends_with_its_data(tmp_path, scripted, proxies):
    p = proxies(tmp_path, scripted.address, listener_extra=H2C)
    out = _h2(p.port, _get(b"/r/none"))
    assert out["status"] == 200 and out["body"] == b"abc" and out["trailers"] is None
    assert out["reset"] is None


def test_trailers_reach_an_http1_client_in_the_last_chunk(tmp_path, scripted, proxies):
    p = proxies(tmp_path, scripted.address)
    raw, _ = _h1(p.port, b"GET /r/trailers HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    assert body == (b"5\r\nhello\r\n6\r\n world\r\n0\r\ngrpc-status: 0\r\n"
                    b"grpc-message: all%20good\r\nx-checksum: abc\r\n\r\n")


def test_an_http10_client_gets_the_body_without_trailers(tmp_path, scripted, proxies):
    p = proxies(tmp_path, scripted.address)
    raw, closed = _h1(p.port, b"GET /r/trailers HTTP/1.0\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert closed and head.startswith(b"HTTP/1.1 200") and body == b"hello world"


def test_an_oversized_trailer_section_breaks_the_response_off(tmp_path, scripted, proxies):
    p = proxies(tmp_path, scripted.address, listener_extra=H2C)
    out = _h2(p.port, _get(b"/r/huge"))
    # reset (the head may not have gone out yet): never a complete-looking response
    assert out["reset"] is not None and out["trailers"] is None
    raw, closed = _h1(p.port, b"GET /r/huge HTTP/1.1\r\nHost: a\r\n\r\n")
    assert closed and raw.startswith(b"HTTP/1.1 200") and not raw.endswith(b"0\r\n\r\n")
    assert b"X-Pad" not in raw


# -- request trailers --------------------------------------------------------------------


def _post_with_trailers(c: SocketClient, path: bytes, body: bytes, trailers) -> dict:
    """A POST without content-length (so it goes upstream chunked), its body in one DATA
    frame, then a trailer HEADERS frame with END_STREAM; returns the response."""
    sid = c.send([(b":method", b"POST"), (b":scheme", b"http"),
                  (b":authority", b"origin.test"), (b":path", path)], end_stream=False)
    c.conn.send_data(sid, body)
    c.conn.send_headers(sid, trailers, end_stream=True)
    c.flush()
    return c.wait(sid)


def test_http2_request_trailers_go_upstream_in_the_last_chunk(tmp_path, recording, proxies):
    p = proxies(tmp_path, recording.address, listener_extra=H2C)
    c = SocketClient(p.port)
    try:
        out = _post_with_trailers(c, b"/up", b"payload",
                                  [(b"x-digest", b"sha-256=abc"), (b"host", b"evil.test")])
    finally:
        c.close()
    assert out["status"] == 200 and out["body"] == b"POST /up 7"
    (seen,) = recording.seen
    assert seen.header("transfer-encoding") == ["chunked"] and seen.body == b"payload"
    # the origin's parser read the trailer section after the body: x-digest only (a
    # host field is not allowed in trailers and was dropped)
    assert seen.header("x-digest") == ["sha-256=abc"]
    assert seen.header("host") == ["origin.test"]
    assert not recording.errors


def test_a_malformed_request_trailer_resets_the_stream(tmp_path, recording, proxies):
    p = proxies(tmp_path, recording.address, listener_extra=H2C)
    c = SocketClient(p.port)
    try:
        out = _post_with_trailers(c, b"/bad", b"x", [(b"x-bad", b"a\r\nInjected: 1")])
        ok = c.wait(c.send(_get(b"/after")))  # the connection goes on
    finally:
        c.close()
    assert out["reset"] is not None and out["status"] is None
    assert ok["status"] == 200
    wait_for(lambda: any(s.path == "/after" for s in recording.seen), what="the next request")
    assert [s.path for s in recording.seen] == ["/after"]
    assert not recording.errors


# -- interim responses ---------------------------------------------------------------------


def test_early_hints_reach_an_http1_client(tmp_path, scripted, proxies):
    p = proxies(tmp_path, scripted.address)
    raw, _ = _h1(p.port, b"GET /r/early HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                          b"HTTP/1.1 200 OK\r\n")
    assert raw.endswith(b"\r\n\r\nok")


def test_interim_responses_are_not_sent_to_http10_clients(tmp_path, scripted, proxies):
    p = proxies(tmp_path, scripted.address)
    raw, _ = _h1(p.port, b"GET /r/early HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"ok")


def test_interim_responses_reach_an_http2_client_in_order(tmp_path, scripted, proxies):
    p = proxies(tmp_path, scripted.address, listener_extra=H2C)
    out = _h2(p.port, _get(b"/r/two"))
    assert out["status"] == 204 and out["reset"] is None
    # hop-by-hop fields of an interim head are not relayed either
    assert out["interim"] == [{b":status": b"102"},
                              {b":status": b"103", b"link": b"</a.js>; rel=preload"}]


def test_expect_continue_is_answered_for_both_protocols(tmp_path, recording, proxies):
    p = proxies(tmp_path, recording.address, listener_extra=H2C)
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(4096)
        assert got == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"abc")
        raw, _ = read_all(s, 1.0)
    assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"POST /e 3")
    c = SocketClient(p.port)
    try:
        sid = c.send([(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"),
                      (b":path", b"/e2"), (b"expect", b"100-continue")], end_stream=False)
        c.conn.send_data(sid, b"abcd", end_stream=True)
        c.flush()
        out = c.wait(sid)
    finally:
        c.close()
    assert out["interim"] == [{b":status": b"100"}]
    assert out["status"] == 200 and out["body"] == b"POST /e2 4"
    assert all(not s.header("expect") for s in recording.seen)  # answered, not forwarded


# -- the session alone (sans-IO) -----------------------------------------------------------


def test_the_session_hands_request_trailers_on_with_the_end_of_the_body():
    session = ServerSession()
    try:
        c = RawClient(session)
        sid = c.send([(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"a"),
                      (b":path", b"/p")], end_stream=False)
        c.conn.send_data(sid, b"body")
        c.conn.send_headers(sid, [(b"x-sum", b"1"), (b"content-type", b"text/plain")],
                            end_stream=True)
        c.pump()
        assert c.kinds(sid) == ["REQUEST", "DATA", "END"]
        (end,) = [p for k, s, p in c.yielded if k == END]
        assert end == [(b"x-sum", b"1")]  # content-type is not a trailer field
        plain = c.send(_get(b"/q"))
        c.pump()
        assert [p for k, s, p in c.yielded if k == END and s == plain] == [None]
    finally:
        session.close()
