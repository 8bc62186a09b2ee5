"""Issue 15, gRPC end to end: a real grpcio server and client (generic handlers on bytes,
tests/grpcutil.py) on loopback, through a real forkproxy master and workers. The client
speaks TLS with ALPN h2 or h2c to the proxy; the proxy speaks h2c or h2 (TLS, verified
against the test CA) to the server: every call kind is checked over all four pairs.
A raw h2 client (tests/h2client.py) checks the shape of the proxy's own gRPC answers
(HTTP 200, application/grpc, grpc-status in trailers), which grpcio alone cannot tell
from an HTTP error status mapped to the same code."""

from __future__ import annotations

import itertools
import json
import os
import queue
import time
import urllib.request

import grpc
import pytest
from fp import Proxy, free_port, wait_for
from grpcutil import (
    FLOOD_MESSAGE,
    SLOW_SECONDS,
    Certs,
    EchoClient,
    GrpcServer,
    StallingOrigin,
    channel,
    drain,
    frame,
    grpc_request,
    timed,
    unframe,
    wait_ready,
    widen_windows,
)
from h2client import SocketClient

H2C_LISTENER = 'protocols = ["http/1.1", "h2c"]'
FOUR_MIB = 4 * 1024 * 1024
CLIENTS = ("tls", "h2c")  # how the client reaches the proxy
UPSTREAMS = ("h2c", "h2")  # how the proxy reaches the server


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs.create(tmp_path_factory.mktemp("grpc-pki"))


def upstream_extra(protocol: str, certs: Certs) -> str:
    if protocol == "h2":
        return (f'protocol = "h2"\n'
                f'tls = {{ ca = "{certs.paths["ca"]}", server_name = "localhost" }}\n')
    return f'protocol = "{protocol}"\n'


def grpc_proxy(tmp_path, address: str, protocol: str, certs: Certs, *, start: bool = True,
               server_extra: str = "") -> Proxy:
    """A proxy with an h2c listener (``port``) and a TLS one (``tls_port``, ALPN h2 by
    default) to one upstream at ``address`` spoken to with ``protocol``."""
    tls_port = free_port()
    tls_listener = (f'\n[[listener]]\nlisten = "127.0.0.1:{tls_port}"\nupstream = "grpc"\n'
                    f'[listener.tls]\ncertificates = [{{ cert = "{certs.paths["cert"]}", '
                    f'key = "{certs.paths["key"]}" }}]\n')
    p = Proxy(tmp_path, {"grpc": [address]}, listener_extra=H2C_LISTENER,
              upstream_extra=upstream_extra(protocol, certs), extra=tls_listener, admin=True,
              start=False, server_extra=server_extra)
    p.tls_port = tls_port
    if start:
        try:
            p.start()
        except BaseException:
            p.kill_all()
            raise
    return p


def client_for(p: Proxy, client: str, certs: Certs) -> EchoClient:
    ch = (channel(p.tls_port, certs, host="localhost") if client == "tls"
          else channel(p.port))
    wait_ready(ch, 30)
    return EchoClient(ch)


@pytest.fixture(scope="module")
def servers(certs):
    """One test.Echo server per upstream protocol: h2c, and TLS for h2."""
    s = {"h2c": GrpcServer(), "h2": GrpcServer(certs)}
    yield s
    for server in s.values():
        server.stop()


@pytest.fixture(scope="module")
def routes(tmp_path_factory, servers, certs):
    """A proxy per upstream protocol (made on first use), shared by the module's tests."""
    made: dict[str, Proxy] = {}

    def get(upstream: str) -> Proxy:
        if upstream not in made:
            d = tmp_path_factory.mktemp(f"grpc-proxy-{upstream}")
            made[upstream] = grpc_proxy(d, servers[upstream].address, upstream, certs)
        return made[upstream]

    yield get
    for p in made.values():
        p.stop()


@pytest.fixture(params=list(itertools.product(CLIENTS, UPSTREAMS)),
                ids=lambda pair: f"client-{pair[0]}-upstream-{pair[1]}")
def route(request, routes, servers, certs):
    """(client, proxy, server) for one client/upstream pair."""
    client_kind, upstream = request.param
    p = routes(upstream)
    c = client_for(p, client_kind, certs)
    yield c, p, servers[upstream]
    c.close()


# -- the call kinds, over every client/upstream pair -------------------------------------


def test_unary_echo_and_metadata_both_ways(route):
    c, _, _ = route
    reply, call = c.unary.with_call(b"hello grpc", timeout=30,
                                    metadata=[("x-client", "one"), ("x-bin-bin", b"\x00\xff")])
    assert reply == b"hello grpc"
    initial = dict(call.initial_metadata())
    assert initial["x-client"] == "one" and initial["x-bin-bin"] == b"\x00\xff"
    assert dict(call.trailing_metadata())["x-trailer"] == "done"
    assert call.code() is grpc.StatusCode.OK


