"""A sans-IO HTTP/2 client connection on libnghttp2 (the proxy's side towards an HTTP/2
upstream): requests out, responses in, bytes to send.

Like the server session (forkproxy/http2/session.py), nothing here touches a socket;
both share the driving code, the outgoing-body queue and the C callback table
(forkproxy/http2/base.py).

Events (``session.events``, a deque of ``(kind, stream_id, payload)``):

* ``INTERIM``: a 1xx head, payload ``(status, fields)``;
* ``HEAD``: the final response head, payload ``(status, fields, content_length)``
  (fields without pseudo-headers and without ``content-length``, names lower-case as
  HTTP/2 has them; the length an int, None when the head has none);
* ``DATA``: a chunk of the response body (bytes). The stream's window only reopens when
  the consumer calls :meth:`consume`, so an upstream never sends faster than the client
  side drains;
* ``TRAILERS``: the trailer fields (a list);
* ``END``: the response is complete;
* ``CLOSED``: the stream is gone; payload the error code (0: it completed). Closed
  before END: reset (``REFUSED_STREAM``: never processed, safe to send again);
* ``GOAWAY``: payload ``(last_stream_id, error_code)``; streams above the id were
  not processed and are CLOSED with ``REFUSED_STREAM``;
* ``SETTINGS``: the server's SETTINGS arrived (its stream limit is known);
* ``PONG``: the server answered our PING.

Requests: :meth:`request` (the head; a body then goes by ``send_data``/``end``, pulled by
a data provider within the server's windows: :meth:`pending` tells the producer how
much is still queued), :meth:`reset`, :meth:`ping`.
"""

from __future__ import annotations

from itertools import compress as _compress
from operator import ne as _ne

from forkproxy.http2 import fieldsink
from forkproxy.http2 import nghttp2 as ng
from forkproxy.http2.base import OutStream, SessionBase, nv_once
from forkproxy.http2.fieldsink import client_callbacks, header_callback, new_sink

ffi = ng.ffi
_from_buffer = ffi.from_buffer
_unpack = ffi.unpack  # names, values and chunks are char * (see base.py)
INTERIM, HEAD, DATA, TRAILERS, END, CLOSED, GOAWAY, SETTINGS, PONG = range(1, 10)
_HEADERS, _DATA, _END_STREAM = ng.HEADERS, ng.DATA, ng.FLAG_END_STREAM
_EV_HEADERS_END, _EV_DATA, _EV_END, _EV_CLOSED, _EV_GOAWAY, _EV_SETTINGS = (
    fieldsink.EV_HEADERS_END, fieldsink.EV_DATA, fieldsink.EV_END, fieldsink.EV_CLOSED,
    fieldsink.EV_GOAWAY, fieldsink.EV_SETTINGS)

#: the window each response stream gets; the connection's is this times the streams
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
#: response header list bytes (RFC 9113 section 6.5.2 counting) before the stream is reset
MAX_HEADER_LIST = 256 * 1024
_PING = b"fp-alive"


class _ClientStream(OutStream):
    __slots__ = ("headed", "unconsumed")

    def __init__(self, sid: int):
        super().__init__(sid)
        self.headed = False  # the final head was received (later HEADERS: trailers)
        self.unconsumed = 0

    def reuse(self, sid: int) -> _ClientStream:
        """The object of a closed stream, for a new one (see ClientSession.request)."""
        self.sid = sid
        self.out.clear()
        self.out_size = self.offset = self.unconsumed = 0
        self.eof = self.deferred = self.headed = False
        self.trailers = None
        return self


#: closed streams' objects a session keeps to use again
STREAMS_KEPT = 128


def _translate_head(fields) -> tuple[int, list, int | None]:
    """A response head's block as the HEAD event has it: the status, the regular
    fields without ``content-length`` (a new list), and that length (None: none)."""
    status = 0
    if fields and fields[0][0] == b":status":
        status = int(fields[0][1])  # nghttp2 checked it is three digits
        # nghttp2 checked the pseudo-headers too: a response has :status only, before
        # the regular fields
        rest = fields[1:]
    else:
        rest = [f for f in fields if not f[0].startswith(b":")]
    length = None
    for i, (name, value) in enumerate(rest):
        if name == b"content-length":  # for the relay (nghttp2 checked it; one at most)
            length = int(value)
            del rest[i]
            break
    return status, rest, length


