"""One downstream client connection: read requests, forward them, relay responses.

A greenlet per connection (not per request). Requests are handled strictly in order,
which is what makes pipelining correct: the parser queues at most one recv buffer of
events, and the next request is only looked at once the previous response is relayed.

Hot-path rules: no logging, no per-request allocation that can be avoided (the recv
buffer for client reads is shared by all connections of the worker because the parser
copies what it keeps before any greenlet switch), one send per response head (+ the
start of the body), and error responses are prebuilt bytes.
"""

from __future__ import annotations

import errno
import socket as pysocket
import time
from ssl import SSLEOFError, SSLWantReadError, SSLWantWriteError

from gevent import getcurrent, socket

from forkproxy.context import (
    N_TIMES,
    T_ACCEPT,
    T_CONNECT_START,
    T_CONNECTED,
    T_END,
    T_FIRST_BYTE,
    T_HEADERS,
    T_SENT,
    T_TLS,
)
from forkproxy.http.messages import (
    CONTINUE_100,
    IDEMPOTENT,
    LAST_CHUNK,
    HTTPError,
    connection_tokens,
    prebuilt_error,
)
from forkproxy.http.request import BODY, END, ERROR, HEAD, Request, RequestParser
from forkproxy.http.response import HEAD_END, BadResponse, ResponseParser, fast_head
from forkproxy.http.tracecontext import (
    SAMPLED,
    format_traceparent,
    parse_traceparent,
    parse_tracestate,
    sampled_by_ratio,
)
from forkproxy.worker.readiness import ReadWatch
from forkproxy.worker.splice import SPLICE_MIN, SpliceError, splice_body
from forkproxy.worker.tls import close_notify
from forkproxy.worker.tunnel import Upgraded, tunnel
from forkproxy.worker.upstream import PoolTimeout, UpstreamConn

_timeout = socket.timeout
MAX_RESPONSE_HEAD = 64 * 1024
#: an idle keep-alive connection keeps its greenlet this long, then is parked on a watcher
PARK_AFTER = 1.0
SWEEP_SLACK = 0.2
#: lingering close after an error reply: discard input this long / this much at most
LINGER_TIME = 1.0
LINGER_BYTES = 256 * 1024


class Deadline(socket.timeout):
    """Raised into a connection's greenlet by the worker's deadline sweeper.

    Sockets have no gevent timeout (a Timeout object and a libev timer per blocking
    call cost ~6% of a tiny request): before each blocking step the connection sets
    `deadline` (a float store) and one sweeper greenlet per worker expires late ones.
    It subclasses socket.timeout so every timeout handler treats it alike."""


class ClientGone(Exception):
    """The client closed or reset the connection, or stopped reading (send_timeout)."""


class UpstreamFailed(Exception):
    """The exchange with the upstream failed; status says what the client gets.

    retryable: a pooled connection the upstream had closed (reconnect, same server).
    kind: the retry_on condition it matches: "reset" (closed or reset before any
    response byte), "timeout" (no response head in time), "status" (an answer in
    retry_on, not relayed), "" (not retried: bad response, client's fault)."""

    def __init__(self, status: int, detail: str, retryable: bool = False, kind: str = ""):
        super().__init__(detail)
        self.status = status
        self.retryable = retryable
        self.kind = kind


def recv_waiting(watch: ReadWatch, sock, buf) -> int:
    """recv_into for a plain gevent socket when the bytes are almost never there yet (the
    upstream's response right after the request, a keep-alive client's next request):
    wait on the socket's armed watcher first, then one recv. Trying first costs an EAGAIN
    syscall and a raised exception per request (profile in docs/BENCHMARKS.md)."""
    watch.wait()
    try:
        return sock._sock.recv_into(buf)
    except BlockingIOError:  # spurious wake-up
        return sock.recv_into(buf)


def send_all(sock, data) -> None:
    """sendall without gevent's per-call getsockopt(SO_SNDBUF)."""
    try:
        n = sock.send(data)
        if n == len(data):
            return
        view = memoryview(data)[n:]
        while view:
            n = sock.send(view)
            view = view[n:]
    except (OSError, _timeout) as e:
        raise ClientGone(str(e))