def test_abort_not_found_keeps_its_details(route):
    c, _, _ = route
    err, _ = timed(c.not_found, b"item 7", timeout=30)
    assert isinstance(err, grpc.RpcError), err
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert err.details() == "no such thing: item 7"


def test_one_thousand_server_streamed_messages(route):
    c, _, _ = route
    got = list(c.stream(b"1000", timeout=60))
    assert got == [b"%d" % i for i in range(1000)]


def test_client_streaming(route):
    c, _, _ = route
    reply = c.collect(iter([b"x" * i for i in range(1, 201)]), timeout=60)
    assert reply == b"200 %d" % sum(range(1, 201))


def test_one_hundred_bidi_ping_pongs_in_order(route):
    """Each ping is sent only after the previous pong arrived: the proxy must carry each
    message as it comes, both ways, rather than wait for the end of either stream."""
    c, _, _ = route
    pings: queue.Queue = queue.Queue()

    def requests():
        while (m := pings.get()) is not None:
            yield m

    replies = c.ping_pong(requests(), timeout=60)
    for i in range(100):
        pings.put(b"ping %d" % i)
        assert next(replies) == b"pong ping %d" % i
    pings.put(None)
    assert list(replies) == []
    assert replies.code() is grpc.StatusCode.OK


def test_four_mib_messages_each_way(route):
    c, _, _ = route
    payload = os.urandom(FOUR_MIB)
    assert c.unary(payload, timeout=60) == payload
    up = c.collect(iter([payload]), timeout=60)
    assert up == b"1 %d" % FOUR_MIB


def test_a_200ms_deadline_on_a_2s_handler(route):
    c, _, server = route
    before = server.seen.cancelled.count("Slow")
    err, took = timed(c.slow, b"x", timeout=0.2)
    assert isinstance(err, grpc.RpcError), err
    assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert took < 1.0
    # the call ended at the server too, long before its 2 s
    wait_for(lambda: server.seen.cancelled.count("Slow") > before, timeout=SLOW_SECONDS,
             what="the server's handler to see its call end")


def test_a_client_that_does_not_read_holds_the_server_back(routes, servers):
    """Backpressure: the server streams 32 MiB to a raw h2 client that reads nothing (its
    windows are 1 MiB). The proxy must stop taking from the server while it cannot give
    to the client: the server gets at most half of it out before it is held (socket
    buffers and both HTTP/2 windows in between; nginx's grpc_pass lets 4 MiB out), then
    all of it arrives."""
    p, server = routes("h2c"), servers["h2c"]
    total = 128  # messages of FLOOD_MESSAGE bytes
    c = SocketClient(p.port, timeout=60)
    widen_windows(c, 1 << 20)
    try:
        before, calls = server.seen.flooded, server.seen.calls.count("Flood")
        sid = c.send(grpc_request("/test.Echo/Flood"), frame(b"%d" % total))
        wait_for(lambda: server.seen.calls.count("Flood") > calls, timeout=30,
                 what="the call to reach the server")
        held = wait_stable(lambda: server.seen.flooded - before)
        assert held < total // 2, f"{held} of {total} messages left the server unread"
        out = drain(c, sid)
    finally:
        c.close()
    messages = unframe(out["body"])
    assert len(messages) == total and set(messages) == {b"f" * FLOOD_MESSAGE}, (
        len(messages), {k: v for k, v in out.items() if k != "body"}, held)
    assert out["trailers"][b"grpc-status"] == b"0"
    assert server.seen.flooded - before == total


def test_a_client_with_64k_windows_reads_a_long_stream(routes):
    """A client with HTTP/2's default 64 KiB windows (the h2 library's) acknowledges
    every 32 KiB it reads, on the stream and on the connection: 2 WINDOW_UPDATE frames
    per 32 KiB, ~2,000 for a 32 MiB stream. Those are the flow control working, not a
    control-frame flood: the whole stream must arrive."""
    p = routes("h2c")  # (the module's servers are up as long as routes is)
    total = 128
    c = SocketClient(p.port, timeout=60)
    try:
        out = drain(c, c.send(grpc_request("/test.Echo/Flood"), frame(b"%d" % total)))
    finally:
        c.close()
    got = len(unframe(out["body"]))
    assert got == total, (got, out["status"], out["trailers"], out["reset"])
    assert out["trailers"][b"grpc-status"] == b"0"


def wait_stable(read, quiet: float = 1.0):
    """read()'s value once it has not changed for ``quiet`` seconds."""
    last = [read(), time.monotonic()]

    def settled():
        now = read()
        if now != last[0]:
            last[:] = [now, time.monotonic()]
            return False
        return time.monotonic() - last[1] >= quiet

    wait_for(settled, timeout=30, interval=0.05, what="a steady value")
    return last[0]


# -- the proxy's own answers -------------------------------------------------------------


