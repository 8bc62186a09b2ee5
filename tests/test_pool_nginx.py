"""Upstream pooling against a real nginx origin (Debian's package): connections are
reused, and a pooled connection that nginx closed on its keep-alive timeout is retried
on a fresh connection without the client noticing."""

from __future__ import annotations

import subprocess

import pytest
from fp import free_port, request, wait_for
from nginxutil import TEMP_PATHS, running_nginx

CONF = """
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
daemon off;
events {{ worker_connections 1024; }}
http {{
    log_format conn '$connection $connection_requests $request_uri';
    access_log {run}/access.log conn;
    keepalive_timeout 1s;
    {temp_paths}
    server {{
        listen 127.0.0.1:{port};
        location = /tiny {{ default_type text/plain; return 200 'ok'; }}
    }}
}}
"""


@pytest.fixture
def nginx(tmp_path):
    run = tmp_path / "nginx"
    run.mkdir()
    port = free_port()
    conf = CONF.format(run=run, port=port, temp_paths=TEMP_PATHS.format(run=run))
    with running_nginx(run, conf, [port]) as proc:
        proc.port = port
        proc.run = run
        yield proc


def _established_from(port: int) -> str:
    """The `ss` lines of established TCP connections whose local port is `port`."""
    return subprocess.run(["ss", "-tnH", "state", "established", f"sport = :{port}"],
                          capture_output=True, text=True, check=True).stdout.strip()


def nginx_log(run) -> list[tuple[str, int]]:
    lines = (run / "access.log").read_text().split("\n")
    return [(ln.split()[0], int(ln.split()[1])) for ln in lines if ln.strip()]


def test_pool_reuses_and_survives_origin_keepalive_timeout(tmp_path, nginx, proxies):
    p = proxies(tmp_path, f"127.0.0.1:{nginx.port}", upstream_extra='keepalive_timeout = "60s"')
    for _ in range(40):
        assert request(p.port, "GET", "/tiny")[2] == b"ok"
    wait_for(lambda: len(nginx_log(nginx.run)) >= 40, what="nginx access log")
    conns = {c for c, _ in nginx_log(nginx.run)}
    assert len(conns) <= 2, f"40 requests used {len(conns)} origin connections"
    # nginx closes its idle keep-alive connections after 1 s; the proxy's pooled one is
    # then stale: wait until nginx has closed its side (none established from its port)
    wait_for(lambda: not _established_from(nginx.port), timeout=60,
             what="nginx closing its idle keep-alive connection")
    for _ in range(5):
        status, _, body = request(p.port, "GET", "/tiny")
        assert (status, body) == (200, b"ok")
    wait_for(lambda: len(nginx_log(nginx.run)) >= 45, what="nginx access log")
    after = {c for c, _ in nginx_log(nginx.run)[40:]}
    assert len(after) == 1 and not (after & conns)  # one fresh connection, reused
    p.stop()
