"""Issue 2: the foundation, end to end through real masters, workers and origins."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading

import pytest
from fp import connect, free_port, is_closed, recv_response, request, rss_kib, wait_for


def headers_seen(body: bytes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in json.loads(body)["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


def test_get_adds_forwarding_headers_and_strips_hop_by_hop(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address)
    status, headers, body = request(p.port, "GET", "/headers", headers={
        "Connection": "close, X-Secret", "X-Secret": "drop me", "Keep-Alive": "timeout=5",
        "X-Forwarded-For": "10.1.2.3", "Proxy-Connection": "keep-alive", "TE": "trailers",
        "X-Kept": "yes"})
    assert status == 200
    seen = headers_seen(body)
    assert seen["host"] == [f"127.0.0.1:{p.port}"]
    assert seen["x-forwarded-for"] == ["10.1.2.3, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert len(seen["x-request-id"][0]) == 16
    assert seen["x-kept"] == ["yes"]
    for hop in ("x-secret", "keep-alive", "proxy-connection", "te", "connection"):
        assert hop not in seen, hop
    assert headers["connection"] == "close"
    p.stop()


def test_request_id_kept_when_client_sends_one(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address)
    _, _, body = request(p.port, "GET", "/headers", headers={"X-Request-Id": "abc-123"})
    assert headers_seen(body)["x-request-id"] == ["abc-123"]
    p.stop()


def test_keepalive_and_pipelining_in_order(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address)
    with connect(p.port) as s:
        for _ in range(3):  # sequential keep-alive
            s.sendall(b"GET /tiny HTTP/1.1\r\nHost: x\r\n\r\n")
            assert recv_response(s)[2] == b"ok"
        # pipelined: three requests in one write, answers in order
        s.sendall(b"GET /bytes/3 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /sleep/50 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /status/201 HTTP/1.1\r\nHost: x\r\n\r\n")
        results = [recv_response(s)[::2] for _ in range(3)]
        assert results == [(200, b"\x00\x01\x02"), (200, b"slept\n"), (201, b"status 201\n")]
    p.stop()


def test_chunked_both_ways(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address)
    with connect(p.port) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n")
        status, headers, body, _ = recv_response(s)
        assert status == 200
        assert headers["transfer-encoding"] == "chunked"
        assert body == b"hello world"
        # the connection stays usable after a chunked exchange
        s.sendall(b"GET /chunked/70000 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body, _ = recv_response(s)
        assert headers["transfer-encoding"] == "chunked"
        assert body == (bytes(range(256)) * 274)[:70000]
    p.stop()


def test_head_204_304_have_no_body(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address)
    with connect(p.port) as s:
        s.sendall(b"HEAD /bytes/5000 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body, _ = recv_response(s, "HEAD")
        assert (status, headers["content-length"], body) == (200, "5000", b"")
        for code in (204, 304):
            s.sendall(b"GET /status/%d HTTP/1.1\r\nHost: x\r\n\r\n" % code)
            status, headers, body, _ = recv_response(s)
            assert status == code and body == b""
            assert "transfer-encoding" not in headers
        s.sendall(b"GET /tiny HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_response(s)[2] == b"ok"
    p.stop()


def test_expect_100_continue(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address)
    with connect(p.port) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        status, _, _, _ = recv_response(s)
        assert status == 100
        s.sendall(b"hello")
        status, _, body, _ = recv_response(s)
        assert status == 200
        assert body == b"5 " + hashlib.sha256(b"hello").hexdigest().encode() + b"\n"
    p.stop()


def test_connection_close_and_http10(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address)
    with connect(p.port) as s:
        s.sendall(b"GET /tiny HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, body, _ = recv_response(s)
        assert (status, body, headers["connection"]) == (200, b"ok", "close")
        assert is_closed(s)
    with connect(p.port) as s:
        s.sendall(b"GET /chunked/1000 HTTP/1.0\r\n\r\n")  # 1.0, no Host: close-delimited
        status, headers, body, _ = recv_response(s)
        assert status == 200 and "transfer-encoding" not in headers
        assert body == (bytes(range(256)) * 4)[:1000]
    with connect(p.port) as s:
        s.sendall(b"GET /tiny HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body, _ = recv_response(s)
        assert headers["connection"].lower() == "keep-alive" and body == b"ok"
        s.sendall(b"GET /tiny HTTP/1.0\r\n\r\n")
        assert recv_response(s)[2] == b"ok"
        assert is_closed(s)
    p.stop()


def test_100mib_both_ways_with_flat_memory(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address)
    worker = p.workers_pids()[0]
    size = 100 * 1024 * 1024
    pattern = bytes(range(256)) * 256
    # download
    with connect(p.port, timeout=30) as s:
        s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        head, _, rest = head.partition(b"\r\n\r\n")
        assert b"Content-Length: %d" % size in head
        h = hashlib.sha256(rest)
        got = len(rest)
        peak = 0
        while got < size:
            data = s.recv(1 << 20)
            assert data
            h.update(data)
            got += len(data)
            if got % (16 << 20) < len(data):
                peak = max(peak, rss_kib(worker))
        expected = hashlib.sha256()
        for _ in range(size // len(pattern)):
            expected.update(pattern)
        assert h.hexdigest() == expected.hexdigest()
    # upload
    with connect(p.port, timeout=30) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(pattern)):
            s.sendall(pattern)
        peak = max(peak, rss_kib(worker))
        status, _, body, _ = recv_response(s)
        assert status == 200
        assert body.decode().split() == [str(size), expected.hexdigest()]
    assert peak < 120 * 1024, f"worker RSS peaked at {peak} KiB"
    p.stop()


def test_upstream_connections_are_reused(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address)
    before = origin.stats()["connections"]
    for _ in range(50):
        assert request(p.port, "GET", "/tiny")[2] == b"ok"
    used = origin.stats()["connections"] - before - 1  # minus the /stats connection
    assert used <= 2, f"origin saw {used} connections for 50 requests"
    p.stop()


def _flaky_origin(close_after_response: bool):
    """A raw origin that answers keep-alive responses and then closes the connection
    anyway (as an origin's idle timeout would): the proxy's pooled connection is stale."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    stats = {"connections": 0}
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                return
            stats["connections"] += 1
            with c:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if data:
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    t = threading.Thread(target=serve, daemon=True)
    t.start()

    def close():
        stop.set()
        srv.close()
    return srv.getsockname()[1], stats, close


def test_stale_pooled_connection_is_retried(tmp_path, proxies):
    port, stats, close = _flaky_origin(True)
    try:
        p = proxies(tmp_path, f"127.0.0.1:{port}")
        for _ in range(20):
            status, _, body = request(p.port, "GET", "/")
            assert (status, body) == (200, b"ok")
        assert stats["connections"] >= 20
        p.stop()
    finally:
        close()


def test_502_when_origin_down_and_504_when_silent(tmp_path, proxies):
    dead = free_port()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        p = proxies(tmp_path, {"app": [f"127.0.0.1:{dead}"],
                               "slow": [f"127.0.0.1:{silent.getsockname()[1]}"]},
                    upstream_extra='read_timeout = "500ms"',
                    extra='[[route]]\npath_prefix = "/slow"\nupstream = "slow"\n')
        with connect(p.port) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert recv_response(s)[0] == 502
            s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")  # same connection: kept
            assert recv_response(s)[0] == 504
        p.stop()
    finally:
        silent.close()


@pytest.mark.parametrize("raw,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n", 413),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
])
def test_bad_requests_get_status_and_close(tmp_path, origin, proxies, raw, status):
    p = proxies(tmp_path, origin.address, server_extra='max_body_size = "1m"')
    with connect(p.port) as s:
        s.sendall(raw)
        got, headers, _, _ = recv_response(s)
        assert got == status
        assert headers["connection"] == "close"
        assert is_closed(s)
    p.stop()


