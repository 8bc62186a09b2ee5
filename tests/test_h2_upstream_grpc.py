"""gRPC end to end through an h2c upstream: a real grpcio server (generic handlers with
bytes, no protoc) behind forkproxy with ``protocol = "h2c"``, and a real grpcio client on
an h2c listener. The upstream's trailers (grpc-status, grpc-message, metadata) come
through, and streams go both ways at once (bidi ping-pong in order)."""

from __future__ import annotations

import json
import queue
from concurrent import futures

import grpc
import pytest
from fp import free_port, request, wait_for

from forkproxy import config

H2C = 'protocols = ["http/1.1", "h2c"]'


def _unary(request, context):
    context.send_initial_metadata((("x-initial", "hello"),))
    meta = dict(context.invocation_metadata())
    context.set_trailing_metadata((("x-trailing", meta.get("x-ask", "none")),))
    return request


def _missing(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


def _stream(request, context):
    n = int(request)
    for i in range(n):
        yield b"%d" % i


def _bidi(requests, context):
    for r in requests:
        yield b"pong " + r


@pytest.fixture(scope="module")
def grpc_origin():
    server = grpc.server(futures.ThreadPoolExecutor(8), options=[
        ("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Missing": grpc.unary_unary_rpc_method_handler(_missing),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", handlers),))
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0).wait()


@pytest.fixture
def channel(proxies, tmp_path, grpc_origin):
    p = proxies(tmp_path, {"app": [grpc_origin]}, upstream_extra='protocol = "h2c"',
                listener_extra=H2C)
    ch = grpc.insecure_channel(f"127.0.0.1:{p.port}", options=[
        ("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)])
    yield ch
    ch.close()


def test_unary_with_metadata_both_ways(channel):
    call = channel.unary_unary("/echo.Echo/Unary")
    reply, info = call.with_call(b"ping", metadata=(("x-ask", "question"),), timeout=10)
    assert reply == b"ping"
    assert ("x-initial", "hello") in info.initial_metadata()
    assert ("x-trailing", "question") in info.trailing_metadata()  # trailers came through
    assert info.code() == grpc.StatusCode.OK


def test_abort_status_and_details_in_trailers(channel):
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/echo.Echo/Missing")(b"x", timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == "no such thing"


def test_server_streaming_1000_messages(channel):
    got = list(channel.unary_stream("/echo.Echo/Stream")(b"1000", timeout=30))
    assert got == [b"%d" % i for i in range(1000)]


def test_bidi_ping_pong_in_order(channel):
    """Each request waits for the previous answer: only works if both directions of the
    upstream stream flow at once."""
    outbox: queue.Queue = queue.Queue()

    def requests():
        for i in range(100):
            yield b"%d" % i
            outbox.get(timeout=10)  # the answer to this one came back first

    replies = []
    for reply in channel.stream_stream("/echo.Echo/Bidi")(requests(), timeout=30):
        replies.append(reply)
        outbox.put(True)
    assert replies == [b"pong %d" % i for i in range(100)]


def test_4mib_messages_each_way(channel):
    big = bytes(range(256)) * (4 * 4096)  # 4 MiB
    assert channel.unary_unary("/echo.Echo/Unary")(big, timeout=30) == big


# -- the type = "grpc" active health check ------------------------------------------------

HEALTH = {"": 1, "echo.Echo": 1}  # service -> ServingStatus (1 SERVING, 2 NOT_SERVING)


def _health_check(request: bytes, context):
    service = request[2:].decode() if request[:1] == b"\x0a" else ""
    if service not in HEALTH:
        context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
    return b"\x08" + bytes((HEALTH[service],))


@pytest.fixture
def health_origin():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {"Check": grpc.unary_unary_rpc_method_handler(_health_check)}),))
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0).wait()
    HEALTH.update({"": 1, "echo.Echo": 1})


def _check_state(p, address) -> str | None:
    status, _, body = request(p.admin_port, "GET", "/status")
    for s in json.loads(body)["upstreams"]["app"]["servers"]:
        if s["address"] == address and s.get("health_check"):
            return s["health_check"]["state"]
    return None


@pytest.mark.parametrize("service", ["", "echo.Echo"])
def test_grpc_health_check(proxies, tmp_path, health_origin, service):
    p = proxies(tmp_path, {"app": [health_origin]}, admin=True, upstream_extra=(
        'protocol = "h2c"\n'
        f'health_check = {{ type = "grpc", service = "{service}", interval = "200ms", '
        'timeout = "1s", rise = 1, fall = 1 }'))
    wait_for(lambda: _check_state(p, health_origin) == "up", what="checked up (SERVING)")
    HEALTH[service] = 2  # NOT_SERVING
    wait_for(lambda: _check_state(p, health_origin) == "down", what="down (NOT_SERVING)")
    HEALTH[service] = 1
    wait_for(lambda: _check_state(p, health_origin) == "up", what="up again")
    del HEALTH[service]  # the service is unknown: grpc-status NOT_FOUND
    wait_for(lambda: _check_state(p, health_origin) == "down", what="down (unknown service)")


def test_grpc_health_check_needs_http2(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[listener]]\nlisten = "127.0.0.1:1"\nupstream = "a"\n'
                    '[upstream.a]\nservers = [{ address = "127.0.0.1:2" }]\n'
                    'health_check = { type = "grpc" }\n')
    with pytest.raises(config.ConfigError) as e:
        config.load(str(path))
    assert "h2c" in str(e.value)
