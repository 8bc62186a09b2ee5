"""The TLS feature of a worker: a listener's server context (shared ticket keys and
staples from the master's key store), and :func:`bind`, which puts ssl's classes and
these functions behind forkproxy/tlsnames.py. Imported (with ssl, and so libcrypto) only
for configs that use TLS (forkproxy/master/features.py)."""

from __future__ import annotations

import ssl
from types import SimpleNamespace

import gevent.ssl

from forkproxy import config as config_mod
from forkproxy import tlsnames
from forkproxy.tls import openssl
from forkproxy.tls.clientcontext import client_context
from forkproxy.tls.context import build_server_context, install_callbacks, staple_provider_for
from forkproxy.tls.tickets import ticket_lifetime
from forkproxy.worker.tls import served_protocols, slot_base


def listener_context(cfg, li: int, keystore):
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


def bind() -> None:
    """Bind forkproxy/tlsnames.py to ssl and to the TLS modules (before fork)."""
    tlsnames.bind(ssl, gevent.ssl, SimpleNamespace(
        client_context=client_context, listener_context=listener_context,
        ssl_pointer=openssl.ssl_pointer, has_pending_function=openssl.has_pending_function,
        create_default_context=gevent.ssl.create_default_context))
