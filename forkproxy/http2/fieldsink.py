"""A header block's fields collected in C: one call into Python per HEADERS frame, not
one per field (Cython compiles this file with fieldsink.pxd's C: setup.py COMPILED).

libnghttp2 calls its on_header callback once per decoded field. Through cffi each call
is a C to Python call with eight arguments converted, ~1.5 µs here, five to ten per
request. Compiled, :class:`CFieldSink` gives nghttp2 a C callback
(``fp_on_header`` in fieldsink.pxd) that copies each field of the block into a buffer
(no Python, no GIL), and :meth:`CFieldSink.take` makes the block's list of ``(name,
value)`` bytes in one call when the HEADERS frame has been received. The sink is the
session's nghttp2 ``user_data``; its first member is the session's cffi handle, through
which the Python callbacks find their session.

Both sinks keep the same bound as before: past the header list size limit (RFC 9113
section 6.5.2's size, SETTINGS_MAX_HEADER_LIST_SIZE) a block's fields are dropped, not
stored, and :meth:`take` gives None (431); nothing else is checked here: nghttp2's
checks, the invalid-field callback and forkproxy/http2/translate.py stay as they were.
As plain Python (no compiler, or FORKPROXY_PURE_PYTHON=1), :class:`PyFieldSink` collects
the same way from the session's Python header callback.

The upstream client (forkproxy/http2/client.py) asks for two things more. ``fail``: a
block past the limit fails the C callback with NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE,
so nghttp2 resets that stream (a response head too large is the upstream's fault, not
answered with a 431). ``memo``: the compiled sink remembers its last two blocks (a
response's head and its trailers) and their lists, and a block byte for byte the same
as one of them is given as the same list again, not made anew: a gRPC server's heads
and trailers repeat call after call (the head within its ``date``'s second), and the
client keeps its translation of such a list (an ``is`` test). A remembered list is
shared: nobody may change it.

The client's other receive callbacks are C too when compiled (:func:`client_callbacks`):
frames it acts on, DATA chunks (copied) and stream closes are queued in the sink while
nghttp2 runs, and :meth:`CFieldSink.drain` gives them to Python in order once the call
into nghttp2 returned: one call into Python per read instead of one per event (cffi's
callback machinery was ~25% of the client session's receive).

The server session (forkproxy/http2/session.py) queues its events the same way
(:func:`server_callbacks`): header blocks (a block past the limit as None, for the
431), DATA chunks, DATA's END_STREAM, stream closes, and the DATA frames and
END_STREAMs it sent. The frames it must act on during the call (RST_STREAM, control
frames, GOAWAY, an empty DATA frame: its limits stop nghttp2 mid-read) go to its Python
callbacks at once (:meth:`CFieldSink.set_python_callbacks`), which handle the queue
first, so the order is that of one callback per event.
"""

from __future__ import annotations

try:
    import cython

    COMPILED = cython.compiled
except ImportError:  # no Cython where the package runs: it is plain Python
    COMPILED = False


class PyFieldSink:
    """The plain-Python sink, filled by the session's Python header callback."""

    __slots__ = ("limit", "sid", "size", "oversize", "fields")

    #: no C callback: the session registers its Python one
    address = 0

    def __init__(self, limit: int):
        self.limit = limit
        self.sid = 0
        self.size = 0
        self.oversize = False
        self.fields: list[tuple[bytes, bytes]] = []

    def add(self, sid: int, name: bytes, value: bytes) -> bool:
        """One field of stream ``sid``'s block (what fp_on_header does in C); True when
        this field took the block past the limit."""
        if sid != self.sid:  # a new block (blocks never interleave)
            self.sid = sid
            self.size = 0
            self.oversize = False
            self.fields = []
        elif self.oversize:
            return False
        size = self.size = self.size + len(name) + len(value) + 32
        if size > self.limit:
            self.oversize = True
            self.fields = []
            return True
        self.fields.append((name, value))
        return False

    def take(self, sid: int):
        """Block ``sid``'s fields, None if it passed the limit; the sink is then empty."""
        if sid != self.sid:  # a block without fields
            return []
        self.sid = 0
        fields, self.fields = self.fields, []
        if self.oversize:
            self.oversize = False
            return None
        return fields


