"""What the HTTP/2 server and client sessions share on libnghttp2: driving the C session
(bytes in, bytes to send, want_read/want_write), the outgoing body of a stream (a
per-stream queue a data provider pulls from, deferring when empty), and the process's
one table of C callbacks.

The callbacks find their session through ``user_data`` and call its ``_on_*`` methods,
so one table serves both :class:`~forkproxy.http2.session.ServerSession` (requests in,
responses out) and :class:`~forkproxy.http2.client.ClientSession` (requests out,
responses in): each implements the same handful of methods for its side.
"""

from __future__ import annotations

from collections import deque

from forkproxy.http2 import nghttp2 as ng
from forkproxy.http2 import sendpath

ffi = ng.ffi
_memmove = ffi.memmove
#: the out-of-line FFI's from_handle is the C function itself (cffi.FFI wraps it in a
#: Python method: one call more per callback, ten callbacks per request)
_from_handle = ffi.from_handle
#: bytes from a char pointer in one call (ffi.buffer(p, n)[:] is two, ~0.2 µs more;
#: the header callbacks and the send loop pass char pointers for it)
_unpack = ffi.unpack
_DATA_FLAG_EOF = ng.DATA_FLAG_EOF
#: frames drained in C (forkproxy/http2/sendpath.py) when it is compiled
_DRAIN = sendpath.drain if sendpath.COMPILED else None


class OutStream:
    """A stream's outgoing body: chunks not yet taken by nghttp2, and how it ends."""

    __slots__ = ("sid", "out", "out_size", "offset", "eof", "trailers", "deferred")

    def __init__(self, sid: int):
        self.sid = sid
        self.out: deque = deque()  # body chunks not yet taken by nghttp2
        self.out_size = 0
        self.offset = 0  # into out[0]
        self.eof = False
        self.trailers = None
        self.deferred = False


