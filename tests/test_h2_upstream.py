"""HTTP/2 upstreams (issue 15 point 2) against a real HTTP/2 origin on loopback (the h2
library in its own process, tests/h2origin.py), through real forkproxy masters:
requests multiplexed over few connections, the server's MAX_CONCURRENT_STREAMS
respected, GOAWAY mid-load without a failed request, a PING left unanswered closing the
connection, large bodies streamed both ways in bounded memory, an upstream reset giving
502 (retried on another server when safe), and h2 over TLS agreed through ALPN."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import trustme
from fp import connect, free_port, port_open, request, rss_kib, stop_process, wait_for
from upstreams_util import access_entries

from forkproxy import config

HERE = os.path.dirname(os.path.abspath(__file__))


class H2Origin:
    """tests/h2origin.py in its own process."""

    def __init__(self, *args: str, tls=None):
        self.port = free_port()
        cmd = [sys.executable, os.path.join(HERE, "h2origin.py"), str(self.port), *args]
        if tls is not None:
            cmd += ["--cert", tls[0], "--key", tls[1]]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.port), what=f"h2 origin on {self.port}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stats(self, proxy_port: int) -> dict:
        """The origin's counters, asked through the proxy (one more stream)."""
        status, _, body = request(proxy_port, "GET", "/stats")
        assert status == 200, body
        return json.loads(body)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def h2origins():
    made: list[H2Origin] = []

    def make(*args, **kw) -> H2Origin:
        o = H2Origin(*args, **kw)
        made.append(o)
        return o
    yield make
    for o in made:
        o.stop()


def h2proxy(proxies, tmp_path, origins, extra: str = "", protocol: str = "h2c", **kw):
    addrs = [o.address for o in origins]
    return proxies(tmp_path, {"app": addrs}, upstream_extra=f'protocol = "{protocol}"\n{extra}',
                   **kw)


def server_retries(p) -> int:
    """Requests retried away from a server, summed over the upstream's servers (/status)."""
    status, _, body = request(p.admin_port, "GET", "/status")
    servers = json.loads(body)["upstreams"]["app"]["servers"]
    return sum(s["retries"] for s in servers)


def many(port: int, paths: list[str], workers: int = 16) -> list[tuple[int, bytes]]:
    def one(path):
        try:
            status, _, body = request(port, "GET", path, timeout=30)
            return status, body
        except OSError as e:
            return 0, str(e).encode()
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, paths))


def test_multiplexed_over_few_connections(proxies, tmp_path, h2origins):
    o = h2origins()
    p = h2proxy(proxies, tmp_path, [o], "http2 = { max_connections = 2 }")
    status, _, body = request(p.port, "GET", "/hello")
    assert status == 200 and body.startswith(b"path=/hello rid=")
    results = many(p.port, [f"/slow/20?i={i}" for i in range(300)], workers=24)
    assert [s for s, _ in results].count(200) == 300, results[:3]
    stats = o.stats(p.port)
    assert stats["streams"] >= 301
    assert 1 <= stats["connections"] <= 2, stats  # 300 requests, 24 at once, 2 connections
    assert stats["max_open"] > 1, stats  # streams did share a connection
    entries = access_entries(p, 302)
    assert sum(1 for e in entries if e["upstream_reused"]) >= 290


def test_max_concurrent_streams_respected(proxies, tmp_path, h2origins):
    o = h2origins("--max-streams", "3")
    p = h2proxy(proxies, tmp_path, [o], "http2 = { max_connections = 2 }\nqueue_timeout = \"20s\"")
    results = many(p.port, [f"/slow/150?i={i}" for i in range(24)], workers=12)
    assert [s for s, _ in results].count(200) == 24, results
    stats = o.stats(p.port)
    assert stats["max_open"] <= 3, stats  # never more than the server allows
    assert stats["connections"] == 2, stats  # the second one opened when the first was full


def test_queue_full_gives_503(proxies, tmp_path, h2origins):
    o = h2origins("--max-streams", "1")
    p = h2proxy(proxies, tmp_path, [o], "http2 = { max_connections = 1 }\nqueue_timeout = \"300ms\"")
    results = many(p.port, ["/slow/1500"] * 3, workers=3)
    statuses = sorted(s for s, _ in results)
    assert statuses[0] == 200 and statuses[-1] == 503, statuses


def test_goaway_mid_load_no_failed_request(proxies, tmp_path, h2origins):
    o = h2origins("--goaway-after", "40")
    p = h2proxy(proxies, tmp_path, [o], "retries = 0")  # the GOAWAY retry is not a counted retry
    results = many(p.port, [f"/slow/5?i={i}" for i in range(400)], workers=16)
    failed = [(s, b) for s, b in results if s != 200]
    assert not failed, failed[:5]
    stats = o.stats(p.port)
    assert stats["goaways"] >= 5, stats  # the load went through several GOAWAYs
    assert stats["connections"] >= 6, stats
    # each connection closes once the streams the GOAWAY let finish are done
    wait_for(lambda: o.stats(p.port)["closed"] >= stats["goaways"], timeout=10,
             what="connections closed after their GOAWAY")


