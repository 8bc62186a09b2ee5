"""Issue 14: the sans-IO HTTP/2 server session (forkproxy/http2/session.py) driven by a raw
client on the h2 library (tests/h2client.py), bytes in and out, no socket.

The hostile corpus asserts, for every case, exactly what the session yields (the
Request it would forward upstream, or nothing) and what the client gets (RST_STREAM
code, GOAWAY code, or a response status), and the reason counted. After each stream-level
case a valid request on the same connection must still be served: the connection (and
its HPACK state) survived.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from h2client import GET, RawClient
from hyperframe.frame import (
    DataFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from forkproxy.http.request import Limits
from forkproxy.http2 import nghttp2 as ng
from forkproxy.http2.limits import Http2Limits
from forkproxy.http2.session import ServerSession, nv_array

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROTOCOL_ERROR, REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x1, 0x7, 0xB


def _req(path=b"/a", authority=b"example.test", method=b"GET", extra=()):
    return [(b":method", method), (b":scheme", b"https"), (b":authority", authority),
            (b":path", path), *extra]


@pytest.fixture
def session():
    s = ServerSession(Http2Limits(), Limits(body_size=1 << 20))
    yield s
    s.close()


def test_self_test_round_trip():
    assert ng.self_test() == "1.52.0" or ng.self_test() >= "1.52"


def test_missing_library_is_refused_with_a_reason():
    code = ("import forkproxy.http2.nghttp2 as n; n.SONAMES = ('libnghttp2.so.999',)\n"
            "try:\n    n.library()\nexcept n.Nghttp2Unavailable as e:\n    print('refused:', e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "refused: libnghttp2 unavailable" in r.stdout and "libnghttp2.so.999" in r.stdout


# -- valid requests ----------------------------------------------------------------------


def test_get_becomes_a_request_and_the_response_reaches_the_client(session):
    c = RawClient(session)
    sid = c.send(_req(extra=[(b"user-agent", b"t"), (b"x-request-id", b"r1"),
                             (b"x-forwarded-for", b"10.0.0.1")]))
    c.pump()
    assert c.kinds(sid) == ["REQUEST", "END"]
    (req,) = c.requests()
    assert (req.method, req.path, req.host) == ("GET", b"/a", b"example.test")
    assert req.headers == [(b"user-agent", b"t")]
    assert (req.request_id, req.forwarded_for) == (b"r1", b"10.0.0.1")
    assert not req.has_body and not req.chunked and req.content_length is None
    assert session.respond(sid, 200, [(b"content-type", b"text/plain")], body=b"hi")
    c.pump()
    assert c.responses()[sid][b":status"] == b"200"
    assert c.kinds(sid) == ["REQUEST", "END", "CLOSED"]


@pytest.mark.parametrize("window", [65535, 1000])
def test_a_whole_body_goes_out_as_the_client_window_allows(session, window):
    """respond_whole (a body that is all of the response, read by nghttp2 in C when
    sendpath is compiled): in DATA frames no larger than the client's window, the last
    one ending the stream, whatever the window."""
    c = RawClient(session)
    c.conn.update_settings({SettingsFrame.INITIAL_WINDOW_SIZE: window})
    c.pump()
    sid = c.send(_req())
    c.pump()
    body = bytes(range(256)) * 20  # 5,120 bytes
    nva, count, keep = nv_array(200, [(b"content-length", b"%d" % len(body))])
    assert session.respond_whole(sid, nva, count, body)
    assert not session.respond_whole(sid, nva, count, body)  # answered once
    assert session.pending(sid) <= len(body)
    for _ in range(20):
        c.pump()
    data = [f for f in c.frames if isinstance(f, DataFrame) and f.stream_id == sid]
    assert b"".join(f.data for f in data) == body
    assert all(len(f.data) <= window for f in data) and len(data) >= len(body) // window
    assert [("END_STREAM" in f.flags) for f in data] == [False] * (len(data) - 1) + [True]
    assert c.responses()[sid][b":status"] == b"200"
    assert c.kinds(sid) == ["REQUEST", "END", "CLOSED"] and sid not in session.streams
    assert not session.respond_whole(sid, nva, count, body)  # the stream is gone


def test_post_with_length_and_body_without_length(session):
    c = RawClient(session)
    a = c.send(_req(method=b"POST", extra=[(b"content-length", b"5")]), b"hello")
    b = c.send(_req(method=b"POST", path=b"/b"), b"chunky")
    c.pump()
    reqs = {r.path: r for r in c.requests()}
    assert reqs[b"/a"].content_length == 5 and not reqs[b"/a"].chunked and reqs[b"/a"].has_body
    assert reqs[b"/b"].chunked and reqs[b"/b"].content_length is None and reqs[b"/b"].has_body
    assert c.body(a) == b"hello" and c.body(b) == b"chunky"
    assert c.kinds(a) == ["REQUEST", "DATA", "END"] and c.kinds(b) == ["REQUEST", "DATA", "END"]


def test_cookies_are_joined_and_host_comes_from_authority(session):
    c = RawClient(session)
    c.send(_req(extra=[(b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2")]))
    c.pump()
    (req,) = c.requests()
    assert req.headers == [(b"accept", b"*/*"), (b"cookie", b"a=1; b=2")]
    assert req.host == b"example.test"


def test_host_without_authority_and_te_trailers(session):
    c = RawClient(session)
    c.send([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/h"),
            (b"host", b"h.test"), (b"te", b"trailers")])
    c.pump()
    (req,) = c.requests()
    assert req.host == b"h.test" and req.headers == []  # te is hop-by-hop: not forwarded


def test_expect_continue_interim_and_trailers(session):
    c = RawClient(session)
    sid = c.send(_req(method=b"PUT", extra=[(b"expect", b"100-continue"),
                                            (b"content-length", b"3")]), end_stream=False)
    c.pump()
    (req,) = c.requests()
    assert req.expect_continue and c.kinds(sid) == ["REQUEST"]
    session.interim(sid, 100)
    c.pump()
    c.conn.send_data(sid, b"abc", end_stream=True)
    c.pump()
    assert c.body(sid) == b"abc" and c.kinds(sid)[-1] == "END"
    session.respond(sid, 200, [(b"content-type", b"application/grpc")])
    session.send_data(sid, b"payload")
    session.end(sid, trailers=[(b"grpc-status", b"0")])
    c.pump()
    infos = [e for e in c.events if type(e).__name__ == "InformationalResponseReceived"]
    assert infos and dict(infos[0].headers)[b":status"] == b"100"
    trailers = [e for e in c.events if type(e).__name__ == "TrailersReceived"]
    assert trailers and dict(trailers[0].headers) == {b"grpc-status": b"0"}


def test_flow_control_pauses_the_producer_and_memory_stays_bounded(session):
    """A client that never opens its window: nghttp2 sends 64 KiB, the rest waits in the
    stream's buffer, whose size the producer reads to pause its upstream."""
    c = RawClient(session)
    c.conn.update_settings({4: 0})  # SETTINGS_INITIAL_WINDOW_SIZE = 0: nothing flows
    c.pump()
    sid = c.send(_req())
    c.pump()
    session.respond(sid, 200, [])
    sent = 0
    while session.pending(sid) <= session.limits.send_buffer:
        session.send_data(sid, b"x" * 16384)
        sent += 16384
        c.pump()  # only the head goes out: the window is 0
    assert session.send_window(sid) <= 0
    assert session.pending(sid) == sent  # the producer sees its bytes are queued, pauses
    c.conn.increment_flow_control_window(1 << 20, stream_id=sid)
    c.conn.update_settings({4: 65535})
    c.pump()
    session.end(sid)
    c.pump()
    got = sum(len(e.data) for e in c.events if type(e).__name__ == "DataReceived")
    assert got == sent and session.pending(sid) == 0