class ClientSession(SessionBase):
    """One HTTP/2 connection to a server (sans-IO). Call :meth:`close` when done."""

    FRAME_SEND = False  # nothing to do per frame sent
    #: the response's header fields are collected in C when fieldsink is compiled (one
    #: call into Python per HEADERS frame instead of one per field)
    HEADER_CALLBACK = header_callback()
    #: and, compiled, the frames, DATA chunks and stream closes are queued in C during
    #: a call into nghttp2 and handled after it (_run_queued: one call into Python per
    #: read, not one per event; frames the client does nothing for are not queued)
    C_CALLBACKS = client_callbacks()

    def __init__(self, stream_window: int = STREAM_WINDOW,
                 connection_window: int = CONNECTION_WINDOW):
        super().__init__()
        lib = self._lib
        #: the header block being received (forkproxy/http2/fieldsink.py): past
        #: MAX_HEADER_LIST its stream is reset; a block the same as one of the last two
        #: comes as the same list, whose translation _headers_done keeps
        self._sink = sink = new_sink(MAX_HEADER_LIST, fail=True, memo=True)
        if sink.address:  # compiled: the sink is nghttp2's user_data, the handle first
            user_data = ffi.cast("void **", sink.address)
            user_data[0] = self._handle
            self._user_data = user_data
        #: the events the C callbacks queued (None: the Python callbacks handle them)
        self._drain = sink.drain if self.C_CALLBACKS else None
        #: the last final head's field list and its event payload (see _headers_done)
        self._head_fields = self._head_payload = None
        self.goaway_last: int | None = None  # the last stream id of a GOAWAY received
        # the last request head, its nghttp2_nv array and its buffers (see _request_nv)
        self._last_fields: tuple | None = None
        self._last_nva = None
        self._last_keep: list | None = None
        self._kept: list[_ClientStream] = []  # closed streams' objects (see request)
        self._create(lib.nghttp2_session_client_new2)
        self._settings([(ng.SETTINGS_ENABLE_PUSH, 0),
                        (ng.SETTINGS_INITIAL_WINDOW_SIZE, stream_window),
                        (ng.SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST)])
        if connection_window > 65535:
            lib.nghttp2_submit_window_update(self._session, ng.FLAG_NONE, 0,
                                             connection_window - 65535)

    def receive(self, data) -> None:
        """Feed bytes read from the server; events and bytes to send may follow."""
        if self._session is None or self.failed is not None:
            return
        rv = self._lib.nghttp2_session_mem_recv(self._session, ffi.from_buffer(data), len(data))
        if self._drain is not None:
            self._run_queued()
        self._after_call()
        if rv < 0:  # nghttp2 sends GOAWAY itself; every stream is over
            self.failed = "protocol_error"
            self._close_streams(ng.PROTOCOL_ERROR)

    def data_to_send(self) -> bytes:
        """As SessionBase's; a stream nghttp2 closed while sending (its END_STREAM, a
        RST_STREAM) is handled before it returns."""
        data = SessionBase.data_to_send(self)
        if self._drain is not None:
            self._run_queued()
        return data

    def _run_queued(self) -> None:
        """The events the C callbacks queued during the last call into nghttp2,
        handled in their order as the Python callbacks below handle them one by one."""
        queued = self._drain()
        if queued is None:
            return
        events, streams = self.events, self.streams
        try:
            for kind, sid, payload in queued:
                if kind == _EV_DATA:
                    self._on_chunk(sid, payload)
                elif kind <= _EV_HEADERS_END:
                    stream = streams.get(sid)
                    if stream is not None:
                        self._headers_done(stream, payload)
                        if kind == _EV_HEADERS_END:
                            events.append((END, sid, None))
                elif kind == _EV_CLOSED:
                    self._on_stream_close(sid, payload)
                elif kind == _EV_END:
                    if sid in streams:
                        events.append((END, sid, None))
                elif kind == _EV_GOAWAY:
                    self.goaway_last = payload[0]
                    events.append((GOAWAY, 0, payload))
                elif kind == _EV_SETTINGS:
                    events.append((SETTINGS, 0, None))
                else:
                    events.append((PONG, 0, None))
        except BaseException:
            self.failed = "internal_error"
            raise

    def _close_streams(self, code: int) -> None:
        streams, self.streams = self.streams, {}
        for sid in streams:
            self.events.append((CLOSED, sid, code))

    @property
    def max_streams(self) -> int:
        """The server's SETTINGS_MAX_CONCURRENT_STREAMS (nghttp2's default until known)."""
        if self._session is None:
            return 0
        return self._lib.nghttp2_session_get_remote_settings(
            self._session, ng.SETTINGS_MAX_CONCURRENT_STREAMS)

    # -- requests ------------------------------------------------------------------------

    def request(self, fields, end_stream: bool) -> int:
        """Submit a request head (``fields``: pseudo-headers first, names lower-case);
        its body follows by send_data/end unless ``end_stream``. Returns the stream id
        (negative: nghttp2's error, e.g. after GOAWAY)."""
        nva = self._request_nv(fields)
        prd = ffi.NULL if end_stream else self.data_provider()
        sid = self._lib.nghttp2_submit_request(self._session, ffi.NULL, nva, len(fields),
                                               prd, ffi.NULL)
        if sid > 0:
            kept = self._kept
            self.streams[sid] = kept.pop().reuse(sid) if kept else _ClientStream(sid)
        return sid

    def _request_nv(self, fields):
        """The nghttp2_nv array of a request head: the last request's, with the fields
        that differ from its (the request id, most often only that) pointed at the new
        names and values. nghttp2 copies the fields at submit, so the array is free to
        change after; building it whole cost ~7 µs here for a gRPC call's dozen fields,
        patching one field ~1 µs."""
        last = self._last_fields
        if last is None or len(last) != len(fields):
            nva, keep = nv_once(fields)
            self._last_nva, self._last_keep = nva, keep
        else:
            nva, keep = self._last_nva, self._last_keep
            for i in _compress(range(len(fields)), map(_ne, fields, last)):
                name, value = fields[i]
                entry = nva[i]
                keep[2 * i] = entry.name = _from_buffer(name)
                keep[2 * i + 1] = entry.value = _from_buffer(value)
                entry.namelen = len(name)
                entry.valuelen = len(value)
        self._last_fields = tuple(fields)
        return nva

    def consume(self, sid: int, n: int) -> None:
        """The consumer relayed ``n`` body bytes of ``sid``: reopen the windows."""
        stream = self.streams.get(sid)
        if stream is None or self._session is None:
            return  # closed: its unconsumed bytes went back to the connection window
        stream.unconsumed -= n
        self._lib.nghttp2_session_consume(self._session, sid, n)

    def reset(self, sid: int, code: int = ng.CANCEL) -> None:
        if sid in self.streams and self._session is not None:
            self._lib.nghttp2_submit_rst_stream(self._session, ng.FLAG_NONE, sid, code)

    def ping(self) -> None:
        if self._session is not None:
            self._lib.nghttp2_submit_ping(self._session, ng.FLAG_NONE, _PING)

    def goaway(self) -> None:
        """Tell the server this connection takes no more (no stream is open)."""
        if self._session is not None:
            self._lib.nghttp2_session_terminate_session(self._session, ng.NO_ERROR)

    # -- callbacks (called by nghttp2 during receive/data_to_send) -----------------------

    def _on_header(self, frame, name, namelen, value, valuelen) -> int:
        """Plain Python only: compiled, fieldsink's C callback collects the fields."""
        # an empty value may come as NULL, which unpack refuses
        if self._sink.add(frame.hd.stream_id, _unpack(name, namelen),
                          _unpack(value, valuelen) if valuelen else b""):
            return ng.ERR_TEMPORAL_CALLBACK_FAILURE  # past the limit: the stream is reset
        return 0

    def _on_invalid_header(self, frame) -> int:
        self._count("invalid_response_field")
        return ng.ERR_TEMPORAL_CALLBACK_FAILURE  # nghttp2 resets the stream

    def _on_frame_recv(self, frame) -> int:
        hd = frame.hd
        kind = hd.type
        if kind == _HEADERS:
            sid = hd.stream_id
            fields = self._sink.take(sid)  # taken whatever the stream: the sink is empty
            stream = self.streams.get(sid)
            if stream is not None:
                self._headers_done(stream, fields)
                if hd.flags & _END_STREAM:
                    self.events.append((END, sid, None))
            return 0
        if kind == _DATA:
            if hd.flags & _END_STREAM:
                sid = hd.stream_id
                if sid in self.streams:
                    self.events.append((END, sid, None))
            return 0
        if kind == ng.GOAWAY:
            last = frame.goaway.last_stream_id
            self.goaway_last = last
            self.events.append((GOAWAY, 0, (last, frame.goaway.error_code)))
            return 0
        elif kind == ng.SETTINGS:
            if not hd.flags & ng.FLAG_ACK:
                self.events.append((SETTINGS, 0, None))
            return 0
        elif kind == ng.PING:
            if hd.flags & ng.FLAG_ACK:
                self.events.append((PONG, 0, None))
            return 0
        return 0

    def _headers_done(self, stream: _ClientStream, fields) -> None:
        """A header block of ``stream`` received whole (the sink's list: possibly a
        remembered one, shared, so it is never changed here or after)."""
        if stream.headed:
            self.events.append((TRAILERS, stream.sid, fields))
            return
        if fields is self._head_fields:  # the same head as the last one
            self.events.append((HEAD, stream.sid, self._head_payload))
            stream.headed = True
            return
        status, rest, length = head = _translate_head(fields)
        if status >= 200:
            stream.headed = True
            self._head_fields, self._head_payload = fields, head
            self.events.append((HEAD, stream.sid, head))
        else:
            self.events.append((INTERIM, stream.sid, (status, rest)))

    def _on_data(self, sid: int, ptr, n: int) -> int:
        self._on_chunk(sid, _unpack(ptr, n) if n else b"")
        return 0

    def _on_chunk(self, sid: int, data: bytes) -> None:
        stream = self.streams.get(sid)
        if stream is None:  # (nghttp2 gives the connection's window back whatever)
            self._lib.nghttp2_session_consume(self._session, sid, len(data))
            return
        stream.unconsumed += len(data)
        self.events.append((DATA, sid, data))

    def _on_stream_close(self, sid: int, code: int) -> int:
        stream = self._forget(sid)
        if stream is None:
            return 0
        self.events.append((CLOSED, sid, code))
        kept = self._kept
        if len(kept) < STREAMS_KEPT:
            kept.append(stream)
        return 0