class SessionBase:
    """One nghttp2 session (either side) and the Python state its callbacks fill."""

    def __init__(self):
        self._lib = ng.library()
        self.events: deque = deque()
        self.streams: dict = {}
        self.stream_errors: dict[str, int] = {}
        self.failed: str | None = None  # why the connection is being torn down
        self._exc: BaseException | None = None
        self._handle = ffi.new_handle(self)  # alive as long as the C session
        #: nghttp2's user_data: a pointer whose first member is the handle (the callbacks
        #: below take it as ``void **``); the server's is its C field sink's struct
        #: (forkproxy/http2/fieldsink.py), whose first member is the handle too
        self._user_data = ffi.new("void *[1]", [self._handle])
        self._out_ptr = ffi.new("const uint8_t **")
        # the same pointer seen as char: bytes by one unpack (see _unpack)
        self._out_chars = ffi.cast("const char **", self._out_ptr)
        self._session = None
        self._session_addr = 0  # the C session's address (sendpath.drain)
        self._mem_send = 0  # nghttp2_session_mem_send's (sendpath.drain)

    #: whether the session's ``_on_frame_send`` needs calling
    FRAME_SEND = True
    #: the C on_header callback's address (fieldsink.header_callback), 0: the Python one
    HEADER_CALLBACK = 0
    #: C callbacks registered instead of the Python ones: (name, address) pairs, names
    #: "frame_recv", "frame_send", "data_chunk", "stream_close" (fieldsink's)
    C_CALLBACKS: tuple = ()

    def _create(self, create) -> None:
        """The C session, made by ``create`` (nghttp2_session_server_new2 or
        client_new2) with the options :meth:`_set_options` chose."""
        lib = self._lib
        opt_p = ffi.new("nghttp2_option **")
        if lib.nghttp2_option_new(opt_p) != 0:
            raise MemoryError("nghttp2_option_new")
        opt = opt_p[0]
        try:
            self._set_options(lib, opt)
            sp = ffi.new("nghttp2_session **")
            table = CALLBACKS.get(lib, self.FRAME_SEND, self.HEADER_CALLBACK,
                                  self.C_CALLBACKS)
            if create(sp, table, self._user_data, opt) != 0:
                raise MemoryError("nghttp2 session")
        finally:
            lib.nghttp2_option_del(opt)
        self._session = sp[0]
        self._session_addr = int(ffi.cast("intptr_t", sp[0]))
        self._mem_send = CALLBACKS.mem_send(lib)

    def _set_options(self, lib, opt) -> None:
        """Both sides give windows back themselves, once the consumer took the bytes."""
        lib.nghttp2_option_set_no_auto_window_update(opt, 1)

    def _settings(self, entries) -> None:
        iv = ffi.new("nghttp2_settings_entry[]", entries)
        rv = self._lib.nghttp2_submit_settings(self._session, ng.FLAG_NONE, iv, len(iv))
        if rv != 0:
            self.close()
            raise ValueError(f"nghttp2_submit_settings: {ng.strerror(rv)}")

    def close(self) -> None:
        if self._session is not None:
            self._lib.nghttp2_session_del(self._session)
            self._session = None
            self.streams.clear()

    def __del__(self):
        self.close()

    # -- driving -------------------------------------------------------------------------

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
        if _DRAIN is not None:  # the loop below in C: one call
            data = _DRAIN(self._session_addr, self._mem_send)
            if data.__class__ is tuple:  # (the bytes before an error, the error)
                self._after_call()
                self.failed = self.failed or "send_failed"
                return data[0]
            if self._exc is not None:
                self._after_call()
            return data
        lib, session, ptr, chars = self._lib, self._session, self._out_ptr, self._out_chars
        chunks = []
        while True:
            n = lib.nghttp2_session_mem_send(session, ptr)
            if n <= 0:
                self._after_call()
                if n < 0:
                    self.failed = self.failed or "send_failed"
                break
            chunks.append(_unpack(chars[0], n))
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

    def _forget(self, sid: int):
        """Pop a closed stream (None if unknown): its received bytes nobody consumed go
        back to the connection window."""
        stream = self.streams.pop(sid, None)
        if stream is not None and stream.unconsumed:
            self._lib.nghttp2_session_consume_connection(self._session, stream.unconsumed)
        return stream

    def _store(self, exc: BaseException) -> int:
        self._exc = exc
        return ng.ERR_CALLBACK_FAILURE

    # -- a stream's outgoing body --------------------------------------------------------

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
            flags[0] |= _DATA_FLAG_EOF
            if stream.trailers:
                flags[0] |= ng.DATA_FLAG_NO_END_STREAM
                nva, keep = nv(stream.trailers)
                self._lib.nghttp2_submit_trailer(self._session, sid, nva, len(keep) // 2)
            return n
        if n == 0:
            stream.deferred = True
            return ng.ERR_DEFERRED
        return n

    @staticmethod
    def _take(stream: OutStream, buf, length: int) -> int:
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

    def send_data(self, sid: int, data) -> bool:
        """Queue body bytes of ``sid``; False: the stream is gone (stop producing)."""
        stream = self.streams.get(sid)
        if stream is None:
            return False
        if data:
            stream.out.append(data)
            stream.out_size += len(data)
            self._resume(stream)
        return True

    def end(self, sid: int, trailers=None) -> None:
        """The body of ``sid`` is complete; ``trailers``: fields sent after it."""
        stream = self.streams.get(sid)
        if stream is None:
            return
        stream.eof = True
        stream.trailers = trailers
        self._resume(stream)

    def _resume(self, stream: OutStream) -> None:
        if stream.deferred:
            stream.deferred = False
            self._lib.nghttp2_session_resume_data(self._session, stream.sid)

    def pending(self, sid: int) -> int:
        """Body bytes of ``sid`` queued but not yet framed (0 if the stream is gone)."""
        stream = self.streams.get(sid)
        return stream.out_size if stream is not None else 0

    def send_window(self, sid: int) -> int:
        """What the peer's flow control lets the stream send now (<= 0: closed)."""
        lib, s = self._lib, self._session
        if s is None:
            return 0
        return min(lib.nghttp2_session_get_stream_remote_window_size(s, sid),
                   lib.nghttp2_session_get_remote_window_size(s))

    @staticmethod
    def data_provider():
        """The data provider that pulls from a stream's queue (see _read_body): one for
        every stream, nghttp2 copies the struct."""
        return CALLBACKS.provider


#: header lists whose nghttp2_nv arrays are kept (see nv); cleared when full
NV_KEPT = 64
#: hashes of header lists seen once (a list is kept the second time it comes)
NV_SEEN = 1024
_nv_kept: dict = {}
_nv_seen: set = set()


def nv(pairs):
    """An nghttp2_nv array for ``pairs``, and the buffers it points into: keep them
    alive until the submit call returns (nghttp2 copies the fields, so an array may be
    submitted again).

    A header list that comes a second time has its array kept (up to NV_KEPT lists) and
    reused from then on: a proxied gRPC call's response head and trailers are most often
    the same call after call, and building an array cost ~6 µs here (a pointer object
    per name and value and an initialiser tuple per field). Lists seen once (a request
    id in them) are never kept, so they neither evict the others nor pile up for the
    garbage collector; :func:`nv_once` skips the look-up for a list known to be new."""
    try:
        key = tuple(pairs)
        kept = _nv_kept.get(key)
    except TypeError:  # a bytearray or memoryview among them: not hashable
        return nv_once(pairs)
    if kept is not None:
        return kept
    kept = nv_once(pairs)
    seen = _nv_seen
    h = hash(key)
    if h not in seen:
        if len(seen) >= NV_SEEN:
            seen.clear()
        seen.add(h)
    else:
        if len(_nv_kept) >= NV_KEPT:
            _nv_kept.clear()
        _nv_kept[key] = kept
    return kept


def nv_once(pairs):
    """:func:`nv` without keeping the array."""
    from_buffer = ffi.from_buffer
    keep = [from_buffer(x) for pair in pairs for x in pair]
    nva = ffi.new("nghttp2_nv[]", [(keep[2 * i], keep[2 * i + 1], len(a), len(b), 0)
                                   for i, (a, b) in enumerate(pairs)])
    return nva, keep


# -- the process's one set of C callbacks: user_data -> the session ---------------------

def _failure(exc, value, tb):
    """cffi's onerror: the last line of defence (a bug before the session was found)."""
    return ng.ERR_CALLBACK_FAILURE


# One C callback per event, each written out (a generic *args trampoline cost ~0.5 us
# more per call, and a request makes ~12 calls): find the session through user_data,
# call its method, and store (never propagate into C) whatever it raises.
# Names, values and body chunks arrive as ``const char *`` (nghttp2 says uint8_t: the
# same ABI; the table entries are cast to nghttp2's types), so ``ffi.unpack`` makes the
# bytes in one call: ``ffi.buffer(p, n)[:]`` made a buffer object and then the bytes,
# ~0.85 against ~0.2 µs, twice per header field.
_FRAME_CB = "int(nghttp2_session *, const nghttp2_frame *, void **)"
_HEADER_CB = ("int(nghttp2_session *, const nghttp2_frame *, const char *, size_t,"
              " const char *, size_t, uint8_t, void **)")


@ffi.callback(_HEADER_CB, onerror=_failure)
def _cb_header(s, frame, name, namelen, value, valuelen, flags, ud):
    session = _from_handle(ud[0])
    try:
        return session._on_header(frame, name, namelen, value, valuelen)
    except BaseException as e:
        return session._store(e)


@ffi.callback(_HEADER_CB, onerror=_failure)
def _cb_invalid_header(s, frame, name, namelen, value, valuelen, flags, ud):
    session = _from_handle(ud[0])
    try:
        return session._on_invalid_header(frame)
    except BaseException as e:
        return session._store(e)


@ffi.callback(_FRAME_CB, onerror=_failure)
def _cb_frame_recv(s, frame, ud):
    session = _from_handle(ud[0])
    try:
        return session._on_frame_recv(frame)
    except BaseException as e:
        return session._store(e)


@ffi.callback(_FRAME_CB, onerror=_failure)
def _cb_frame_send(s, frame, ud):
    session = _from_handle(ud[0])
    try:
        return session._on_frame_send(frame)
    except BaseException as e:
        return session._store(e)


@ffi.callback("int(nghttp2_session *, int32_t, uint32_t, void **)", onerror=_failure)
def _cb_stream_close(s, sid, code, ud):
    session = _from_handle(ud[0])
    try:
        return session._on_stream_close(sid, code)
    except BaseException as e:
        return session._store(e)


@ffi.callback("int(nghttp2_session *, uint8_t, int32_t, const char *, size_t, void **)",
              onerror=_failure)
def _cb_data_chunk(s, flags, sid, data, n, ud):
    session = _from_handle(ud[0])
    try:
        return session._on_data(sid, data, n)
    except BaseException as e:
        return session._store(e)


@ffi.callback("ssize_t(nghttp2_session *, int32_t, uint8_t *, size_t, uint32_t *,"
              " nghttp2_data_source *, void **)", onerror=_failure)
def _cb_read_body(s, sid, buf, length, flags, source, ud):
    session = _from_handle(ud[0])
    try:
        return session._read_body(sid, buf, length, flags)
    except BaseException as e:
        return session._store(e)


def frame_callback_addresses() -> tuple[int, int]:
    """The addresses of the Python frame-received and frame-sent callbacks (the
    server's C ones hand them the frames they do not queue: forkproxy/http2/fieldsink.py)."""
    return (int(ffi.cast("intptr_t", _cb_frame_recv)),
            int(ffi.cast("intptr_t", _cb_frame_send)))


class _Callbacks:
    """The nghttp2_session_callbacks tables, built once per process on first use: the
    server's, and the client's, which has no frame-sent callback (a C to Python call
    per frame sent that the client has nothing to do in)."""

    def __init__(self):
        self._tables: dict[tuple[bool, int, tuple], object] = {}
        self.provider = None
        #: the data provider of whole bodies (sendpath.BodySource, read in C): its
        #: source.ptr is set per response (nghttp2 copies the struct at submit)
        self.whole = None
        self._mem_send = 0

    def mem_send(self, lib) -> int:
        """The address of nghttp2_session_mem_send (for sendpath.drain)."""
        addr = self._mem_send
        if not addr:
            addr = self._mem_send = int(ffi.cast(
                "intptr_t", ffi.addressof(lib, "nghttp2_session_mem_send")))
        return addr

    def get(self, lib, frame_send: bool = True, header_callback: int = 0,
            c_callbacks: tuple = ()):
        """The table; ``header_callback``: the address of a C on_header callback to
        register instead of the Python one (0: the Python one); ``c_callbacks``: more
        such, as (name, address) pairs (see SessionBase.C_CALLBACKS)."""
        key = (frame_send, header_callback, c_callbacks)
        table = self._tables.get(key)
        if table is None:
            c = dict(c_callbacks)
            if self.provider is None:
                prd = ffi.new("nghttp2_data_provider *")
                prd.read_callback = ffi.cast("nghttp2_data_source_read_callback",
                                             _cb_read_body)
                self.provider = prd
                if sendpath.COMPILED:
                    whole = ffi.new("nghttp2_data_provider *")
                    whole.read_callback = ffi.cast("nghttp2_data_source_read_callback",
                                                   sendpath.read_callback())
                    self.whole = whole
            p = ffi.new("nghttp2_session_callbacks **")
            if lib.nghttp2_session_callbacks_new(p) != 0:
                raise MemoryError("nghttp2_session_callbacks_new")
            table = p[0]
            lib.nghttp2_session_callbacks_set_on_header_callback(
                table, ffi.cast("nghttp2_on_header_callback", header_callback or _cb_header))
            lib.nghttp2_session_callbacks_set_on_invalid_header_callback(
                table, ffi.cast("nghttp2_on_invalid_header_callback", _cb_invalid_header))
            lib.nghttp2_session_callbacks_set_on_frame_recv_callback(
                table, ffi.cast("nghttp2_on_frame_recv_callback",
                                c.get("frame_recv") or _cb_frame_recv))
            if frame_send:
                lib.nghttp2_session_callbacks_set_on_frame_send_callback(
                    table, ffi.cast("nghttp2_on_frame_send_callback",
                                    c.get("frame_send") or _cb_frame_send))
            lib.nghttp2_session_callbacks_set_on_stream_close_callback(
                table, ffi.cast("nghttp2_on_stream_close_callback",
                                c.get("stream_close") or _cb_stream_close))
            lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
                table, ffi.cast("nghttp2_on_data_chunk_recv_callback",
                                c.get("data_chunk") or _cb_data_chunk))
            self._tables[key] = table  # never freed: nghttp2 copies it into each session
        return table


CALLBACKS = _Callbacks()