def test_request_body_window_opens_only_when_consumed(session):
    """Unread request bodies are bounded by the windows: the client can send 64 KiB, then
    must wait until the consumer calls consume()."""
    c = RawClient(session)
    sid = c.send(_req(method=b"POST"), end_stream=False)
    c.pump()
    window = c.conn.local_flow_control_window(sid)
    for i in range(0, window, 16384):
        c.conn.send_data(sid, b"y" * min(16384, window - i))
    c.pump()
    assert len(c.body(sid)) == window == 65535
    assert c.conn.local_flow_control_window(sid) == 0  # no WINDOW_UPDATE yet
    session.consume(sid, window)
    c.pump()
    assert c.conn.local_flow_control_window(sid) == 65535


def test_graceful_goaway_lets_in_flight_streams_finish(session):
    c = RawClient(session)
    sid = c.send(_req())
    c.pump()
    session.shutdown_notice()
    c.pump()
    first = c.goaway()
    assert first is not None and first.last_stream_id == (1 << 31) - 1
    assert session.goaway() == sid
    session.respond(sid, 200, [], body=b"done")
    c.pump()
    goaways = c.goaways()
    assert [(g.last_stream_id, g.error_code) for g in goaways] == [((1 << 31) - 1, 0), (sid, 0)]
    # the in-flight stream's response went out after the final GOAWAY
    after = c.frames[c.frames.index(goaways[-1]):]
    assert [(type(f).__name__, f.stream_id) for f in after[1:]] == [
        ("HeadersFrame", sid), ("DataFrame", sid)]
    assert after[-1].data == b"done" and "END_STREAM" in after[-1].flags
    assert session.finished