def test_even_spread_over_two_workers(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2)
    socks = [connect(p.port) for _ in range(64)]
    try:
        by_worker: dict[str, int] = {}
        for s in socks:
            s.sendall(b"GET /headers HTTP/1.1\r\nHost: x\r\n\r\n")
            rid = headers_seen(recv_response(s)[2])["x-request-id"][0]
            by_worker[rid[:8]] = by_worker.get(rid[:8], 0) + 1  # per-worker id prefix
        assert len(by_worker) == 2, by_worker
        assert min(by_worker.values()) >= 16, by_worker  # no worker below 25%
    finally:
        for s in socks:
            s.close()
    p.stop()


def test_listen_on_interface_ipv6_and_wildcard(tmp_path, origin, proxies):
    ports = [free_port() for _ in range(3)]
    p = proxies(tmp_path, origin.address,
                listeners=[f"lo:{ports[0]}", f"[::1]:{ports[1]}", f"*:{ports[2]}"])
    assert request(ports[0], "GET", "/tiny")[2] == b"ok"
    assert request(ports[1], "GET", "/tiny", host="::1")[2] == b"ok"
    assert request(ports[2], "GET", "/tiny")[2] == b"ok"
    p.stop()


def test_clean_shutdown_and_dead_worker_replaced(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2)
    first = set(p.workers_pids())
    assert len(first) == 2
    victim = next(iter(first))
    os.kill(victim, 9)
    wait_for(lambda: len(set(p.workers_pids()) - first) == 1, what="a replacement worker")
    assert request(p.port, "GET", "/tiny")[2] == b"ok"
    assert os.path.exists(p.pidfile)
    p.stop()  # asserts: no process, pidfile or shm segment left


