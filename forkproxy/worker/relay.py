"""Response body relayers, one per :class:`~forkproxy.http.framing.Framing`.

The exchange reads the response head, asks ``response_framing`` once, and calls
``RELAYERS[framing](ex, conn, view, start, n)``: ``view`` is the exchange's buffer,
holding ``n`` bytes of which the body starts at ``start``. Each relayer starts the
client's response (``front.send_head``), relays the body through the front end, adds
to ``ex.bytes_out`` and clears ``ex.up_keep`` when the upstream connection must not be
pooled afterwards. A relayer that read a trailer section hands it to
``ex.relay_trailers(fields)`` after the body (the exchange filters it and passes it to
``front.send_trailers``). Upstream failures mid-body raise UpstreamBroken; a client that
went away raises ClientGone.
"""

from __future__ import annotations

import time

from gevent import socket

from forkproxy.http.framing import Framing
from forkproxy.http.response import BadResponse
from forkproxy.worker.failures import UpstreamBroken
from forkproxy.worker.front import ClientGone
from forkproxy.worker.splice import SPLICE_MIN, SpliceError, splice_body

_timeout = socket.timeout
_monotonic = time.monotonic


def relay_none(ex, conn, view, start: int, n: int) -> None:
    """No body (HEAD, 204, 304): bytes after the head make the connection unusable."""
    ex.front.send_head(ex, b"")
    if n > start:
        ex.up_keep = False


def relay_length(ex, conn, view, start: int, n: int) -> None:
    """A Content-Length body: the bytes already read go with the head, the rest is
    spliced (large, plain-text client) or copied through the exchange's buffer."""
    front = ex.front
    length = ex.content_length
    have = n - start
    if have > length:
        ex.up_keep = False  # the upstream sent more than it announced
        have = length
    front.send_head(ex, view[start:start + have])
    ex.bytes_out = have
    remaining = length - have
    if not remaining:
        return
    up = conn.sock
    read_timeout = conn.server.cfg.read_timeout
    ws = ex.ws
    send_timeout = ws.send_timeout
    if remaining >= SPLICE_MIN and ws.pipes is not None and conn.raw is not None:  # not TLS
        fd = front.splice_fd()
        if fd >= 0:
            try:
                ex.bytes_out += splice_body(front, ws.pipes, up.fileno(), fd, remaining,
                                            read_timeout, send_timeout, _monotonic)
            except SpliceError as e:
                raise UpstreamBroken(str(e))
            except (OSError, _timeout) as e:
                raise ClientGone(str(e))
            return
    size = len(view)
    while remaining:
        front.deadline = _monotonic() + read_timeout
        try:
            got = up.recv_into(view, remaining if remaining < size else size)
        except (OSError, _timeout) as e:
            raise UpstreamBroken(f"upstream body: {e}")
        if got == 0:
            raise UpstreamBroken("upstream closed mid-body")
        front.deadline = _monotonic() + send_timeout
        front.send_body(view[:got])
        remaining -= got
        ex.bytes_out += got


def relay_chunked(ex, conn, view, start: int, n: int) -> None:
    """A chunked body, de-chunked by the response parser; the front end re-frames it."""
    ex.front.send_head(ex, b"")
    parser = ex.parser
    up = conn.sock
    timeout = max(conn.server.cfg.read_timeout, ex.ws.send_timeout)
    sink = ex.body_piece
    try:
        if n > start:
            parser.feed_body(view[start:n], sink)
        while not parser.complete:
            ex.front.deadline = _monotonic() + timeout
            got = _recv_body(up, view)
            if got == 0:
                raise UpstreamBroken("upstream closed mid-body")
            parser.feed_body(view[:got], sink)
    except BadResponse as e:
        if not parser.complete:
            raise UpstreamBroken(f"bad chunked body from upstream: {e}")
    if parser.extra:
        ex.up_keep = False
    if parser.trailers is not None:
        ex.relay_trailers(parser.trailers)


def relay_until_close(ex, conn, view, start: int, n: int) -> None:
    """No length: everything until the upstream closes (never pooled afterwards)."""
    ex.front.send_head(ex, b"")
    ex.up_keep = False
    if n > start:
        ex.body_piece(view[start:n])
    up = conn.sock
    timeout = max(conn.server.cfg.read_timeout, ex.ws.send_timeout)
    while True:
        ex.front.deadline = _monotonic() + timeout
        got = _recv_body(up, view)
        if got == 0:
            return
        ex.body_piece(view[:got])


def _recv_body(up, view) -> int:
    try:
        return up.recv_into(view)
    except (OSError, _timeout) as e:
        raise UpstreamBroken(f"upstream body: {e}")


_BY_FRAMING = {
    Framing.NONE: relay_none,
    Framing.LENGTH: relay_length,
    Framing.CHUNKED: relay_chunked,
    Framing.UNTIL_CLOSE: relay_until_close,
}
#: the relayer of each framing, indexed by it (a tuple index: no hashing per request)
RELAYERS = tuple(_BY_FRAMING[f] for f in sorted(Framing))
