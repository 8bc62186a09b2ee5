"""The sans-IO HTTP/2 client session (forkproxy/http2/client.py) against the project's
own server session (both on libnghttp2, no socket): requests with bodies and trailers,
responses with interim heads and trailers, GOAWAY refusing the streams above its last
id, flow control that waits for the consumer, and PING answers."""

from __future__ import annotations

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection

from forkproxy.http2 import client as h2c
from forkproxy.http2 import fieldsink
from forkproxy.http2 import nghttp2 as ng
from forkproxy.http2 import session as h2s

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"t"), (b":path", b"/")]
POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"t"), (b":path", b"/p"),
        (b"te", b"trailers")]


@pytest.fixture(autouse=True)
def closed_sessions(monkeypatch):
    """Every session a test made is closed by it (not left to the garbage collector)."""
    made = []
    for cls in (h2c.ClientSession, h2s.ServerSession):
        init = cls.__init__

        def tracked(self, *a, _init=init, **kw):
            _init(self, *a, **kw)
            made.append(self)
        monkeypatch.setattr(cls, "__init__", tracked)
    yield
    for s in made:
        s.close()


def pump(client, server, rounds=10):
    for _ in range(rounds):
        a = client.data_to_send()
        if a:
            server.receive(a)
        b = server.data_to_send()
        if b:
            client.receive(b)
        if not a and not b:
            return


def events(session, sid=None):
    out = [e for e in session.events if sid is None or e[1] == sid]
    session.events.clear()
    return out


def test_request_and_response_with_trailers_both_ways(sink_kind):
    c, s = h2c.ClientSession(), h2s.ServerSession()
    sid = c.request(POST, end_stream=False)
    c.send_data(sid, b"hello")
    c.end(sid, [(b"x-req-trailer", b"1")])
    pump(c, s)
    got = events(s)
    assert [k for k, _, _ in got] == [h2s.REQUEST, h2s.DATA, h2s.END]
    assert got[1][2] == b"hello"
    assert got[2][2] == [(b"x-req-trailer", b"1")]  # the request's trailers arrived
    s.interim(sid, 103, [(b"link", b"</a>")])
    s.respond(sid, 200, [(b"content-type", b"application/grpc")])
    s.send_data(sid, b"world")
    s.end(sid, [(b"grpc-status", b"0")])
    pump(c, s)
    kinds = [(k, p) for k, i, p in events(c, sid)]
    assert kinds[0] == (h2c.INTERIM, (103, [(b"link", b"</a>")]))
    assert kinds[1] == (h2c.HEAD, (200, [(b"content-type", b"application/grpc")], None))
    assert kinds[2] == (h2c.DATA, b"world")
    assert kinds[3] == (h2c.TRAILERS, [(b"grpc-status", b"0")])
    assert kinds[4] == (h2c.END, None)
    assert kinds[5] == (h2c.CLOSED, 0)


def test_content_length_is_taken_out_of_the_head_and_stream_objects_are_reused():
    c, s = h2c.ClientSession(), h2s.ServerSession()
    pump(c, s)
    for body in (b"abc", b"defgh"):
        sid = c.request(GET, end_stream=True)
        pump(c, s)
        events(s)
        s.respond(sid, 200, [(b"content-type", b"text/plain"),
                             (b"content-length", b"%d" % len(body)), (b"x-a", b"1")])
        s.send_data(sid, body)
        s.end(sid, [(b"x-length-trailer", b"7")])
        pump(c, s)
        kinds = [(k, p) for k, i, p in events(c, sid)]
        assert kinds[0] == (h2c.HEAD, (200, [(b"content-type", b"text/plain"),
                                             (b"x-a", b"1")], len(body)))
        assert kinds[1] == (h2c.DATA, body)
        assert kinds[2] == (h2c.TRAILERS, [(b"x-length-trailer", b"7")])
        assert kinds[3:] == [(h2c.END, None), (h2c.CLOSED, 0)]
    # a response without a length after one with: the kept stream object forgot it
    sid = c.request(GET, end_stream=True)
    pump(c, s)
    s.respond(sid, 204, [])
    s.end(sid)
    pump(c, s)
    assert [(k, p) for k, i, p in events(c, sid)][0] == (h2c.HEAD, (204, [], None))


def test_settings_known_before_requests(sink_kind):
    c, s = h2c.ClientSession(), h2s.ServerSession()
    pump(c, s)
    assert (h2c.SETTINGS, 0, None) in events(c)
    assert c.max_streams == s.limits.max_concurrent_streams


def test_goaway_refuses_streams_above_its_last_id(sink_kind):
    c, s = h2c.ClientSession(), h2s.ServerSession()
    first = c.request(GET, end_stream=True)
    pump(c, s)
    second = c.request(GET, end_stream=True)
    s.goaway()  # last processed: the first stream only (the second is not sent yet)
    pump(c, s)
    got = events(c)
    assert (h2c.GOAWAY, 0, (first, 0)) in got
    assert (h2c.CLOSED, second, ng.REFUSED_STREAM) in got  # safe to send elsewhere
    assert c.goaway_last == first


