"""HTTP/2 in the worker, loaded only for configs that use it.

Importing this module registers HTTP/2 with the worker: the client connection class and
its cleartext preface (forkproxy/worker/frontends.py) when libnghttp2 loads, and the h2c
and h2 upstream protocols (forkproxy/worker/protocols.py). The master imports it before
forking when the config has an HTTP/2 listener (a TLS listener offers h2 by default) or
an HTTP/2 upstream (forkproxy/master/features.py); otherwise ~1 MiB of modules, the cffi
binding and libnghttp2 stay out of every process.
"""

from __future__ import annotations

from functools import partial

from forkproxy.http2 import nghttp2
from forkproxy.http2.translate import upstream_fields
from forkproxy.worker import frontends, h2exchange
from forkproxy.worker.h2pool import H2Server, H2TLSServer
from forkproxy.worker.http2 import PREFACE, Http2Connection
from forkproxy.worker.protocols import PROTOCOLS, UpstreamProtocol


def _library_loads() -> bool:
    try:
        nghttp2.library()
    except nghttp2.Nghttp2Unavailable:
        return False
    return True


if _library_loads():  # else listeners serve HTTP/1.1 only (the master logs why)
    frontends.CONNECTIONS["h2"] = Http2Connection
    frontends.PREFACES["h2c"] = PREFACE
PROTOCOLS["h2c"] = UpstreamProtocol(partial(upstream_fields, up_scheme=b"http"),
                                    h2exchange.send_and_relay, H2Server, H2TLSServer, None)
PROTOCOLS["h2"] = UpstreamProtocol(partial(upstream_fields, up_scheme=b"https"),
                                   h2exchange.send_and_relay, H2Server, H2TLSServer, ["h2"])
