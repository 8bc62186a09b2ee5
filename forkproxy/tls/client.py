"""Client TLS towards upstream servers: the context of an upstream's ``tls`` section,
the handshake of a new connection, and why a handshake failed in words an operator can
act on.

Used by the workers (proxied requests) and the manager (health checks), each building
its own contexts after fork: a context holds the loaded CA store (about 1 MiB for the
system store) and the sessions the worker resumes. This module imports no ssl (every
config imports it): the contexts are built in forkproxy/tls/clientcontext.py, and ssl's
classes are reached through forkproxy/tlsnames.py.
"""

from __future__ import annotations

import gevent
from gevent import socket

from forkproxy import tlsnames
from forkproxy.config import UpstreamTLSConfig
from forkproxy.tlsnames import TLSHandshakeFailed

__all__ = ["TLSHandshakeFailed", "client_context", "failure_reason", "handshake",
           "server_name", "shutdown"]


def client_context(tls: UpstreamTLSConfig, base: str):
    """The context for one upstream's connections (forkproxy/tls/clientcontext.py, bound
    by the TLS feature: a config without TLS never imports ssl)."""
    return tlsnames.client_context(tls, base)


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
    except tlsnames.SSLError as e:
        _close(ssock)
        raise TLSHandshakeFailed(failure_reason(e))
    except BaseException:
        _close(ssock)
        raise
    return ssock


def failure_reason(e: OSError) -> str:
    """A handshake failure in words: the verification error when there is one."""
    if isinstance(e, tlsnames.SSLCertVerificationError):
        return f"upstream TLS: certificate verify failed: {e.verify_message}"
    if isinstance(e, (tlsnames.SSLEOFError, tlsnames.SSLZeroReturnError)):
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
        except (tlsnames.SSLError, OSError, ValueError):
            pass  # close_notify sent (SSL_SENT_SHUTDOWN) or the connection is gone
    _close(ssock)


def _close(ssock) -> None:
    try:
        ssock.close()
    except OSError:
        pass
