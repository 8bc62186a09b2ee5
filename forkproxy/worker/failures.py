"""How a try with an upstream ends when it does not end well.

Raised inside the exchange and its body relayers, caught by the exchange (retry or an
answer of the proxy's own) and by the tunnel (which takes over on a 101).
"""

from __future__ import annotations


class UpstreamFailed(Exception):
    """The exchange with the upstream failed before the response started; ``status``
    is what the client gets.

    retryable: a pooled connection the upstream had closed (reconnect, same server).
    kind: the retry_on condition it matches: "reset" (closed or reset before any
    response byte), "timeout" (no response head in time), "status" (an answer in
    retry_on, not relayed), "" (not retried: bad response, client's fault)."""

    def __init__(self, status: int, detail: str, retryable: bool = False, kind: str = ""):
        super().__init__(detail)
        self.status = status
        self.retryable = retryable
        self.kind = kind


class UpstreamBroken(Exception):
    """The upstream failed after the response head reached the client."""


class Upgraded(Exception):
    """The upstream answered 101 to a tunnel's request: raised out of the response
    relay before anything was sent to the client. ``head``: the raw 101 head; ``extra``:
    bytes read after it."""

    def __init__(self, head: bytes, extra: bytes):
        super().__init__("upgraded")
        self.head = head
        self.extra = extra
