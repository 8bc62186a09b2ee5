"""TLS is a per-config feature (forkproxy/master/features.py): a plain-HTTP tree maps
neither libssl nor libcrypto in any process, and a reload that adds a TLS listener binds
ssl's classes (forkproxy/tlsnames.py) before the new workers fork, so modules imported
without TLS handle TLS connections (their except clauses name ssl's classes)."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess

from fp import free_port, request, wait_for
from otlputil import Receiver
from tlsutil import BioClient

OPENSSL_FILES = ("/libssl.so", "/libcrypto.so")


def maps_openssl(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return any(name in line for line in f for name in OPENSSL_FILES)


def tree(p) -> list[int]:
    pids = [p.pid, p.manager_pid(), *p.workers_pids()]
    assert len(pids) == 4 and None not in pids
    return pids


def self_signed(tmp_path) -> tuple[str, str]:
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


def https_get(port: int, ca: str) -> bytes:
    """One HTTP/1.1 request over TLS with a fresh connection (the system's OpenSSL)."""
    ctx = ssl.create_default_context(cafile=ca)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), 10),
                         server_hostname="localhost") as s:
        s.sendall(b"GET /tiny HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_a_plain_tree_maps_no_openssl(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2)
    for _ in range(3):
        assert request(p.port, "GET", "/tiny")[0] == 200
    assert {pid: maps_openssl(pid) for pid in tree(p)} == {pid: False for pid in tree(p)}


def test_a_tls_upstream_loads_openssl_before_fork(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2, upstream_extra="tls = { verify = false }")
    assert {pid: maps_openssl(pid) for pid in tree(p)} == {pid: True for pid in tree(p)}


def test_reload_from_plain_to_a_tls_listener(tmp_path, origin, proxies):
    p = proxies(tmp_path, origin.address, workers=2)
    assert not any(maps_openssl(pid) for pid in tree(p))
    cert, key = self_signed(tmp_path)
    tls_port = free_port()
    p.write_config(p.config_text() + (
        f'\n[[listener]]\nlisten = "127.0.0.1:{tls_port}"\nupstream = "app"\n'
        f'[listener.tls]\ncertificates = [{{ cert = "{cert}", key = "{key}" }}]\n'
        "ocsp_stapling = false\n"))
    old_workers = set(p.workers_pids())
    p.send(signal.SIGHUP)
    wait_for(lambda: any(e.get("event") == "reload complete" for e in p.log_events()),
             timeout=30, what="reload")
    wait_for(lambda: len(set(p.workers_pids()) - old_workers) == 2
             and not old_workers & set(p.workers_pids()), timeout=30, what="new workers")
    assert maps_openssl(p.pid)
    assert all(maps_openssl(pid) for pid in p.workers_pids())
    for _ in range(4):  # both workers
        resp = https_get(tls_port, cert)
        assert resp.startswith(b"HTTP/1.1 200"), resp[:200]
    for _ in range(4):  # half a record: the worker's read raises ssl.SSLWantReadError,
        # which client.py, imported before TLS was on, must match (tlsnames)
        c = BioClient(tls_port, cert, ssl.TLSVersion.TLSv1_3)
        try:
            c.handshake()
            c.send_split(b"GET /tiny HTTP/1.1\r\nHost: localhost\r\nConnection: close"
                         b"\r\n\r\n", pause=0.2)
            got = c.read_to_close()
        finally:
            c.close()
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
    assert request(p.port, "GET", "/tiny")[0] == 200


def test_tracing_to_https_loads_openssl_and_exports(tmp_path, origin, proxies, monkeypatch):
    cert, key = self_signed(tmp_path)
    receiver = Receiver()
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        receiver.server.socket = ctx.wrap_socket(receiver.server.socket, server_side=True)
        monkeypatch.setenv("SSL_CERT_FILE", cert)  # the exporter verifies with the system store
        p = proxies(tmp_path, origin.address, workers=2, extra=(
            f'[tracing]\nendpoint = "https://localhost:{receiver.port}/v1/traces"\n'
            'sample_ratio = 1.0\nexport_interval = "100ms"\n'))
        assert {pid: maps_openssl(pid) for pid in tree(p)} == {pid: True for pid in tree(p)}
        assert request(p.port, "GET", "/tiny")[0] == 200
        wait_for(lambda: receiver.server_spans(), timeout=30, what="a span exported over TLS")
    finally:
        receiver.stop()