def test_a_callback_exception_never_unwinds_through_c():
    """A bug inside a callback (here: no request limits, so the translation fails with
    an AttributeError inside on_frame_recv) is stored, nghttp2 gets a failure code, and
    receive() raises the original exception once the C call has returned."""
    s = ServerSession()
    c = RawClient(s)
    s.request_limits = None
    c.conn.send_headers(1, GET, end_stream=True)
    with pytest.raises(AttributeError, match="request_line"):
        s.receive(c.conn.data_to_send())
    assert s.failed == "internal_error" and not s.want_read
    s.close()


# -- hostile corpus: stream level --------------------------------------------------------

# (id, headers, body or None, expected): ("reset", reason) = RST_STREAM PROTOCOL_ERROR and
# nothing yielded; ("status", code, reason) = the proxy answers itself, nothing yielded;
# ("short", reason) = the head was yielded, the body stopped at the declared length, and
# the stream was reset without END (the exchange aborts its upstream request)
A = b":authority"
HOSTILE = [
    ("te-gzip", _req(extra=[(b"te", b"gzip")]), None, ("reset", "malformed_headers")),
    ("te-trailers-gzip", _req(extra=[(b"te", b"trailers, gzip")]), None,
     ("reset", "malformed_headers")),
    ("transfer-encoding", _req(method=b"POST", extra=[(b"transfer-encoding", b"chunked")]),
     b"0\r\n\r\n", ("reset", "malformed_headers")),
    ("connection", _req(extra=[(b"connection", b"keep-alive")]), None,
     ("reset", "malformed_headers")),
    ("keep-alive", _req(extra=[(b"keep-alive", b"timeout=5")]), None,
     ("reset", "malformed_headers")),
    ("proxy-connection", _req(extra=[(b"proxy-connection", b"close")]), None,
     ("reset", "malformed_headers")),
    ("upgrade", _req(extra=[(b"upgrade", b"websocket")]), None, ("reset", "malformed_headers")),
    ("uppercase-name", _req(extra=[(b"X-Evil", b"1")]), None, ("reset", "malformed_headers")),
    ("crlf-in-value", _req(extra=[(b"x-a", b"1\r\nx-injected: 1")]), None,
     ("reset", "invalid_field")),
    ("lf-in-value", _req(extra=[(b"x-a", b"1\nhost: evil")]), None, ("reset", None)),
    ("nul-in-value", _req(extra=[(b"x-a", b"a\x00b")]), None, ("reset", None)),
    ("crlf-in-name", _req(extra=[(b"x-a\r\nx-b", b"1")]), None, ("reset", None)),
    ("space-in-name", _req(extra=[(b"x a", b"1")]), None, ("reset", None)),
    ("colon-in-name", _req(extra=[(b"x:a", b"1")]), None, ("reset", None)),
    ("leading-space-value", _req(extra=[(b"x-a", b" 1")]), None, ("reset", None)),
    ("ctl-in-value", _req(extra=[(b"x-a", b"a\x01b")]), None, ("reset", None)),
    ("cl-with-end-stream", _req(extra=[(b"content-length", b"5")]), None, ("reset", None)),
    ("cl-conflicting", _req(method=b"POST", extra=[(b"content-length", b"3"),
                                                   (b"content-length", b"4")]), b"abc",
     ("reset", None)),
    ("cl-list", _req(method=b"POST", extra=[(b"content-length", b"3, 3")]), b"abc",
     ("reset", None)),
    ("cl-negative", _req(method=b"POST", extra=[(b"content-length", b"-1")]), b"abc",
     ("reset", None)),
    ("cl-underscore", _req(method=b"POST", extra=[(b"content_length", b"3")]), b"abc",
     ("reset", "content_length")),
    ("te-underscore", _req(method=b"POST", extra=[(b"transfer_encoding", b"chunked")]), b"abc",
     ("reset", "content_length")),
    ("host-mismatch", _req(extra=[(b"host", b"evil.test")]), None, ("reset", "host_mismatch")),
    ("authority-userinfo", _req(authority=b"user@example.test"), None, ("reset", None)),
    ("authority-slash", _req(authority=b"example.test/x"), None, ("reset", None)),
    ("no-authority-no-host", [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")],
     None, ("reset", "malformed_headers")),
    ("duplicate-path", _req(extra=[(b":path", b"/b")]), None, ("reset", None)),
    ("pseudo-after-regular", [(b":method", b"GET"), (b":scheme", b"https"), (b"x-a", b"1"),
                              (A, b"example.test"), (b":path", b"/")], None, ("reset", None)),
    ("unknown-pseudo", _req(extra=[]) + [(b":protocol", b"websocket")], None, ("reset", None)),
    ("status-in-request", [(b":status", b"200"), *_req()], None, ("reset", None)),
    ("missing-method", [(b":scheme", b"https"), (A, b"e.test"), (b":path", b"/")], None,
     ("reset", None)),
    ("missing-path", [(b":method", b"GET"), (b":scheme", b"https"), (A, b"e.test")], None,
     ("reset", None)),
    ("empty-path", _req(path=b""), None, ("reset", None)),
    ("path-with-space", _req(path=b"/a b HTTP/1.1\r\nHost: x"), None, ("reset", None)),
    ("path-with-space-only", _req(path=b"/a b"), None, ("reset", "malformed_headers")),
    ("path-absolute-form", _req(path=b"http://evil.test/x"), None, ("reset", None)),
    ("path-fragment", _req(path=b"/a#b"), None, ("reset", "pseudo_header")),
    ("path-8bit", _req(path=b"/a\xffb"), None, ("reset", "pseudo_header")),
    ("method-with-space", _req(method=b"GET /x HTTP/1.1"), None, ("reset", None)),
    ("scheme-ftp", [(b":method", b"GET"), (b":scheme", b"ftp"), (A, b"e.test"),
                    (b":path", b"/")], None, ("reset", "pseudo_header")),
    ("connect", [(b":method", b"CONNECT"), (A, b"evil.test:22")], None,
     ("status", 501, "connect")),
    ("expect-other", _req(extra=[(b"expect", b"202-accepted")]), None,
     ("status", 417, "expectation")),
    ("header-list-too-large", _req(extra=[(b"x-big-%d" % i, b"v" * 4000) for i in range(9)]),
     None, ("status", 431, "headers_too_large")),
    ("too-many-fields", _req(extra=[(b"x-%d" % i, b"v") for i in range(101)]), None,
     ("status", 431, "headers_too_large")),
    ("body-too-large", _req(method=b"POST", extra=[(b"content-length", b"%d" % (2 << 20))]),
     False, ("status", 413, "body_too_large")),
    ("body-longer-than-cl", _req(method=b"POST", extra=[(b"content-length", b"3")]),
     b"abcdefgh", ("short", None)),
    ("body-shorter-than-cl", _req(method=b"POST", extra=[(b"content-length", b"9")]),
     b"abc", ("short", None)),
]


@pytest.mark.parametrize("headers,body,expected", [c[1:] for c in HOSTILE],
                         ids=[c[0] for c in HOSTILE])
def test_hostile_stream(session, headers, body, expected):
    c = RawClient(session)
    # body False: a head without END_STREAM, and no body yet
    sid = c.send(headers, end_stream=False) if body is False else c.send(headers, body)
    c.pump()
    kind, reason = expected[0], expected[-1]
    if kind == "reset":
        assert c.resets() == {sid: PROTOCOL_ERROR}
        assert c.yielded == []  # nothing would be written upstream
    elif kind == "status":
        assert c.responses()[sid][b":status"] == b"%d" % expected[1]
        # answered before the request ended: at most an RST_STREAM(NO_ERROR) after the
        # answer, asking the client to stop sending (RFC 9113 section 8.1)
        assert set(c.resets().values()) <= {0} and c.yielded == []
    else:  # "short": the body never goes past the declared length, and never ENDs
        (req,) = c.requests()
        assert len(c.body(sid)) <= req.content_length
        assert "END" not in c.kinds(sid) and c.kinds(sid)[-1] == "CLOSED"
        assert c.resets() == {sid: PROTOCOL_ERROR}
    if reason is not None:
        assert session.stream_errors.get(reason) == 1, session.stream_errors
    assert sum(session.stream_errors.values()) == 1, session.stream_errors
    assert c.goaway() is None
    # the connection survived: the next request is served
    c.yielded.clear()
    nxt = c.send(_req(path=b"/next"))
    c.pump()
    assert [r.path for r in c.requests()] == [b"/next"] and c.kinds(nxt) == ["REQUEST", "END"]


def test_hostile_translation_is_caught_by_forkproxy_too():
    """The classes libnghttp2 rejects before forkproxy sees them are rejected by
    forkproxy's own translation as well (two independent validators)."""
    from forkproxy.http2.translate import StreamRefused, build_request

    limits = Limits()
    for case_id, headers, body, expected in HOSTILE:
        if expected[0] != "reset":
            continue
        with pytest.raises(StreamRefused) as info:
            build_request(list(headers), body is None, limits)  # noqa: B023
        assert info.value.status == 0, case_id


def test_the_same_header_list_again_gives_the_same_request_as_a_new_object():
    """build_request's memo: a list equal to the last one gives a Request equal in every
    field to a fresh translation, and a new object whose lists are its own."""
    from forkproxy.http.request import Request
    from forkproxy.http2.translate import build_request

    limits = Limits()
    fields = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"ex.com"),
              (b":path", b"/a?b"), (b"cookie", b"a=1"), (b"cookie", b"b=2"),
              (b"content-length", b"5"), (b"x-forwarded-for", b"10.0.0.1"),
              (b"traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"),
              (b"content-type", b"application/grpc"), (b"expect", b"100-continue")]
    first = build_request(list(fields), False, limits)
    again = build_request(list(fields), False, limits)
    assert again is not first and again.headers is not first.headers
    assert {k: getattr(again, k) for k in Request.__slots__} == \
        {k: getattr(first, k) for k in Request.__slots__}
    again.headers.append((b"x", b"y"))
    again.request_id = b"set by the worker"
    third = build_request(list(fields), False, limits)
    assert (b"x", b"y") not in third.headers and third.request_id == b""
    # a different end_stream is a different translation (content-length without a body)
    with pytest.raises(Exception, match="content-length without a body"):
        build_request(list(fields), True, limits)


