"""The exchange driven by a front end that is not HTTP/1.1.

A stream-like front end (as an HTTP/2 stream will be: a header list out, body pieces
out, no HTTP/1.1 bytes) forwards requests through a real Exchange to the real built-in
origin over loopback, in this process's gevent hub. The request contexts are read back
from a real ring. Nothing in forkproxy/worker/exchange.py knows this front end exists.
"""

from __future__ import annotations

import json

import gevent
import pytest
from fp import Origin, free_port

from forkproxy import config as config_mod
from forkproxy.context import T_CONNECTED, T_END, T_FIRST_BYTE, T_SENT, RequestContext, decoder
from forkproxy.http.forward import response_fields
from forkproxy.http.framing import Framing
from forkproxy.http.request import Request
from forkproxy.http.tracecontext import parse_traceparent
from forkproxy.shm.ring import Ring
from forkproxy.worker.exchange import Exchange
from forkproxy.worker.front import BodyAborted, FrontEnd
from forkproxy.worker.process import WorkerSpec
from forkproxy.worker.state import POOLED_BUFFERS_IDLE, ListenerRuntime, WorkerState


class StreamFront(FrontEnd):
    """A front end shaped like an HTTP/2 stream: fields and pieces, no wire bytes."""

    __slots__ = ("ws", "listener", "remote", "remote_b", "tls_resumed", "tls_version",
                 "deadline", "greenlet", "closing", "body", "status", "fields", "pieces",
                 "ended", "errors", "continued", "abort_with")

    protocol = "TEST/0"

    def __init__(self, ws, listener, body=()):
        self.ws = ws
        self.listener = listener
        self.remote = "192.0.2.9"
        self.remote_b = None
        self.tls_resumed = None
        self.tls_version = ""
        self.deadline = 0.0
        self.greenlet = None
        self.closing = False
        self.body = list(body)
        self.status = 0
        self.fields: list = []
        self.pieces: list[bytes] = []
        self.ended = False
        self.errors: list[int] = []
        self.continued = False
        self.abort_with = None

    def read_body(self):
        if self.abort_with is not None and not self.body:
            raise BodyAborted(self.abort_with, "body_too_large")
        return self.body.pop(0) if self.body else None

    def send_continue(self):
        self.continued = True

    def send_head(self, ex, first):
        self.status = ex.status
        self.fields = (response_fields(ex.raw_head) if ex.raw_head is not None
                       else list(ex.rhead.headers))
        if first:
            self.pieces.append(bytes(first))

    def send_body(self, data):
        self.pieces.append(bytes(data))

    def end_body(self):
        self.ended = True
        return True

    def send_error(self, status):
        self.errors.append(status)
        return False


@pytest.fixture(scope="module")
def origin():
    o = Origin()
    yield o
    o.stop()


@pytest.fixture
def worker(origin):
    dead = f"127.0.0.1:{free_port()}"
    cfg = config_mod.loads(f"""
        [[listener]]
        listen = "127.0.0.1:{free_port()}"
        upstream = "app"
        [upstream.app]
        servers = [{{ address = "{origin.address}" }}]
        [upstream.dead]
        servers = [{{ address = "{dead}" }}]
        """, check_files=False)
    ring = Ring.create(1 << 16)
    spec = WorkerSpec(cfg=cfg, slot=0, index=0, generation=1, cpu=None, sockets=[],
                      ready_fd=-1, lifeline_fd=-1, ring=ring)
    ws = WorkerState(spec, gevent.get_hub())
    listener = ListenerRuntime("test", ws.upstreams["app"], b"https")
    yield ws, listener, ring
    for up in ws.upstreams.values():
        up.close_idle()
    ring.close()


def contexts(ring) -> list[RequestContext]:
    out = []
    ring.drain(lambda view: out.append(decoder.decode(view)))
    return [r for r in out if isinstance(r, RequestContext)]


def make_request(method: str, path: bytes, body_length: int | None = None) -> Request:
    req = Request()
    req.method = method
    req.target = req.path = path
    req.host = b"exchange.test"
    req.headers = [(b"Accept", b"*/*")]
    req.request_id = b"rid-%d" % len(path)
    if body_length is not None:
        req.content_length = body_length
    else:
        req.chunked = method == "POST"
    req.has_body = method == "POST"
    return req


def forward(ws, front, req, upstream="app"):
    ex = Exchange(ws, front)
    ex.start(req, 0.0, 0.0)
    front.greenlet = gevent.spawn(ex.forward, ws.upstreams[upstream])
    return ex, front.greenlet.get(timeout=20)