def start_span(req, ws) -> bytes:
    """Give the request forkproxy's span: continue the client's trace (a valid
    traceparent) or start one; the header lines that carry it upstream, our span as
    the parent. No system call: ids come from the worker's IdGenerator."""
    ids = ws.ids
    tp = req.traceparent
    parsed = parse_traceparent(tp) if tp else None
    span_id = req.span_id = ids.span_id()
    if parsed is None:
        trace_id = req.trace_id = ids.trace_id()
        flags = req.trace_flags = SAMPLED if sampled_by_ratio(trace_id, ws.trace_threshold) else 0
        req.tracestate = b""  # a tracestate without a valid traceparent is dropped
        return b"traceparent: %s\r\n" % format_traceparent(trace_id, span_id, flags)
    trace_id, req.parent_span_id, flags = parsed
    req.trace_id = trace_id
    req.trace_flags = flags
    line = b"traceparent: %s\r\n" % format_traceparent(trace_id, span_id, flags)
    state = req.tracestate
    if state:
        state = req.tracestate = parse_tracestate([state]).encode()
        if state:
            return line + b"tracestate: %s\r\n" % state
    return line


class Connection:
    """State of one client connection; `serve()` runs until the connection closes."""

    __slots__ = ("ws", "listener", "sock", "remote", "parser", "t_accept", "t_tls", "idle",
                 "tls_resumed", "tls_version", "closing", "body_done", "idle_since", "deadline",
                 "greenlet", "head_deadline", "req", "resp_started", "reject", "linger",
                 "retries", "retry_statuses", "parked", "counted", "raw", "remote_b", "rwatch",
                 "sslobj", "route")

    def __init__(self, ws, listener, sock, addr, t_accept: float):
        self.ws = ws
        self.listener = listener
        self.sock = sock
        self.remote = addr[0] if isinstance(addr, tuple) else "unix"
        self.parser = RequestParser(ws.limits)
        self.t_accept = t_accept
        self.t_tls = 0.0
        self.idle = True
        self.tls_resumed = None
        self.tls_version = ""
        self.closing = False
        self.body_done = True
        self.idle_since = t_accept
        self.deadline = 0.0  # monotonic time after which the sweeper raises Deadline
        self.greenlet = None
        # client_header_timeout bounds a whole request head (a new connection's from
        # accept); 0.0 = between requests, where keepalive_timeout applies
        self.head_deadline = t_accept + ws.header_timeout
        self.req = None  # the request being served (for the fault log)
        self.resp_started = False  # response bytes went out: a fault can no longer 500
        self.reject = ""  # why the proxy refused the request itself (the context's reject)
        self.linger = False  # drain unread input before closing (the reply must arrive)
        self.retries = 0  # tries on another server for the current request (the context's)
        self.route = ""  # the label of the route the current request matched (the context's)
        self.retry_statuses = None  # upstream statuses _relay turns into a retry, this try
        self.parked = None  # the read watcher of an idle connection parked without a greenlet
        self.counted = None  # the client address counted by the per-IP connection limit
        #: the plain socket under gevent's wrapper, for direct sends and reads on the hot
        #: path; None once TLS wraps the connection (worker/tls.py)
        self.raw = sock._sock
        self.remote_b = None  # the client address as bytes, for X-Forwarded-For
        self.rwatch = None  # ReadWatch for the waits between requests
        self.sslobj = None  # the OpenSSL connection under a TLS socket (worker/tls.py)

    # -- reading -------------------------------------------------------------------

    def _fill(self, timeout: float) -> bool:
        """Read once from the client into the worker's shared buffer and parse it.

        Returns False on EOF. The parser copies everything it keeps before we can
        switch greenlets, so sharing one buffer across connections is safe."""
        sock = self.sock
        self.deadline = time.monotonic() + timeout
        ws = self.ws
        try:
            if not self.idle:
                n = sock.recv_into(ws.rbuf)
            elif self.raw is not None:
                n = recv_waiting(self._watch(), sock, ws.rbuf)
            elif self.sslobj is not None:
                n = self._tls_read_waiting(ws.rbuf)
            else:
                n = sock.recv_into(ws.rbuf)
        except _timeout:
            raise HTTPError(408, "client timed out")
        except OSError as e:
            if e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.EBADF):
                return False
            raise
        if n == 0:
            return False
        self.parser.feed(ws.rview[:n])
        return True

    def _tls_read_waiting(self, buf) -> int:
        """recv_waiting for a TLS connection: wait on the armed watcher unless OpenSSL
        holds decrypted bytes already (no read-ahead is set, so a record is never left
        half-read in OpenSSL while the socket looks idle), then one SSL_read. A record
        that has not fully arrived goes the gevent way."""
        sslobj = self.sslobj
        if not sslobj.pending():
            self._watch().wait()
        try:
            return sslobj.read(len(buf), buf)
        except (SSLWantReadError, SSLWantWriteError):
            return self.sock.recv_into(buf)
        except SSLEOFError:  # closed without close_notify: an EOF like any other
            return 0

    def serve(self) -> None:
        ws = self.ws
        events = self.parser.events
        self.greenlet = getcurrent()
        try:
            while True:
                if not events:
                    # waiting for the start of a request (idle) or the rest of its head
                    if self.parser.in_head:
                        self.idle = False
                        if not self.head_deadline:
                            self.head_deadline = time.monotonic() + ws.header_timeout
                    elif not self.idle:
                        self.idle = True
                        self.idle_since = time.monotonic()
                    if self.closing:
                        return
                    d = self.head_deadline
                    now = time.monotonic()
                    timeout = d - now if d else ws.keepalive_timeout
                    idle_left = self.idle_since + ws.keepalive_timeout - now
                    # only between requests: a first request keeps its whole-head deadline
                    plain_idle = self.idle and self.tls_resumed is None and not d
                    if plain_idle:
                        timeout = min(idle_left, PARK_AFTER)
                    try:
                        if not self._fill(timeout):
                            return
                    except HTTPError as e:
                        if e.status == 408 and self.idle:
                            if plain_idle and idle_left > PARK_AFTER + SWEEP_SLACK:
                                self._park()
                                return True
                            return  # nothing of a request arrived in time: just close
                        e.kind = "header_timeout"
                        raise
                    if not self.t_accept:  # keep-alive: the request began with these bytes
                        self.t_accept = time.monotonic()
                    continue
                kind, req = events.popleft()
                self.idle = False
                self.head_deadline = 0.0
                if kind == END:  # the end of a request without a body
                    continue
                if kind != HEAD:
                    if kind == ERROR:  # after the requests before it were served
                        raise req
                    raise HTTPError(400, "unexpected body")  # bodies go through handle()
                self.req = req
                self.body_done = not req.has_body
                climits = ws.client_limits
                if climits is not None and not climits.allow_request(self.remote):
                    if not self._refuse_request(req, climits.status):
                        return
                    continue
                if not self.handle(req):
                    return
                self.resp_started = False
                self.req = None
        except HTTPError as e:
            ws.stats_errors += 1
            self.reject = e.kind
            self.linger = True
            self._reply_error(e.status, True, self.req or self.parser.current())
        except ClientGone:
            pass
        except Exception as e:  # a bug: log it, 500 if we can, keep the worker serving
            self._fault(e)
        finally:
            if self.parked is None:
                self.idle = False
                self._close()

    def _park(self) -> None:
        """Release the greenlet of a connection idle for PARK_AFTER: a greenlet parked in
        recv costs ~9 KiB, a libev read watcher ~1 KiB (docs/BENCHMARKS.md). Readable
        (a request, EOF, or the drain's shutdown) -> ws.unpark() serves it in a new
        greenlet; the deadline sweeper closes it at the keep-alive timeout."""
        ws = self.ws
        self._unwatch()
        self.greenlet = None
        self.parser = None  # at a message boundary: a new one costs ~1 us on wake-up
        self.deadline = self.idle_since + ws.keepalive_timeout
        watcher = self.parked = ws.hub.loop.io(self.sock.fileno(), 1)
        watcher.start(ws.unpark, self)

    def unparked(self) -> None:
        """Called in the hub when a parked connection becomes readable."""
        watcher = self.parked
        self.parked = None
        self.parser = RequestParser(self.ws.limits)
        if watcher is not None:
            watcher.stop()
            watcher.close()

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

    def _close(self) -> None:
        self._unwatch()
        sock = self.sock
        if self.tls_resumed is not None:
            close_notify(sock)
            return
        if self.linger:
            self._linger()
        try:
            sock.close()
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
            self.deadline = time.monotonic() + LINGER_TIME
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

    def _reply_error(self, status: int, close: bool, req) -> None:
        self.resp_started = True
        try:
            send_all(self.sock, prebuilt_error(status, close))
        except ClientGone:
            pass
        if req is not None:
            if not req.request_id:
                req.request_id = self.ws.new_request_id()
            times = [0.0] * N_TIMES
            times[T_ACCEPT] = self.t_accept
            times[T_END] = time.monotonic()
            self.ws.record(self, req, status, 0, None, None, 0, times)

    def _refuse_request(self, req, status: int) -> bool:
        """A request over the client's rate: answered here; keep the connection if the
        framing allows (no body to skip)."""
        keep = req.keep_alive and not req.has_body and not self.closing and not self.ws.draining
        self.reject = "rate_limited"
        if not keep:
            self.linger = True
        req.request_id = req.request_id or self.ws.new_request_id()
        self._reply_error(status, not keep, req)
        self.resp_started = False
        self.req = None
        return keep

    def refuse(self, status: int, reason: str) -> None:
        """Refuse a whole connection before reading from it (per-IP connection limit):
        answer ``status``, drain what the client sent, close."""
        self.greenlet = getcurrent()
        self.reject = reason
        self.linger = True
        try:
            self._reply_error(status, True, Request())
        finally:
            self._close()

    def _fault(self, e: BaseException) -> None:
        """A bug while serving (not the client's fault, not the upstream's): logged with
        the request id; answered 500 unless response bytes already went out; the
        connection closes and the worker goes on serving the others. Not a hot path."""
        ws = self.ws
        req = self.req
        if req is None:
            req = self.parser.current()
        if not req.request_id:
            req.request_id = ws.new_request_id()
        log = ws.spec.logger
        if log is not None:
            try:
                log.error("request failed", request_id=req.request_id.decode("latin-1"),
                          remote=self.remote, method=req.method,
                          path=req.path.decode("latin-1"), error=repr(e), exc_info=e)
            except Exception:
                pass
        if not self.resp_started:
            try:
                self._reply_error(500, True, None)
                times = [0.0] * N_TIMES
                times[T_ACCEPT] = self.t_accept
                times[T_END] = time.monotonic()
                ws.record(self, req, 500, 0, None, None, 0, times, f"internal error: {e!r}")
            except Exception:
                pass

    def _send(self, data) -> None:
        """send_all to the client: on a plain socket one direct send, without gevent's
        wrapper frame, when the kernel takes it all (nearly always)."""
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
            except (SSLWantWriteError, SSLWantReadError):
                pass
            except OSError as e:
                raise ClientGone(str(e))
        send_all(self.sock, data)

    # -- one request -----------------------------------------------------------------

    def handle(self, req) -> bool:
        """Forward one request and relay its response; False = close the connection."""
        ws = self.ws
        times = [0.0] * N_TIMES
        times[T_ACCEPT] = self.t_accept
        times[T_TLS] = self.t_tls
        times[T_HEADERS] = now = time.monotonic()
        self.t_accept = 0.0  # the next request starts when its first bytes arrive
        self.t_tls = 0.0
        upstream = ws.router.route(req.host, req.path, self.listener.default_upstream)
        self.route = ws.router.matched
        rid = req.request_id or ws.new_request_id()
        req.request_id = rid
        if upstream is None:
            return self._fail(req, 503, times, None, "no upstream")
        if upstream.split:  # a canary split between upstreams: choose one
            upstream = upstream.choose(req, self.remote)
        if req is self.parser.upgrade_req:
            return tunnel(self, req, upstream, self._upstream_head(req, rid), times)
        head = self._upstream_head(req, rid)
        # retries (see UpstreamConfig.retry_on): another server each time; after the
        # request was sent only if it can be replayed; never after response bytes went out
        upstream.budget.request(now)
        key = upstream.keyspec.key(req, self.remote) if upstream.keyspec is not None else None
        replayable = not req.has_body and req.method in IDEMPOTENT
        tries = upstream.retries
        exclude = None
        last = None  # (status, detail, server) of the last failed try
        while True:
            server = upstream.pick(key, exclude)
            if server is None:
                if last is not None:
                    return self._fail(req, last[0], times, last[2], last[1])
                return self._fail(req, 503, times, None, "no server available")
            times[T_CONNECT_START] = time.monotonic()
            try:
                conn = server.acquire()
            except PoolTimeout as e:
                return self._fail(req, 503, times, server, f"upstream queue: {e}")
            except (OSError, _timeout) as e:
                if isinstance(e, _timeout):
                    status, detail = 504, "upstream connect timeout"
                else:
                    status, detail = 502, f"upstream connect: {e.strerror or e}"
                now = time.monotonic()
                server.failed(now)
                if tries and upstream.retry_connect and upstream.budget.allow(now):
                    tries -= 1
                    exclude = self._retry(server, exclude)
                    last = (status, detail, server)
                    continue
                return self._fail(req, status, times, server, detail)
            if conn.reused and req.method not in IDEMPOTENT and _peer_closed(conn.sock):
                # never resend a non-idempotent request: check a pooled socket first
                server.release(conn, False)
                server.close_idle()
                continue
            times[T_CONNECTED] = time.monotonic()
            rs = upstream.retry_statuses  # None unless retry_on names statuses
            self.retry_statuses = (rs if rs is not None and tries and replayable
                                   and upstream.budget.can(times[T_CONNECTED]) else None)
            try:
                return self._exchange(req, head, conn, times)
            except UpstreamFailed as e:
                conn.reusable = False
                if e.retryable and replayable:
                    # a pooled connection the upstream had closed while idle: retry fresh
                    server.close_idle()
                    continue
                if e.kind:
                    now = time.monotonic()
                    server.failed(now)
                    if (tries and replayable and e.kind in upstream.retry_kinds
                            and upstream.budget.allow(now)):
                        tries -= 1
                        exclude = self._retry(server, exclude)
                        last = (e.status, str(e), server)
                        continue
                return self._fail(req, e.status, times, server, str(e))
            finally:
                server.release(conn, conn.reusable)

    def _retry(self, server, exclude) -> list:
        """Count a retry away from ``server``; the servers the next pick must skip."""
        self.retries += 1
        server.retries += 1
        if exclude is None:
            return [server]
        exclude.append(server)
        return exclude

    def _fail(self, req, status: int, times, server, detail: str) -> bool:
        """Answer an upstream failure ourselves; keep the connection if framing allows."""
        keep = req.keep_alive and not self.closing and not self._body_pending()
        times[T_END] = time.monotonic()
        self.resp_started = True
        try:
            send_all(self.sock, prebuilt_error(status, not keep))
        except ClientGone:
            keep = False
        self.ws.record(self, req, status, 0, server, None, 0, times, detail)
        return keep

    def _body_pending(self) -> bool:
        """True while unread request body bytes make the connection unusable."""
        return not self.body_done

    def _upstream_head(self, req, rid: bytes) -> bytes:
        headers = req.headers
        if req.connection:
            drop = connection_tokens(req.connection) - {b"close", b"keep-alive"}
            if drop:
                headers = [h for h in headers if h[0].lower() not in drop]
        remote = self.remote_b
        if remote is None:  # after a PROXY header, if any, named the client
            remote = self.remote_b = self.remote.encode()
        if req.chunked:
            tail = b"Transfer-Encoding: chunked\r\n\r\n"
        elif req.content_length is not None:
            tail = b"Content-Length: %d\r\n\r\n" % req.content_length
        else:
            tail = b"\r\n"
        return b"%s %s HTTP/1.1\r\nHost: %s\r\n%sX-Forwarded-For: %s%s\r\nX-Forwarded-Proto: %s\r\nX-Request-Id: %s\r\n%s%s" % (
            req.method.encode(), req.path, req.host or self.listener.host_fallback,
            b"".join([b"%s: %s\r\n" % h for h in headers]) if headers else b"",
            req.forwarded_for + b", " if req.forwarded_for else b"", remote,
            self.listener.scheme, rid, start_span(req, self.ws), tail)

    def _exchange(self, req, head: bytes, conn: UpstreamConn, times) -> bool:
        """Send the request (head + streamed body) and relay the response."""
        ws = self.ws
        up = conn.sock
        cfg = conn.server.cfg
        self.deadline = time.monotonic() + cfg.send_timeout
        try:
            if req.has_body:
                if req.expect_continue:
                    send_all(self.sock, CONTINUE_100)
                up.sendall(head)
                bytes_in = self._stream_body(req, up, cfg.send_timeout)
            else:
                try:
                    n = up._sock.send(head)  # the plain socket: no gevent wrapper frame
                except BlockingIOError:
                    n = 0
                if n != len(head):
                    up.sendall(memoryview(head)[n:])
                bytes_in = 0
        except (OSError, _timeout) as e:
            if isinstance(e, _timeout):
                raise UpstreamFailed(504, "upstream send timeout", kind="timeout")
            raise UpstreamFailed(502, f"upstream send: {e}", retryable=conn.reused, kind="reset")
        times[T_SENT] = time.monotonic()
        buf = ws.get_buffer()
        try:
            return self._relay(req, conn, buf, times, bytes_in)
        finally:
            ws.put_buffer(buf)

    def _stream_body(self, req, up, send_timeout: float) -> int:
        """Copy the request body to the upstream as parsed; re-frame chunked bodies."""
        events = self.parser.events
        ws = self.ws
        chunked = req.chunked
        total = 0
        while True:
            if not events:
                try:
                    if not self._fill(ws.body_timeout):
                        raise ClientGone("client closed during the request body")
                except HTTPError as e:
                    # 408 mid-body: tell the client, the upstream exchange is void
                    self.closing = True
                    self.linger = True
                    self.reject = "body_timeout"
                    raise UpstreamAbort(e.status)
                continue
            kind, data = events.popleft()
            if kind == ERROR:  # 413/400 mid-body: the same
                self.closing = True
                self.linger = True
                self.reject = data.kind
                raise UpstreamAbort(data.status)
            if kind == BODY:
                self.deadline = time.monotonic() + send_timeout
                total += len(data)
                if chunked:
                    up.sendall(b"%x\r\n%s\r\n" % (len(data), data))
                else:
                    up.sendall(data)
            elif kind == END:
                if chunked:
                    up.sendall(LAST_CHUNK)
                self.body_done = True
                return total
            else:  # pragma: no cover - a HEAD before END is a parser bug
                raise HTTPError(400, "request framing error")

    def _relay(self, req, conn: UpstreamConn, buf: bytearray, times, bytes_in: int) -> bool:
        ws = self.ws
        up = conn.sock
        server = conn.server
        view = memoryview(buf)
        read_timeout = server.cfg.read_timeout
        self.deadline = time.monotonic() + server.head_timeout  # per_try_timeout bounds it
        # -- response head -------------------------------------------------------------
        n = 0
        start = 0
        while True:
            # after an interim response (100, 103) the next head may be buffered already
            end = buf.find(HEAD_END, start, n) if start else -1
            if end < 0:
                try:
                    if n == 0:
                        watch = conn.watch
                        if watch is None:
                            watch = conn.watch = ReadWatch(ws.hub, up.fileno())
                        got = recv_waiting(watch, up, view)
                    else:
                        got = up.recv_into(view[n:])
                except _timeout:
                    raise UpstreamFailed(504, "upstream read timeout", kind="timeout")
                except OSError as e:
                    raise UpstreamFailed(502, f"upstream read: {e.strerror or e}", retryable=conn.reused and n == 0, kind="reset")
                if got == 0:
                    raise UpstreamFailed(502, "upstream closed before the response", retryable=conn.reused and n == 0, kind="reset")
                if not times[T_FIRST_BYTE]:
                    times[T_FIRST_BYTE] = time.monotonic()
                n += got
                end = buf.find(HEAD_END, max(start, n - got - 3), n)
                if end < 0:
                    if n >= MAX_RESPONSE_HEAD or n >= len(buf):
                        raise UpstreamFailed(502, "upstream response head too large")
                    continue
            head_len = end + 4
            fast = fast_head(bytes(view[start:head_len]))
            if fast is not None:
                break
            parser = ResponseParser()
            try:
                rhead = parser.parse_head(view[start:head_len])
            except BadResponse as e:
                raise UpstreamFailed(502, f"bad upstream response: {e}")
            if 100 <= rhead.status < 200:
                if rhead.status == 101:
                    if req is self.parser.upgrade_req:  # the tunnel takes it from here
                        raise Upgraded(bytes(view[start:head_len]), bytes(view[head_len:n]))
                    raise UpstreamFailed(502, "unexpected 101 from upstream")
                start = head_len  # interim response (100, 103): skip it
                continue
            break
        # -- framing decisions (RFC 9112 6.3) ------------------------------------------
        if fast is not None:
            status, content_length, up_reusable, out_head = fast
            chunked = False
        else:
            status = rhead.status
            content_length = rhead.content_length
            chunked = rhead.chunked
            up_reusable = rhead.keep_alive
        if self.retry_statuses is not None and status in self.retry_statuses:
            # retry_on names this status and a retry is possible: not relayed
            raise UpstreamFailed(status, f"upstream answered {status}", kind="status")
        body_start = head_len
        if req.method == "HEAD" or status == 204 or status == 304:
            mode = 0  # no body
        elif chunked:
            mode = 2
        elif content_length is not None:
            mode = 1
        else:
            mode = 3  # until the upstream closes
            up_reusable = False
        client_11 = req.version != "1.0"
        keep = req.keep_alive and not self.closing and not ws.draining and (client_11 or mode < 2)
        if fast is not None:  # the upstream's head as it came, minus its Connection line
            if not keep:
                out_head = out_head[:-2] + b"Connection: close\r\n\r\n"
            elif not client_11:
                out_head = out_head[:-2] + b"Connection: keep-alive\r\n\r\n"
        else:
            out_head = self._rebuild_head(rhead, mode, client_11, keep)
        self.resp_started = True
        bytes_out = 0
        csock = self.sock
        send_timeout = ws.send_timeout
        self.deadline = time.monotonic() + send_timeout
        # -- body ----------------------------------------------------------------------
        try:
            if mode == 0:
                if n > body_start:
                    up_reusable = False
                self._send(out_head)
            elif mode == 1:
                length = content_length
                have = n - body_start
                if have > length:
                    up_reusable = False  # the upstream sent more than it announced
                    have = length
                if have == length or have < 16384:
                    self._send(out_head + view[body_start : body_start + have])
                else:
                    self._send(out_head)
                    self._send(view[body_start : body_start + have])
                bytes_out = have
                remaining = length - have
                if remaining >= SPLICE_MIN and ws.pipes is not None and self.tls_resumed is None:
                    try:
                        bytes_out += splice_body(self, ws.pipes, up.fileno(), csock.fileno(),
                                                 remaining, read_timeout, send_timeout,
                                                 time.monotonic)
                    except SpliceError as e:
                        raise UpstreamBroken(str(e))
                    except (OSError, _timeout) as e:
                        raise ClientGone(str(e))
                    remaining = 0
                while remaining:
                    self.deadline = time.monotonic() + read_timeout
                    try:
                        got = up.recv_into(view, min(remaining, len(buf)))
                    except (OSError, _timeout) as e:
                        raise UpstreamBroken(f"upstream body: {e}")
                    if got == 0:
                        raise UpstreamBroken("upstream closed mid-body")
                    self.deadline = time.monotonic() + send_timeout
                    self._send(view[:got])
                    remaining -= got
                    bytes_out += got
            else:
                self._send(out_head)
                if mode == 2:
                    bytes_out = self._relay_chunked(parser, up, view, body_start, n, client_11,
                                                    max(read_timeout, send_timeout))
                    if parser.extra:
                        up_reusable = False
                else:
                    bytes_out = self._relay_until_close(up, view, body_start, n, client_11,
                                                        max(read_timeout, send_timeout))
        except UpstreamBroken as e:
            times[T_END] = time.monotonic()
            ws.record(self, req, status, bytes_out, server, conn, bytes_in, times, str(e))
            return False  # the client sees a truncated response: the only honest signal
        except ClientGone:
            times[T_END] = time.monotonic()
            ws.record(self, req, status, bytes_out, server, conn, bytes_in, times, "client gone")
            return False
        conn.reusable = up_reusable
        times[T_END] = time.monotonic()
        ws.record(self, req, status, bytes_out, server, conn, bytes_in, times)
        return keep

    @staticmethod
    def _rebuild_head(rhead, mode: int, client_11: bool, keep: bool) -> bytes:
        """The client's response head from a parsed one (what fast_head() does not take)."""
        parts = [b"HTTP/1.1 %d %s\r\n" % (rhead.status, rhead.reason)]
        for name, value in rhead.headers:
            parts += (name, b": ", value, b"\r\n")
        if mode == 1 or (mode == 0 and rhead.content_length is not None):
            parts.append(b"Content-Length: %d\r\n" % rhead.content_length)
        elif mode >= 2 and client_11:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if not keep:
            parts.append(b"Connection: close\r\n\r\n")
        elif not client_11:
            parts.append(b"Connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    def _relay_chunked(self, parser, up, view, start, n, client_11, timeout) -> int:
        sent = [0]

        def sink(piece):
            sent[0] += len(piece)
            if client_11:
                self._send(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                self._send(piece)

        try:
            if n > start:
                parser.feed_body(view[start:n], sink)
            while not parser.complete:
                self.deadline = time.monotonic() + timeout
                try:
                    got = up.recv_into(view)
                except (OSError, _timeout) as e:
                    raise UpstreamBroken(f"upstream body: {e}")
                if got == 0:
                    raise UpstreamBroken("upstream closed mid-body")
                parser.feed_body(view[:got], sink)
        except BadResponse as e:
            if parser.complete:
                return sent[0]
            raise UpstreamBroken(f"bad chunked body from upstream: {e}")
        if client_11:
            self._send(LAST_CHUNK)
        return sent[0]

    def _relay_until_close(self, up, view, start, n, client_11, timeout) -> int:
        total = 0
        if n > start:
            piece = view[start:n]
            self._send(b"%x\r\n%s\r\n" % (len(piece), piece) if client_11 else piece)
            total += len(piece)
        while True:
            self.deadline = time.monotonic() + timeout
            try:
                got = up.recv_into(view)
            except (OSError, _timeout) as e:
                raise UpstreamBroken(f"upstream body: {e}")
            if got == 0:
                break
            piece = view[:got]
            self._send(b"%x\r\n%s\r\n" % (got, piece) if client_11 else piece)
            total += got
        if client_11:
            self._send(LAST_CHUNK)
        return total


class UpstreamBroken(Exception):
    """The upstream failed after the response head reached the client."""


class UpstreamAbort(UpstreamFailed):
    """The client's request body failed mid-stream (timeout, too large, malformed)."""

    def __init__(self, status: int):
        super().__init__(status, "request body failed")


def _peer_closed(sock) -> bool:
    """True if a pooled socket has been closed by the peer (or has unexpected data)."""
    try:
        data = sock._sock.recv(1, pysocket.MSG_PEEK | pysocket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True if data == b"" else True
