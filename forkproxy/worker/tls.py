"""TLS in a worker: the listener's context (shared ticket keys + staples from the
master's key store) and the handshake of an accepted connection."""

from __future__ import annotations

import ssl

from gevent import socket

from forkproxy import config as config_mod
from forkproxy.tls import openssl
from forkproxy.tls.context import build_server_context, install_callbacks, staple_provider_for
from forkproxy.tls.tickets import ticket_lifetime
from forkproxy.worker import frontends

_HANDSHAKE_ERRORS = (ssl.SSLError, OSError, socket.timeout, ValueError)
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
    """Build listener li's context; keystore None = degraded (per-process tickets)."""
    tls = cfg.listener[li].tls
    base = config_mod.config_dir(cfg)
    pairs = [(config_mod.resolve_path(c.cert, base), config_mod.resolve_path(c.key, base))
             for c in tls.certificates]
    ctx = build_server_context(pairs, alpn=served_protocols(cfg.listener[li]))
    if not tls.session_tickets:
        for c in ctx.contexts():
            c.options |= ssl.OP_NO_TICKET
    if keystore is not None:
        install_callbacks(
            ctx,
            keys_provider=keystore.keys if tls.session_tickets else None,
            staple_provider=(staple_provider_for(ctx, keystore.staple, slot_base(cfg, li))
                             if tls.ocsp_stapling else None),
            session_timeout=ticket_lifetime(cfg),
        )
    ctx.read_ahead = server_read_ahead(ctx)
    return ctx


def server_read_ahead(ctx) -> bool:
    """Read-ahead on the listener's contexts (OpenSSL reads a record in one read(2), not
    its 5-byte header and then its body: one syscall less per request; nginx does the
    same). Its connections must then ask OpenSSL whether it holds bytes before they wait
    on the socket (:class:`~forkproxy.worker.client.ClientConnection`). False, and off,
    when the shim cannot give them that check. Read-ahead is copied into a connection
    when it is made, so the contexts SNI switches to need it only for consistency."""
    if not openssl.enable_server_read_ahead(ctx):
        return False
    for c in ctx.contexts()[1:]:
        openssl.set_read_ahead(c)
    return True


def tls_handshake(raw, context, timeout: float):
    """Wrap an accepted socket and complete the server handshake within ``timeout``.

    Returns the TLS socket (no timeout set: later steps are bounded by the connection's
    deadline), or None after closing the socket when the handshake failed."""
    raw.settimeout(timeout)
    try:
        ssock = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        ssock.do_handshake()
    except _HANDSHAKE_ERRORS:
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
    except _HANDSHAKE_ERRORS:
        pass
    try:
        sock.close()
    except OSError:
        pass
