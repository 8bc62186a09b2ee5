"""Issue 14 end to end: HTTP/2 clients (curl --http2 over TLS with ALPN, curl
--http2-prior-knowledge, h2load, and a raw h2-library client for protocol violations)
through real forked forkproxy masters and workers to real origins on loopback."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import threading
import time
import urllib.request

import h2.events
import pytest
from fp import rss_kib, wait_for
from h2client import SocketClient
from hostile import RecordingOrigin

H2C = 'protocols = ["http/1.1", "h2c"]'


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    """A self-signed certificate for localhost (real openssl); curl trusts it directly."""
    d = tmp_path_factory.mktemp("h2pki")
    paths = {"ca": d / "cert.pem", "cert": d / "cert.pem", "key": d / "key.pem"}
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(paths["key"]),
                    "-out", str(paths["cert"]), "-subj", "/CN=localhost", "-days", "2",
                    "-addext", "subjectAltName=DNS:localhost"], check=True,
                   capture_output=True, timeout=60)
    return paths


@pytest.fixture
def recording():
    o = RecordingOrigin()
    yield o
    o.stop()


def tls_listener(ca, extra: str = "") -> str:
    return (f"{extra}\n[listener.tls]\n"
            f'certificates = [{{ cert = "{ca["cert"]}", key = "{ca["key"]}" }}]\n')


def curl(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], input=data,
                          capture_output=True, timeout=60)


def access_records(p, n: int) -> list[dict]:
    def read():
        if not os.path.exists(p.access_log):
            return []
        with open(p.access_log) as f:
            return [json.loads(line) for line in f if line.strip()]
    wait_for(lambda: len(read()) >= n, timeout=15, what=f"{n} access log lines")
    return read()


def metric_lines(p, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/metrics", timeout=10).read()
    out = {}
    for line in text.decode().splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name):].rsplit(" ", 1)
            out[labels] = float(value)
    return out


def h2load(url: str, *args: str) -> dict:
    r = subprocess.run(["h2load", *args, url], capture_output=True, text=True, timeout=300)
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", r.stdout)
    assert m, r.stdout + r.stderr
    total, started, done, ok, failed, errored, timeouts = map(int, m.groups())
    proto = re.search(r"Application protocol: (\S+)", r.stdout)
    return {"total": total, "started": started, "done": done, "ok": ok, "failed": failed,
            "errored": errored,
            "timeout": timeouts, "protocol": proto[1] if proto else "", "out": r.stdout}


# -- negotiation -------------------------------------------------------------------------


def test_tls_listener_offers_h2_by_default_and_still_serves_http1(tmp_path, origin, proxies,
                                                                   ca):
    p = proxies(tmp_path, origin.address, listener_extra=tls_listener(ca), admin=True)
    url = f"https://localhost:{p.port}/headers"
    common = ["--cacert", str(ca["ca"]), "--resolve", f"localhost:{p.port}:127.0.0.1"]
    r2 = curl("--http2", "-w", "\n%{http_version}", *common, url)
    r1 = curl("--http1.1", "-w", "\n%{http_version}", *common, url)
    assert r2.returncode == 0 and r2.stdout.endswith(b"\n2"), r2.stderr
    assert r1.returncode == 0 and r1.stdout.endswith(b"\n1.1"), r1.stderr
    seen = json.loads(r2.stdout.rsplit(b"\n", 1)[0])
    names = [n for n, _ in seen["headers"]]
    assert seen["headers"][0] == ["Host", f"localhost:{p.port}"]
    assert ["X-Forwarded-Proto", "https"] in seen["headers"] and "te" not in names
    recs = access_records(p, 2)
    by_proto = {r["protocol"]: r for r in recs}
    assert by_proto["HTTP/2"]["stream"] == 1 and by_proto["HTTP/2"]["tls_resumed"] is False
    assert "stream" not in by_proto["HTTP/1.1"]
    wait_for(lambda: metric_lines(p, "forkproxy_client_connections_total").get(
        f'{{listener="127.0.0.1:{p.port}",protocol="h2"}}') == 1, timeout=10,
        what="the h2 connection counted")
    conns = metric_lines(p, "forkproxy_client_connections_total")
    assert conns[f'{{listener="127.0.0.1:{p.port}",protocol="http/1.1"}}'] == 1


def test_h2c_prior_knowledge_and_http1_on_the_same_port(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, listener_extra=H2C)
    url = f"http://127.0.0.1:{p.port}/bytes/100000"
    r2 = curl("--http2-prior-knowledge", "-w", "%{http_version}", "-o", "/dev/null", url)
    r1 = curl("--http1.1", "-w", "%{http_version}", "-o", "/dev/null", url)
    assert (r2.returncode, r2.stdout) == (0, b"2"), r2.stderr
    assert (r1.returncode, r1.stdout) == (0, b"1.1"), r1.stderr
    body = curl("--http2-prior-knowledge", url).stdout
    assert body == (bytes(range(256)) * 400)[:100000]


def test_a_plain_listener_without_h2c_speaks_only_http1(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address)
    r2 = curl("--http2-prior-knowledge", f"http://127.0.0.1:{p.port}/tiny")
    assert r2.returncode != 0
    r1 = curl("--http1.1", f"http://127.0.0.1:{p.port}/tiny")
    assert (r1.returncode, r1.stdout) == (0, b"ok")


# -- translation: the differential test --------------------------------------------------


REQUESTS = [
    ("GET", "/a?x=1&y=2", ["-H", "Accept: text/html", "-H", "X-Custom: one two"], None),
    ("GET", "/cookies", ["-H", "Cookie: a=1; b=2", "-H", "X-Forwarded-For: 192.0.2.1"], None),
    ("POST", "/form", ["-H", "Content-Type: application/x-www-form-urlencoded"], b"k=v&w=z"),
    ("PUT", "/upload", ["-H", "Content-Type: application/octet-stream"], b"\x00\x01" * 3000),
    ("DELETE", "/thing/7", [], None),
    ("HEAD", "/head", [], None),
    ("OPTIONS", "/opts", ["-H", "Origin: https://example.test"], None),
]


def test_http1_and_http2_requests_reach_the_origin_as_the_same_request(tmp_path, recording,
                                                                        proxies):
    """Each request is sent over HTTP/1.1 and over HTTP/2 (curl both times); the origin
    must receive the same HTTP/1.1 request: method, target, body, and every header field
    with its value and position (names compared without case: HTTP/2 lower-cases them).
    The request id is fixed by the client so it is the same too."""
    p = proxies(tmp_path, recording.address, listener_extra=H2C)
    for method, path, headers, body in REQUESTS:
        for version in ("--http1.1", "--http2-prior-knowledge"):
            args = [version, "-X", method, *headers, "-H", f"X-Request-Id: rid-{method}",
                    "-H", "Expect:", "-o", "/dev/null", "-w", "%{http_code}"]
            if method == "HEAD":
                args = [version, "-I", *headers, "-H", f"X-Request-Id: rid-{method}",
                        "-o", "/dev/null", "-w", "%{http_code}"]
            if body is not None:
                args += ["--data-binary", "@-"]
            r = curl(*args, f"http://127.0.0.1:{p.port}{path}", data=body)
            assert r.stdout == b"200", (method, version, r.stdout, r.stderr)
    wait_for(lambda: len(recording.seen) == 2 * len(REQUESTS), what="all requests at the origin")
    assert not recording.errors and not recording.incomplete
    seen = list(recording.seen)
    for i, (method, path, _, body) in enumerate(REQUESTS):
        h1, h2 = seen[2 * i], seen[2 * i + 1]
        assert (h1.method, h1.path, h1.body) == (h2.method, h2.path, h2.body) == (
            method, path, body or b"")
        # each request gets its own trace (tests/test_tracing.py): the rest is the same
        strip = [(n.lower(), v) for n, v in h1.headers if n.lower() != b"traceparent"]
        assert strip == [(n.lower(), v) for n, v in h2.headers
                         if n.lower() != b"traceparent"], (method, h1.headers, h2.headers)


def test_a_body_without_length_goes_upstream_chunked(tmp_path, recording, proxies):
    p = proxies(tmp_path, recording.address, listener_extra=H2C)
    c = SocketClient(p.port)
    sid = c.send([(b":method", b"POST"), (b":scheme", b"http"),
                  (b":authority", b"origin.test"), (b":path", b"/stream")], end_stream=False)
    for piece in (b"abc", b"defg", b"h"):
        c.conn.send_data(sid, piece)
        c.flush()
    c.conn.end_stream(sid)
    c.flush()
    out = c.wait(sid)
    c.close()
    assert out["status"] == 200 and out["body"] == b"POST /stream 8"
    (s,) = recording.seen
    assert s.header("transfer-encoding") == ["chunked"] and not s.header("content-length")
    assert s.body == b"abcdefgh" and s.header("host") == ["origin.test"]


def test_a_body_without_length_over_the_limit_is_413_and_never_completes_upstream(
        tmp_path, recording, proxies):
    """max_body_size holds for a body with no declared length too (it is counted as it
    streams): the client gets 413 and then RST_STREAM(NO_ERROR) (stop sending, RFC 9113
    section 8.1), the origin never gets the whole body, and the connection goes on."""
    p = proxies(tmp_path, recording.address, listener_extra=H2C, admin=True,
                server_extra='max_body_size = "64k"')
    c = SocketClient(p.port)
    sid = c.send(_req(b"/upload", method=b"POST"), end_stream=False)
    sent, out = 0, None
    deadline = time.monotonic() + 30
    while out is None and time.monotonic() < deadline:
        window = min(c.conn.local_flow_control_window(sid), 16384)
        if window > 0 and sent < 1 << 20:
            c.conn.send_data(sid, b"x" * window)
            sent += window
            c.flush()
        if select.select([c.sock], [], [], 0.2)[0]:
            data = c.sock.recv(65536)
            assert data, "connection closed"
            for ev in c.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    out = dict(ev.headers)
            c.flush()
    assert out is not None and out[b":status"] == b"413", (sent, out)
    assert sent > 64 << 10
    good = c.wait(c.send(_req(b"/after")))
    c.close()
    assert good["status"] == 200 and good["body"] == b"GET /after 0"
    assert [s.path for s in recording.seen if s.path == "/after"] == ["/after"]
    assert all(len(s.body) < sent for s in recording.seen), [len(s.body) for s in recording.seen]
    wait_for(lambda: metric_lines(p, "forkproxy_http2_stream_errors_total").get(
        '{reason="body_too_large"}') == 1, timeout=10, what="body_too_large counted")


def test_a_grpc_request_declared_too_large_is_resource_exhausted(tmp_path, recording, proxies):
    """A gRPC request refused before any exchange (its content-length is over
    max_body_size) gets a gRPC status, not an error page, and never reaches the origin."""
    p = proxies(tmp_path, recording.address, listener_extra=H2C, server_extra='max_body_size = "1m"')
    c = SocketClient(p.port)
    out = c.wait(c.send(_req(b"/pkg.Svc/Call", (b"content-type", b"application/grpc"),
                             (b"te", b"trailers"), (b"content-length", b"2097152"),
                             method=b"POST"), end_stream=False))
    c.close()
    assert out["status"] == 200 and out["headers"][b"grpc-status"] == b"8", out
    assert out["headers"][b"content-type"] == b"application/grpc" and out["body"] == b""
    assert recording.seen == []


# -- hostile clients through the proxy ----------------------------------------------------


def _req(path: bytes, *extra, method: bytes = b"GET"):
    return [(b":method", method), (b":scheme", b"http"), (b":authority", b"origin.test"),
            (b":path", path), *extra]


@pytest.mark.parametrize("headers,body,reason", [
    (_req(b"/te", (b"te", b"gzip")), None, "malformed_headers"),
    (_req(b"/te2", (b"transfer-encoding", b"chunked"), method=b"POST"), b"0\r\n\r\n",
     "malformed_headers"),
    (_req(b"/crlf", (b"x-a", b"1\r\nx-smuggled: 1")), None, "invalid_field"),
    (_req(b"/host", (b"host", b"evil.test")), None, "host_mismatch"),
    (_req(b"/cl", (b"content-length", b"2"), method=b"POST"), b"GET /smuggled HTTP/1.1\r\n",
     "malformed_body"),
])
def test_smuggling_attempts_never_reach_the_origin(tmp_path, recording, proxies, headers,
                                                   body, reason):
    """The stream is reset and nothing of it reaches the origin as a request (a body
    longer than its content-length: at most the declared bytes, never a second request);
    the next request on the same connection is served normally."""
    p = proxies(tmp_path, recording.address, listener_extra=H2C, admin=True)
    c = SocketClient(p.port)
    bad = c.wait(c.send(headers, body))
    assert bad["reset"] == 1 and bad["status"] is None, repr(bad)  # PROTOCOL_ERROR
    good = c.wait(c.send(_req(b"/after")))
    c.close()
    assert good["status"] == 200 and good["body"] == b"GET /after 0"
    time.sleep(0.3)  # anything smuggled would have reached the origin by now
    assert [s.path for s in recording.seen] == ["/after"] and not recording.errors
    wait_for(lambda: metric_lines(p, "forkproxy_http2_stream_errors_total").get(
        f'{{reason="{reason}"}}') == 1, timeout=10, what=f"the {reason} error counted")


def test_rapid_reset_gets_goaway_and_other_connections_are_served(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, listener_extra=H2C, admin=True,
                extra="[http2]\nreset_burst = 50\nreset_rate = 1.0\n")
    c = SocketClient(p.port)
    for _ in range(200):
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, _req(b"/sleep/200"))
        c.conn.reset_stream(sid)
    c.flush()
    out = c.wait(-1)
    c.close()
    assert out["goaway"] == 0xB  # ENHANCE_YOUR_CALM
    r = curl("--http2-prior-knowledge", f"http://127.0.0.1:{p.port}/tiny")
    assert r.stdout == b"ok"
    wait_for(lambda: metric_lines(p, "forkproxy_http2_stream_errors_total").get(
        '{reason="rapid_reset"}') == 1, timeout=10, what="rapid_reset counted")


# -- load and lifecycle ------------------------------------------------------------------


def test_h2load_over_tls_and_h2c(tmp_path, origin, proxies, ca):
    p = proxies(tmp_path, origin.address, listener_extra=tls_listener(ca))
    q = proxies(tmp_path / "h2c", origin.address, listener_extra=H2C) if (
        (tmp_path / "h2c").mkdir() or True) else None
    tls = h2load(f"https://127.0.0.1:{p.port}/bytes/2048", "-n", "2000", "-c", "4", "-m", "10")
    plain = h2load(f"http://127.0.0.1:{q.port}/bytes/2048", "-n", "2000", "-c", "4", "-m", "10")
    assert (tls["protocol"], tls["ok"], tls["failed"], tls["errored"]) == ("h2", 2000, 0, 0), \
        tls["out"]
    assert (plain["protocol"], plain["ok"], plain["failed"]) == ("h2c", 2000, 0), plain["out"]


def test_quit_lets_in_flight_streams_finish_after_goaway(tmp_path, recording, proxies):
    """Two streams in flight on one connection (curl multiplexes them) when QUIT
    arrives: both complete, then the worker closes the connection and the master exits."""
    p = proxies(tmp_path, recording.address, listener_extra=H2C)
    base = f"http://127.0.0.1:{p.port}"
    client = subprocess.Popen(
        ["curl", "-sS", "--http2-prior-knowledge", "--parallel", "--parallel-immediate",
         "-w", "%{http_version} %{http_code}\n", f"{base}/sleep/800", f"{base}/sleep/900"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(recording.seen) == 2, what="both requests at the origin")
        p.send(signal.SIGQUIT)
        out, err = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, err
    assert b"GET /sleep/800 02 200" in out and b"GET /sleep/900 02 200" in out, out
    assert p.proc.wait(15) == 0


def test_no_request_fails_across_ten_hups(tmp_path, origin, proxies, ca):
    """Four curl clients, each multiplexing 10 streams on one TLS connection (ALPN h2;
    curl 7.88 cannot multiplex with prior knowledge), fetch
    continuously while the master gets 10 HUPs. Each HUP retires the old workers, whose
    connections get GOAWAY with the last stream id: the streams at or below it finish,
    and curl retries the ones above it on a new connection, as a browser does (RFC 9113
    section 6.8: they were not processed). Every request any client made must come back
    200 over HTTP/2, and the access log must hold exactly the requests answered."""
    p = proxies(tmp_path, origin.address, listener_extra=tls_listener(ca), workers=2)
    config = tmp_path / "urls.curlrc"
    config.write_text("".join(f'url = "https://localhost:{p.port}/bytes/2048?{i}"\n'
                              'output = "/dev/null"\n' for i in range(400)))
    results: list[bytes] = []
    errors: list[bytes] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            r = subprocess.run(
                ["curl", "-sS", "--no-progress-meter", "--http2", "--cacert", str(ca["cert"]),
                 "--resolve", f"localhost:{p.port}:127.0.0.1", "--parallel", "--parallel-max",
                 "10", "--max-time", "60", "-w", "%{http_code} %{http_version}\n",
                 "-K", str(config)], capture_output=True, timeout=120)
            results.extend(r.stdout.splitlines())
            if r.returncode or r.stderr:
                errors.append(b"exit %d: %s" % (r.returncode, r.stderr[-400:]))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        wait_for(lambda: len(results) >= 400, timeout=60, what="load running")
        for _ in range(10):
            old = set(p.workers_pids())
            p.send(signal.SIGHUP)
            wait_for(lambda old=old: len(set(p.workers_pids()) - old) == 2, timeout=60,
                     what="a new generation of workers")
            wait_for(lambda old=old: not old & set(p.workers_pids()), timeout=60,
                     what="the old workers drained and gone")
            seen = len(results)
            wait_for(lambda seen=seen: len(results) >= seen + 200, timeout=60,
                     what="requests answered by the new workers")
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=180)
    assert errors == [], errors[:3]
    assert len(results) >= 2400 and set(results) == {b"200 2"}, \
        (len(results), {r for r in results if r != b"200 2"})
    records = access_records(p, len(results))
    assert [r for r in records if r["status"] != 200 or r["error"]] == []
    assert len(records) == len(results)


def sample_rss(pid: int, stop: threading.Event, samples: list[int]) -> None:
    """The worker's RSS from /proc every 50 ms until stop is set."""
    while not stop.is_set():
        samples.append(rss_kib(pid))
        stop.wait(0.05)