def test_a_get_through_a_stream_front_end(worker):
    ws, listener, ring = worker
    front = StreamFront(ws, listener)
    ex, keep = forward(ws, front, make_request("GET", b"/bytes/5000"))
    assert keep and front.status == 200 and front.ended and not front.errors
    assert len(b"".join(front.pieces)) == 5000
    assert (b"Content-Length", b"5000") in [(n, v) for n, v in front.fields]
    assert ex.framing is Framing.LENGTH
    [ctx] = contexts(ring)
    assert (ctx.status, ctx.bytes_out, ctx.listener, ctx.remote) == (200, 5000, "test",
                                                                      "192.0.2.9")
    assert ctx.upstream == "app" and ctx.request_id == "rid-11"
    t = ctx.times
    assert 0 < t[T_CONNECTED] <= t[T_SENT] <= t[T_FIRST_BYTE] <= t[T_END]


def test_the_origin_sees_the_forwarding_headers(worker):
    ws, listener, ring = worker
    front = StreamFront(ws, listener)
    forward(ws, front, make_request("GET", b"/headers"))
    seen = json.loads(b"".join(front.pieces))
    assert front.status == 200 and seen["method"] == "GET" and seen["path"] == "/headers"
    *headers, (name, traceparent) = seen["headers"]
    assert headers == [["Host", "exchange.test"], ["Accept", "*/*"],
                       ["X-Forwarded-For", "192.0.2.9"], ["X-Forwarded-Proto", "https"],
                       ["X-Request-Id", "rid-8"]]
    # a trace started for a request that came without one (tests/test_tracing.py)
    assert name == "traceparent" and parse_traceparent(traceparent.encode()) is not None


def test_a_chunked_request_body_and_a_chunked_response(worker):
    ws, listener, ring = worker
    front = StreamFront(ws, listener, [b"hello ", b"stream ", b"world"])
    ex, keep = forward(ws, front, make_request("POST", b"/echo"))
    assert front.status == 200 and ex.framing is Framing.CHUNKED
    assert b"".join(front.pieces) == b"hello stream world" and front.ended
    [ctx] = contexts(ring)
    assert (ctx.bytes_in, ctx.bytes_out) == (18, 18)


def test_a_sized_body_with_expect_continue(worker):
    ws, listener, ring = worker
    front = StreamFront(ws, listener, [b"x" * 1000, b"y" * 24])
    req = make_request("POST", b"/upload", body_length=1024)
    req.expect_continue = True
    forward(ws, front, req)
    assert front.continued and front.status == 200
    assert b"".join(front.pieces).startswith(b"1024 ")


def test_head_has_no_body(worker):
    ws, listener, ring = worker
    front = StreamFront(ws, listener)
    ex, _ = forward(ws, front, make_request("HEAD", b"/bytes/100"))
    assert ex.framing is Framing.NONE and front.pieces == [] and front.ended


def test_failures_are_answered_through_the_front_end(worker):
    ws, listener, ring = worker
    front = StreamFront(ws, listener)
    _, keep = forward(ws, front, make_request("GET", b"/"), upstream="dead")
    assert front.errors == [502] and not keep and front.status == 0
    [ctx] = contexts(ring)
    assert ctx.status == 502 and ctx.error.startswith("upstream connect")


def test_a_failed_request_body_is_the_clients_status(worker):
    ws, listener, ring = worker
    front = StreamFront(ws, listener, [b"part"])
    front.abort_with = 413
    forward(ws, front, make_request("POST", b"/upload", body_length=100))
    assert front.errors == [413]
    [ctx] = contexts(ring)
    assert (ctx.status, ctx.reject) == (413, "body_too_large")


def test_one_exchange_serves_requests_one_after_another(worker):
    ws, listener, ring = worker
    front = StreamFront(ws, listener)
    ex = Exchange(ws, front)
    for n in (10, 20, 30):
        front.pieces.clear()
        ex.start(make_request("GET", b"/bytes/%d" % n), 0.0, 0.0)
        assert gevent.spawn(ex.forward, ws.upstreams["app"]).get(timeout=20)
        assert len(b"".join(front.pieces)) == n
    ctxs = contexts(ring)
    assert [c.bytes_out for c in ctxs] == [10, 20, 30]
    assert [c.reused for c in ctxs] == [False, True, True]  # the pooled connection


def test_relay_buffers_pool_to_the_peak_in_flight_and_trim_back(worker):
    """More responses in flight than the idle pool keeps must not map a buffer per
    request once the peak was seen; a fall in load gives the extra buffers back."""
    ws = worker[0]
    peak = [ws.get_buffer() for _ in range(300)]
    for buf in peak:
        ws.put_buffer(buf)
    again = [ws.get_buffer() for _ in range(300)]
    assert {id(b) for b in again} == {id(b) for b in peak}  # all reused, none new
    for buf in again:
        ws.put_buffer(buf)
    ws.trim_buffers()
    assert len(ws._buffers) == POOLED_BUFFERS_IDLE
