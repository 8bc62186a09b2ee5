"""The client context of an upstream's ``tls`` section: loaded only by configs that use
TLS (forkproxy/master/features.py), as it imports ssl and so libcrypto."""

from __future__ import annotations

import ssl

import gevent.ssl

from forkproxy.config import UpstreamTLSConfig, resolve_path
from forkproxy.tls import openssl
from forkproxy.tls.context import CIPHERS_TLS12

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


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
