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

from forkproxy.http.grpcstatus import proxy_answer
from forkproxy.http.request import Limits
from forkproxy.http2 import fieldsink
from forkproxy.http2 import nghttp2 as ng
from forkproxy.http2.base import CALLBACKS, OutStream, SessionBase, frame_callback_addresses
from forkproxy.http2.base import nv as _nv
from forkproxy.http2.fieldsink import header_callback, new_sink, server_callbacks
from forkproxy.http2.limits import Http2Limits, TokenBucket
from forkproxy.http2.sendpath import COMPILED as _WHOLE_IN_C
from forkproxy.http2.sendpath import BodySource
from forkproxy.http2.translate import StreamRefused, build_request, request_trailers

ffi = ng.ffi
_unpack = ffi.unpack
_void_p = ffi.typeof("void *")
_cast = ffi.cast  # names, values and chunks are char * (see base.py)
REQUEST, DATA, END, CLOSED, GOAWAY = 1, 2, 3, 4, 5
# the constants the per-frame callbacks test, as module globals (one lookup, not two)
_DATA_FRAME, _HEADERS_FRAME, _RST_STREAM_FRAME = ng.DATA, ng.HEADERS, ng.RST_STREAM
_END_STREAM = ng.FLAG_END_STREAM
_HCAT_REQUEST = ng.HCAT_REQUEST
_EV_DATA, _EV_END, _EV_CLOSED = fieldsink.EV_DATA, fieldsink.EV_END, fieldsink.EV_CLOSED
_EV_REQUEST, _EV_REQUEST_END = fieldsink.EV_REQUEST, fieldsink.EV_REQUEST_END
_EV_BLOCK_ENDS = frozenset((fieldsink.EV_REQUEST_END, fieldsink.EV_BLOCK_END))
_EV_SENT_DATA, _EV_SENT_HEADERS_END = fieldsink.EV_SENT_DATA, fieldsink.EV_SENT_HEADERS_END

#: the opaque data of the PING sent with the first GOAWAY (its ACK is recognised)
_NOTICE_PING = b"goaway-1"
_CONTROL_REASON = {ng.SETTINGS: "settings_flood", ng.PING: "ping_flood",
                   ng.PRIORITY: "priority_flood", ng.WINDOW_UPDATE: "window_update_flood",
                   ng.DATA: "empty_data_flood"}
#: what nghttp2's fatal mem_recv errors are counted as, and the GOAWAY code sent
_FATAL = {ng.ERR_FLOODED: ("ack_flood", ng.ENHANCE_YOUR_CALM),
          ng.ERR_TOO_MANY_CONTINUATIONS: ("continuation_flood", ng.ENHANCE_YOUR_CALM),
          ng.ERR_BAD_CLIENT_MAGIC: ("bad_preface", ng.PROTOCOL_ERROR)}
#: bound on the WINDOW_UPDATEs banked by DATA frames sent (a client that sends none for
#: a long time does not earn a burst bigger than this)
_MAX_WINDOW_CREDIT = 4096
#: a DATA event's payload when a body without a declared length passed the body size
#: limit (``[server] max_body_size``): the front end answers 413 (gRPC: 8)
BODY_TOO_LARGE = b"body too large"
_CODE_NAME = {ng.PROTOCOL_ERROR: "protocol_error", ng.FLOW_CONTROL_ERROR: "flow_control_error",
              ng.FRAME_SIZE_ERROR: "frame_size_error", ng.COMPRESSION_ERROR: "compression_error",
              ng.STREAM_CLOSED: "stream_closed", ng.INTERNAL_ERROR: "internal_error",
              ng.ENHANCE_YOUR_CALM: "enhance_your_calm"}


class _Stream(OutStream):
    __slots__ = ("request", "received", "unconsumed", "responded", "refused", "ended",
                 "source")

    def __init__(self, sid: int):
        super().__init__(sid)
        self.source = None  # a whole body read by nghttp2 in C (respond_whole)
        self.request = None
        self.received = 0  # body bytes received (checked against content-length)
        self.unconsumed = 0  # received, not yet given back to the window by consume()
        self.responded = False
        self.refused = False  # the session answered or reset it: no consumer
        self.ended = False  # END_STREAM received