def test_response_window_opens_only_as_the_consumer_takes():
    c = h2c.ClientSession(stream_window=16384, connection_window=65535)
    s = h2s.ServerSession()
    sid = c.request(GET, end_stream=True)
    pump(c, s)
    events(s)
    s.respond(sid, 200, [])
    s.send_data(sid, b"x" * 100000)
    pump(c, s)
    received = sum(len(p) for k, _, p in events(c, sid) if k == h2c.DATA)
    assert received == 16384  # the stream window, and no more
    c.consume(sid, received)
    pump(c, s)
    received = sum(len(p) for k, _, p in events(c, sid) if k == h2c.DATA)
    assert 0 < received <= 16384


def test_ping_is_answered(sink_kind):
    c, s = h2c.ClientSession(), h2s.ServerSession()
    pump(c, s)
    events(c)
    c.ping()
    pump(c, s)
    assert (h2c.PONG, 0, None) in events(c)


def test_reset_stream_is_closed_with_its_code(sink_kind):
    c, s = h2c.ClientSession(), h2s.ServerSession()
    sid = c.request(GET, end_stream=True)
    pump(c, s)
    s.reset(sid, ng.INTERNAL_ERROR)
    pump(c, s)
    assert (h2c.CLOSED, sid, ng.INTERNAL_ERROR) in events(c)


@pytest.fixture(params=["compiled", "python"])
def sink_kind(request, monkeypatch):
    """Both header sinks (forkproxy/http2/fieldsink.py): the C one when the module is
    compiled, and the plain-Python one with the session's Python header callback (and
    its Python frame callback for every frame, not the C filter in front of it)."""
    if request.param == "compiled":
        if not fieldsink.COMPILED:
            pytest.skip("fieldsink is not compiled in this build")
    else:
        monkeypatch.setattr(h2c.ClientSession, "HEADER_CALLBACK", 0)
        monkeypatch.setattr(h2c.ClientSession, "C_CALLBACKS", ())
        monkeypatch.setattr(h2c, "new_sink", lambda limit, fail, memo:
                            fieldsink.PyFieldSink(limit))
    return request.param


def test_an_oversized_response_head_resets_its_stream_only(sink_kind):
    """A head past MAX_HEADER_LIST fails the header callback: nghttp2 resets that
    stream (the consumer sees it CLOSED, never a HEAD), and the next one is served.
    The server is the h2 library's (nghttp2 does not send a block that large)."""
    c = h2c.ClientSession()
    srv = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    srv.initiate_connection()

    def exchange():
        for _ in range(5):
            a = c.data_to_send()
            if a:
                srv.receive_data(a)
            b = srv.data_to_send()
            if b:
                c.receive(b)

    sid = c.request(GET, end_stream=True)
    exchange()
    # one field 2,500 times: ~330 KiB of header list (> 256 KiB), a few KiB on the wire
    srv.send_headers(sid, [(b":status", b"200")] + [(b"x-big", b"v" * 100)] * 2500,
                     end_stream=True)
    exchange()
    assert events(c, sid) == [(h2c.CLOSED, sid, ng.INTERNAL_ERROR)]
    nxt = c.request(GET, end_stream=True)
    exchange()
    srv.send_headers(nxt, [(b":status", b"200"), (b"x-a", b"1")], end_stream=True)
    exchange()
    assert events(c, nxt) == [(h2c.HEAD, nxt, (200, [(b"x-a", b"1")], None)),
                              (h2c.END, nxt, None), (h2c.CLOSED, nxt, 0)]


def test_repeated_heads_and_trailers_keep_their_values(sink_kind):
    """A head or trailer block the same as an earlier one (the compiled sink gives its
    list again, and the session its translation) has the same values as a new one; a
    head that differs (a later Date) gets its own; nothing is changed in place."""
    c, s = h2c.ClientSession(), h2s.ServerSession()
    pump(c, s)
    heads = []
    for date in (b"1", b"1", b"2", b"1", b"1"):
        sid = c.request(GET, end_stream=True)
        pump(c, s)
        events(s)
        s.respond(sid, 200, [(b"content-type", b"application/grpc"), (b"date", date),
                             (b"content-length", b"3")])
        s.send_data(sid, b"abc")
        s.end(sid, [(b"grpc-status", b"0")])
        pump(c, s)
        kinds = [(k, p) for k, _, p in events(c, sid)]
        assert kinds == [
            (h2c.HEAD, (200, [(b"content-type", b"application/grpc"), (b"date", date)], 3)),
            (h2c.DATA, b"abc"), (h2c.TRAILERS, [(b"grpc-status", b"0")]), (h2c.END, None),
            (h2c.CLOSED, 0)]
        heads.append(kinds[0][1])
    if sink_kind == "compiled":  # the same head's translation, not made again
        assert heads[1] is heads[0] and heads[4] is heads[3] and heads[2] is not heads[1]
    assert heads[0] == (200, [(b"content-type", b"application/grpc"), (b"date", b"1")], 3)
