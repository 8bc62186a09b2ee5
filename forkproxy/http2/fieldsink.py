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

    def add(self, sid: int, name: bytes, value: bytes) -> None:
        """One field of stream ``sid``'s block (what fp_on_header does in C)."""
        if sid != self.sid:  # a new block (blocks never interleave)
            self.sid = sid
            self.size = 0
            self.oversize = False
            self.fields = []
        elif self.oversize:
            return
        size = self.size = self.size + len(name) + len(value) + 32
        if size > self.limit:
            self.oversize = True
            self.fields = []
            return
        self.fields.append((name, value))

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

    def __init__(self, limit: int):
        fp_sink_init(cython.address(self.sink), limit)  # noqa: F821

    def __dealloc__(self):
        fp_sink_free(cython.address(self.sink))  # noqa: F821

    @property
    def address(self) -> int:
        """Where the C struct is: nghttp2's user_data (its first member the handle)."""
        return fp_sink_address(cython.address(self.sink))  # noqa: F821

    def take(self, sid: int):
        """Block ``sid``'s fields, None if it passed the limit; the sink is then empty."""
        return fp_sink_take(cython.address(self.sink), sid)  # noqa: F821


def header_callback() -> int:
    """The address of the C on_header callback; 0 when this module runs as plain Python."""
    if COMPILED:
        return fp_header_callback_address()  # noqa: F821
    return 0


def new_sink(limit: int):
    """A sink for one session: the C one when compiled."""
    return CFieldSink(limit) if COMPILED else PyFieldSink(limit)
