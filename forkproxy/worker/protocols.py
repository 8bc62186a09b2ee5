"""The protocol an upstream's servers speak, chosen once per upstream (``protocol``):
how the request head is built, how one try is made, and the server class (its pool).

The exchange calls ``upstream.make_head`` and ``upstream.relay`` without looking at the
protocol, so the HTTP/1.1 path has no branch on it per request. HTTP/1.1 is here; h2c and
h2 are added by forkproxy/worker/h2plugin.py, which the master imports only for configs
that use HTTP/2.
"""

from __future__ import annotations

from typing import NamedTuple

from forkproxy.http.forward import upstream_head
from forkproxy.worker.exchange import Exchange
from forkproxy.worker.server import Server, TLSServer


class UpstreamProtocol(NamedTuple):
    #: the request head for a try: (req, rid, remote, scheme, host_fallback, extra)
    make_head: object
    #: one try: (exchange, head, conn) -> the front end's keep-alive
    relay: object
    #: the server class without and with ``tls``
    server: type
    tls_server: type
    #: ALPN offered on TLS (None: the ``tls.alpn`` setting)
    alpn: list[str] | None


PROTOCOLS = {
    "http/1.1": UpstreamProtocol(upstream_head, Exchange.send_and_relay, Server, TLSServer,
                                 None),
}
