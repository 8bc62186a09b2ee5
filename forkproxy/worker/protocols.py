"""The protocol an upstream's servers speak, chosen once per upstream (``protocol``):
how the request head is built, how one try is made, and the server class (its pool).

The exchange calls ``upstream.make_head`` and ``upstream.relay`` without looking at the
protocol, so the HTTP/1.1 path has no branch on it per request.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

from forkproxy.http.forward import upstream_head
from forkproxy.http2.translate import upstream_fields
from forkproxy.worker import h2exchange
from forkproxy.worker.exchange import Exchange
from forkproxy.worker.h2pool import H2Server, H2TLSServer
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
    "h2c": UpstreamProtocol(partial(upstream_fields, up_scheme=b"http"),
                            h2exchange.send_and_relay, H2Server, H2TLSServer, None),
    "h2": UpstreamProtocol(partial(upstream_fields, up_scheme=b"https"),
                           h2exchange.send_and_relay, H2Server, H2TLSServer, ["h2"]),
}
