"""Upstream TLS failures of proxied requests, in the error log.

Workers never log per request: a failed handshake becomes the request context's
``error`` (502), and the process that collects the context (the manager, or a collector
shard) writes it to the error log here, called by ``Metrics.on_error``. The first failure of
a kind (upstream, server, reason) is logged at once, later ones at most every
``INTERVAL`` with how many were not logged, so a server with a bad certificate under
load costs a line every few seconds per collecting process, not one per request.
"""

from __future__ import annotations

import time

#: the error texts that name a TLS failure (forkproxy/tls/client.py failure_reason)
TLS_PREFIX = "upstream TLS"
INTERVAL = 10.0


class TLSFailureLog:
    __slots__ = ("log", "seen")

    def __init__(self, logger):
        self.log = logger
        self.seen: dict[tuple[str, str, str], list] = {}  # kind -> [last logged, not logged]

    def observe(self, ctx) -> None:
        """Look at a request context whose ``error`` is set."""
        if not ctx.error.startswith(TLS_PREFIX) or self.log is None:
            return
        kind = (ctx.upstream, ctx.upstream_addr, ctx.error)
        now = time.monotonic()
        entry = self.seen.get(kind)
        if entry is not None and now - entry[0] < INTERVAL:
            entry[1] += 1
            return
        suppressed = entry[1] if entry is not None else 0
        self.seen[kind] = [now, 0]
        if len(self.seen) > 1000:  # many servers and reasons: forget the oldest
            oldest = min(self.seen, key=lambda k: self.seen[k][0])
            del self.seen[oldest]
        self.log.error("upstream TLS handshake failed", upstream=ctx.upstream,
                       server=ctx.upstream_addr, error=ctx.error, request_id=ctx.request_id,
                       not_logged_since=suppressed)
