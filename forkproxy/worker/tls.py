"""TLS in a worker: the protocols a listener serves, the handshake of an accepted
connection and its close. Every config imports this module, so it imports no ssl: the
listener's context is built in forkproxy/worker/tlscontext.py (loaded by the TLS
feature), and ssl's classes are reached through forkproxy/tlsnames.py."""

from __future__ import annotations

from gevent import socket

from forkproxy import config as config_mod
from forkproxy import tlsnames
from forkproxy.worker import frontends

#: what this worker can serve; ALPN offers the listener's protocols filtered by it, so a
#: client is never offered a protocol the worker would then fail to speak
SERVED_PROTOCOLS = ("h2", "http/1.1", "h2c")


def slot_base(cfg, li: int) -> int:
    """Staple slots are numbered over all TLS listeners' certificates in config order."""
    return sum(len(lcfg.tls.certificates) for lcfg in cfg.listener[:li] if lcfg.tls is not None)


def served_protocols(lcfg) -> tuple[str, ...]:
    """The listener's protocols that this process can serve: HTTP/2 only when libnghttp2
    loaded (the master refuses to start when a listener names it explicitly and it does
    not; a TLS listener's default then falls back to http/1.1)."""
    served = SERVED_PROTOCOLS if frontends.http2_available() else ("http/1.1",)
    return tuple(p for p in config_mod.listener_protocols(lcfg) if p in served)


def worker_tls_context(cfg, li: int, keystore):
    """Build listener li's context; keystore None = degraded (per-process tickets). Built
    by forkproxy/worker/tlscontext.py, which the TLS feature loads and binds."""
    return tlsnames.listener_context(cfg, li, keystore)


def tls_handshake(raw, context, timeout: float):
    """Wrap an accepted socket and complete the server handshake within ``timeout``.

    Returns the TLS socket (no timeout set: later steps are bounded by the connection's
    deadline), or None after closing the socket when the handshake failed."""
    raw.settimeout(timeout)
    try:
        ssock = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        ssock.do_handshake()
    except (tlsnames.SSLError, OSError, socket.timeout, ValueError):
        try:
            raw.close()
        except OSError:
            pass
        return None
    ssock.settimeout(None)
    return ssock


def close_notify(sock) -> None:
    """Send close_notify (OpenSSL 3 clients drop sessions of unclean closes) and close."""
    try:
        sock.settimeout(0.2)
        sock.unwrap()
    except (tlsnames.SSLError, OSError, socket.timeout, ValueError):
        pass
    try:
        sock.close()
    except OSError:
        pass