GIB = 1 << 30


@pytest.mark.timeout(600)
def test_a_1gib_download_streams_with_flat_memory(tmp_path, origin, proxies):
    """1 GiB through one HTTP/2 stream (issue 14, point 3): the origin generates the bytes
    (no disk), curl reads them at its pace into /dev/null, and the worker's RSS, sampled
    from /proc all through the transfer, never rises more than 32 MiB above what it was
    after a 16 MiB warm-up (the stream's queue is bounded by send_buffer, the upstream is
    read as the client's window opens: nothing grows with the body)."""
    p = proxies(tmp_path, origin.address, listener_extra=H2C, admin=True)
    (wpid,) = p.workers_pids()
    url = f"http://127.0.0.1:{p.port}/bytes/"
    warm = curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{size_download}",
                url + str(16 << 20))
    assert warm.stdout == b"%d" % (16 << 20), warm.stderr
    before = rss_kib(wpid)
    samples: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(wpid, stop, samples))
    sampler.start()
    try:
        r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", "540",
                            "-w", "%{size_download} %{http_version} %{time_total}",
                            "-o", "/dev/null", url + str(GIB)],
                           capture_output=True, timeout=560)
    finally:
        stop.set()
        sampler.join()
    size, version, seconds = r.stdout.split()
    assert (int(size), version) == (GIB, b"2"), r.stderr
    peak = max(samples)
    print(f"1 GiB over one HTTP/2 stream in {float(seconds):.1f} s "
          f"({GIB / float(seconds) / 2**20:.0f} MiB/s); worker RSS {before} KiB before, "
          f"peak {peak} KiB over {len(samples)} samples, {rss_kib(wpid)} KiB after")
    assert len(samples) >= 10, "the transfer was too short to sample"
    assert peak - before < 32 * 1024, (before, peak)


