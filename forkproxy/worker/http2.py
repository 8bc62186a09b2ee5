"""The HTTP/2 client connection: one greenlet reads and writes the socket and drives the
sans-IO session (forkproxy/http2/session.py); each stream is a front end
(:mod:`forkproxy.worker.h2stream`) that drives one :class:`~forkproxy.worker.exchange.Exchange`
in its own greenlet, against the same upstream pools, retries, limits and ring as
HTTP/1.1. Finished streams (object, exchange, greenlet) are kept for the connection's
next requests, up to STREAMS_KEPT.

The connection greenlet sleeps on one event, set by the socket's read watcher and by
any stream that queued output or consumed request body; it then reads what the socket
has, hands the session's events to the streams, and writes what the session framed.

Lifecycle: idle (no stream) for keepalive_timeout: GOAWAY and close. Worker drain (QUIT,
HUP's old generation, upgrade): GOAWAY(2^31-1) and a PING at once, the final GOAWAY with
the last stream id when the PING's ACK is back; in-flight streams finish; then the
connection closes.
"""

from __future__ import annotations

import time

import gevent
from gevent import getcurrent
from gevent.event import Event

from forkproxy import tlsnames
from forkproxy.http2.session import (
    BODY_TOO_LARGE,
    CLOSED,
    DATA,
    END,
    GOAWAY,
    REQUEST,
    ServerSession,
)
from forkproxy.worker.client import _GONE, ClientConnection
from forkproxy.worker.front import ClientGone, Deadline
from forkproxy.worker.h2stream import Http2Stream, StreamBuffers

_monotonic = time.monotonic
#: the client connection preface (RFC 9113 section 3.4): what h2c prior knowledge begins with
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: socket reads per wake-up before the connection writes and yields (fairness)
READS_PER_WAKE = 16
#: finished streams kept per connection for its next requests (each a parked greenlet,
#: an Exchange and a front end: a few KiB); more concurrent ones end with their request
STREAMS_KEPT = 16
#: a connection without streams this long lets its pooled ones go (an idle connection
#: keeps no parked greenlets; as an idle HTTP/1.1 connection parks after 1 s)
POOL_IDLE = 1.0


