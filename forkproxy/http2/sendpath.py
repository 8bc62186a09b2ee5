"""The session's send side in C (Cython compiles this file with sendpath.pxd's C:
setup.py COMPILED): a response body known whole when its head is submitted, read by
nghttp2 from C, and the frames to send drained in one call.

Through cffi, nghttp2's data-provider callback was a C to Python call converting seven
arguments plus the Python that copied the queued chunk, once per response; and
``nghttp2_session_mem_send`` hands out one frame per call, so sending a turn's frames
was a Python loop of cffi calls and ``ffi.unpack`` per frame. Compiled:

- :class:`BodySource` holds a body that is all there is of a response (an HTTP/1.1
  upstream's Content-Length body that came with its head), and ``fp_read_body`` (C) is
  the data provider that copies it into nghttp2's frames, flow control deciding how
  much each time, and ends the stream after its last byte. The session keeps the
  source with its stream until the stream closes (nghttp2 reads it only while open).
- :func:`drain` calls ``nghttp2_session_mem_send`` until it has nothing more and gives
  the frames as one bytes object. The session's Python callbacks still run inside it
  (they take the GIL, which is held throughout) and store what they raise, as before.

As plain Python (no compiler, or FORKPROXY_PURE_PYTHON=1) :data:`COMPILED` is False
and the session keeps its Python data provider and send loop.
"""

from __future__ import annotations

try:
    import cython

    COMPILED = cython.compiled
except ImportError:  # no Cython where the package runs: it is plain Python
    COMPILED = False


class BodySource:
    """A whole response body for ``fp_read_body``; only made when COMPILED (its methods
    are C functions of sendpath.pxd)."""

    def __init__(self, data: bytes):
        self.data = data  # kept alive: the C struct points into it
        fp_body_init(cython.address(self.body), data)  # noqa: F821

    @property
    def address(self) -> int:
        """The C struct: the data provider's ``source.ptr``."""
        return fp_body_address(cython.address(self.body))  # noqa: F821


def read_callback() -> int:
    """The address of the C data provider; 0 when this module runs as plain Python."""
    if COMPILED:
        return fp_read_body_address()  # noqa: F821
    return 0


def drain(session: int, mem_send: int):
    """Every frame nghttp2 has to send now, as one bytes object; ``session`` and
    ``mem_send`` are the addresses of the C session and of nghttp2_session_mem_send.
    On an error, ``(the bytes before it, the error code)``. Only when COMPILED."""
    return fp_drain(session, mem_send)  # noqa: F821