def test_status_shows_http2_connections_and_streams(tmp_path, recording, proxies):
    p = proxies(tmp_path, recording.address, listener_extra=H2C, admin=True)
    c = SocketClient(p.port)
    c.send(_req(b"/sleep/3000"))

    def h2_status():
        body = urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/status", timeout=10)
        (w,) = json.loads(body.read())["workers"]
        return w["http2_connections"], w["http2_streams"]

    wait_for(lambda: h2_status() == (1, 1), timeout=10, what="one connection, one stream")
    c.close()
    wait_for(lambda: h2_status() == (0, 0), timeout=15, what="both gone")


def test_pooled_streams_answer_each_request_with_its_own_response(tmp_path, recording,
                                                                  proxies):
    """Two rounds of 40 concurrent requests on one connection (more than a connection
    keeps finished streams for: STREAMS_KEPT), with responses of different lengths: every
    stream gets its own body and content-length, whether a new or a reused stream serves
    it, and whether its head is the same as the last one (whose header list the worker
    reuses) or not."""
    p = proxies(tmp_path, recording.address, listener_extra=H2C)
    c = SocketClient(p.port)
    for batch in range(2):
        paths = {c.send(_req(f"/sleep/{50 + 25 * (i % 3)}/{'x' * (i % 7)}".encode())):
                 f"/sleep/{50 + 25 * (i % 3)}/{'x' * (i % 7)}" for i in range(40)}
        heads: dict[int, dict] = {}
        bodies = dict.fromkeys(paths, b"")
        ended: set[int] = set()
        while len(ended) < len(paths):
            data = c.sock.recv(65536)
            assert data, "connection closed"
            for ev in c.conn.receive_data(data):
                assert not isinstance(ev, (h2.events.StreamReset,
                                           h2.events.ConnectionTerminated)), ev
                if isinstance(ev, h2.events.ResponseReceived):
                    heads[ev.stream_id] = dict(ev.headers)
                elif isinstance(ev, h2.events.DataReceived):
                    bodies[ev.stream_id] += ev.data
                    c.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    ended.add(ev.stream_id)
            c.flush()
        for sid, path in paths.items():
            want = f"GET {path} 0".encode()
            assert heads[sid][b":status"] == b"200" and bodies[sid] == want, (batch, sid)
            assert heads[sid][b"content-length"] == b"%d" % len(want), (batch, sid)
    c.close()
    assert len(recording.seen) == 80 and not recording.errors