# -- hostile corpus: connection level ----------------------------------------------------


def _rapid_reset(c):
    out = []
    for i in range(300):
        sid = 1 + 2 * i
        out.append(c.headers_frames(sid, GET))
        out.append(RstStreamFrame(sid, error_code=8).serialize())
    return b"".join(out)


def _flood(frame_bytes: bytes, n: int = 1500):
    return lambda c: frame_bytes * n


FLOODS = [
    ("rapid-reset", _rapid_reset, ENHANCE_YOUR_CALM, "rapid_reset"),
    ("settings-flood", _flood(SettingsFrame(0, settings={3: 100}).serialize()),
     ENHANCE_YOUR_CALM, "settings_flood"),
    ("ping-flood", _flood(PingFrame(0, opaque_data=b"12345678").serialize()),
     ENHANCE_YOUR_CALM, "ping_flood"),
    ("priority-flood", _flood(PriorityFrame(3, depends_on=0, stream_weight=16).serialize()),
     ENHANCE_YOUR_CALM, "priority_flood"),
    ("window-update-flood", _flood(WindowUpdateFrame(0, window_increment=1).serialize()),
     ENHANCE_YOUR_CALM, "window_update_flood"),
    ("empty-data-flood", lambda c: c.headers_frames(1, _req(method=b"POST"), end_stream=False)
     + DataFrame(1, data=b"").serialize() * 1500, ENHANCE_YOUR_CALM, "empty_data_flood"),
    ("continuation-flood", lambda c: c.headers_frames(1, _req(extra=[
        (b"x-%d" % i, b"v" * 100) for i in range(40)]), continuations=20), ENHANCE_YOUR_CALM,
     "continuation_flood"),
    ("continuation-flood-empty", lambda c: c.headers_frames(1, GET, continuations=9),
     ENHANCE_YOUR_CALM, "continuation_flood"),
    ("data-on-stream-0", lambda c: b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x", PROTOCOL_ERROR,
     "protocol_error"),
    ("window-overflow", lambda c: WindowUpdateFrame(0, window_increment=(1 << 31) - 1)
     .serialize() * 2, 0x3, "flow_control_error"),
    ("data-beyond-window", lambda c: c.headers_frames(1, _req(method=b"POST"), end_stream=False)
     + b"".join(DataFrame(1, data=b"z" * 16384).serialize() for _ in range(5)), 0x3,
     "flow_control_error"),
    ("headers-on-even-stream", lambda c: c.headers_frames(2, GET), PROTOCOL_ERROR,
     "protocol_error"),
]


