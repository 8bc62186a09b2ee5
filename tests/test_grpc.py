"""gRPC through the proxy: a real grpcio client (generic calls with bytes, no protoc) and
a raw h2 client, over h2c and over TLS with ALPN h2, through real forked proxies to
upstreams on loopback: one that is down, and an HTTP/1.1 origin that speaks gRPC's
framing (length-prefixed messages, status in chunked trailers, or trailers-only).

Checked: the proxy's own failures come back as gRPC statuses (HTTP 200, trailers-only),
``grpc-timeout`` is the request's deadline, trailers carry the upstream's status and
metadata to the client, and the metrics and access log carry the method and status.
End-to-end calls against a grpcio server need HTTP/2 upstreams (issue 15, elsewhere).
"""

from __future__ import annotations

import socket
import struct
import time

import grpc
import pytest
from fp import free_port, wait_for
from h2client import SocketClient
from hostile import RecordingOrigin, read_all
from test_http2_proxy import access_records, metric_lines, tls_listener
from test_http2_proxy import ca as ca  # noqa: F401 (the fixture: a certificate for localhost)

H2C = 'protocols = ["http/1.1", "h2c"]'
GRPC_CT = b"application/grpc"


def frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed)."""
    return struct.pack(">BI", 0, len(message)) + message


class GrpcOverHttp1Origin(RecordingOrigin):
    """An HTTP/1.1 origin answering gRPC calls as a gRPC server would over HTTP/2: the
    response messages in a chunked body and the status in its trailer section.

    /echo.Echo/Unary: the request message back, status 0, a metadata trailer;
    /echo.Echo/Missing: no message, status 5 with a message; /echo.Echo/Denied: a
    trailers-only answer (status in the head, Content-Length 0); /echo.Echo/Slow: the
    same as Unary after 2 s."""

    def respond(self, conn, seen):
        if seen.path == "/echo.Echo/Slow":
            time.sleep(2.0)
        if seen.path == "/echo.Echo/Denied":
            conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\n"
                              b"Grpc-Status: 7\r\nGrpc-Message: not%20yours\r\n"
                              b"Content-Length: 0\r\n\r\n")
            return
        if seen.path == "/echo.Echo/Missing":
            body, trailers = b"", b"grpc-status: 5\r\ngrpc-message: no%20such%20thing\r\n"
        else:
            body = seen.body  # the request's own framing: one message back
            trailers = b"grpc-status: 0\r\nx-served-by: origin\r\n"
        chunk = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
        try:
            conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n" + chunk + b"0\r\n"
                              + trailers + b"\r\n")
        except OSError:
            pass  # the proxy gave up first (a deadline)


@pytest.fixture
def grpc_origin():
    o = GrpcOverHttp1Origin()
    yield o
    o.stop()


def _call(channel, method: str, message: bytes = b"ping", timeout: float = 10.0):
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return call.with_call(message, timeout=timeout, metadata=[("x-client-md", "c1")])


def _channels(p, ca_paths):
    """(name, channel) over h2c and over TLS with ALPN h2 to the proxy ``p``, whose
    listeners are p.listeners[0] (h2c) and p.listeners[1] (TLS)."""
    h2c_port = int(p.listeners[0].rsplit(":", 1)[1])
    tls_port = int(p.listeners[1].rsplit(":", 1)[1])
    with open(ca_paths["cert"], "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    return [("h2c", grpc.insecure_channel(f"127.0.0.1:{h2c_port}")),
            ("tls", grpc.secure_channel(f"127.0.0.1:{tls_port}", creds,
                                        options=[("grpc.ssl_target_name_override",
                                                  "localhost")]))]


def _two_listener_proxy(proxies, tmp_path, upstream: str, ca_paths, **kw):
    h2c, tls = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    p = proxies(tmp_path, upstream, listeners=[h2c], admin=True, start=False, **kw)
    p.extra = (f'[[listener]]\nlisten = "{tls}"\nupstream = "app"\n'
               + tls_listener(ca_paths).lstrip("\n"))
    p.listener_extra = H2C
    p.write_config()
    p.listeners = [h2c, tls]
    p.start()
    return p


def test_upstream_down_is_unavailable_over_h2c_and_tls(tmp_path, proxies, ca):
    dead = f"127.0.0.1:{free_port()}"
    p = _two_listener_proxy(proxies, tmp_path, dead, ca)
    for name, channel in _channels(p, ca):
        with channel, pytest.raises(grpc.RpcError) as err:
            _call(channel, "/echo.Echo/Unary")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, name
        assert err.value.details() == "forkproxy: upstream unavailable", name
    lines = [r for r in access_records(p, 2) if r["path"] == "/echo.Echo/Unary"]
    assert [(r["grpc_method"], r["grpc_status"], r["status"]) for r in lines] == [
        ("/echo.Echo/Unary", 14, 502)] * 2
    assert all(r["error"].startswith("upstream connect") for r in lines)
    grpc_metrics = metric_lines(p, "forkproxy_grpc_requests_total")
    assert sum(v for k, v in grpc_metrics.items() if 'grpc_status="14"' in k) == 2


def test_trailers_carry_status_and_metadata_to_a_grpc_client(tmp_path, proxies, ca,
                                                             grpc_origin):
    p = _two_listener_proxy(proxies, tmp_path, grpc_origin.address, ca)
    for name, channel in _channels(p, ca):
        with channel:
            reply, call = _call(channel, "/echo.Echo/Unary", b"hello " + name.encode())
            assert reply == b"hello " + name.encode()
            assert call.code() == grpc.StatusCode.OK
            assert ("x-served-by", "origin") in call.trailing_metadata()
            with pytest.raises(grpc.RpcError) as err:
                _call(channel, "/echo.Echo/Missing")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert err.value.details() == "no such thing"
            with pytest.raises(grpc.RpcError) as err:  # trailers-only from HTTP/1.1
                _call(channel, "/echo.Echo/Denied")
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert err.value.details() == "not yours"
    # request metadata and the gRPC framing reached the origin as sent
    unary = [s for s in grpc_origin.seen if s.path == "/echo.Echo/Unary"]
    assert len(unary) == 2 and unary[0].header("x-client-md") == ["c1"]
    assert unary[0].header("content-type") == ["application/grpc"]
    assert unary[0].header("te") == []  # hop-by-hop: not forwarded over HTTP/1.1
    statuses = sorted((r["grpc_method"], r["grpc_status"]) for r in access_records(p, 6))
    assert statuses == [("/echo.Echo/Denied", 7)] * 2 + [("/echo.Echo/Missing", 5)] * 2 + [
        ("/echo.Echo/Unary", 0)] * 2
    grpc_metrics = metric_lines(p, "forkproxy_grpc_requests_total")
    assert {k.split('grpc_status="')[1][:-2]: v for k, v in grpc_metrics.items()
            if 'listener="' + p.listeners[0] in k} == {"0": 1, "5": 1, "7": 1}


def test_a_grpc_deadline_on_a_slow_origin_is_exceeded_in_time(tmp_path, proxies, ca,
                                                              grpc_origin):
    p = _two_listener_proxy(proxies, tmp_path, grpc_origin.address, ca,
                            upstream_extra='read_timeout = "30s"')
    channels = _channels(p, ca)
    try:
        for name, channel in channels:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                _call(channel, "/echo.Echo/Slow", timeout=0.2)
            took = time.monotonic() - start
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, name
            assert took < 1.0, (name, took)
        # the proxy gave up at the deadline too (not at read_timeout, not when the origin
        # answered 2 s later), and recorded it so (the channels stay open meanwhile: a
        # stream whose connection closes is ended without a record)
        lines = [r for r in access_records(p, 2) if r["path"] == "/echo.Echo/Slow"]
    finally:
        for _, channel in channels:
            channel.close()
    assert [r["grpc_status"] for r in lines] == [4, 4]
    assert all(r["duration_ms"] < 1000 for r in lines), lines
    assert all("grpc-timeout exceeded" in r["error"] for r in lines), lines


# -- the proxy's answers, as a raw HTTP/2 client sees them ------------------------------


def _grpc_request(path: bytes, *extra):
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc.test"),
            (b":path", path), (b"content-type", GRPC_CT), (b"te", b"trailers"), *extra]


def _h2_call(port: int, headers, body: bytes = frame(b"x")) -> tuple[dict, float]:
    c = SocketClient(port)
    try:
        start = time.monotonic()
        sid = c.send(headers, end_stream=False)
        c.conn.send_data(sid, body, end_stream=True)
        c.flush()
        out = c.wait(sid)
        return out, time.monotonic() - start
    finally:
        c.close()


def test_the_proxy_enforces_grpc_timeout_itself(tmp_path, proxies, grpc_origin):
    """No client-side deadline here: only the proxy's can end the call in time."""
    p = proxies(tmp_path, grpc_origin.address, listener_extra=H2C,
                upstream_extra='read_timeout = "30s"')
    out, took = _h2_call(p.port, _grpc_request(b"/echo.Echo/Slow", (b"grpc-timeout", b"200m")))
    assert took < 1.0
    # trailers-only: one HEADERS frame with END_STREAM, no DATA
    assert out["status"] == 200 and out["body"] == b"" and out["trailers"] is None
    assert out["headers"][b"content-type"] == GRPC_CT
    assert out["headers"][b"grpc-status"] == b"4"
    assert out["headers"][b"grpc-message"] == b"forkproxy: deadline exceeded (grpc-timeout)"
    # the origin's slow answer is not waited for, and the server is not held to blame
    out, _ = _h2_call(p.port, _grpc_request(b"/echo.Echo/Unary", (b"grpc-timeout", b"5S")),
                      frame(b"again"))
    assert out["status"] == 200 and out["body"] == frame(b"again")
    assert out["trailers"][b"grpc-status"] == b"0"


