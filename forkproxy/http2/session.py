"""A sans-IO HTTP/2 server connection on libnghttp2: bytes in, events out, bytes to send.

Nothing here touches a socket or a greenlet, so every protocol path is tested by
feeding bytes (tests/test_http2_session.py drives it with the h2 library as a client).

Events (``session.events``, a deque of ``(kind, stream_id, payload)``):

* ``REQUEST``: a request head, validated and translated into the project's HTTP/1.1
  :class:`~forkproxy.http.request.Request` (forkproxy/http2/translate.py);
* ``DATA``: a chunk of its body (bytes). The window is only reopened once the consumer
  calls :meth:`consume`, so unread request bodies are bounded by the flow-control
  windows, whatever the client does;
* ``END``: the request body is complete (its length matched ``content-length``);
  payload its trailer fields (checked and filtered, forkproxy.http2.translate), or None;
* ``CLOSED``: the stream is gone; payload the error code (0: it completed). A stream
  closed before its response ended was reset (by the client or by the session).
* ``GOAWAY``: the client is going away; payload the error code.

Responses: :meth:`respond` (final head; a data provider pulls the body from a per-stream
buffer and defers when it is empty), :meth:`interim` (1xx), :meth:`send_data`,
:meth:`end` (optionally with trailers), :meth:`reset`, and the graceful
:meth:`shutdown_notice` / :meth:`goaway` pair. :meth:`pending` tells the producer how much
of a stream's response is queued: it pauses reading its upstream above
``limits.send_buffer`` (the client's window is closed, or the socket is slow).

Limits (forkproxy/http2/limits.py): concurrent streams (the excess refused with
REFUSED_STREAM), header list size (431), header block bytes before END_HEADERS (bounded
by the frame size we advertise times the CONTINUATION count nghttp2 allows; more
CONTINUATIONs: GOAWAY ENHANCE_YOUR_CALM, CVE-2024-27316), client resets per second (rapid reset, CVE-2023-44487:
GOAWAY ENHANCE_YOUR_CALM), control frames per second (SETTINGS, PING, PRIORITY,
WINDOW_UPDATE, empty DATA: GOAWAY ENHANCE_YOUR_CALM). Each refusal is counted by reason
in :attr:`stream_errors` (``forkproxy_http2_stream_errors_total{reason}``).
"""

from __future__ import annotations

from collections import deque

from forkproxy.http.request import Limits
from forkproxy.http2 import nghttp2 as ng
from forkproxy.http2.limits import Http2Limits, TokenBucket
from forkproxy.http2.translate import StreamRefused, build_request, request_trailers

ffi = ng.ffi
_buffer = ffi.buffer
_memmove = ffi.memmove
REQUEST, DATA, END, CLOSED, GOAWAY = 1, 2, 3, 4, 5

#: the opaque data of the PING sent with the first GOAWAY (its ACK is recognised)
_NOTICE_PING = b"goaway-1"
_CONTROL_REASON = {ng.SETTINGS: "settings_flood", ng.PING: "ping_flood",
                   ng.PRIORITY: "priority_flood", ng.WINDOW_UPDATE: "window_update_flood",
                   ng.DATA: "empty_data_flood"}
#: what nghttp2's fatal mem_recv errors are counted as, and the GOAWAY code sent
_FATAL = {ng.ERR_FLOODED: ("ack_flood", ng.ENHANCE_YOUR_CALM),
          ng.ERR_TOO_MANY_CONTINUATIONS: ("continuation_flood", ng.ENHANCE_YOUR_CALM),
          ng.ERR_BAD_CLIENT_MAGIC: ("bad_preface", ng.PROTOCOL_ERROR)}
_CODE_NAME = {ng.PROTOCOL_ERROR: "protocol_error", ng.FLOW_CONTROL_ERROR: "flow_control_error",
              ng.FRAME_SIZE_ERROR: "frame_size_error", ng.COMPRESSION_ERROR: "compression_error",
              ng.STREAM_CLOSED: "stream_closed", ng.INTERNAL_ERROR: "internal_error",
              ng.ENHANCE_YOUR_CALM: "enhance_your_calm"}