def raw_call(port: int, path: str, message: bytes, *extra) -> tuple[dict, float]:
    c = SocketClient(port, timeout=30)
    try:
        return timed(lambda: c.wait(c.send(grpc_request(path, *extra), frame(message))))
    finally:
        c.close()


def assert_grpc_status(out: dict, code: grpc.StatusCode) -> None:
    """An HTTP 200 gRPC response whose status is in the trailers (or, for a response with
    no messages, in the headers: gRPC's trailers-only form)."""
    assert out["status"] == 200, out
    assert out["headers"][b"content-type"].startswith(b"application/grpc"), out
    fields = out["trailers"] or out["headers"]
    assert fields.get(b"grpc-status") == str(code.value[0]).encode(), out
    assert b"grpc-message" in fields, out


def test_grpc_timeout_becomes_the_proxy_deadline(tmp_path, certs):
    """The origin takes the call and never answers; grpc-timeout 200m must end it at the
    proxy as DEADLINE_EXCEEDED within a second (read_timeout is 30 s), and the proxy
    must give the stream up upstream (reset it or close the connection)."""
    origin = StallingOrigin()
    p = grpc_proxy(tmp_path, origin.address, "h2c", certs)
    try:
        out, took = raw_call(p.port, "/test.Echo/Unary", b"x", (b"grpc-timeout", b"200m"))
        assert_grpc_status(out, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert took < 1.0, took
        assert origin.opened, "the call never reached the origin"
        wait_for(lambda: origin.abandoned == origin.opened, timeout=10,
                 what="the proxy to abandon the stream upstream")
    finally:
        p.stop()
        origin.stop()


@pytest.mark.parametrize("client", CLIENTS)
def test_upstream_down_is_unavailable(tmp_path, certs, client):
    p = grpc_proxy(tmp_path, f"127.0.0.1:{free_port()}", "h2c", certs)  # nothing listens
    try:
        c = client_for(p, client, certs)
        err, _ = timed(c.unary, b"x", timeout=30)
        c.close()
        assert isinstance(err, grpc.RpcError), err
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        # and it is the proxy's gRPC answer, not an HTTP 502/503 that grpcio maps alike
        assert "http2 header with status" not in (err.details() or ""), err.details()
        if client == "h2c":
            out, _ = raw_call(p.port, "/test.Echo/Unary", b"x")
            assert_grpc_status(out, grpc.StatusCode.UNAVAILABLE)
    finally:
        p.stop()


def test_a_request_over_the_body_limit_is_resource_exhausted(tmp_path, servers, certs):
    p = grpc_proxy(tmp_path, servers["h2c"].address, "h2c", certs,
                   server_extra='max_body_size = "1m"')
    try:
        c = client_for(p, "h2c", certs)
        err, _ = timed(c.unary, os.urandom(2 * 1024 * 1024), timeout=30)
        assert isinstance(err, grpc.RpcError), err
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert c.unary(b"small", timeout=30) == b"small"
        c.close()
    finally:
        p.stop()


# -- observability -----------------------------------------------------------------------


def access_records(p: Proxy) -> list[dict]:
    if not os.path.exists(p.access_log):
        return []
    with open(p.access_log) as f:
        return [json.loads(line) for line in f if line.strip()]


def metrics_text(p: Proxy) -> str:
    url = f"http://127.0.0.1:{p.admin_port}/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()


def test_access_log_and_metrics_carry_the_grpc_method_and_status(tmp_path, servers, certs):
    p = grpc_proxy(tmp_path, servers["h2c"].address, "h2c", certs)
    try:
        c = client_for(p, "h2c", certs)
        assert c.unary(b"a", timeout=30) == b"a"
        timed(c.not_found, b"b", timeout=30)
        c.close()

        def by_path():
            return {r["path"]: r for r in access_records(p)}

        wait_for(lambda: {"/test.Echo/Unary", "/test.Echo/NotFound"} <= set(by_path()),
                 timeout=15, what="both calls in the access log")
        recs = by_path()
        ok, missing = recs["/test.Echo/Unary"], recs["/test.Echo/NotFound"]
        assert (ok["grpc_method"], ok["grpc_status"]) == ("/test.Echo/Unary", 0), ok
        assert (missing["grpc_method"], missing["grpc_status"]) == ("/test.Echo/NotFound",
                                                                    5), missing
        assert ok["status"] == missing["status"] == 200

        def grpc_counts():
            out = {}
            for line in metrics_text(p).splitlines():
                if line.startswith("forkproxy_grpc_requests_total{"):
                    labels, value = line.rsplit(" ", 1)
                    out[labels] = float(value)
            return out

        def counted():
            counts = grpc_counts()
            return (any('grpc_status="0"' in k and v >= 1 for k, v in counts.items())
                    and any('grpc_status="5"' in k and v >= 1 for k, v in counts.items()))

        wait_for(counted, timeout=15, what="calls counted by grpc_status")
    finally:
        p.stop()