@pytest.mark.parametrize("make,code,reason", [f[1:] for f in FLOODS], ids=[f[0] for f in FLOODS])
def test_hostile_connection(session, make, code, reason):
    c = RawClient(session)
    started = time.monotonic()
    c.raw(make(c))
    elapsed = time.monotonic() - started
    assert reason in session.stream_errors, session.stream_errors
    assert session.failed is not None and not session.want_read
    if code is not None:
        goaway = c.goaway()
        assert goaway is not None and goaway.error_code == code, c.events[-3:]
    if reason == "rapid_reset":  # the attack was cut off after the reset burst
        # the bucket refills at reset_rate while the burst is processed (slower on a busy CPU)
        refill = int(session.limits.reset_rate * elapsed) + 1
        assert len(c.requests()) <= session.limits.reset_burst + refill
        assert c.kinds().count("CLOSED") == len(c.requests())  # each one aborted upstream
    else:
        assert "END" not in c.kinds()  # no request completed from the flood


def test_header_block_at_the_continuation_bound_is_answered_431(session):
    """9 frames (HEADERS + 8 CONTINUATION) of ~16 KiB: the most a header block can be
    (about 144 KiB decoded, then dropped); the header list is over its limit: 431, and
    the connection goes on."""
    c = RawClient(session)
    big = _req(extra=[(b"x-%d" % i, b"%d" % i * 5000) for i in range(26)])
    frames = c.headers_frames(1, big, continuations=8)
    assert 8 * 16384 < len(frames) - 9 * 9 <= 9 * 16384
    c.raw(frames)
    assert c.responses()[1][b":status"] == b"431" and c.requests() == []
    assert session.stream_errors == {"headers_too_large": 1} and session.failed is None