class ServerSession(SessionBase):
    """One HTTP/2 server connection (sans-IO). Call :meth:`close` when done."""

    #: header fields are collected in C when fieldsink is compiled (one call into Python
    #: per HEADERS frame instead of one per field)
    HEADER_CALLBACK = header_callback()
    #: and, compiled, the header blocks, DATA chunks, DATA's END_STREAM and stream
    #: closes are queued in C during a call into nghttp2 and handled after it
    #: (_run_queued), and so are the DATA frames and END_STREAMs sent; the other frames
    #: received and sent still reach _on_frame_recv and _on_frame_send at once
    C_CALLBACKS = server_callbacks()

    def __init__(self, limits: Http2Limits | None = None, request_limits: Limits | None = None,
                 clock=None):
        super().__init__()
        lib = self._lib
        self.limits = limits = limits or Http2Limits()
        #: the header block being received (forkproxy/http2/fieldsink.py); compiled, it
        #: is nghttp2's user_data, its first member the handle
        self._sink = sink = new_sink(limits.max_header_list_size)
        if sink.address:
            user_data = ffi.cast("void **", sink.address)
            user_data[0] = self._handle
            self._user_data = user_data
        #: the events the C callbacks queued (None: the Python callbacks handle them)
        self._drain = None
        self._resend = False  # _sent_end submitted a RST_STREAM after a queued event
        if self.C_CALLBACKS:
            sink.set_python_callbacks(*frame_callback_addresses())
            self._drain = sink.drain
        self.request_limits = request_limits or Limits()
        self._body_limit = self.request_limits.body_size
        #: the client answered the PING sent with the first GOAWAY: every stream it
        #: opened before it saw that GOAWAY has arrived (TCP keeps the order)
        self.notice_acked = False
        self._violation: tuple[str, int] | None = None
        self._dropped: list[dict] = []  # streams of a torn-down connection (_close_streams)
        kw = {} if clock is None else {"clock": clock}
        self._resets = TokenBucket(limits.reset_burst, limits.reset_rate, **kw)
        self._control = TokenBucket(limits.control_burst, limits.control_rate, **kw)
        #: WINDOW_UPDATEs the client may send without drawing on the control-frame budget:
        #: two per DATA frame sent (its stream's and the connection's), as a client
        #: reading a long body with small windows must (Envoy's rule is alike:
        #: max_inbound_window_update_frames_per_data_frame_sent)
        self._window_credit = 0
        self._create(lib.nghttp2_session_server_new2)
        self._settings([
            (ng.SETTINGS_MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams),
            (ng.SETTINGS_INITIAL_WINDOW_SIZE, limits.initial_window_size),
            (ng.SETTINGS_MAX_FRAME_SIZE, limits.max_frame_size),
            (ng.SETTINGS_MAX_HEADER_LIST_SIZE, limits.max_header_list_size),
            (ng.SETTINGS_HEADER_TABLE_SIZE, limits.header_table_size),
            (ng.SETTINGS_ENABLE_PUSH, 0)])

    def _set_options(self, lib, opt) -> None:
        super()._set_options(lib, opt)
        limits = self.limits
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

    # -- driving -------------------------------------------------------------------------

    def receive(self, data) -> None:
        """Feed bytes read from the client; events and bytes to send may follow."""
        if self._session is None or self.failed is not None:
            return
        rv = self._lib.nghttp2_session_mem_recv(self._session, ffi.from_buffer(data), len(data))
        if self._drain is not None:
            self._run_queued()
        self._after_call()
        violation = self._violation
        if violation is not None:  # a limit broken inside a callback
            self._violation = None
            self._terminate(*violation)
        elif rv < 0:
            self._terminate(*_FATAL.get(rv, ("protocol_error", ng.PROTOCOL_ERROR)))

    def data_to_send(self) -> bytes:
        """As SessionBase's; the streams nghttp2 closed while sending are handled before
        it returns."""
        data = SessionBase.data_to_send(self)
        if self._drain is not None:
            self._run_queued()
            if self._resend:  # its RST_STREAM(NO_ERROR) goes with this batch
                self._resend = False
                data += self.data_to_send()
        return data

    def _run_queued(self) -> None:
        """The events the C callbacks queued during the call into nghttp2 (or before a
        Python callback inside it), handled in their order as the Python callbacks
        handle them one by one. A failure marks the session failed, as the client's."""
        queued = self._drain()
        if queued is None:
            return
        streams = self.streams
        try:
            for kind, sid, payload in queued:
                if kind == _EV_DATA:
                    self._on_chunk(sid, payload)
                elif kind >= _EV_SENT_DATA:
                    if kind != _EV_SENT_DATA:
                        self._resend = self._sent_end(sid) or self._resend
                    if kind != _EV_SENT_HEADERS_END and self._window_credit < _MAX_WINDOW_CREDIT:
                        self._window_credit += 2
                elif kind >= _EV_REQUEST:
                    stream = streams.get(sid)
                    if stream is None and kind <= _EV_REQUEST_END:
                        stream = streams[sid] = _Stream(sid)
                    if stream is not None:
                        self._headers_done(stream, payload, kind in _EV_BLOCK_ENDS)
                elif kind == _EV_CLOSED:
                    self._on_stream_close(sid, payload)
                elif kind == _EV_END:
                    stream = streams.get(sid)
                    if stream is not None and stream.request is not None:
                        self._end(stream)
        except BaseException:
            self.failed = "internal_error"
            raise

    def _terminate(self, reason: str, code: int) -> None:
        """GOAWAY(code) and the end of the connection: every open stream is CLOSED for
        the consumer now (its upstream request is aborted), none is served further."""
        self._count(reason)
        self.failed = reason
        self._lib.nghttp2_session_terminate_session(self._session, code)
        self._close_streams(code)

    def _close_streams(self, code: int) -> None:
        streams, self.streams = self.streams, {}
        # nghttp2 sends no more DATA once terminating, but a whole body's source
        # (respond_whole) is still its pointer: kept until the C session is gone
        self._dropped.append(streams)
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
        if err.status and err.grpc:
            self.respond(stream.sid, 200, proxy_answer(err.grpc, err.status, str(err))[1],
                         end_stream=True)
        elif err.status:
            self.respond(stream.sid, err.status, [(b"content-type", b"text/plain")],
                         body=b"%d %s\n" % (err.status, str(err).encode("latin-1", "replace")))
        else:
            self.reset(stream.sid, ng.PROTOCOL_ERROR)

    def _headers_done(self, stream: _Stream, fields, end_stream: bool) -> None:
        """A header block received: ``fields`` its list, None if it passed the header
        list size limit."""
        if stream.request is not None or stream.refused:  # trailers (nghttp2 checked
            if fields is None and not stream.refused:  # that they end the stream)
                self._refuse(stream, StreamRefused("headers_too_large", 0, "trailers too large"))
            elif end_stream:
                self._end(stream, fields)
            return
        if fields is None:
            self._refuse(stream, StreamRefused("headers_too_large", 431, "header list too large"))
            return
        try:
            req = build_request(fields, end_stream, self.request_limits)
        except StreamRefused as err:
            self._refuse(stream, err)
            return
        stream.request = req
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
        """Plain Python only: compiled, the chunk is queued in C (_run_queued)."""
        self._on_chunk(sid, _unpack(ptr, n) if n else b"")
        return 0

    def _on_chunk(self, sid: int, chunk: bytes) -> None:
        n = len(chunk)
        stream = self.streams.get(sid)
        if stream is None or stream.refused or stream.request is None:
            self._lib.nghttp2_session_consume(self._session, sid, n)
            return
        stream.received += n
        cl = stream.request.content_length
        if cl is not None and stream.received > cl:
            self._lib.nghttp2_session_consume(self._session, sid, n)
            self._refuse(stream, StreamRefused("content_length", 0, "body longer than declared"))
            return
        if cl is None and stream.received > self._body_limit > 0:
            # no declared length to refuse up front: the exchange already streams the
            # body, so its front end is told (read_body raises BodyAborted 413) and the
            # rest of the body is dropped as it comes
            self._lib.nghttp2_session_consume(self._session, sid, n)
            stream.refused = True
            self._count("body_too_large")
            self.events.append((DATA, sid, BODY_TOO_LARGE))
            return
        stream.unconsumed += n
        self.events.append((DATA, sid, chunk))

    # -- callbacks (called by nghttp2 during receive/data_to_send) -----------------------

    def _on_header(self, frame, name, namelen, value, valuelen) -> int:
        """Plain Python only: compiled, fieldsink's C callback collects the fields."""
        self._sink.add(frame.hd.stream_id, _unpack(name, namelen), _unpack(value, valuelen))
        return 0

    def _new_stream(self, frame):
        """The stream a request's header block opens (None: not a request's block)."""
        if frame.headers.cat != _HCAT_REQUEST:
            return None
        sid = frame.hd.stream_id
        stream = self.streams[sid] = _Stream(sid)
        return stream

    def _on_invalid_header(self, frame) -> int:
        if self._drain is not None:  # what C queued before this comes first
            self._run_queued()
        stream = self.streams.get(frame.hd.stream_id) or self._new_stream(frame)
        if stream is not None and not stream.refused:
            stream.refused = True
            self._count("invalid_field")
            self._reset_budget()
        return ng.ERR_TEMPORAL_CALLBACK_FAILURE  # nghttp2 resets it: PROTOCOL_ERROR

    def _on_frame_recv(self, frame) -> int:
        """Compiled, only the frames fieldsink's C callback does not queue come here."""
        if self._drain is not None:  # what C queued before this frame comes first
            self._run_queued()
        hd = frame.hd
        kind = hd.type
        if kind == _DATA_FRAME:
            stream = self.streams.get(hd.stream_id)
            if hd.flags & _END_STREAM:
                if stream is not None and stream.request is not None:
                    self._end(stream)
            elif hd.length == 0 and not self._control.take():
                return self._flood(ng.DATA)
        elif kind == _HEADERS_FRAME:
            fields = self._sink.take(hd.stream_id)
            stream = self.streams.get(hd.stream_id) or self._new_stream(frame)
            if stream is not None:
                self._headers_done(stream, fields, bool(hd.flags & _END_STREAM))
        elif kind == ng.RST_STREAM:
            self._reset_budget()
            if self._violation is not None:
                return ng.ERR_CALLBACK_FAILURE
        elif kind == ng.WINDOW_UPDATE and self._window_credit > 0:
            self._window_credit -= 1
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
        """Count what nghttp2 decided on its own (malformed messages, refused streams),
        and the DATA frames that entitle the client to WINDOW_UPDATEs."""
        hd = frame.hd
        kind = hd.type
        if kind > _HEADERS_FRAME and self._drain is not None:
            # a RST_STREAM or GOAWAY looks at the streams: the closes C queued first
            self._run_queued()
        if hd.flags & _END_STREAM and kind <= _HEADERS_FRAME:
            self._sent_end(hd.stream_id)
        if kind == _DATA_FRAME:
            if self._window_credit < _MAX_WINDOW_CREDIT:
                self._window_credit += 2
        elif kind == _RST_STREAM_FRAME:
            code = frame.rst_stream.error_code
            stream = self.streams.get(hd.stream_id)
            if code == ng.REFUSED_STREAM:
                self._count("refused_stream")
            elif code == ng.NO_ERROR:
                pass  # ours, after an answer that came before the request's end
            elif stream is None or not stream.refused:
                self._reset_budget()
                if stream is not None:
                    stream.refused = True
                if stream is None or stream.request is None:
                    self._count("malformed_headers")
                else:
                    self._count("malformed_body")
        elif kind == ng.GOAWAY and self.failed is None:
            code = frame.goaway.error_code
            if code != ng.NO_ERROR:  # nghttp2 ends the connection (a protocol error)
                self.failed = _CODE_NAME.get(code, "protocol_error")
                self._count(self.failed)
                self._close_streams(code)
        return 0

    def _sent_end(self, sid: int) -> bool:
        """Our END_STREAM of ``sid`` was sent; True: a RST_STREAM was submitted."""
        stream = self.streams.get(sid)
        if stream is None or stream.ended:
            return False
        # answered before the request ended (an error mid-body): ask the client to stop
        # sending, without error (RFC 9113 section 8.1)
        stream.refused = True
        self._lib.nghttp2_submit_rst_stream(self._session, ng.FLAG_NONE, sid, ng.NO_ERROR)
        return True

    def _on_stream_close(self, sid: int, code: int) -> int:
        stream = self._forget(sid)
        if stream is None:
            return 0
        if stream.request is not None:
            self.events.append((CLOSED, sid, code))
        return 0

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

    def respond_whole(self, sid: int, nva, count: int, body: bytes) -> bool:
        """:meth:`respond_nv` with ``body``, all of the response (not empty, no
        trailers): compiled, nghttp2 reads it in C (sendpath.BodySource; no Python data
        provider call), else it is queued for the Python one. False: the stream is gone."""
        stream = self.streams.get(sid)
        if stream is None or stream.responded:
            return False
        stream.responded = True
        stream.eof = True
        if not _WHOLE_IN_C:
            stream.out.append(body)
            stream.out_size = len(body)
            return self._submit(sid, nva, count, False)
        source = stream.source = BodySource(body)  # kept until the stream closes
        prd = CALLBACKS.whole
        prd.source.ptr = _cast(_void_p, source.address)
        return self._lib.nghttp2_submit_response(self._session, sid, nva, count, prd) == 0

    def _submit(self, sid: int, nva, count: int, end_stream: bool) -> bool:
        # one data provider for every stream: nghttp2 copies the struct
        prd = ffi.NULL if end_stream else CALLBACKS.provider
        return self._lib.nghttp2_submit_response(self._session, sid, nva, count, prd) == 0

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
