"""TLS listeners read ahead (one read(2) per record): bytes OpenSSL read ahead but has
not decrypted yet must be served without waiting for the socket, which has nothing more
to say. Real forked proxy, a real TLS client that places records in one TCP send."""

from __future__ import annotations

import ssl
import subprocess

import pytest
from tlsutil import BioClient

from forkproxy import config as config_mod
from forkproxy.tls import openssl
from forkproxy.worker import tlscontext

REQUEST = b"GET /headers HTTP/1.1\r\nHost: localhost\r\n\r\n"
LAST = b"GET /headers HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


@pytest.fixture
def cert(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_listener(tmp_path, origin, proxies, cert):
    return proxies(tmp_path, origin.address, workers=1, listener_extra=(
        f'[listener.tls]\ncertificates = [{{ cert = "{cert[0]}", key = "{cert[1]}" }}]\n'
        "ocsp_stapling = false\n"))


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_pipelined_records_in_one_segment(tls_listener, cert, version):
    c = BioClient(tls_listener.port, cert[0], version)
    try:
        c.handshake()
        c.send_records(REQUEST)  # a keep-alive request first: the connection is idle after
        c.send_records(REQUEST, REQUEST, LAST)
        got = c.read_to_close()
    finally:
        c.close()
    assert got.count(b"HTTP/1.1 200 OK") == 4, got[-500:]


def test_first_request_with_the_last_handshake_flight(tls_listener, cert):
    c = BioClient(tls_listener.port, cert[0], ssl.TLSVersion.TLSv1_3)
    try:
        c.handshake(flush_last=False)  # Finished and the request arrive together
        c.send_records(LAST)
        got = c.read_to_close()
    finally:
        c.close()
    assert got.count(b"HTTP/1.1 200 OK") == 1, got[-500:]


def test_worker_context_reads_ahead_and_finds_the_ssl_pointer(cert):
    cfg = config_mod.loads(
        '[[listener]]\nlisten = "127.0.0.1:1"\nupstream = "app"\n'
        f'[listener.tls]\ncertificates = [{{ cert = "{cert[0]}", key = "{cert[1]}" }}]\n'
        'ocsp_stapling = false\n[upstream.app]\nservers = [{ address = "127.0.0.1:2" }]\n',
        check_files=False)
    ctx = tlscontext.listener_context(cfg, 0, None)
    assert ctx.read_ahead
    obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    p = openssl.ssl_pointer(obj._sslobj)
    assert openssl.library().SSL_ctrl(p, 40, 0, None) == 1  # SSL_CTRL_GET_READ_AHEAD
    assert openssl.has_pending_function()(p) == 0
    with pytest.raises(TypeError):
        openssl.ssl_pointer(obj)  # the Python wrapper, not the _ssl object