def test_unanswered_ping_closes_the_connection(proxies, tmp_path, h2origins):
    o = h2origins()
    p = h2proxy(proxies, tmp_path, [o], 'http2 = { ping_interval = "1s", ping_timeout = "1s" }\n'
                              'read_timeout = "60s"\nretries = 0')
    assert request(p.port, "GET", "/first")[0] == 200
    # /mute: the origin stops answering anything on that connection, PING included
    status, _, _ = request(p.port, "GET", "/mute", timeout=60)
    assert status == 502  # the PING timeout closed it, long before read_timeout
    e = [x for x in access_entries(p, 2) if x["path"] == "/mute"][0]
    assert e["duration_ms"] < 20000, e
    assert "PING timeout" in e["error"], e
    status, _, _ = request(p.port, "GET", "/after")
    assert status == 200  # on a new connection
    assert o.stats(p.port)["connections"] == 2


def test_idle_connection_is_pinged(proxies, tmp_path, h2origins):
    o = h2origins()
    p = h2proxy(proxies, tmp_path, [o], 'http2 = { ping_interval = "1s", ping_timeout = "5s" }')
    assert request(p.port, "GET", "/first")[0] == 200
    # polled slowly: each /stats request is traffic, and only a quiet connection is pinged
    wait_for(lambda: o.stats(p.port)["pings"] >= 2, timeout=30, interval=3,
             what="PINGs from the proxy")
    assert o.stats(p.port)["connections"] == 1  # answered PINGs keep the connection


def test_upstream_reset_is_502_and_retried_elsewhere(proxies, tmp_path, h2origins):
    a, b = h2origins(), h2origins()
    p = h2proxy(proxies, tmp_path, [a, b], 'retry_on = ["reset"]\nretries = 1\nmax_fails = 0',
                admin=True)
    status, _, _ = request(p.port, "GET", "/reset")
    assert status == 502
    e = access_entries(p, 1)[0]
    assert "reset the stream" in e["error"], e
    # the other server was tried, and reset it too
    wait_for(lambda: server_retries(p) == 1, what="the retry in /status")
    assert request(p.port, "GET", "/fine")[0] == 200  # the connections stay usable


def test_post_reset_is_not_retried(proxies, tmp_path, h2origins):
    a, b = h2origins(), h2origins()
    p = h2proxy(proxies, tmp_path, [a, b], 'retry_on = ["reset"]\nretries = 1\nmax_fails = 0',
                admin=True)
    status, _, _ = request(p.port, "POST", "/reset", body=b"once")
    assert status == 502
    assert "reset the stream" in access_entries(p, 1)[0]["error"]
    assert request(p.port, "GET", "/fine")[0] == 200
    wait_for(lambda: access_entries(p, 2), what="two requests")
    assert server_retries(p) == 0


def test_large_bodies_stream_both_ways_in_bounded_memory(proxies, tmp_path, h2origins):
    o = h2origins()
    p = h2proxy(proxies, tmp_path, [o])
    worker = p.workers_pids()[0]
    assert request(p.port, "GET", "/warm")[0] == 200
    before = rss_kib(worker)
    size = 96 * 1024 * 1024
    chunk = os.urandom(64 * 1024)
    sent = hashlib.sha256()
    got = hashlib.sha256()
    received = [0]
    peak = [before]
    c = connect(p.port, timeout=60)
    c.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
              b"Connection: close\r\n\r\n")

    def read_all():  # the echo comes back while the request body is still going up
        buf = c.recv(65536)
        head, _, rest = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        raw = bytearray(rest)
        while True:
            data = c.recv(1 << 20)
            if not data:
                break
            raw += data
            # de-chunk what is complete
            while True:
                line_end = raw.find(b"\r\n")
                if line_end < 0:
                    break
                n = int(raw[:line_end], 16)
                if len(raw) < line_end + 2 + n + 2:
                    break
                piece = raw[line_end + 2:line_end + 2 + n]
                got.update(piece)
                received[0] += n
                del raw[:line_end + 2 + n + 2]
                if n == 0:
                    return
            peak[0] = max(peak[0], rss_kib(worker))

    reader = threading.Thread(target=read_all)
    reader.start()
    for _ in range(size // len(chunk)):
        sent.update(chunk)
        c.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    c.sendall(b"0\r\n\r\n")
    reader.join(120)
    c.close()
    assert received[0] == size
    assert got.hexdigest() == sent.hexdigest()
    # 96 MiB went through: the worker held at most a few windows of it
    assert peak[0] - before < 32 * 1024, (before, peak[0])


def test_http2_client_to_h2c_upstream(proxies, tmp_path, h2origins):
    """An HTTP/2 client (h2c listener) through to an HTTP/2 upstream: both sides
    multiplexed, bodies both ways."""
    o = h2origins()
    p = proxies(tmp_path, {"app": [o.address]}, upstream_extra='protocol = "h2c"',
                listener_extra='protocols = ["http/1.1", "h2c"]')
    out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-d", "x" * 100000,
                          f"http://127.0.0.1:{p.port}/echo", "-o", "-", "-w", "\n%{http_code}"],
                         capture_output=True, timeout=60)
    body, _, code = out.stdout.rpartition(b"\n")
    assert code == b"200" and body == b"x" * 100000
    e = access_entries(p, 1)[0]
    assert e["protocol"] == "HTTP/2" and e["status"] == 200 and e["bytes_in"] == 100000


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("h2tls")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "h2.test")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(d / "key.pem"))
    return str(d / "ca.pem"), str(d / "cert.pem"), str(d / "key.pem")