@pytest.mark.parametrize("value", [b"200", b"123456789m", b"-1S", b"1.5S", b"10s", b"m"])
def test_an_invalid_grpc_timeout_gets_a_clear_grpc_error(tmp_path, proxies, grpc_origin, value):
    p = proxies(tmp_path, grpc_origin.address, listener_extra=H2C)
    out, _ = _h2_call(p.port, _grpc_request(b"/echo.Echo/Unary", (b"grpc-timeout", value)))
    assert out["status"] == 200 and out["headers"][b"grpc-status"] == b"13"
    message = out["headers"][b"grpc-message"]
    assert message.startswith(b"forkproxy: invalid grpc-timeout") and b"digits" in message
    assert not grpc_origin.seen  # refused before anything went upstream


def test_grpc_over_http1_gets_the_status_in_the_head(tmp_path, proxies):
    """gRPC-Web and other HTTP/1.1 gRPC clients: the same trailers-only answer."""
    p = proxies(tmp_path, f"127.0.0.1:{free_port()}")
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        body = frame(b"x")
        s.sendall(b"POST /echo.Echo/Unary HTTP/1.1\r\nHost: a\r\n"
                  b"Content-Type: application/grpc-web+proto\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body))
        raw, _ = read_all(s, 2.0)
    # (the body was not read: the connection closes after the answer)
    assert raw == (b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc-web+proto\r\n"
                   b"grpc-status: 14\r\ngrpc-message: forkproxy: upstream unavailable\r\n"
                   b"Content-Length: 0\r\nConnection: close\r\n\r\n")


def test_a_non_grpc_request_still_gets_an_error_page(tmp_path, proxies):
    p = proxies(tmp_path, f"127.0.0.1:{free_port()}", listener_extra=H2C)
    out, _ = _h2_call(p.port, [(b":method", b"POST"), (b":scheme", b"http"),
                               (b":authority", b"svc.test"), (b":path", b"/x"),
                               (b"content-type", b"application/json")], b"{}")
    assert out["status"] == 502 and b"grpc-status" not in out["headers"]
    (line,) = access_records(p, 1)
    assert "grpc_status" not in line and "grpc_method" not in line


def test_a_call_whose_connection_closes_is_recorded_as_cancelled(tmp_path, proxies,
                                                                  grpc_origin):
    """The client goes away while the upstream is still working: the stream's exchange
    is ended, and still recorded (status 499, like nginx; gRPC status 1 CANCELLED)."""
    p = proxies(tmp_path, grpc_origin.address, listener_extra=H2C)
    c = SocketClient(p.port)
    sid = c.send(_grpc_request(b"/echo.Echo/Slow"), end_stream=False)
    c.conn.send_data(sid, frame(b"x"), end_stream=True)
    c.flush()
    wait_for(lambda: grpc_origin.seen, what="the call at the origin")
    c.close()
    (line,) = access_records(p, 1)
    assert (line["status"], line["grpc_status"], line["error"]) == (499, 1, "client gone")
    assert line["grpc_method"] == "/echo.Echo/Slow" and line["duration_ms"] < 1500