def test_header_blocks_split_across_reads_of_two_connections_stay_apart():
    """Fields are collected per session (in C when fieldsink is compiled): two
    connections' header blocks, each in HEADERS + CONTINUATIONs and fed a
    few bytes at a time, interleaved, give each connection its own request, with every
    field. (One byte per read is not used: libnghttp2 1.52 then counts the block's
    CONTINUATIONs as a flood, with or without forkproxy's sink.)"""
    sessions = [ServerSession(Http2Limits(), Limits()) for _ in range(2)]
    try:
        clients = [RawClient(s) for s in sessions]
        wires = [c.headers_frames(1, _req(path=b"/%d" % i, extra=[
            (b"x-n", b"%d" % i), (b"x-long", b"v" * 300)]), continuations=2)
            for i, c in enumerate(clients)]
        for at in range(0, max(map(len, wires)), 3):
            for s, wire in zip(sessions, wires, strict=True):
                if at < len(wire):
                    s.receive(wire[at:at + 3])
        for i, c in enumerate(clients):
            c.pump()
            (req,) = c.requests()
            assert (req.path, req.headers) == (b"/%d" % i, [(b"x-n", b"%d" % i),
                                                            (b"x-long", b"v" * 300)])
    finally:
        for s in sessions:
            s.close()


