"""Client TLS towards upstream servers: the context of an upstream's ``tls`` section,
the handshake of a new connection, and why a handshake failed in words an operator can
act on.

Used by the workers (proxied requests) and the manager (health checks), each building
its own contexts after fork: a context holds the loaded CA store (about 1 MiB for the
system store) and the sessions the worker resumes.
"""

from __future__ import annotations

import ssl

import gevent
import gevent.ssl
from gevent import socket

from forkproxy.config import UpstreamTLSConfig, resolve_path
from forkproxy.tls import openssl
from forkproxy.tls.context import CIPHERS_TLS12

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TLSHandshakeFailed(OSError):
    """The upstream's TLS handshake failed; ``detail`` says why (verification first)."""

    def __init__(self, detail: str):
        super().__init__(0, detail)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


def client_context(tls: UpstreamTLSConfig, base: str) -> gevent.ssl.SSLContext:
    """The context for one upstream's connections (raises OSError / ssl.SSLError on
    files that ``forkproxy check`` would have refused). Read-ahead is on: a response
    record costs one read(2) instead of two (header, then body); the connections read
    each response to its end before they wait again (forkproxy/worker/upconn.py), so
    nothing lies unseen in OpenSSL's buffer while they wait."""
    ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.maximum_version = _VERSIONS[tls.max_version]
    ctx.set_ciphers(tls.ciphers or CIPHERS_TLS12)
    if tls.verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
        if tls.ca:
            ctx.load_verify_locations(cafile=resolve_path(tls.ca, base))
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert:
        ctx.load_cert_chain(resolve_path(tls.cert, base), resolve_path(tls.key, base))
    if tls.alpn:
        ctx.set_alpn_protocols(list(tls.alpn))
    try:  # one read(2) per response instead of two per record; an optimisation only
        openssl.set_read_ahead(ctx)
    except openssl.OpenSSLError:
        pass
    return ctx


def server_name(tls: UpstreamTLSConfig, host: str) -> str:
    """SNI and the name verified: ``server_name``, else the host of the address."""
    return tls.server_name or host


def handshake(sock, ctx, name: str, session, timeout: float):
    """Wrap a connected gevent socket and complete the client handshake within
    ``timeout``: the TLS socket, or TLSHandshakeFailed / socket.timeout (the plain
    socket is then the caller's to close)."""
    sock.settimeout(None)
    ssock = ctx.wrap_socket(sock, server_hostname=name, session=session,
                            do_handshake_on_connect=False)
    try:
        with gevent.Timeout(timeout, socket.timeout("upstream TLS handshake timeout")):
            ssock.do_handshake()
    except ssl.SSLError as e:
        _close(ssock)
        raise TLSHandshakeFailed(failure_reason(e))
    except BaseException:
        _close(ssock)
        raise
    return ssock


def failure_reason(e: ssl.SSLError) -> str:
    """A handshake failure in words: the verification error when there is one."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"upstream TLS: certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "upstream TLS: the server closed the connection during the handshake"
    reason = e.reason or e.strerror or str(e)
    return f"upstream TLS handshake failed: {reason}"


def shutdown(ssock) -> None:
    """Send close_notify without waiting for the server's, then close. A server that
    resumes from its session cache (no tickets) drops the session of a connection closed
    without it: with Python's OpenSSL 3.0 as the server, 0 of 3 reconnects resumed
    without close_notify, 3 of 3 with it."""
    sslobj = ssock._sslobj
    if sslobj is not None:
        try:
            sslobj.shutdown()
        except (ssl.SSLError, OSError, ValueError):
            pass  # close_notify sent (SSL_SENT_SHUTDOWN) or the connection is gone
    _close(ssock)


def _close(ssock) -> None:
    try:
        ssock.close()
    except OSError:
        pass