def read_frames(sock, buf: bytearray):
    """The whole HTTP/2 frames in ``buf`` after one more read, as (type, flags, stream,
    payload); what is left of a frame stays in ``buf``. EOF: None."""
    data = sock.recv(65536)
    if not data:
        return None
    buf += data
    frames = []
    while len(buf) >= 9:
        length = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + length:
            break
        frames.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF,
                       bytes(buf[9:9 + length])))
        del buf[:9 + length]
    return frames


GOAWAY, PING, ACK = 7, 6, 1


@pytest.mark.parametrize("ack, drain_timeout", [(True, "60s"), (False, "1s")],
                         ids=["acked", "never-acked"])
def test_a_drain_sends_the_shutdown_notice_at_once_and_the_final_goaway_on_its_ack(
        tmp_path, recording, proxies, ack, drain_timeout):
    """QUIT drains the worker: an idle HTTP/2 connection gets the shutdown notice (GOAWAY
    with the largest stream id, and a PING) at once, and the final GOAWAY (the last
    stream it served) as soon as the PING is acknowledged, long before [http2]
    drain_timeout. The notice was once queued after the connection loop's flush and
    left only with the final GOAWAY when drain_timeout ended: here the worker would be
    stopped by graceful_timeout (5 s) before that, and the client would see no GOAWAY.
    A client that never acknowledges gets the final GOAWAY after drain_timeout. The
    frames are read raw: the h2 library takes no PING after a GOAWAY."""
    p = proxies(tmp_path, recording.address, listener_extra=H2C,
                extra=f'[http2]\ndrain_timeout = "{drain_timeout}"\n')
    c = SocketClient(p.port, timeout=30)
    try:
        sid = c.send(_req(b"/"))
        assert c.wait(sid)["status"] == 200
        p.send(signal.SIGQUIT)
        buf = bytearray()
        goaways: list[tuple[int, int]] = []
        pings = 0
        while len(goaways) < 2:
            frames = read_frames(c.sock, buf)
            assert frames is not None, f"the connection closed after {goaways}\n{p.log()}"
            for kind, flags, stream, payload in frames:
                if kind in (GOAWAY, PING):
                    assert stream == 0, (kind, stream)  # connection frames
                if kind == GOAWAY:
                    goaways.append((int.from_bytes(payload[:4], "big") & 0x7FFFFFFF,
                                    int.from_bytes(payload[4:8], "big")))
                elif kind == PING and not flags & ACK:  # nghttp2 sends it first
                    pings += 1
                    if ack:
                        c.sock.sendall(b"\x00\x00\x08\x06\x01\x00\x00\x00\x00" + payload)
        assert pings == 1, "one PING comes with the shutdown notice"
        assert goaways == [(2**31 - 1, 0), (sid, 0)]
        assert read_frames(c.sock, buf) is None  # then the worker closes the connection
    finally:
        c.close()
    assert p.proc.wait(15) == 0