def test_oversized_trailers_are_refused_and_the_connection_serves_on(session):
    c = RawClient(session)
    sid = c.send(_req(method=b"POST"), end_stream=False)
    c.conn.send_data(sid, b"abc")
    c.conn.send_headers(sid, [(b"x-t%d" % i, b"v" * 1000) for i in range(40)],
                        end_stream=True)
    c.pump()
    assert c.resets() == {sid: PROTOCOL_ERROR}
    assert session.stream_errors == {"headers_too_large": 1}
    nxt = c.send(_req(path=b"/next"))
    c.pump()
    assert c.kinds(nxt) == ["REQUEST", "END"]


def test_bad_preface_closes_without_processing(session):
    session.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 20)
    assert session.failed == "bad_preface" and session.stream_errors == {"bad_preface": 1}
    assert not list(session.events)


def test_excess_streams_are_refused(session):
    """Streams beyond max_concurrent_streams sent before the client has our SETTINGS are
    refused one by one (REFUSED_STREAM: retryable); the others are served."""
    c = RawClient(session, handshake=False)
    wire = c.conn.data_to_send()
    for i in range(130):
        wire += c.headers_frames(1 + 2 * i, GET)
    c.raw(wire)
    assert len(c.requests()) == 128
    assert sorted(c.resets().values()) == [REFUSED_STREAM, REFUSED_STREAM]
    assert session.stream_errors == {"refused_stream": 2}


def test_malformed_requests_count_as_resets():
    """A client that makes the server reset its streams (malformed requests) is cut off
    like one that resets them itself (the 'made you reset' variant of rapid reset)."""
    s = ServerSession(Http2Limits(reset_burst=20, reset_rate=0.001))
    c = RawClient(s)
    wire = b"".join(c.headers_frames(1 + 2 * i, _req(extra=[(b"te", b"gzip")]))
                    for i in range(50))
    c.raw(wire)
    assert s.failed == "rapid_reset" and c.goaway().error_code == ENHANCE_YOUR_CALM
    assert s.stream_errors["rapid_reset"] == 1 and c.requests() == []
    s.close()


def test_the_pre_parsed_declarations_are_current():
    """_nghttp2_ffi.py is what scripts/gen-nghttp2-ffi makes of nghttp2_decls.py today."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gen-nghttp2-ffi"),
                        "--check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_the_binding_loads_without_cffis_c_parser():
    """Out-of-line ABI mode: a process that loads libnghttp2 never imports pycparser."""
    code = ("import sys; from forkproxy.http2 import nghttp2 as ng; ng.library(); "
            "print(sorted(m for m in ('cffi', 'pycparser') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# -- events queued in C (fieldsink compiled), handled after the call into nghttp2 -------

def test_events_keep_their_order_around_a_frame_python_handles_at_once(session):
    """Two requests, a client reset of the first, a third request and the client's
    GOAWAY, in one read: compiled, the header blocks are queued in C and the GOAWAY goes
    to the Python callback at once, which handles what was queued before it first; the
    session's events come in the order the frames came, as with one callback each."""
    c = RawClient(session)
    first = c.send(_req(b"/1"))
    second = c.send(_req(b"/2"))
    c.conn.reset_stream(first, 0x8)
    third = c.send(_req(b"/3"))
    c.conn.close_connection()
    session.receive(c.conn.data_to_send())
    order = [(kind, sid) for kind, sid, _ in session.events]
    assert order == [(1, first), (3, first), (1, second), (3, second), (4, first),
                     (1, third), (3, third), (5, 0)]
    c.pump()
    assert [r.path for r in c.requests()] == [b"/1", b"/2", b"/3"]


class _FailingSession(ServerSession):
    """A session whose request handling raises (a bug): the failure must not unwind
    through nghttp2's C, and it ends the session."""

    def _headers_done(self, stream, fields, end_stream):
        raise RuntimeError("handler bug")


def test_a_failure_while_handling_received_events_marks_the_session_failed():
    session = _FailingSession(Http2Limits(), Limits())
    try:
        c = RawClient(session, handshake=False)
        c.send(_req())
        with pytest.raises(RuntimeError, match="handler bug"):
            session.receive(c.conn.data_to_send())
        assert session.failed == "internal_error"
        assert not session.want_read
        session.receive(c.conn.data_to_send())  # nothing more is read: no second raise
    finally:
        session.close()
