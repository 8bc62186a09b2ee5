"""Upstream connections as the exchange uses them: plain TCP, or TLS.

What differs between the two is chosen here once per connection, not per request, so
the exchange's hot path has no branch on it (forkproxy/worker/exchange.py): ``send``
(one send, which may take less than given), ``recv_first`` (the wait for a response
head), and ``raw`` (the plain socket for splice, None on TLS). Everything else goes
through the socket object itself (gevent's plain or TLS socket: ``sendall``,
``recv_into``).
"""

from __future__ import annotations

import time
from socket import SHUT_RDWR

from forkproxy import tlsnames
from forkproxy.tls.client import shutdown as tls_shutdown
from forkproxy.worker.readiness import ReadWatch
from forkproxy.worker.sockio import peer_closed

_monotonic = time.monotonic


class UpstreamConn:
    """One TCP connection to an upstream server.

    The exchange reads and writes it through what is chosen here once per connection,
    not per request: ``send`` (one send that may take less, BlockingIOError when the
    kernel takes nothing), ``recv_first`` (the wait for the response head), and the
    socket's own ``sendall`` / ``recv_into``. ``raw`` is the plain socket for splice
    (None on TLS)."""

    __slots__ = ("sock", "server", "requests", "created", "idle_since", "reused", "reusable",
                 "watch", "raw", "send", "held")

    def __init__(self, sock, server, now: float = 0.0):
        self.sock = sock
        self.watch = None  # the ReadWatch kept armed for the response waits (worker/exchange.py)
        self.server = server
        self.requests = 0
        self.created = now or _monotonic()
        self.idle_since = 0.0
        self.reused = False
        self.reusable = False  # set by the exchange once the response ended cleanly
        # the plain socket under gevent's wrapper (no wrapper frame); a stdlib socket is
        # its own
        self.raw = getattr(sock, "_sock", sock)
        self.send = self.raw.send
        self.held = None  # a request head held until the loop turn ends (worker/heldsends.py)

    def recv_first(self, watch: ReadWatch, buf) -> int:
        """recv_into when the bytes are almost never there yet (the response right after
        the request): wait on the armed watcher first, then one recv. Trying first costs
        an EAGAIN syscall and a raised exception per request."""
        watch.wait()
        try:
            return self.raw.recv_into(buf)
        except BlockingIOError:  # spurious wake-up
            return self.sock.recv_into(buf)

    def held_short(self, data, sent: int) -> None:
        """The turn's flush did not send the whole held head (worker/heldsends.py):
        shut the connection down; the exchange waiting for the response reads its EOF
        and retries the request on a fresh connection."""
        try:
            self.raw.shutdown(SHUT_RDWR)
        except OSError:
            pass

    def closed_by_peer(self) -> bool:
        """Checked before reusing it for a request that must not be sent twice."""
        return peer_closed(self.sock)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        try:
            self.sock.close()
        except OSError:
            pass


class TLSUpstreamConn(UpstreamConn):
    """An upstream connection through TLS: bytes go through the OpenSSL object, a read
    takes what OpenSSL decrypted already before waiting on the socket, and closing sends
    close_notify (the session stays resumable)."""

    __slots__ = ("sslobj", "fresh")

    def __init__(self, sock, server, now: float = 0.0):
        super().__init__(sock, server, now)
        self.raw = None  # no splice: the bytes must be decrypted
        self.sslobj = sock._sslobj
        #: SSL_write without partial writes: all of it, or SSLWantWriteError and the
        #: whole buffer again through sendall
        self.send = self.sslobj.write
        self.fresh = True  # its session not yet offered to the server's cache

    def recv_first(self, watch: ReadWatch, buf) -> int:
        sslobj = self.sslobj
        # decrypted bytes not yet taken; raw bytes read ahead are not counted, but none
        # can be there before a response: the last one was read to its end
        if not sslobj.pending():
            watch.wait()
        try:
            return sslobj.read(len(buf), buf)
        except (tlsnames.SSLWantReadError, tlsnames.SSLWantWriteError):  # part of a record, or a ticket
            return self.sock.recv_into(buf)
        except tlsnames.SSLEOFError:  # closed without close_notify: an EOF like any other
            return 0

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        tls_shutdown(self.sock)
