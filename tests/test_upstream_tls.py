"""TLS to upstream servers against real nginx origins (Debian's package) with a test CA
(trustme): a verified chain works (by SNI name and by IP address), a wrong name, an
expired certificate and an unknown CA each give 502 with the reason in the access and
error logs, mTLS required by the origin works, reconnects resume their sessions (nginx
says so too), bodies of every framing come through TLS, and active health checks go
through TLS (up when the certificate verifies, down when it does not)."""

from __future__ import annotations

import datetime
import gzip
import os
import ssl
import subprocess
import sys

import pytest
import trustme
from fp import connect, free_port, request, wait_for
from nginxutil import TEMP_PATHS, running_nginx
from upstreams_util import (
    RawOrigin,
    UProxy,
    access_entries,
    exact_reader,
    metric_value,
    ws_accept,
    ws_echo,
    ws_frame,
    ws_read_frame,
)

from forkproxy import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: a body nginx compresses on the fly, so it arrives chunked (no length known up front)
GZ_TEXT = " ".join(f"line {i} of a compressible body" for i in range(100))  # nginx: < 4 KiB
SERVERS = ("good", "mtls", "wrong", "expired", "unknown")

NGINX_CONF = """
user root;  # (ignored when not root) the files are in a private pytest directory
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log info;
daemon off;
events {{ worker_connections 1024; }}
http {{
    log_format tls '$server_port $connection $connection_requests $ssl_session_reused '
                   '$ssl_protocol $ssl_server_name $ssl_alpn_protocol $request_uri';
    access_log {run}/access.log tls;
    keepalive_timeout 60s;
    {temp_paths}
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_tickets on;
{servers}
}}
"""