def test_idle_keepalive_connection_closed_after_timeout(tmp_path, origin, proxies):
    import time

    p = proxies(tmp_path, origin.address, server_extra='keepalive_timeout = "300ms"')
    with connect(p.port) as s:
        s.sendall(b"GET /tiny HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_response(s)[2] == b"ok"
        t0 = time.monotonic()
        assert is_closed(s, timeout=60)
        waited = time.monotonic() - t0
        assert waited > 0.25, waited  # not before (the deadline sweeper's step is 0.1 s)
    p.stop()


def test_splice_relays_large_bodies_exactly(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, server_extra="splice = true")
    (worker,) = p.workers_pids()

    def pipes() -> int:
        fds = os.listdir(f"/proc/{worker}/fd")
        return sum(os.readlink(f"/proc/{worker}/fd/{fd}").startswith("pipe:") for fd in fds
                   if os.path.exists(f"/proc/{worker}/fd/{fd}"))

    pipes_before = pipes()
    size = 20 * 1024 * 1024 + 123
    with connect(p.port, timeout=30) as s:
        for _ in range(2):  # the pipe goes back to the pool clean and is reused
            s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
            status, headers, body, _ = recv_response(s)
            assert status == 200 and len(body) == size
            expected = (bytes(range(256)) * (size // 256 + 1))[:size]
            assert hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()
        s.sendall(b"GET /tiny HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_response(s)[2] == b"ok"
    assert pipes() == pipes_before + 2  # one splice pipe, pooled for reuse
    p.stop()


def test_proxy_protocol_v1_and_v2_feed_x_forwarded_for(tmp_path, origin, proxies):
    from forkproxy.http.proxy_protocol import build_v1, build_v2

    p = proxies(tmp_path, origin.address, listener_extra="proxy_protocol = true")
    for header, client in [(build_v1(("203.0.113.7", 5555), ("127.0.0.1", p.port)), "203.0.113.7"),
                           (build_v2(("2001:db8::9", 6666), ("::1", p.port)), "2001:db8::9")]:
        with connect(p.port) as s:
            s.sendall(header + b"GET /headers HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body, _ = recv_response(s)
            assert status == 200
            assert headers_seen(body)["x-forwarded-for"] == [client]
    with connect(p.port) as s:  # no header on a PROXY listener: closed, nothing forwarded
        s.sendall(b"GET /headers HTTP/1.1\r\nHost: x\r\n\r\n")
        assert is_closed(s)
    p.stop()


def test_idle_connection_parked_then_served_then_timed_out(tmp_path, origin, proxies):
    import time

    p = proxies(tmp_path, origin.address, server_extra='keepalive_timeout = "2500ms"')
    with connect(p.port) as s:
        s.sendall(b"GET /tiny HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_response(s)[2] == b"ok"
        # idle past PARK_AFTER (1 s): the greenlet is released, the watcher wakes it up
        s.settimeout(1.4)
        try:
            assert s.sock.recv(1) == b"", "unexpected bytes"
        except TimeoutError:
            pass
        s.settimeout(10)
        s.sendall(b"GET /tiny HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_response(s)[2] == b"ok"
        t0 = time.monotonic()
        assert is_closed(s, timeout=60)  # the keep-alive timeout still applies when parked
        waited = time.monotonic() - t0
        assert waited > 2.0, waited  # not before keepalive_timeout
    p.stop()
