"""A client's socket, whatever protocol it speaks: TLS start, the hot-path reads and
sends, the armed read watcher, lingering close, close_notify.

:class:`ClientConnection` is what the worker registers, sweeps and drains (``deadline``,
``greenlet``, ``idle``, ``parked``, ``counted``); a protocol's front end subclasses it
(:mod:`forkproxy.worker.http1`).
"""

from __future__ import annotations

import errno
import socket as pysocket
import time

from gevent import socket

from forkproxy import tlsnames
from forkproxy.tlsnames import OpenSSLError, has_pending_function, ssl_pointer
from forkproxy.worker.front import ClientGone
from forkproxy.worker.readiness import ReadWatch
from forkproxy.worker.sockio import close_plain, send_all
from forkproxy.worker.tls import close_notify, tls_handshake

_timeout = socket.timeout
_monotonic = time.monotonic
#: lingering close after an error reply: discard input this long / this much at most
LINGER_TIME = 1.0
LINGER_BYTES = 256 * 1024
#: errors of a read that mean the client is gone (an EOF like any other)
_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.EBADF)


class ClientConnection:
    """One accepted client socket and the state the worker manages it by."""

    __slots__ = ("ws", "listener", "sock", "remote", "remote_b", "t_accept", "t_tls",
                 "tls_resumed", "tls_version", "deadline", "greenlet", "idle", "idle_since",
                 "parked", "counted", "linger", "raw", "rwatch", "sslobj", "sslp",
                 "has_pending", "held")

    def __init__(self, ws, listener, sock, addr, t_accept: float):
        self.ws = ws
        self.listener = listener
        self.sock = sock
        self.remote = addr[0] if isinstance(addr, tuple) else "unix"
        self.remote_b = None  # the client address as bytes, for X-Forwarded-For
        self.t_accept = t_accept
        self.t_tls = 0.0
        self.tls_resumed = None  # None on plain text
        self.tls_version = ""
        self.deadline = 0.0  # monotonic time after which the sweeper raises Deadline
        self.greenlet = None
        self.idle = True  # between requests (the drain closes idle connections)
        self.idle_since = t_accept
        self.parked = None  # the read watcher of an idle connection parked without a greenlet
        self.counted = None  # the client address counted by the per-IP connection limit
        self.linger = False  # drain unread input before closing (the reply must arrive)
        #: the plain socket under gevent's wrapper, for direct sends and reads on the hot
        #: path; None once TLS wraps the connection
        self.raw = sock._sock
        self.rwatch = None  # ReadWatch for the waits between requests
        self.sslobj = None  # the OpenSSL connection under a TLS socket
        #: with read-ahead (worker/tls.py): its SSL* and SSL_has_pending, which also
        #: counts bytes read ahead but not yet decrypted; else 0 and None
        self.sslp = 0
        self.has_pending = None
        #: a response held until the loop turn ends (worker/heldsends.py), or what the
        #: kernel did not take of it; sent before anything else goes to this client
        self.held = None

    def start_tls(self) -> bool:
        """TLS handshake on the accepted socket; False = it failed (socket closed)."""
        ssock = tls_handshake(self.sock, self.listener.tls_context, self.ws.header_timeout)
        if ssock is None:
            return False
        sslobj = ssock._sslobj
        if getattr(self.listener.tls_context, "read_ahead", False):
            try:
                self.sslp = ssl_pointer(sslobj)
            except OpenSSLError:  # checked at start (worker/tls.py): not expected
                close_notify(ssock)
                return False
            self.has_pending = has_pending_function()
        self.sock = ssock
        self.raw = None  # bytes go through the TLS object from now on
        self.sslobj = sslobj
        self.t_tls = _monotonic()
        self.tls_resumed = ssock.session_reused
        self.tls_version = ssock.version() or ""
        return True

    # -- reading -------------------------------------------------------------------

    def recv(self, buf, timeout: float, waiting: bool) -> int:
        """Read once into ``buf`` within ``timeout`` (socket.timeout past it); 0 = EOF.

        waiting: the bytes are almost never there yet (a keep-alive client's next
        request): wait on the armed watcher first instead of trying a read."""
        self.deadline = _monotonic() + timeout
        return self.recv_by(buf, waiting)

    def recv_by(self, buf, waiting: bool) -> int:
        """recv() within the ``deadline`` the caller set (it read the clock already)."""
        sock = self.sock
        try:
            if not waiting:
                if self.held is not None:
                    self.settle()
                return sock.recv_into(buf)
            if self.raw is not None:
                watch = self.rwatch
                if watch is None:
                    # a new connection (or a parked one that became readable): its first
                    # request is nearly always there already, so read before making and
                    # arming the watcher (an fcntl, an epoll_ctl and a loop turn)
                    try:
                        return self.raw.recv_into(buf)
                    except BlockingIOError:
                        watch = self._watch()
                watch.wait()
                if self.held is not None:  # woken to finish a held response (below)
                    self.settle()
                try:
                    return self.raw.recv_into(buf)
                except BlockingIOError:  # spurious wake-up
                    return sock.recv_into(buf)
            if self.sslobj is not None:
                return self._tls_read_waiting(buf)
            return sock.recv_into(buf)
        except OSError as e:
            if isinstance(e, _timeout):
                raise
            if e.errno in _GONE:
                return 0
            raise

    def _tls_read_waiting(self, buf) -> int:
        """recv_waiting for a TLS connection: wait on the armed watcher unless OpenSSL
        holds bytes already (with read-ahead: a pipelined request's record read with the
        one before it, or the first request read with the handshake's last message;
        without: decrypted bytes of a record not yet returned), then one SSL_read. A
        record that has not fully arrived goes the gevent way."""
        sslobj = self.sslobj
        has_pending = self.has_pending
        if not (has_pending(self.sslp) if has_pending is not None else sslobj.pending()):
            self._watch().wait()
        try:
            return sslobj.read(len(buf), buf)
        except (tlsnames.SSLWantReadError, tlsnames.SSLWantWriteError):
            return self.sock.recv_into(buf)
        except tlsnames.SSLEOFError:  # closed without close_notify: an EOF like any other
            return 0

    def _watch(self) -> ReadWatch:
        """The client socket's armed read watcher, made on the first wait."""
        watch = self.rwatch
        if watch is None:
            watch = self.rwatch = ReadWatch(self.ws.hub, self.sock.fileno())
        return watch

    def _unwatch(self) -> None:
        if self.rwatch is not None:
            self.rwatch.close()
            self.rwatch = None

    # -- writing -------------------------------------------------------------------

    def send(self, data) -> None:
        """send_all to the client: on a plain socket one direct send, without gevent's
        wrapper frame, when the kernel takes it all (nearly always)."""
        if self.held is not None:
            self.settle()
        raw = self.raw
        if raw is not None:
            try:
                n = raw.send(data)
            except BlockingIOError:
                n = 0
            except OSError as e:
                raise ClientGone(str(e))
            if n == len(data):
                return
            data = memoryview(data)[n:]
        elif self.sslobj is not None:
            try:  # SSL_write without partial writes: all of it, or retried whole below
                if self.sslobj.write(data) == len(data):
                    return
            except (tlsnames.SSLWantWriteError, tlsnames.SSLWantReadError):
                pass
            except OSError as e:
                raise ClientGone(str(e))
        send_all(self.sock, data)

    def settle(self) -> None:
        """Send what is held for this client (a response held until the turn ends, or
        the rest the kernel did not take of it) before anything else goes to it or it
        is read from again: blocking, within send_timeout; ClientGone if it fails."""
        data = self.held
        self.held = None
        idle, deadline = self.idle, self.deadline
        self.idle = False  # busy while it sends: the drain closes only idle connections
        self.deadline = _monotonic() + self.ws.send_timeout
        send_all(self.sock, data)
        self.idle, self.deadline = idle, deadline

    def held_short(self, data, sent: int) -> None:
        """The turn's flush sent ``sent`` bytes of the held ``data`` (-1: the send
        failed). The rest is this connection's to send: its greenlet, waiting for the
        next request, is woken from the hub to send it first."""
        if sent < 0:  # reset or closed: the connection's read sees it too
            return
        self.held = memoryview(data)[sent:]
        self.ws.hub.loop.run_callback(self._wake_to_settle)

    def _wake_to_settle(self) -> None:
        watch = self.rwatch
        g = watch.waiter() if watch is not None else None
        if g is not None and self.held is not None:
            g.switch()  # its wait's end disarms the watcher: not woken twice

    def _send_held_nowait(self) -> None:
        """Closing with a response still held (closed from outside the connection's
        greenlet in the same turn): what the kernel takes now, without waiting."""
        data = self.held
        self.held = None
        try:
            self.raw.send(data)
        except OSError:
            pass

    def start_drain(self) -> None:
        """The worker began a graceful stop. HTTP/1.1 needs nothing here (the drain
        closes its idle connections); HTTP/2 sends GOAWAY."""

    # -- closing -------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket: close_notify on TLS, a lingering close after an error."""
        self._unwatch()
        if self.held is not None:
            self._send_held_nowait()
        sock = self.sock
        if self.tls_resumed is not None:
            close_notify(sock)
            return
        if self.linger:
            self._linger()
        try:
            close_plain(sock)
        except OSError:
            pass

    def _linger(self) -> None:
        """Lingering close after an error reply (nginx's lingering_close): closing with
        unread input makes the kernel send a reset, which can destroy the reply before
        the client reads it. Half-close, then discard input for a moment."""
        sock = self.sock
        self.linger = False
        try:
            sock.shutdown(pysocket.SHUT_WR)
            self.deadline = _monotonic() + LINGER_TIME
            rbuf = self.ws.rbuf
            budget = LINGER_BYTES
            while budget > 0:
                n = sock.recv_into(rbuf)
                if not n:
                    break
                budget -= n
        except (OSError, _timeout):
            pass
        self.deadline = 0.0