def test_h2_over_tls_with_alpn(proxies, tmp_path, h2origins, tls_files):
    ca, cert, key = tls_files
    o = h2origins(tls=(cert, key))
    p = h2proxy(proxies, tmp_path, [o], f'tls = {{ ca = "{ca}", server_name = "h2.test" }}', protocol="h2")
    results = many(p.port, [f"/slow/10?i={i}" for i in range(60)], workers=8)
    assert [s for s, _ in results].count(200) == 60
    assert o.stats(p.port)["connections"] <= 4


@pytest.mark.parametrize("alpn", [[], ["-alpn", "http/1.1"]], ids=["no-alpn", "http1-alpn"])
def test_tls_server_without_h2_alpn_is_502(proxies, tls_files, tmp_path, alpn):
    """A TLS origin that does not agree to h2 (no ALPN at all, or HTTP/1.1 only): a 502
    with the reason, never HTTP/1.1 bytes on what should be HTTP/2."""
    ca, cert, key = tls_files
    port = free_port()
    srv = subprocess.Popen(["openssl", "s_server", "-accept", str(port), "-cert", cert,
                            "-key", key, *alpn, "-www", "-quiet"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), what="openssl s_server")
        p = proxies(tmp_path, {"app": [f"127.0.0.1:{port}"]},
                    upstream_extra=f'protocol = "h2"\ntls = {{ ca = "{ca}", server_name = "h2.test" }}')
        status, _, _ = request(p.port, "GET", "/")
        assert status == 502
        error = access_entries(p, 1)[0]["error"]
        # refused in the handshake (OpenSSL's alert) or by forkproxy after it
        assert "no application protocol" in error or "h2 through ALPN" in error, error
    finally:
        stop_process(srv)


def test_config_protocol_needs_matching_tls(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[listener]]\nlisten = "127.0.0.1:1"\nupstream = "a"\n'
                    '[upstream.a]\nservers = [{ address = "127.0.0.1:2" }]\nprotocol = "h2"\n')
    with pytest.raises(config.ConfigError) as e:
        config.load(str(path))
    assert "needs tls" in str(e.value)
    path.write_text('[[listener]]\nlisten = "127.0.0.1:1"\nupstream = "a"\n'
                    '[upstream.a]\nservers = [{ address = "127.0.0.1:2" }]\nprotocol = "h3"\n')
    with pytest.raises(config.ConfigError):
        config.load(str(path))


def test_http1_origin_behind_h2c_is_502(proxies, tmp_path, origin):
    """protocol = "h2c" towards a server that speaks HTTP/1.1: a clear 502."""
    p = proxies(tmp_path, {"app": [origin.address]}, upstream_extra='protocol = "h2c"\nretries = 0')
    status, _, _ = request(p.port, "GET", "/")
    assert status == 502
    assert "HTTP/2" in access_entries(p, 1)[0]["error"]



def test_upgrade_to_http2_upstream_is_501(proxies, tmp_path, h2origins):
    """WebSocket needs RFC 8441's extended CONNECT towards an HTTP/2 server, which is not
    implemented: refused with 501, never HTTP/1.1 bytes on the HTTP/2 connection."""
    o = h2origins()
    p = h2proxy(proxies, tmp_path, [o])
    status, _, _ = request(p.port, "GET", "/ws", headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert status == 501
    assert "HTTP/2 upstream" in access_entries(p, 1)[0]["error"]
    assert request(p.port, "GET", "/after")[0] == 200
