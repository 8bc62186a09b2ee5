"""Issue 8: request smuggling and malformed input, through a real proxy (2 workers).

A table-driven corpus: every case is raw bytes on a fresh connection, and asserts the
statuses the client gets, that the connection is closed afterwards, and exactly which
requests reached the origin (a strict recording origin: anything malformed it receives
fails the test). After every case a request on a fresh connection must be answered
correctly (no desync), and the worker pids never change (no crash).

Then property tests (hypothesis) generating malformed requests and chunked bodies, and
a response corpus against a misbehaving origin (502, the upstream connection is never
reused).
"""

from __future__ import annotations

import socket
import time

import pytest
from fp import Proxy, connect, recv_response, wait_for
from hostile import RecordingOrigin, ScriptedOrigin, read_all, statuses
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

H = b"Host: x\r\n"
CLOSE = b"Connection: close\r\n"


def _chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def _body_is(expected: bytes):
    def check(seen):
        assert seen[0].body == expected, seen[0].body[:100]
        assert not seen[0].header("transfer-encoding") or seen[0].header(
            "transfer-encoding") == ["chunked"]
    return check


def _host_is(expected: str):
    def check(seen):
        assert seen[0].header("host") == [expected]
    return check


def _no_trailer(seen):
    assert seen[0].body == b"hello"
    assert not seen[0].header("x-trailer")


def _no_underscore_header(seen):
    assert not seen[0].header("x_forwarded_for")


BIG = 64 * 1024  # max_body_size of the corpus proxy