class _Stream:
    __slots__ = ("sid", "fields", "list_size", "oversize", "request", "received",
                 "unconsumed", "out", "out_size", "offset", "eof", "trailers", "deferred",
                 "responded", "refused", "ended")

    def __init__(self, sid: int):
        self.sid = sid
        self.fields: list[tuple[bytes, bytes]] = []
        self.list_size = 0
        self.oversize = False
        self.request = None
        self.received = 0  # body bytes received (checked against content-length)
        self.unconsumed = 0  # received, not yet given back to the window by consume()
        self.out: deque = deque()  # response body chunks not yet taken by nghttp2
        self.out_size = 0
        self.offset = 0  # into out[0]
        self.eof = False
        self.trailers = None
        self.deferred = False
        self.responded = False
        self.refused = False  # the session answered or reset it: no consumer
        self.ended = False  # END_STREAM received


class ServerSession:
    """One HTTP/2 server connection (sans-IO). Call :meth:`close` when done."""

    def __init__(self, limits: Http2Limits | None = None, request_limits: Limits | None = None,
                 clock=None):
        lib = ng.library()
        self._lib = lib
        self.limits = limits = limits or Http2Limits()
        self._max_list_size = limits.max_header_list_size
        self.request_limits = request_limits or Limits()
        self.events: deque = deque()
        self.streams: dict[int, _Stream] = {}
        self.stream_errors: dict[str, int] = {}
        self.failed: str | None = None  # why the connection is being torn down
        #: the client answered the PING sent with the first GOAWAY: every stream it
        #: opened before it saw that GOAWAY has arrived (TCP keeps the order)
        self.notice_acked = False
        self._exc: BaseException | None = None
        self._violation: tuple[str, int] | None = None
        kw = {} if clock is None else {"clock": clock}
        self._resets = TokenBucket(limits.reset_burst, limits.reset_rate, **kw)
        self._control = TokenBucket(limits.control_burst, limits.control_rate, **kw)
        self._handle = ffi.new_handle(self)  # alive as long as the C session
        self._out_ptr = ffi.new("const uint8_t **")
        self._session = self._new_session(lib, limits)

    def _new_session(self, lib, limits: Http2Limits):
        opt_p = ffi.new("nghttp2_option **")
        if lib.nghttp2_option_new(opt_p) != 0:
            raise MemoryError("nghttp2_option_new")
        opt = opt_p[0]
        try:
            lib.nghttp2_option_set_no_auto_window_update(opt, 1)
            # a backstop too: the control-frame bucket refuses a SETTINGS or PING flood
            # first (a flood in one read would otherwise race the two limits)
            lib.nghttp2_option_set_max_outbound_ack(
                opt, max(limits.max_outbound_ack, 2 * limits.control_burst))
            lib.nghttp2_option_set_max_settings(opt, limits.max_settings)
            lib.nghttp2_option_set_max_continuations(opt, limits.max_continuations)
            lib.nghttp2_option_set_max_deflate_dynamic_table_size(opt, limits.header_table_size)
            # the library's own rapid-reset bucket is a backstop behind this session's
            lib.nghttp2_option_set_stream_reset_rate_limit(
                opt, limits.reset_burst * 2, int(limits.reset_rate * 2) + 1)
            sp = ffi.new("nghttp2_session **")
            if lib.nghttp2_session_server_new2(sp, _CALLBACKS.get(lib), self._handle, opt) != 0:
                raise MemoryError("nghttp2_session_server_new2")
        finally:
            lib.nghttp2_option_del(opt)
        session = sp[0]
        iv = ffi.new("nghttp2_settings_entry[]", [
            (ng.SETTINGS_MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams),
            (ng.SETTINGS_INITIAL_WINDOW_SIZE, limits.initial_window_size),
            (ng.SETTINGS_MAX_FRAME_SIZE, limits.max_frame_size),
            (ng.SETTINGS_MAX_HEADER_LIST_SIZE, limits.max_header_list_size),
            (ng.SETTINGS_HEADER_TABLE_SIZE, limits.header_table_size),
            (ng.SETTINGS_ENABLE_PUSH, 0)])
        rv = lib.nghttp2_submit_settings(session, ng.FLAG_NONE, iv, len(iv))
        if rv != 0:
            lib.nghttp2_session_del(session)
            raise ValueError(f"nghttp2_submit_settings: {ng.strerror(rv)}")
        return session

    def close(self) -> None:
        if self._session is not None:
            self._lib.nghttp2_session_del(self._session)
            self._session = None
            self.streams.clear()

    def __del__(self):
        self.close()

    # -- driving -------------------------------------------------------------------------

    def receive(self, data) -> None:
        """Feed bytes read from the client; events and bytes to send may follow."""
        if self._session is None or self.failed is not None:
            return
        rv = self._lib.nghttp2_session_mem_recv(self._session, ffi.from_buffer(data), len(data))
        self._after_call()
        violation = self._violation
        if violation is not None:  # a limit broken inside a callback
            self._violation = None
            self._terminate(*violation)
        elif rv < 0:
            self._terminate(*_FATAL.get(rv, ("protocol_error", ng.PROTOCOL_ERROR)))

    def _after_call(self) -> None:
        """Re-raise, once C has returned, what a callback caught (never unwound through C)."""
        exc = self._exc
        if exc is not None:
            self._exc = None
            self.failed = "internal_error"
            raise exc

    def data_to_send(self) -> bytes:
        """All bytes nghttp2 has to send now (frames, DATA pulled from the stream buffers)."""
        if self._session is None:
            return b""
        lib, session, ptr = self._lib, self._session, self._out_ptr
        chunks = []
        while True:
            n = lib.nghttp2_session_mem_send(session, ptr)
            if n <= 0:
                self._after_call()
                if n < 0:
                    self.failed = self.failed or "send_failed"
                break
            chunks.append(ffi.buffer(ptr[0], n)[:])
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @property
    def want_read(self) -> bool:
        return self._session is not None and self.failed is None and bool(
            self._lib.nghttp2_session_want_read(self._session))

    @property
    def want_write(self) -> bool:
        return self._session is not None and bool(
            self._lib.nghttp2_session_want_write(self._session))

    @property
    def finished(self) -> bool:
        """Nothing more to read or write: the connection can be closed."""
        return not self.want_read and not self.want_write

    def _count(self, reason: str) -> None:
        errors = self.stream_errors
        errors[reason] = errors.get(reason, 0) + 1

    def _terminate(self, reason: str, code: int) -> None:
        """GOAWAY(code) and the end of the connection: every open stream is CLOSED for
        the consumer now (its upstream request is aborted), none is served further."""
        self._count(reason)
        self.failed = reason
        self._lib.nghttp2_session_terminate_session(self._session, code)
        self._close_streams(code)

    def _close_streams(self, code: int) -> None:
        streams, self.streams = self.streams, {}
        for sid, stream in streams.items():
            if stream.request is not None:
                self.events.append((CLOSED, sid, code))

    # -- request side --------------------------------------------------------------------

    def consume(self, sid: int, n: int) -> None:
        """The consumer took ``n`` body bytes of stream ``sid``: reopen the windows."""
        stream = self.streams.get(sid)
        if stream is None:
            return  # closed: its unconsumed bytes went back to the connection window
        stream.unconsumed -= n
        self._lib.nghttp2_session_consume(self._session, sid, n)

    def _reset_budget(self) -> None:
        """A stream reset the client caused (its RST_STREAM or its malformed request)
        takes a token; none left: the connection ends after this read (rapid reset,
        CVE-2023-44487, and its variant through malformed requests)."""
        if not self._resets.take() and self._violation is None:
            self._violation = ("rapid_reset", ng.ENHANCE_YOUR_CALM)

    def _refuse(self, stream: _Stream, err: StreamRefused) -> None:
        stream.refused = True
        self._count(err.reason)
        self._reset_budget()
        if err.status:
            self.respond(stream.sid, err.status, [(b"content-type", b"text/plain")],
                         body=b"%d %s\n" % (err.status, str(err).encode("latin-1", "replace")))
        else:
            self.reset(stream.sid, ng.PROTOCOL_ERROR)

    def _headers_done(self, frame, stream: _Stream) -> None:
        end_stream = bool(frame.hd.flags & ng.FLAG_END_STREAM)
        if stream.request is not None or stream.refused:  # trailers (nghttp2 checked
            fields, stream.fields = stream.fields, []  # they end the stream)
            if stream.oversize and not stream.refused:
                self._refuse(stream, StreamRefused("headers_too_large", 0, "trailers too large"))
            elif end_stream:
                self._end(stream, fields)
            return
        fields, stream.fields = stream.fields, []
        if stream.oversize:
            self._refuse(stream, StreamRefused("headers_too_large", 431, "header list too large"))
            return
        try:
            req = build_request(fields, end_stream, self.request_limits)
        except StreamRefused as err:
            self._refuse(stream, err)
            return
        stream.request = req
        stream.list_size = 0  # trailers, if any, have a header list budget of their own
        self.events.append((REQUEST, stream.sid, req))
        if end_stream:
            stream.ended = True
            self.events.append((END, stream.sid, None))

    def _end(self, stream: _Stream, trailers=None) -> None:
        stream.ended = True
        if stream.refused:
            return
        req = stream.request
        if req.content_length is not None and stream.received != req.content_length:
            self._refuse(stream, StreamRefused("content_length", 0, "body shorter than declared"))
            return
        if trailers:
            try:
                trailers = request_trailers(trailers) or None
            except StreamRefused as err:
                self._refuse(stream, err)
                return
        self.events.append((END, stream.sid, trailers or None))

    def _on_data(self, sid: int, ptr, n: int) -> int:
        stream = self.streams.get(sid)
        if stream is None or stream.refused or stream.request is None:
            self._lib.nghttp2_session_consume(self._session, sid, n)
            return 0
        stream.received += n
        cl = stream.request.content_length
        if cl is not None and stream.received > cl:
            self._lib.nghttp2_session_consume(self._session, sid, n)
            self._refuse(stream, StreamRefused("content_length", 0, "body longer than declared"))
            return 0
        stream.unconsumed += n
        self.events.append((DATA, sid, ffi.buffer(ptr, n)[:]))
        return 0

    # -- callbacks (called by nghttp2 during receive/data_to_send) -----------------------

    def _store(self, exc: BaseException) -> int:
        self._exc = exc
        return ng.ERR_CALLBACK_FAILURE

    def _on_header(self, frame, name, namelen, value, valuelen) -> int:
        sid = frame.hd.stream_id
        stream = self.streams.get(sid)
        if stream is None:
            if frame.headers.cat != ng.HCAT_REQUEST:
                return 0
            stream = self.streams[sid] = _Stream(sid)
        elif stream.oversize:
            return 0
        size = stream.list_size = stream.list_size + namelen + valuelen + 32  # RFC 9113 6.5.2
        if size > self._max_list_size:
            stream.oversize = True
            stream.fields = []
            return 0
        stream.fields.append((_buffer(name, namelen)[:], _buffer(value, valuelen)[:]))
        return 0

    def _on_invalid_header(self, frame) -> int:
        stream = self.streams.get(frame.hd.stream_id)
        if stream is not None and not stream.refused:
            stream.refused = True
            self._count("invalid_field")
            self._reset_budget()
        return ng.ERR_TEMPORAL_CALLBACK_FAILURE  # nghttp2 resets it: PROTOCOL_ERROR

    def _on_frame_recv(self, frame) -> int:
        hd = frame.hd
        kind = hd.type
        if kind == ng.DATA:
            stream = self.streams.get(hd.stream_id)
            if hd.flags & ng.FLAG_END_STREAM:
                if stream is not None and stream.request is not None:
                    self._end(stream)
            elif hd.length == 0 and not self._control.take():
                return self._flood(ng.DATA)
        elif kind == ng.HEADERS:
            stream = self.streams.get(hd.stream_id)
            if stream is not None:
                self._headers_done(frame, stream)
        elif kind == ng.RST_STREAM:
            self._reset_budget()
            if self._violation is not None:
                return ng.ERR_CALLBACK_FAILURE
        elif kind in _CONTROL_REASON and not hd.flags & ng.FLAG_ACK or kind == ng.PRIORITY:
            if not self._control.take():
                return self._flood(kind)
        elif kind == ng.GOAWAY:
            self.events.append((GOAWAY, 0, frame.goaway.error_code))
        elif kind == ng.PING and ffi.buffer(frame.ping.opaque_data, 8)[:] == _NOTICE_PING:
            self.notice_acked = True
        return 0

    def _flood(self, kind: int) -> int:
        self._violation = (_CONTROL_REASON[kind], ng.ENHANCE_YOUR_CALM)
        return ng.ERR_CALLBACK_FAILURE

    def _on_frame_send(self, frame) -> int:
        """Count what nghttp2 decided on its own (malformed messages, refused streams)."""
        hd = frame.hd
        if hd.type == ng.RST_STREAM:
            code = frame.rst_stream.error_code
            stream = self.streams.get(hd.stream_id)
            if code == ng.REFUSED_STREAM:
                self._count("refused_stream")
            elif stream is None or not stream.refused:
                self._reset_budget()
                if stream is not None:
                    stream.refused = True
                if stream is None or stream.request is None:
                    self._count("malformed_headers")
                else:
                    self._count("malformed_body")
        elif hd.type == ng.GOAWAY and self.failed is None:
            code = frame.goaway.error_code
            if code != ng.NO_ERROR:  # nghttp2 ends the connection (a protocol error)
                self.failed = _CODE_NAME.get(code, "protocol_error")
                self._count(self.failed)
                self._close_streams(code)
        return 0

    def _on_stream_close(self, sid: int, code: int) -> int:
        stream = self.streams.pop(sid, None)
        if stream is None:
            return 0
        if stream.unconsumed:
            self._lib.nghttp2_session_consume_connection(self._session, stream.unconsumed)
        if stream.request is not None:
            self.events.append((CLOSED, sid, code))
        return 0

    def _read_body(self, sid: int, buf, length: int, flags) -> int:
        stream = self.streams.get(sid)
        if stream is None:
            return ng.ERR_DEFERRED
        out = stream.out
        if len(out) == 1 and not stream.offset and len(out[0]) <= length:
            chunk = out.popleft()  # the usual case: one whole chunk queued, and it fits
            n = len(chunk)
            _memmove(buf, chunk, n)
        else:
            n = self._take(stream, buf, length)
        stream.out_size -= n
        if not out and stream.eof:
            flags[0] |= ng.DATA_FLAG_EOF
            if stream.trailers:
                flags[0] |= ng.DATA_FLAG_NO_END_STREAM
                nva, keep = _nv(stream.trailers)
                self._lib.nghttp2_submit_trailer(self._session, sid, nva, len(keep) // 2)
            return n
        if n == 0:
            stream.deferred = True
            return ng.ERR_DEFERRED
        return n

    @staticmethod
    def _take(stream: _Stream, buf, length: int) -> int:
        """Copy up to ``length`` queued body bytes of ``stream`` into ``buf``."""
        out = stream.out
        n = 0
        while out and n < length:
            chunk = out[0]
            take = min(len(chunk) - stream.offset, length - n)
            _memmove(buf + n, memoryview(chunk)[stream.offset:stream.offset + take], take)
            n += take
            stream.offset += take
            if stream.offset == len(chunk):
                out.popleft()
                stream.offset = 0
        return n

    # -- response side -------------------------------------------------------------------

    def interim(self, sid: int, status: int, headers=()) -> None:
        """A 1xx response (100 Continue, 103 Early Hints) before the final one."""
        if sid not in self.streams:
            return
        nva, keep = _nv([(b":status", b"%d" % status), *headers])
        self._lib.nghttp2_submit_headers(self._session, ng.FLAG_NONE, sid, ffi.NULL, nva,
                                         len(keep) // 2, ffi.NULL)

    def respond(self, sid: int, status: int, headers, *, end_stream: bool = False,
                body: bytes = b"") -> bool:
        """The final response head; a body (if not end_stream) follows by send_data/end.
        ``headers``: lower-case names, no connection-specific field. False: the stream
        is gone."""
        stream = self.streams.get(sid)
        if stream is None or stream.responded:
            return False
        stream.responded = True
        nva, count, keep = nv_array(status, headers)
        if body:
            stream.out.append(body)
            stream.out_size = len(body)
            stream.eof = True
        return self._submit(sid, nva, count, end_stream and not body)

    def respond_nv(self, sid: int, nva, count: int, end_stream: bool) -> bool:
        """:meth:`respond` with the head already an nghttp2_nv array (from
        :func:`nv_array`, which may be reused: nghttp2 copies the fields)."""
        stream = self.streams.get(sid)
        if stream is None or stream.responded:
            return False
        stream.responded = True
        return self._submit(sid, nva, count, end_stream)

    def _submit(self, sid: int, nva, count: int, end_stream: bool) -> bool:
        # one data provider for every stream: nghttp2 copies the struct
        prd = ffi.NULL if end_stream else _CALLBACKS.provider
        return self._lib.nghttp2_submit_response(self._session, sid, nva, count, prd) == 0

    def send_data(self, sid: int, data) -> bool:
        """Queue response body bytes; False: the stream is gone (stop producing)."""
        stream = self.streams.get(sid)
        if stream is None:
            return False
        if data:
            stream.out.append(data)
            stream.out_size += len(data)
            self._resume(stream)
        return True

    def end(self, sid: int, trailers=None) -> None:
        """The response body is complete; ``trailers``: fields sent after it."""
        stream = self.streams.get(sid)
        if stream is None:
            return
        stream.eof = True
        stream.trailers = trailers
        self._resume(stream)

    def _resume(self, stream: _Stream) -> None:
        if stream.deferred:
            stream.deferred = False
            self._lib.nghttp2_session_resume_data(self._session, stream.sid)

    def pending(self, sid: int) -> int:
        """Response bytes of ``sid`` queued but not yet framed (0 if the stream is gone)."""
        stream = self.streams.get(sid)
        return stream.out_size if stream is not None else 0

    def send_window(self, sid: int) -> int:
        """What the client's flow control lets the stream send now (<= 0: closed)."""
        lib, s = self._lib, self._session
        if s is None:
            return 0
        return min(lib.nghttp2_session_get_stream_remote_window_size(s, sid),
                   lib.nghttp2_session_get_remote_window_size(s))

    def reset(self, sid: int, code: int = ng.CANCEL) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            return
        stream.refused = True
        self._lib.nghttp2_submit_rst_stream(self._session, ng.FLAG_NONE, sid, code)

    def shutdown_notice(self) -> None:
        """The first GOAWAY of a graceful close (last stream id 2^31-1): the client stops
        opening streams; streams already on the way are still accepted. A PING goes with
        it: its ACK (``notice_acked``) says when the final goaway() may be sent."""
        if self._session is not None:
            self._lib.nghttp2_submit_shutdown_notice(self._session)
            self._lib.nghttp2_submit_ping(self._session, ng.FLAG_NONE, _NOTICE_PING)

    def goaway(self, code: int = ng.NO_ERROR) -> int:
        """The final GOAWAY with the last stream id processed; returns that id."""
        if self._session is None:
            return 0
        last = self._lib.nghttp2_session_get_last_proc_stream_id(self._session)
        self._lib.nghttp2_submit_goaway(self._session, ng.FLAG_NONE, last, code, ffi.NULL, 0)
        return last


def nv_array(status: int, headers):
    """The nghttp2_nv array of a response head (``:status``, then ``headers``), its
    length, and the buffers it points into (keep them alive as long as the array)."""
    nva, keep = _nv([(b":status", b"%d" % status), *headers])
    return nva, len(keep) // 2, keep


def _nv(pairs):
    """An nghttp2_nv array for ``pairs`` (one ffi.new from an initialiser list), and
    the buffers it points into: keep them alive until the submit call returns (nghttp2
    copies the fields)."""
    from_buffer = ffi.from_buffer
    keep = [from_buffer(x) for pair in pairs for x in pair]
    nva = ffi.new("nghttp2_nv[]", [(keep[2 * i], keep[2 * i + 1], len(a), len(b), 0)
                                   for i, (a, b) in enumerate(pairs)])
    return nva, keep


# -- the process's one set of C callbacks: user_data -> ServerSession ---------------------

def _failure(exc, value, tb):
    """cffi's onerror: the last line of defence (a bug before the session was found)."""
    return ng.ERR_CALLBACK_FAILURE


#: the out-of-line FFI's from_handle is the C function itself (cffi.FFI wraps it in a
#: Python method: one call more per callback, ten callbacks per request)
_from_handle = ffi.from_handle


# One C callback per event, each written out (a generic *args trampoline cost ~0.5 us
# more per call, and a request makes ~12 calls): find the session through user_data,
# call its method, and store (never propagate into C) whatever it raises.
_FRAME_CB = "int(nghttp2_session *, const nghttp2_frame *, void *)"
_HEADER_CB = ("int(nghttp2_session *, const nghttp2_frame *, const uint8_t *, size_t,"
              " const uint8_t *, size_t, uint8_t, void *)")


@ffi.callback(_HEADER_CB, onerror=_failure)
def _cb_header(s, frame, name, namelen, value, valuelen, flags, ud):
    session = _from_handle(ud)
    try:
        return session._on_header(frame, name, namelen, value, valuelen)
    except BaseException as e:
        return session._store(e)


@ffi.callback(_HEADER_CB, onerror=_failure)
def _cb_invalid_header(s, frame, name, namelen, value, valuelen, flags, ud):
    session = _from_handle(ud)
    try:
        return session._on_invalid_header(frame)
    except BaseException as e:
        return session._store(e)


@ffi.callback(_FRAME_CB, onerror=_failure)
def _cb_frame_recv(s, frame, ud):
    session = _from_handle(ud)
    try:
        return session._on_frame_recv(frame)
    except BaseException as e:
        return session._store(e)


@ffi.callback(_FRAME_CB, onerror=_failure)
def _cb_frame_send(s, frame, ud):
    session = _from_handle(ud)
    try:
        return session._on_frame_send(frame)
    except BaseException as e:
        return session._store(e)


@ffi.callback("int(nghttp2_session *, int32_t, uint32_t, void *)", onerror=_failure)
def _cb_stream_close(s, sid, code, ud):
    session = _from_handle(ud)
    try:
        return session._on_stream_close(sid, code)
    except BaseException as e:
        return session._store(e)


@ffi.callback("int(nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t, void *)",
              onerror=_failure)
def _cb_data_chunk(s, flags, sid, data, n, ud):
    session = _from_handle(ud)
    try:
        return session._on_data(sid, data, n)
    except BaseException as e:
        return session._store(e)


@ffi.callback("ssize_t(nghttp2_session *, int32_t, uint8_t *, size_t, uint32_t *,"
              " nghttp2_data_source *, void *)", onerror=_failure)
def _cb_read_body(s, sid, buf, length, flags, source, ud):
    session = _from_handle(ud)
    try:
        return session._read_body(sid, buf, length, flags)
    except BaseException as e:
        return session._store(e)


class _Callbacks:
    """The nghttp2_session_callbacks table, built once per process on first use."""

    def __init__(self):
        self._table = None
        self.provider = None

    def get(self, lib):
        if self._table is None:
            prd = ffi.new("nghttp2_data_provider *")
            prd.read_callback = _cb_read_body
            self.provider = prd
            p = ffi.new("nghttp2_session_callbacks **")
            if lib.nghttp2_session_callbacks_new(p) != 0:
                raise MemoryError("nghttp2_session_callbacks_new")
            table = p[0]
            lib.nghttp2_session_callbacks_set_on_header_callback(table, _cb_header)
            lib.nghttp2_session_callbacks_set_on_invalid_header_callback(table, _cb_invalid_header)
            lib.nghttp2_session_callbacks_set_on_frame_recv_callback(table, _cb_frame_recv)
            lib.nghttp2_session_callbacks_set_on_frame_send_callback(table, _cb_frame_send)
            lib.nghttp2_session_callbacks_set_on_stream_close_callback(table, _cb_stream_close)
            lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback(table, _cb_data_chunk)
            self._table = table  # never freed: nghttp2 copies it into each session
        return self._table


_CALLBACKS = _Callbacks()