class CFieldSink:
    """The compiled sink: nghttp2's user_data, filled by the C callback. Only made when
    COMPILED (its methods are C functions of fieldsink.pxd)."""

    def __init__(self, limit: int, fail: bool = False, memo: bool = False):
        fp_sink_init(cython.address(self.sink), limit, fail, memo)  # noqa: F821

    def __dealloc__(self):
        fp_sink_dealloc(cython.address(self.sink))  # noqa: F821

    @property
    def address(self) -> int:
        """Where the C struct is: nghttp2's user_data (its first member the handle)."""
        return fp_sink_address(cython.address(self.sink))  # noqa: F821

    def take(self, sid: int):
        """Block ``sid``'s fields, None if it passed the limit; the sink is then empty."""
        return fp_sink_take(cython.address(self.sink), sid)  # noqa: F821

    def set_python_callbacks(self, frame_recv: int, frame_send: int) -> None:
        """The Python frame-received and frame-sent callbacks the server's C ones hand
        the frames they do not queue to (server_callbacks)."""
        fp_sink_set_py_callbacks(cython.address(self.sink), frame_recv,  # noqa: F821
                                 frame_send)

    def drain(self):
        """The client's events queued by its C callbacks (client_callbacks), in order,
        as (EV_* kind, stream id, payload); None if there are none. The queue is then
        empty."""
        return fp_sink_drain(cython.address(self.sink))  # noqa: F821


def header_callback() -> int:
    """The address of the C on_header callback; 0 when this module runs as plain Python."""
    if COMPILED:
        return fp_header_callback_address()  # noqa: F821
    return 0


#: the kinds of the client's queued events (fieldsink.pxd's FP_EV_*)
EV_HEADERS, EV_HEADERS_END, EV_DATA, EV_END, EV_CLOSED, EV_GOAWAY, EV_SETTINGS, EV_PONG = \
    range(1, 9)
#: and the server's header blocks: a request's, another (trailers); each with END_STREAM
EV_REQUEST, EV_REQUEST_END, EV_BLOCK, EV_BLOCK_END = range(9, 13)
#: and the frames it sent: DATA, DATA with END_STREAM, HEADERS with END_STREAM
EV_SENT_DATA, EV_SENT_DATA_END, EV_SENT_HEADERS_END = range(13, 16)


def client_callbacks() -> tuple[tuple[str, int], ...]:
    """The upstream client's C callbacks that queue its events in the sink (frames
    received, DATA chunks, streams closed), as (nghttp2 callback name, address) pairs;
    empty when this module runs as plain Python (the client's Python callbacks then)."""
    if COMPILED:
        return (("frame_recv", fp_client_frame_recv_address()),  # noqa: F821
                ("data_chunk", fp_client_data_chunk_address()),  # noqa: F821
                ("stream_close", fp_client_stream_close_address()))  # noqa: F821
    return ()


def server_callbacks() -> tuple[tuple[str, int], ...]:
    """The server session's C callbacks (header blocks, DATA chunks, the END_STREAM of
    DATA, stream closes, DATA frames and END_STREAM sent queued in the sink; every other
    frame received or sent handed to the Python callbacks given to
    :meth:`CFieldSink.set_python_callbacks`); empty when this module runs as plain
    Python. The chunk and close callbacks are the client's: they queue the same events."""
    if COMPILED:
        return (("frame_recv", fp_server_frame_recv_address()),  # noqa: F821
                ("frame_send", fp_server_frame_send_address()),  # noqa: F821
                ("data_chunk", fp_client_data_chunk_address()),  # noqa: F821
                ("stream_close", fp_client_stream_close_address()))  # noqa: F821
    return ()


def new_sink(limit: int, fail: bool = False, memo: bool = False):
    """A sink for one session: the C one when compiled (``fail`` and ``memo``: see the
    module's docstring; the plain-Python sink has no memo, and its session's callback
    fails an oversize block itself)."""
    return CFieldSink(limit, fail, memo) if COMPILED else PyFieldSink(limit)