SERVER = """
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {dir}/{name}.crt;
        ssl_certificate_key {dir}/{name}.key;
        {extra}
        location = /healthz {{ return 200 'healthy'; }}
        location = /big {{ root {dir}; try_files /big.bin =404; }}
        location = /gz {{
            gzip on; gzip_min_length 1; gzip_types text/plain; default_type text/plain;
            return 200 '{gz}';
        }}
        location / {{ default_type text/plain; return 200 '{name} $ssl_client_s_dn'; }}
    }}
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """CA, server certificates (good, wrong name, expired, unknown CA), client cert."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    stranger = trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    certs = {
        "good": ca.issue_cert("origin.test", "127.0.0.1"),
        "mtls": ca.issue_cert("origin.test", "127.0.0.1"),
        "wrong": ca.issue_cert("other.test"),
        "expired": ca.issue_cert("origin.test", not_before=now - datetime.timedelta(days=30),
                                 not_after=now - datetime.timedelta(days=1)),
        "unknown": stranger.issue_cert("origin.test"),
        "client": ca.issue_cert("client.test", common_name="client.test"),
    }
    for name, leaf in certs.items():
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{name}.crt"))
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    stranger.cert_pem.write_to_path(str(d / "stranger.crt"))
    (d / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    return d


@pytest.fixture(scope="module")
def origins(pki, tmp_path_factory):
    """One nginx with a TLS server per certificate; .ports[name], .log() lines."""
    run = tmp_path_factory.mktemp("nginx")
    ports = {name: free_port() for name in SERVERS}
    extra = {"mtls": f"ssl_client_certificate {pki}/ca.crt; ssl_verify_client on;"}
    servers = "".join(SERVER.format(port=ports[n], dir=pki, name=n, extra=extra.get(n, ""),
                                    gz=GZ_TEXT) for n in SERVERS)
    conf = NGINX_CONF.format(run=run, servers=servers, temp_paths=TEMP_PATHS.format(run=run))
    with running_nginx(run, conf, ports.values()) as proc:
        proc.ports = ports
        proc.log = lambda: [ln.split() for ln in (run / "access.log").read_text().splitlines()
                            if ln.strip()]
        yield proc


def upstream(name: str, port: int, tls: str, extra: str = "") -> str:
    return (f'[upstream.{name}]\nservers = [{{ address = "127.0.0.1:{port}" }}]\n'
            f"tls = {{ {tls} }}\n{extra}\n"
            f'[[route]]\nhost = "{name}.t"\nupstream = "{name}"\n\n')


@pytest.fixture(scope="module")
def proxy(pki, origins, tmp_path_factory):
    ports = origins.ports
    ca = f'ca = "{pki}/ca.crt"'
    sni = 'server_name = "origin.test"'
    body = (
        upstream("good", ports["good"], f"{ca}, {sni}")
        + upstream("byip", ports["good"], ca)  # verified against the certificate's IP SAN
        + upstream("mtls", ports["mtls"],
                   f'{ca}, {sni}, cert = "{pki}/client.crt", key = "{pki}/client.key"')
        + upstream("nocert", ports["mtls"], f"{ca}, {sni}")
        + upstream("wrong", ports["wrong"], f"{ca}, {sni}")
        + upstream("flood", ports["wrong"], f"{ca}, {sni}")
        + upstream("expired", ports["expired"], f"{ca}, {sni}")
        + upstream("unknown", ports["unknown"], f"{ca}, {sni}")
        + upstream("unverified", ports["unknown"], f"verify = false, {sni}")
        + upstream("resume", ports["good"], f"{ca}, {sni}", "keepalive_requests = 1")
        + upstream("noresume", ports["good"], f"{ca}, {sni}, session_reuse = false",
                   "keepalive_requests = 1")
    )
    p = UProxy(tmp_path_factory.mktemp("proxy"), body, default="good", admin=True,
               start=False)
    try:
        p.start()
        yield p
    finally:
        p.kill_all()


def origin_lines(origins, before: int, port: int, path: str, count: int) -> list[list[str]]:
    """nginx's access log lines for ``path`` on ``port`` after line ``before``, once there
    are ``count`` (nginx writes a line after the response went out: it may lag)."""
    def lines():
        found = [ln for ln in origins.log()[before:] if ln[0] == str(port) and ln[7] == path]
        return found if len(found) >= count else None
    return wait_for(lines, what=f"{count} nginx log lines for {path}")


def get(p, name: str, path: str = "/x"):
    return request(p.port, "GET", path, headers={"Host": f"{name}.t"})


def test_verified_chain_by_name_and_by_ip(proxy, origins):
    status, _, body = get(proxy, "good", "/v")
    assert (status, body) == (200, b"good ")
    status, _, body = get(proxy, "byip", "/v")
    assert (status, body) == (200, b"good ")
    lines = origin_lines(origins, 0, origins.ports["good"], "/v", 2)
    names = {ln[5] for ln in lines}
    assert "origin.test" in names  # SNI sent: the configured server_name
    assert "-" in names  # by IP address: no SNI (RFC 6066), verified against the IP SAN
    assert {ln[6] for ln in lines} == {"http/1.1"}  # ALPN offered and chosen


@pytest.mark.parametrize("name, reason", [
    ("wrong", "Hostname mismatch"),
    ("expired", "certificate has expired"),
    ("unknown", "unable to get local issuer certificate"),
])
def test_certificate_that_fails_verification_is_502_with_reason(proxy, name, reason):
    status, _, _ = get(proxy, name, f"/{name}")
    assert status == 502
    wait_for(lambda: any(e["path"] == f"/{name}" for e in access_entries(proxy, None)),
             what="the access log line")
    entry = [e for e in access_entries(proxy, None) if e["path"] == f"/{name}"][-1]
    assert entry["status"] == 502
    assert entry["error"].startswith("upstream TLS: certificate verify failed")
    assert reason in entry["error"]
    wait_for(lambda: any(e.get("event") == "upstream TLS handshake failed"
                         and e.get("upstream") == name and reason in e.get("error", "")
                         for e in proxy.log_events()), what="the error log line")


def test_repeated_failures_are_logged_once_per_interval(proxy):
    """Every failed request carries the reason in the access log; the error log gets the
    first one and then at most one line per 10 s for the same upstream, server, reason."""
    for _ in range(6):
        assert get(proxy, "flood", "/flood")[0] == 502
    wait_for(lambda: len([e for e in access_entries(proxy, None) if e["path"] == "/flood"
                          and "Hostname mismatch" in e["error"]]) == 6,
             what="6 access log lines")
    lines = [e for e in proxy.log_events()
             if e.get("event") == "upstream TLS handshake failed" and e.get("upstream") == "flood"]
    assert len(lines) == 1, lines
    assert "Hostname mismatch" in lines[0]["error"]


def test_verify_false_is_an_explicit_opt_out(proxy):
    status, _, body = get(proxy, "unverified")
    assert (status, body) == (200, b"unknown ")


def test_mtls_required_by_the_origin(proxy):
    status, _, body = get(proxy, "mtls")
    assert status == 200
    assert body.startswith(b"mtls ") and b"CN=client.test" in body
    # the same origin refuses a proxy without the client certificate
    assert get(proxy, "nocert")[0] == 400


def test_reconnects_resume_the_session(proxy, origins):
    before = len(origins.log())
    for _ in range(12):
        status, _, body = get(proxy, "resume", "/resume")
        assert (status, body) == (200, b"good ")
    lines = origin_lines(origins, before, origins.ports["good"], "/resume", 12)
    assert len(lines) == 12
    assert len({ln[1] for ln in lines}) == 12  # keepalive_requests = 1: new connections
    assert [ln[3] for ln in lines] == ["."] + ["r"] * 11  # nginx saw every reconnect resume
    text = wait_for(lambda: (lambda t: t if metric_value(
        t, "forkproxy_upstream_tls_handshakes_total", upstream="resume", resumed="true") >= 11
        else None)(proxy.metrics()), what="resumed handshakes in /metrics")
    assert metric_value(text, "forkproxy_upstream_tls_handshakes_total",
                        upstream="resume", resumed="false") <= 1
    assert metric_value(text, "forkproxy_upstream_tls_handshakes_total",
                        upstream="resume", resumed="true") == 11


def test_session_reuse_off_makes_full_handshakes(proxy, origins):
    before = len(origins.log())
    for _ in range(4):
        assert get(proxy, "noresume", "/noresume")[0] == 200
    lines = origin_lines(origins, before, origins.ports["good"], "/noresume", 4)
    assert [ln[3] for ln in lines] == ["."] * 4
    wait_for(lambda: metric_value(proxy.metrics(), "forkproxy_upstream_tls_handshakes_total",
                                  upstream="noresume", resumed="false") == 4,
             what="full handshakes in /metrics")


def test_keepalive_and_bodies_through_tls(proxy, origins, pki):
    """Pooled TLS connections carry many requests; a 3 MiB body (no splice through TLS),
    a chunked one and a request body come through intact."""
    before = len(origins.log())
    for _ in range(40):
        status, _, body = get(proxy, "good", "/ka")
        assert (status, body) == (200, b"good ")
    lines = origin_lines(origins, before, origins.ports["good"], "/ka", 40)
    assert len(lines) == 40 and len({ln[1] for ln in lines}) <= 2
    status, _, body = get(proxy, "good", "/big")
    assert status == 200 and body == (pki / "big.bin").read_bytes()
    status, _, body = request(proxy.port, "POST", "/post", headers={"Host": "good.t"},
                              body=b"x" * 200_000)
    assert (status, body) == (200, b"good ")
    status, headers, body = request(proxy.port, "GET", "/gz",
                                    headers={"Host": "good.t", "Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("transfer-encoding") == "chunked", headers
    assert gzip.decompress(body).decode() == GZ_TEXT


def test_health_checks_over_tls(pki, origins, tmp_path):
    ports = origins.ports
    ca = f'ca = "{pki}/ca.crt"'
    hc = 'health_check = { path = "/healthz", interval = "200ms", rise = 1, fall = 1 }'
    body = (upstream("hgood", ports["good"], f'{ca}, server_name = "origin.test"', hc)
            + upstream("hbad", ports["wrong"], f'{ca}, server_name = "origin.test"', hc))
    p = UProxy(tmp_path, body, default="hgood", admin=True, start=False)
    try:
        p.start()
        good = f"127.0.0.1:{ports['good']}"
        bad = f"127.0.0.1:{ports['wrong']}"
        wait_for(lambda: p.server_status("hgood", good)["health_check"]["state"] == "up",
                 what="the TLS origin checked up")
        wait_for(lambda: p.server_status("hbad", bad)["health_check"]["state"] == "down",
                 what="the origin with a wrong certificate checked down")
        check = p.server_status("hbad", bad)["health_check"]
        assert check["last_result"] == "TLS handshake failed", check
        down = [e for e in p.log_events() if e.get("event") == "upstream server down"]
        assert any("Hostname mismatch" in e.get("error", "") for e in down), down
        assert p.server_status("hgood", good)["health_check"]["last_status"] == 200
        # the checks resume their sessions too (nginx's view of the handshakes)
        wait_for(lambda: "r" in {ln[3] for ln in origins.log()
                                 if ln[0] == str(ports["good"]) and ln[7] == "/healthz"},
                 what="a health check that resumed its session")
    finally:
        p.kill_all()


def forkproxy_check(tmp_path, tls: str) -> subprocess.CompletedProcess:
    conf = tmp_path / "check.toml"
    conf.write_text(f"""
[[listener]]
listen = "127.0.0.1:8080"
upstream = "app"
[upstream.app]
servers = [{{ address = "127.0.0.1:9443" }}]
tls = {{ {tls} }}
""")
    return subprocess.run([sys.executable, "-m", "forkproxy", "check", "-c", str(conf)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_check_loads_and_validates_the_files(tmp_path, pki):
    ok = forkproxy_check(tmp_path, f'ca = "{pki}/ca.crt", cert = "{pki}/client.crt", '
                                   f'key = "{pki}/client.key"')
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert forkproxy_check(tmp_path, "").returncode == 0  # the system store
    (tmp_path / "notpem.crt").write_text("not a certificate\n")
    for tls, key, words in [
        (f'ca = "{pki}/ca.crt", cert = "{pki}/client.crt", key = "{pki}/good.key"',
         "upstream.app.tls.key:", "does not match"),
        (f'ca = "{tmp_path}/missing.crt"', "upstream.app.tls.ca:", "cannot read CA file"),
        (f'ca = "{tmp_path}/notpem.crt"', "upstream.app.tls.ca:", "no PEM certificate"),
        (f'ca = "{pki}/good.crt"', "upstream.app.tls.ca:", "no CA certificate"),
        (f'ca = "{pki}/ca.crt", cert = "{pki}/client.crt"', "upstream.app.tls:", "go together"),
        (f'verify = false, ca = "{pki}/ca.crt"', "upstream.app.tls.ca:", "no effect"),
        ('min_version = "TLSv1.3", max_version = "TLSv1.2"', "upstream.app.tls.min_version:",
         "newer"),
        ('ciphers = "NOPE"', "upstream.app.tls.ciphers:", "no cipher"),
        ('alpn = ["spdy/3"]', "upstream.app.tls.alpn:", "unsupported"),
        ('verify = "yes"', "upstream.app.tls.verify", "bool"),
    ]:
        r = forkproxy_check(tmp_path, tls)
        assert r.returncode == 1, (tls, r.stdout)
        assert key in r.stdout and words in r.stdout, (tls, r.stdout)


class TLSRawOrigin(RawOrigin):
    """RawOrigin (threads in the test process) behind a TLS server handshake."""

    def __init__(self, behaviour, pki):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(pki / "good.crt"), str(pki / "good.key"))
        super().__init__(behaviour)

    def _serve(self, c):
        try:
            c = self.ctx.wrap_socket(c, server_side=True)
        except (OSError, ValueError):
            c.close()
            return
        super()._serve(c)


def test_websocket_tunnel_through_tls(pki, tmp_path):
    ws = TLSRawOrigin(ws_echo, pki)
    try:
        p = UProxy(tmp_path, upstream("app", ws.port, f'ca = "{pki}/ca.crt"'), start=False)
        p.start()
        key = b"dGhlIHNhbXBsZSBub25jZQ=="
        with connect(p.port) as c:
            c.sendall(b"GET /chat HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                      b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                      b"Sec-WebSocket-Key: " + key + b"\r\n\r\n" + ws_frame(b"early bird"))
            head = b""
            while b"\r\n\r\n" not in head:
                head += c.sock.recv(4096)
            head, _, rest = head.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101") and ws_accept(key) in head
            recv = exact_reader(c.sock, rest)
            assert ws_read_frame(recv) == (1, b"early bird")
            for msg in (b"hello", b"x" * 70000):
                c.sendall(ws_frame(msg, 2))
                assert ws_read_frame(recv) == (2, msg)
            c.sendall(ws_frame(b"", 8))
            assert ws_read_frame(recv)[0] == 8
    finally:
        ws.stop()
        p.kill_all()


def test_failures_logged_by_collector_shards(pki, origins, tmp_path):
    """With two workers and two collectors, whichever process drains a worker's ring
    logs that worker's TLS failures (once per interval each)."""
    body = upstream("app", origins.ports["expired"],
                    f'ca = "{pki}/ca.crt", server_name = "origin.test"')
    p = UProxy(tmp_path, body, workers=2, server_extra="collectors = 2", start=False)
    try:
        p.start()
        for _ in range(20):  # new connections: the kernel spreads them over both workers
            assert get(p, "app", "/exp")[0] == 502
        wait_for(lambda: len([e for e in access_entries(p, None)
                              if "certificate has expired" in e["error"]]) == 20,
                 what="20 access log lines")
        lines = [e for e in p.log_events() if e.get("event") == "upstream TLS handshake failed"]
        assert 1 <= len(lines) <= 2, lines
        assert {e["process"] for e in lines} <= {"manager", "collector-1"}, lines
    finally:
        p.kill_all()


def test_servers_from_dns_verify_the_name_they_were_found_through():
    base = '[[listener]]\nlisten = "127.0.0.1:8080"\nupstream = "app"\n[upstream.app]\n'
    cfg = config.loads(base + 'servers = [{ address = "app.internal:443", resolve = "30s" }]\n'
                       "tls = {}\n", check_files=False)
    assert config.dns_tls_name(cfg.upstream["app"]) == "app.internal"
    for servers in ('[{ srv = "_https._tcp.app.internal", resolve = "30s" }]',
                    '[{ address = "a.internal:443", resolve = "30s" }, '
                    '{ address = "b.internal:443", resolve = "30s" }]'):
        with pytest.raises(config.ConfigError) as e:
            config.loads(base + f"servers = {servers}\ntls = {{}}\n", check_files=False)
        assert "upstream.app.tls.server_name: required" in str(e.value)
        config.loads(base + f'servers = {servers}\ntls = {{ server_name = "app.internal" }}\n',
                     check_files=False)