# (id, raw bytes, statuses the client gets, paths the origin sees, extra check)
CORPUS = [
    # -- Content-Length / Transfer-Encoding conflicts (CL.TE, TE.CL) --------------------
    ("cl-te", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", [400], []),
    ("te-cl", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", [400], []),
    ("cl-te-classic", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nSMUGGLED", [400], []),
    ("te-cl-classic", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n", [400], []),
    ("cl-differing", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", [400], []),
    ("cl-duplicate-same", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", [400], []),
    ("cl-list", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", [400], []),
    ("cl-negative", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", [400], []),
    ("cl-plus", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", [400], []),
    ("cl-hex", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc", [400], []),
    ("cl-space-inside", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 1 2\r\n\r\nabc", [400], []),
    ("cl-overflow", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n", [400], []),
    ("cl-underscore", b"POST /a HTTP/1.1\r\n" + H + b"Content_Length: 3\r\n\r\nabc", [400], []),
    # -- Transfer-Encoding obfuscation (TE.TE) ------------------------------------------
    ("te-chunked-identity", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", [400], []),
    ("te-identity", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n", [400], []),
    ("te-gzip", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", [400], []),
    ("te-gzip-chunked", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", [501], []),
    ("te-xchunked", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", [400], []),
    ("te-chunkedx", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunkedx\r\n\r\n0\r\n\r\n", [400], []),
    ("te-chunked-param", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked;q=1\r\n\r\n0\r\n\r\n", [400], []),
    ("te-empty-element", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n", [400], []),
    ("te-chunked-twice-list", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", [400], []),
    ("te-twice", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", [400], []),
    ("te-space-before-colon", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", [400], []),
    ("te-tab-before-colon", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n", [400], []),
    ("te-tab-value", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding:\tchunked\t\r\n\r\n0\r\n\r\n", [400], []),
    ("te-vertical-tab", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n", [400], []),
    ("te-obs-fold", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", [400], []),
    ("te-leading-space-line", b"POST /a HTTP/1.1\r\n Transfer-Encoding: chunked\r\n" + H + b"\r\n0\r\n\r\n", [400], []),
    ("te-underscore", b"POST /a HTTP/1.1\r\n" + H + b"Transfer_Encoding: chunked\r\n\r\n0\r\n\r\n", [400], []),
    ("te-http10", b"POST /a HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", [400], []),
    # -- chunked framing ------------------------------------------------------------------
    ("chunk-size-invalid", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", [400], []),
    ("chunk-size-0x", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", [400], []),
    ("chunk-size-negative", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", [400], []),
    ("chunk-size-space", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n", [400], []),
    ("chunk-size-overflow", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n", [400], []),
    ("chunk-size-huge", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n" + b"x" * (BIG + 10), [413], []),
    ("chunk-bare-lf-size", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", [400], []),
    ("chunk-bare-lf-data", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n", [400], []),
    ("chunk-bare-lf-last", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\n\n", [400], []),
    ("chunk-bare-cr", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\rhello\r\n0\r\n\r\n", [400], []),
    ("chunk-data-too-long", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n", [400], []),
    ("chunk-ext-bare-lf", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n", [400], []),
    ("chunk-ext-ctl", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5;a=\x01\r\nhello\r\n0\r\n\r\n", [400], []),
    ("chunk-trailer-cl", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n", [400], []),
    ("chunk-trailer-obs-fold", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n", [400], []),
    ("chunk-body-too-large", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(*[b"y" * 8000] * 10), [413], []),
    ("chunk-ext-flood", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1;" + b"e" * 200000 + b"\r\nx\r\n0\r\n\r\n", [400], []),
    # -- control bytes, obs-fold, line endings --------------------------------------------
    ("obs-fold", b"GET /a HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", [400], []),
    ("nul-in-value", b"GET /a HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", [400], []),
    ("ctl-in-value", b"GET /a HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n", [400], []),
    ("del-in-value", b"GET /a HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n", [400], []),
    ("nul-in-name", b"GET /a HTTP/1.1\r\n" + H + b"X-\x00A: a\r\n\r\n", [400], []),
    ("space-in-name", b"GET /a HTTP/1.1\r\n" + H + b"X A: a\r\n\r\n", [400], []),
    ("empty-name", b"GET /a HTTP/1.1\r\n" + H + b": a\r\n\r\n", [400], []),
    ("no-colon", b"GET /a HTTP/1.1\r\n" + H + b"X-A\r\n\r\n", [400], []),
    ("nul-in-target", b"GET /a\x00b HTTP/1.1\r\n" + H + b"\r\n", [400], []),
    ("ctl-in-target", b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", [400], []),
    ("tab-in-target", b"GET /a\tb HTTP/1.1\r\n" + H + b"\r\n", [400], []),
    ("8bit-in-target", b"GET /a\xffb HTTP/1.1\r\n" + H + b"\r\n", [400], []),
    ("nul-in-method", b"G\x00T /a HTTP/1.1\r\n" + H + b"\r\n", [400], []),
    ("lowercase-method", b"get /a HTTP/1.1\r\n" + H + b"\r\n", [400], []),
    ("bare-lf-request", b"GET /a HTTP/1.1\n" + H.replace(b"\r\n", b"\n") + b"\n", [400], []),
    ("bare-lf-header", b"GET /a HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", [400], []),
    ("bare-cr-header", b"GET /a HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n", [400], []),
    ("space-after-version", b"GET /a HTTP/1.1 \r\n" + H + b"\r\n", [400], []),
    # -- Host and request target ------------------------------------------------------------
    ("host-missing", b"GET /a HTTP/1.1\r\n\r\n", [400], []),
    ("host-twice", b"GET /a HTTP/1.1\r\n" + H + b"Host: y\r\n\r\n", [400], []),
    ("host-twice-same", b"GET /a HTTP/1.1\r\n" + H + H + b"\r\n", [400], []),
    ("host-slash", b"GET /a HTTP/1.1\r\nHost: x/y\r\n\r\n", [400], []),
    ("host-userinfo", b"GET /a HTTP/1.1\r\nHost: u@x\r\n\r\n", [400], []),
    ("host-space", b"GET /a HTTP/1.1\r\nHost: x y\r\n\r\n", [400], []),
    ("host-empty", b"GET /a HTTP/1.1\r\nHost:\r\n\r\n", [400], []),
    ("absolute-host-differs", b"GET http://evil/a HTTP/1.1\r\n" + H + b"\r\n", [400], []),
    ("absolute-userinfo", b"GET http://u@x/a HTTP/1.1\r\n" + H + b"\r\n", [400], []),
    ("absolute-no-authority", b"GET http:///a HTTP/1.1\r\n" + H + b"\r\n", [400], []),
    ("fragment", b"GET /a#frag HTTP/1.1\r\n" + H + b"\r\n", [400], []),
    ("relative-target", b"GET a HTTP/1.1\r\n" + H + b"\r\n", [400], []),
    ("asterisk-get", b"GET * HTTP/1.1\r\n" + H + b"\r\n", [400], []),
    # -- versions, methods, upgrades ----------------------------------------------------
    ("http2-version", b"GET /a HTTP/2.0\r\n" + H + b"\r\n", [505], []),
    ("http12-version", b"GET /a HTTP/1.2\r\n" + H + b"\r\n", [400], []),
    ("http09", b"GET /a\r\n\r\n", [400], []),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", [400], []),
    ("connect", b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", [501], []),
    ("upgrade-with-body", b"POST /a HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 3\r\n\r\nabc", [501], []),
    ("expect-unknown", b"POST /a HTTP/1.1\r\n" + H + b"Expect: 200-ok\r\nContent-Length: 0\r\n\r\n", [417], []),
    # -- limits ---------------------------------------------------------------------------
    ("uri-too-long", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", [414], []),
    ("header-too-long", b"GET /a HTTP/1.1\r\n" + H + b"X-A: " + b"a" * 9000 + b"\r\n\r\n", [431], []),
    ("too-many-headers", b"GET /a HTTP/1.1\r\n" + H + b"".join(b"X-%d: a\r\n" % i for i in range(101)) + b"\r\n", [431], []),
    ("headers-total", b"GET /a HTTP/1.1\r\n" + H + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 7000) for i in range(6)) + b"\r\n", [431], []),
    ("cl-body-too-large", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % (BIG + 1), [413], []),
    # -- valid-then-bad pipelines: the good request is served, nothing after the bad one --
    ("pipeline-then-cl-te", b"GET /first HTTP/1.1\r\n" + H + b"\r\nPOST /a HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /third HTTP/1.1\r\n" + H + b"\r\n", [200, 400], ["/first"]),
    ("pipeline-body-then-bad", b"POST /first HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhelloGET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", [200, 400], ["/first"]),
    ("pipeline-chunked-then-bad", b"POST /first HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /a\x00 HTTP/1.1\r\n" + H + b"\r\n", [200, 400], ["/first"]),
    # -- what is accepted is re-framed by the proxy -------------------------------------
    ("chunked-ext-valid", b"POST /a HTTP/1.1\r\n" + H + CLOSE + b"Transfer-Encoding: chunked\r\n\r\n5;a=b;c=\"d\"\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", [200], ["/a"], _body_is(b"hello world")),
    ("chunked-trailer-dropped", b"POST /a HTTP/1.1\r\n" + H + CLOSE + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n", [200], ["/a"], _no_trailer),
    ("chunked-upper-hex", b"POST /a HTTP/1.1\r\n" + H + CLOSE + b"Transfer-Encoding: CHUNKED\r\n\r\n00A\r\n0123456789\r\n0\r\n\r\n", [200], ["/a"], _body_is(b"0123456789")),
    ("chunk-then-smuggled-request", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /b HTTP/1.1\r\n" + H + CLOSE + b"\r\n", [200, 200], ["/a", "/b"]),
    ("absolute-form", b"GET http://X:80/p?q=1 HTTP/1.1\r\nHost: x:80\r\n" + CLOSE + b"\r\n", [200], ["/p?q=1"], _host_is("X:80")),
    ("absolute-form-no-path", b"GET http://x?q HTTP/1.1\r\n" + CLOSE + b"\r\n", [200], ["/?q"], _host_is("x")),
    ("get-with-body", b"GET /a HTTP/1.1\r\n" + H + CLOSE + b"Content-Length: 3\r\n\r\nabc", [200], ["/a"], _body_is(b"abc")),
    ("obs-text-value", b"GET /a HTTP/1.1\r\n" + H + CLOSE + b"X-A: caf\xe9\r\n\r\n", [200], ["/a"]),
    ("leading-empty-line", b"\r\nGET /a HTTP/1.1\r\n" + H + CLOSE + b"\r\n", [200], ["/a"]),
    ("underscore-header", b"GET /a HTTP/1.1\r\n" + H + CLOSE + b"X_Forwarded_For: 1.2.3.4\r\n\r\n", [200], ["/a"]),
]


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    origin = RecordingOrigin()
    p = Proxy(tmp_path_factory.mktemp("smuggling"), origin.address, workers=2,
              server_extra=f'max_body_size = "{BIG}"\nclient_body_timeout = "3s"\n'
                           'client_header_timeout = "3s"')
    pids = sorted(p.workers_pids())
    yield p, origin
    try:
        assert sorted(p.workers_pids()) == pids, "a worker crashed"
        assert not origin.errors, origin.errors
        p.stop()
    finally:
        p.kill_all()
        origin.stop()


_sentinel = iter(range(1_000_000))


def _sentinel_ok(p, origin) -> None:
    """A valid request on a fresh connection is answered correctly (no desync)."""
    n = next(_sentinel)
    mark = origin.mark()
    with connect(p.port) as c:
        c.sendall(b"GET /sentinel/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % n)
        raw, closed = read_all(c.sock)
    assert statuses(raw) == [200] and raw.endswith(b"GET /sentinel/%d 0" % n), raw[-200:]
    assert [s.path for s in origin.since(mark)] == [f"/sentinel/{n}"]


def test_corpus_size():
    assert len(CORPUS) >= 40
    assert len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_smuggling_corpus(rig, case):
    p, origin = rig
    name, raw, want, paths = case[:4]
    mark = origin.mark()
    with connect(p.port) as c:
        c.sendall(raw)
        got, closed = read_all(c.sock, timeout=5)
    assert statuses(got) == want, got[:300]
    assert closed, "the connection stayed open"
    if want[-1] >= 400:
        assert b"Connection: close" in got.rsplit(b"HTTP/1.1 ", 1)[-1]
    seen = origin.since(mark)
    assert [s.path for s in seen] == paths
    if len(case) > 4:
        case[4](seen)
    assert not origin.errors, origin.errors
    _sentinel_ok(p, origin)


# -- property tests -----------------------------------------------------------------------

_framing_headers = st.sampled_from([
    b"Content-Length: 5", b"Content-Length: 0", b"Content-Length: 3", b"Content-Length:5",
    b"Content-Length: 5 ", b"Content-Length: 05", b"Content-Length: -5", b"Content-Length: 5, 5",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: Chunked", b"Transfer-Encoding:chunked",
    b"Transfer-Encoding: chunked ", b"Transfer-Encoding: chunked, identity",
    b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: xchunked",
    b"Transfer-Encoding:\tchunked", b"Transfer-Encoding : chunked", b" Transfer-Encoding: chunked",
    b"Transfer_Encoding: chunked", b"Content_Length: 5", b"Host: y", b"Host: x:80",
    b"Connection: close", b"Connection: keep-alive", b"Connection: upgrade",
    b"Upgrade: websocket", b"Expect: 100-continue", b"Expect: nope", b"TE: trailers",
    b"X-A: \x00", b"X-A: a\x01", b"X-A: \xff", b"X-A:", b"X-A: a\r\n b",
])
_any_header = st.builds(lambda n, v: n + b": " + v, st.binary(min_size=1, max_size=8),
                        st.binary(max_size=8))
_bodies = st.sampled_from([b"", b"hello", b"abc", b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n",
                           b"5\nhello\n0\n\n", b"3\r\nhello\r\n0\r\n\r\n",
                           b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
                           b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"])


@st.composite
def malformed_requests(draw):
    """Mostly well-formed requests with smuggling-prone framing headers, and sometimes
    one byte-level mutation (a control byte, a bare CR/LF, a byte dropped)."""
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS"]))
    target = draw(st.sampled_from([b"/p", b"/p?q=1", b"http://x/p", b"http://y/p", b"/p#f",
                                   b"*", b"/p%00"]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2"]))
    lines = [method + b" " + target + b" " + version]
    if draw(st.integers(0, 9)):
        lines.append(b"Host: x")
    lines += draw(st.lists(st.one_of(_framing_headers, _framing_headers, _any_header),
                           max_size=4))
    raw = b"\r\n".join(lines) + b"\r\n\r\n" + draw(_bodies)
    if draw(st.integers(0, 2)) == 0 and raw:
        i = draw(st.integers(0, len(raw) - 1))
        repl = draw(st.sampled_from([b"", b"\n", b"\r", b"\x00", b"\x7f", b" ", b"\t", b"\x0b"]))
        raw = raw[:i] + repl + raw[i + 1:]
    return raw


def _one(p, origin, raw: bytes) -> None:
    mark = origin.mark()
    try:
        with connect(p.port, timeout=5) as c:
            c.sendall(raw)
            c.sock.shutdown(socket.SHUT_WR)  # no more input: every response is final
            got, closed = read_all(c.sock, timeout=5)
    except (ConnectionResetError, BrokenPipeError):
        got, closed = b"", True
    assert closed, f"no close after {raw!r}: {got[:200]!r}"
    codes = statuses(got)
    event(f"statuses {codes}")
    assert len(codes) <= raw.count(b"HTTP/") + 1, (raw, got)
    # the origin saw whole, well-formed requests only, never more than the client sent
    assert not origin.errors, origin.errors
    seen = origin.since(mark)
    assert len(seen) <= max(1, raw.count(b"HTTP/1")), (raw, seen)
    assert len([c for c in codes if c == 200]) == len(seen), (raw, got, seen)
    _sentinel_ok(p, origin)


@settings(max_examples=600, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=malformed_requests())
def test_property_malformed_requests(rig, raw):
    _one(*rig, raw)


@st.composite
def chunked_bodies(draw):
    """A chunked request, valid or with one byte of its framing broken."""
    pieces = draw(st.lists(st.binary(min_size=1, max_size=300), max_size=6))
    out = []
    for piece in pieces:
        size = b"%x" % len(piece)
        if draw(st.booleans()):
            size = size.upper()
        size = b"0" * draw(st.integers(0, 3)) + size
        ext = draw(st.sampled_from([b"", b";a", b";a=b", b';a="q"', b";a=b;c"]))
        out.append(size + ext + b"\r\n" + piece + b"\r\n")
    trailer = draw(st.sampled_from([b"", b"X-T: 1\r\n"]))
    framing = b"".join(out) + b"0\r\n" + trailer + b"\r\n"
    corrupt = draw(st.booleans())
    if corrupt and framing:
        i = draw(st.integers(0, len(framing) - 1))
        how = draw(st.sampled_from(["drop", "dup", "lf", "nul", "z"]))
        b = framing[i:i + 1]
        repl = {"drop": b"", "dup": b + b, "lf": b"\n", "nul": b"\x00", "z": b"z"}[how]
        framing = framing[:i] + repl + framing[i + 1:]
    return b"".join(pieces), framing, corrupt


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=chunked_bodies())
def test_property_chunked_bodies(rig, case):
    p, origin = rig
    body, framing, corrupt = case
    raw = (b"POST /chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n" + framing)
    mark = origin.mark()
    with connect(p.port, timeout=5) as c:
        c.sendall(raw)
        c.sock.shutdown(socket.SHUT_WR)  # a truncated body ends here, not at a timeout
        got, closed = read_all(c.sock, timeout=5)
    assert closed
    codes = statuses(got)
    event(f"{'corrupt' if corrupt else 'valid'} {codes}")
    seen = origin.since(mark)
    assert not origin.errors, origin.errors
    if not corrupt:
        assert codes == [200], (raw, got)
        assert [s.body for s in seen] == [body]
    else:
        assert codes in ([200], [400], [413], []), (raw, got)
        if codes == [200]:  # the broken byte still parsed: the origin got what we parsed
            assert len(seen) == 1 and got.endswith(b" %d" % len(seen[0].body))
        else:
            assert seen == []
    _sentinel_ok(p, origin)


# -- responses ------------------------------------------------------------------------------

RESPONSES = {
    "garbage": b"HTTP/1.1 OK\r\n\r\n",
    "not-http": b"ICY 200 OK\r\n\r\n",
    "http2": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "rtsp": b"RTSP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "status-600": b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n",
    "status-99": b"HTTP/1.1 99 Odd\r\nContent-Length: 0\r\n\r\n",
    "reason-nul": b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",
    "reason-ctl": b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n",
    "cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "cl-differing": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    "cl-negative": b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\n",
    "te-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    "te-xchunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
    "nul-value": b"HTTP/1.1 200 OK\r\nX-A: a\x00\r\nContent-Length: 0\r\n\r\n",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "bad-name": b"HTTP/1.1 200 OK\r\nX(A): a\r\nContent-Length: 0\r\n\r\n",
    "head-too-large": b"HTTP/1.1 200 OK\r\n" + b"X-A: " + b"a" * 70000 + b"\r\n\r\n",
    "unexpected-101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
}
# the head went out before the body broke: the client gets a truncated response
# and its connection closes; the upstream connection is discarded all the same
BROKEN_BODIES = {
    "chunk-bad-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n",
    "chunk-bare-lf": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n",
}
# framed correctly but with bytes after the end: relayed, never pooled
EXTRA = {
    "extra-after-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmugl",
    "extra-after-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
}


#: valid responses whose Connection field names other fields: those are hop-by-hop (RFC 9110
#: section 7.6.1) and never reach the client, whichever path (fast head or full parser)
#: the head takes and whatever the framing
CONNECTION_NAMED = {
    "named": b"HTTP/1.1 200 OK\r\nConnection: X-Up\r\nX-Up: 1\r\nX-Kept: 2\r\n"
             b"Content-Length: 2\r\n\r\nok",
    "named-after": b"HTTP/1.1 200 OK\r\nX-Up: 1\r\nX-Kept: 2\r\nContent-Length: 2\r\n"
                   b"Connection: keep-alive, x-up\r\n\r\nok",
    "named-two-fields": b"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: X-Up,X-Down\r\n"
                        b"X-Down: 3\r\nX-Up: 1\r\nX-Kept: 2\r\nContent-Length: 2\r\n\r\nok",
    "named-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: X-Up\r\n"
                     b"X-Up: 1\r\nX-Kept: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "named-http10": b"HTTP/1.0 200 OK\r\nConnection: keep-alive, X-Up\r\nX-Up: 1\r\n"
                    b"X-Kept: 2\r\nContent-Length: 2\r\n\r\nok",
}


def test_fields_named_in_connection_are_not_relayed(tmp_path, proxies):
    origin = ScriptedOrigin(CONNECTION_NAMED)
    try:
        p = proxies(tmp_path, origin.address, workers=1)
        for _ in range(2):  # twice: the second time fast_head answers from its memo
            with connect(p.port) as c:
                for name in CONNECTION_NAMED:
                    c.sendall(b"GET /r/%s HTTP/1.1\r\nHost: x\r\n\r\n" % name.encode())
                    status, headers, body, _ = recv_response(c)
                    assert (status, body) == (200, b"ok"), (name, status, body)
                    assert headers.get("x-kept") == "2", (name, headers)
                    assert "x-up" not in headers and "x-down" not in headers, (name, headers)
        p.stop()
    finally:
        origin.stop()


def test_fields_named_in_a_101s_connection_are_not_relayed(tmp_path, proxies):
    """The tunnel's 101 is rebuilt from the upstream's: fields its Connection names stay
    behind as well (Upgrade itself is rebuilt for the client)."""
    origin = ScriptedOrigin({"up": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                   b"Connection: Upgrade, X-Up\r\nX-Up: 1\r\nX-Kept: 2\r\n\r\n"})
    try:
        p = proxies(tmp_path, origin.address, workers=1)
        with connect(p.port) as c:
            c.sendall(b"GET /r/up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                      b"Upgrade: websocket\r\n\r\n")
            status, headers, _, _ = recv_response(c)
        assert status == 101 and headers.get("x-kept") == "2", headers
        assert "x-up" not in headers and headers["upgrade"] == "websocket", headers
        p.stop()
    finally:
        origin.stop()


def test_malformed_responses_are_502_and_never_reused(tmp_path, proxies):
    origin = ScriptedOrigin({**RESPONSES, **BROKEN_BODIES, **EXTRA})
    try:
        p = proxies(tmp_path, origin.address, workers=1, upstream_extra='read_timeout = "2s"')
        worker = p.workers_pids()
        with connect(p.port) as c:  # one pooled connection the bad ones must not reuse
            c.sendall(b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
            c.recv(4096)
        for name in RESPONSES:
            with connect(p.port) as c:
                c.sendall(b"GET /r/%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % name.encode())
                got, _ = read_all(c.sock, timeout=30)
            assert statuses(got) == [502], (name, got[:200])
            with connect(p.port) as c:  # the next request is served on a sound connection
                c.sendall(b"GET /after/%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % name.encode())
                got, _ = read_all(c.sock, timeout=30)
            assert got.endswith(b"good"), (name, got)
        for name in list(BROKEN_BODIES) + list(EXTRA):
            with connect(p.port) as c:
                c.sendall(b"GET /r/%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % name.encode())
                got, closed = read_all(c.sock, timeout=30)
            assert statuses(got)[:1] == [200], (name, got)
            if name in BROKEN_BODIES:
                assert closed and not got.endswith(b"0\r\n\r\n"), (name, got)
            with connect(p.port) as c:
                c.sendall(b"GET /after/%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % name.encode())
                got, _ = read_all(c.sock, timeout=30)
            assert got.endswith(b"good"), (name, got)
        bad = {f"/r/{n}" for n in [*RESPONSES, *BROKEN_BODIES, *EXTRA]}

        def discarded():
            with origin.lock:
                conns = {cid: list(paths) for cid, paths in origin.conns.items()}
                closed = set(origin.closed)
            for cid, paths in conns.items():
                for i, path in enumerate(paths):
                    if path in bad:
                        assert i == len(paths) - 1, f"connection reused after {path}: {paths}"
                        if cid not in closed:
                            return False
            return True

        wait_for(discarded, timeout=30, what="bad upstream connections closed by the proxy")
        assert p.workers_pids() == worker
        p.stop()
    finally:
        origin.stop()


def test_interim_responses_in_the_same_read_as_the_final_one(tmp_path, proxies):
    """103 Early Hints (or 100) and the final response in one segment: the final head is
    already buffered and must be parsed from the buffer, not waited for."""
    origin = ScriptedOrigin({
        "hints": b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                 b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "two": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n"
               b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    })
    try:
        # the origin keeps the connection open: a proxy that waited for more bytes would
        # answer 504 after read_timeout instead of the 200
        p = proxies(tmp_path, origin.address, upstream_extra='read_timeout = "20s"')
        # the interim responses are relayed (the client sent no Expect: the 100 too)
        for name, relayed in (("hints", [103, 200]), ("two", [100, 103, 200])):
            with connect(p.port) as c:
                c.sendall(b"GET /r/%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                          % name.encode())
                got, closed = read_all(c.sock, timeout=60)
            assert statuses(got) == relayed and closed, (name, got)
        p.stop()
    finally:
        origin.stop()


def test_chunked_413_discovered_mid_stream_closes_both_sides(tmp_path, proxies):
    """The upstream already has the head and part of the body when the limit is crossed:
    the client gets 413, the upstream exchange is abandoned (never a complete request)."""
    origin = RecordingOrigin()
    try:
        p = proxies(tmp_path, origin.address, server_extra='max_body_size = "100k"')
        with connect(p.port) as c:
            c.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(30):
                try:
                    c.sendall(b"1000\r\n" + b"z" * 4096 + b"\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    break
                time.sleep(0.005)
            got, closed = read_all(c.sock, timeout=5)
        assert statuses(got) == [413] and closed
        wait_for(lambda: origin.incomplete == 1 or origin.connections == 0, timeout=5,
                 what="the upstream exchange abandoned")
        assert origin.seen == [] and not origin.errors
        p.stop()
    finally:
        origin.stop()