class Http2Connection(ClientConnection):
    """One HTTP/2 client connection (h2 over TLS, or h2c with prior knowledge)."""

    __slots__ = ("session", "streams", "wake", "watcher", "readable", "notice_at",
                 "final_sent", "client_gone_away", "early", "idle_streams", "over",
                 "buffers", "run_callback")

    @classmethod
    def adopt(cls, conn: ClientConnection, early: bytes = b"") -> Http2Connection:
        """Take over an accepted connection once its protocol is known to be HTTP/2
        (ALPN h2, or the h2c preface); ``early``: bytes already read from it."""
        self = cls.__new__(cls)
        for name in ClientConnection.__slots__:
            setattr(self, name, getattr(conn, name))
        self.session = None
        self.streams: dict[int, Http2Stream] = {}
        self.wake = Event()
        self.watcher = None
        self.readable = True  # the socket may have bytes (set by its read watcher)
        self.notice_at = 0.0  # when the first GOAWAY of a graceful close went out
        self.final_sent = False
        self.client_gone_away = False
        self.early = early
        self.idle_streams: list[Http2Stream] = []  # finished, parked, for the next requests
        self.over = False  # the connection ended: streams handed a request do not start
        ws = conn.ws
        if ws.stream_buffers is None:
            ws.stream_buffers = StreamBuffers(ws.buffer_size)
        self.buffers = ws.stream_buffers
        self.run_callback = None
        return self

    def _on_readable(self) -> None:
        """libev callback, in the hub: the socket has bytes."""
        self.readable = True
        self.wake.set()

    def start_drain(self) -> None:
        """The worker stops: the connection's loop sends GOAWAY on its next turn."""
        self.wake.set()

    # -- the connection's life -------------------------------------------------------

    def serve(self) -> bool:
        """Serve streams until the connection closes (never parked: returns False)."""
        ws = self.ws
        self.greenlet = getcurrent()
        self.idle = False  # the drain sends GOAWAY instead of shutting it down
        ws.h2_connections += 1
        session = self.session = ServerSession(ws.h2limits, ws.limits)
        self.run_callback = gevent.get_hub().loop.run_callback
        try:
            self.watcher = ws.hub.loop.io(self.sock.fileno(), 1)
            self.watcher.start(self._on_readable)
            if self.early:
                session.receive(self.early)
                self.early = b""
                self._dispatch()
            self._loop()
        except (ClientGone, Deadline):
            pass
        except Exception as e:  # a bug: logged; the worker goes on serving the others
            self._fault(e)
        finally:
            self._end()
        return False

    def _loop(self) -> None:
        session = self.session
        wake = self.wake
        ws = self.ws
        was_busy = False
        while True:
            # cleared before the flush, not after: a stream that queues while the flush
            # is blocked writing (a full socket) sets it then, and, above send_buffer, waits
            # for this loop to frame its bytes (_flush only wakes streams whose bytes
            # drained): cleared after, that wake-up was lost and the stream waited for
            # send_timeout unless the client happened to send a frame
            wake.clear()
            self._flush()
            if session.failed is not None or session.finished:
                return
            # a stream stays open in the session until its response is all sent (a
            # closed client window can hold its last bytes after the exchange ended)
            busy = self.streams or session.streams
            if (self.final_sent or self.client_gone_away) and not busy:
                return
            if ws.draining and not self.final_sent:
                self._goaway_step()
            if self.notice_at and not self.final_sent:
                self.deadline = self.notice_at + ws.h2_drain_timeout
            elif not busy:  # idle: first the pooled streams go, then the connection
                if was_busy:  # since now (not a clock read per finished stream)
                    self.idle_since = _monotonic()
                self.deadline = self.idle_since + (
                    min(POOL_IDLE, ws.keepalive_timeout) if self.idle_streams
                    else ws.keepalive_timeout)
            else:
                self.deadline = 0.0
            was_busy = busy
            got = self._read()
            if got is None:
                return
            # nothing read, nothing new, and nghttp2 has nothing framed to write (a frame
            # queued after the flush, as a drain's GOAWAY is, goes round once more): sleep
            if not got and not wake.is_set() and not session.want_write:
                try:
                    wake.wait()
                except Deadline:
                    if not self._timed_out():
                        return

    def _timed_out(self) -> bool:
        """The deadline passed while waiting: the second GOAWAY of a drain is due (go on,
        True), the pooled streams were idle for POOL_IDLE (they end; go on), or the
        connection was idle too long (GOAWAY, then close: False)."""
        if self.notice_at and not self.final_sent:
            self._goaway_step()
            return True
        if self.idle_streams and _monotonic() < self.idle_since + self.ws.keepalive_timeout:
            self._release_streams()
            return True
        self.session.goaway()
        self._flush()
        return False

    def _goaway_step(self) -> None:
        """A drain's GOAWAYs: first the shutdown notice and its PING; the final GOAWAY
        once the client acknowledged the PING (the streams it opened before it saw the
        notice have then all arrived, and are served), or [http2] drain_timeout after
        the notice if it never does. Each is queued after the loop's flush: the loop
        does not sleep while nghttp2 wants to write, so it goes round and sends it now."""
        now = _monotonic()
        if not self.notice_at:
            self.notice_at = now
            self.session.shutdown_notice()
        elif self.session.notice_acked or now >= self.notice_at + self.ws.h2_drain_timeout:
            # not sooner, even when idle: requests the client sent before it saw the
            # first GOAWAY may still be on the way, and the final one refuses them
            self.final_sent = True
            self.session.goaway()

    def _read(self) -> bool | None:
        """Read what the socket has (up to READS_PER_WAKE times) into the session and
        hand the events out. True: bytes were read (answers may be due); None: the
        client closed the connection."""
        ws = self.ws
        session = self.session
        raw = self.raw
        sslobj = self.sslobj
        buf = ws.rbuf
        view = ws.rview
        size = len(buf)
        if not session.want_read:  # after GOAWAY: only the streams' answers remain
            if self.watcher is not None:
                self.watcher.stop()
            return False
        # woken by a stream, not by the socket: no read (it would only say EAGAIN)
        if not self.readable and (sslobj is None or not self._tls_pending()):
            return False
        got = False
        for _ in range(READS_PER_WAKE):
            try:
                n = raw.recv_into(buf) if raw is not None else sslobj.read(size, buf)
            except (BlockingIOError, tlsnames.SSLWantReadError, tlsnames.SSLWantWriteError):
                self.readable = False
                return got
            except (tlsnames.SSLEOFError, tlsnames.SSLZeroReturnError):
                return None
            except OSError as e:
                if e.errno in _GONE:
                    return None
                raise
            if n == 0:
                return None
            got = True
            self.idle_since = _monotonic()
            session.receive(view[:n])
            self._dispatch()
            if not session.want_read:
                break
            if n < size and (raw is not None or not self._tls_pending()):
                # a short read took what the socket (and OpenSSL) had: the read watcher
                # (level-triggered) says when more comes, no read ends in EAGAIN first
                self.readable = False
                break
        return got

    def _tls_pending(self) -> bool:
        """OpenSSL holds bytes of the connection (with read-ahead, records read but not
        yet decrypted count too: SSL_has_pending)."""
        has_pending = self.has_pending
        return bool(has_pending(self.sslp) if has_pending is not None
                    else self.sslobj.pending())

    def _dispatch(self) -> None:
        session = self.session
        events = session.events
        streams = self.streams
        while events:
            kind, sid, payload = events.popleft()
            if kind == REQUEST:
                idle = self.idle_streams
                if idle:
                    stream = streams[sid] = idle.pop()
                    stream.begin(sid, payload)
                    self.run_callback(stream.greenlet.switch)  # parked in the hub
                else:
                    stream = streams[sid] = Http2Stream(self)
                    stream.begin(sid, payload)
                    gevent.spawn(stream.run)
                continue
            stream = streams.get(sid)
            if kind == DATA:
                if stream is None:
                    if payload is not BODY_TOO_LARGE:  # that one the session consumed
                        session.consume(sid, len(payload))
                    continue
                stream.body.append(payload)
            elif kind == END:
                if stream is None:
                    continue
                stream.request_trailers = payload  # None, or the checked trailer fields
                stream.body.append(None)
            elif kind == CLOSED:
                if stream is None:
                    continue
                stream.closed = payload  # the error code (0: it completed)
            elif kind == GOAWAY:
                self.client_gone_away = True
                continue
            stream.event.set()
        if session.stream_errors:
            self.ws.count_http2_errors(session.stream_errors)

    def _flush(self) -> None:
        """Write what the session has framed; then wake the streams waiting for room."""
        session = self.session
        data = session.data_to_send()
        if data:
            self.deadline = _monotonic() + self.ws.send_timeout
            self.send(data)
            self.deadline = 0.0
        limit = session.limits.send_buffer
        for stream in self.streams.values():
            if stream.blocked and (session.pending(stream.stream) <= limit
                                   or stream.closed is not None):
                stream.event.set()

    def _end(self) -> None:
        """The connection is over: every stream still running is told, all is closed."""
        ws = self.ws
        self.over = True
        for stream in list(self.streams.values()):
            g = stream.greenlet
            # one handed its request but not yet running sees `over` and ends by itself
            if g is not None and not g.dead and not stream.starting:
                g.kill(ClientGone("connection closed"), block=False)
        self.streams.clear()
        self._release_streams()
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher.close()
            self.watcher = None
        session = self.session
        if session is not None:
            ws.count_http2_errors(session.stream_errors)
            session.close()
        ws.h2_connections -= 1
        self.deadline = 0.0
        self.close()

    def _release_streams(self) -> None:
        """End the pooled streams' greenlets (parked: each gets GreenletExit)."""
        for stream in self.idle_streams:
            stream.greenlet.kill(block=False)
        self.idle_streams.clear()

    def _fault(self, e: BaseException) -> None:
        log = self.ws.spec.logger
        if log is not None:
            try:
                log.error("HTTP/2 connection failed", remote=self.remote, error=repr(e),
                          exc_info=e)
            except Exception:
                pass

    def stream_done(self, stream: Http2Stream) -> bool:
        """A stream's exchange is over. True: it is kept for the next request (its
        greenlet parks until then); False: its greenlet ends."""
        if self.streams.get(stream.stream) is stream:
            del self.streams[stream.stream]
        self.wake.set()  # the loop sees whether the connection is idle now
        if self.over or len(self.idle_streams) >= STREAMS_KEPT:
            return False
        stream.req = None
        self.idle_streams.append(stream)
        return True
