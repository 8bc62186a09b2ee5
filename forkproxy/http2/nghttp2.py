"""cffi (ABI mode) binding to the system's libnghttp2: a declared subset of its API.

Why nghttp2 and not the pure-Python ``h2``: the framing, HPACK and flow control of one
request cost about a fifth of the CPU in C (docs/BENCHMARKS.md, "HTTP/2 engine").
ABI mode needs no compiler: the declarations (forkproxy/http2/nghttp2_decls.py) were
written from Debian's ``nghttp2.h`` (libnghttp2-dev 1.52) and only the runtime
``libnghttp2.so.14`` is loaded. They are parsed once, when ``scripts/gen-nghttp2-ffi``
writes ``_nghttp2_ffi.py`` (cffi's out-of-line ABI mode): at run time no process loads
cffi's C parser (pycparser and its tables, ~1.8 MiB in every process tree).
Struct layouts are therefore trusted, not checked by a compiler; :func:`self_test`
proves them at start by a real client/server round trip through the library.

Callback rules (they are C function pointers called from inside nghttp2):
- a Python exception must never unwind through C: every callback catches, stores the
  exception on its session and returns ``NGHTTP2_ERR_CALLBACK_FAILURE``; the caller of
  the C function re-raises it once the C call has returned (forkproxy/http2/session.py);
- the cffi callback objects are made once per process (module globals) and each
  session's Python object travels through ``user_data`` as an ``ffi.new_handle`` that
  the session keeps alive for as long as the C session exists.
"""

from __future__ import annotations

from forkproxy.http2 import _nghttp2_ffi

__all__ = ["Nghttp2Unavailable", "ffi", "library", "self_test", "MIN_VERSION"]

ffi = _nghttp2_ffi.ffi

#: the oldest libnghttp2 this binding was written against (Debian 12's 1.52.0 with the
#: backported rapid-reset and CONTINUATION limits: the two option setters below exist)
MIN_VERSION = 0x013400
SONAMES = ("libnghttp2.so.14",)

# -- constants (nghttp2.h; stable ABI values) -------------------------------------------
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
FLAG_NONE = 0
FLAG_END_STREAM = 0x01
FLAG_ACK = 0x01
FLAG_END_HEADERS = 0x04
HCAT_REQUEST = 0
HCAT_RESPONSE = 1
HCAT_PUSH_RESPONSE = 2
HCAT_HEADERS = 3
DATA_FLAG_EOF = 0x01
DATA_FLAG_NO_END_STREAM = 0x02
NV_FLAG_NONE = 0

SETTINGS_HEADER_TABLE_SIZE = 0x01
SETTINGS_ENABLE_PUSH = 0x02
SETTINGS_MAX_CONCURRENT_STREAMS = 0x03
SETTINGS_INITIAL_WINDOW_SIZE = 0x04
SETTINGS_MAX_FRAME_SIZE = 0x05
SETTINGS_MAX_HEADER_LIST_SIZE = 0x06

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB
HTTP_1_1_REQUIRED = 0xD

ERR_INVALID_ARGUMENT = -501
ERR_DEFERRED = -508
ERR_STREAM_CLOSED = -510
ERR_INVALID_STATE = -519
ERR_TEMPORAL_CALLBACK_FAILURE = -521
ERR_FATAL = -900
ERR_CALLBACK_FAILURE = -902
ERR_BAD_CLIENT_MAGIC = -903
ERR_FLOODED = -904
ERR_TOO_MANY_CONTINUATIONS = -905

#: the stream id of the first GOAWAY of a graceful shutdown (RFC 9113 section 6.8)
MAX_STREAM_ID = (1 << 31) - 1


class Nghttp2Unavailable(RuntimeError):
    """libnghttp2 cannot be used in this process; the message says why."""


_lib = None
_refusal: str | None = None


def library():
    """The loaded library (once per process); raises Nghttp2Unavailable with the reason."""
    global _lib, _refusal
    if _lib is not None:
        return _lib
    if _refusal is not None:
        raise Nghttp2Unavailable(_refusal)
    errors = []
    for name in SONAMES:
        try:
            lib = ffi.dlopen(name)
        except OSError as e:
            errors.append(str(e))
            continue
        try:
            info = lib.nghttp2_version(0)
            version = info.version_num
            # every declared function must resolve (a missing one raises AttributeError)
            # resolving nghttp2_session_del here also keeps a session's __del__, which
            # the garbage collector may run inside a cffi call holding cffi's lock, from
            # needing that lock to look the function up (a deadlock otherwise)
            for fn in ("nghttp2_session_del", "nghttp2_option_set_stream_reset_rate_limit",
                       "nghttp2_option_set_max_continuations", "nghttp2_session_server_new2",
                       "nghttp2_session_client_new2", "nghttp2_session_get_remote_settings"):
                getattr(lib, fn)
        except AttributeError as e:
            errors.append(f"{name}: {e}")
            continue
        if version < MIN_VERSION:
            errors.append(f"{name} is version {ffi.string(info.version_str).decode()}, "
                          f"forkproxy needs >= 1.52.0")
            continue
        _lib = lib
        return lib
    _refusal = ("libnghttp2 unavailable (install Debian's libnghttp2-14): "
                + "; ".join(errors))
    raise Nghttp2Unavailable(_refusal)


def version_string() -> str:
    return ffi.string(library().nghttp2_version(0).version_str).decode()


def strerror(code: int) -> str:
    return ffi.string(library().nghttp2_strerror(code)).decode("ascii", "replace")


# -- self-test: one request and its response through a C client and a C server ----------

_seen: dict[int, list[int]] = {}


@ffi.callback("int(nghttp2_session *, const nghttp2_frame *, void *)",
              onerror=lambda *exc: ERR_CALLBACK_FAILURE)
def _count_frame(session, frame, user_data):
    # onerror: even a bug here returns a failure code to C instead of unwinding
    _seen[int(ffi.cast("intptr_t", user_data))].append(frame.hd.type)
    return 0


def _drain(lib, session, out: bytearray) -> None:
    ptr = ffi.new("const uint8_t **")
    while True:
        n = lib.nghttp2_session_mem_send(session, ptr)
        if n < 0:
            raise Nghttp2Unavailable(f"self-test: mem_send failed: {strerror(n)}")
        if n == 0:
            return
        out += ffi.buffer(ptr[0], n)


def _nv(pairs):
    keep = [(ffi.from_buffer(n), ffi.from_buffer(v)) for n, v in pairs]
    nva = ffi.new("nghttp2_nv[]", [(kn, kv, len(n), len(v), 0)
                                   for (kn, kv), (n, v) in zip(keep, pairs, strict=True)])
    return nva, keep


def self_test() -> str:
    """Prove the declared layouts and calls against the loaded library: a client session
    sends a GET, a server session answers 200; both must see the other's HEADERS.
    Returns the library's version string; raises Nghttp2Unavailable."""
    lib = library()
    cbs = ffi.new("nghttp2_session_callbacks **")
    if lib.nghttp2_session_callbacks_new(cbs) != 0:
        raise Nghttp2Unavailable("self-test: nghttp2_session_callbacks_new failed")
    lib.nghttp2_session_callbacks_set_on_frame_recv_callback(cbs[0], _count_frame)
    client_p, server_p = ffi.new("nghttp2_session **"), ffi.new("nghttp2_session **")
    _seen[1], _seen[2] = [], []
    try:
        if (lib.nghttp2_session_client_new(client_p, cbs[0], ffi.cast("void *", 1)) != 0
                or lib.nghttp2_session_server_new2(server_p, cbs[0], ffi.cast("void *", 2),
                                                   ffi.NULL) != 0):
            raise Nghttp2Unavailable("self-test: cannot create sessions")
        client, server = client_p[0], server_p[0]
        lib.nghttp2_submit_settings(client, 0, ffi.NULL, 0)
        lib.nghttp2_submit_settings(server, 0, ffi.NULL, 0)
        nva, keep = _nv([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"),
                         (b":authority", b"self-test")])
        sid = lib.nghttp2_submit_request(client, ffi.NULL, nva, 4, ffi.NULL, ffi.NULL)
        wire = bytearray()
        _drain(lib, client, wire)
        if lib.nghttp2_session_mem_recv(server, bytes(wire), len(wire)) != len(wire):
            raise Nghttp2Unavailable("self-test: the server rejected the client's request")
        resp, keep2 = _nv([(b":status", b"200")])
        if lib.nghttp2_submit_response(server, sid, resp, 1, ffi.NULL) != 0:
            raise Nghttp2Unavailable("self-test: nghttp2_submit_response failed")
        wire = bytearray()
        _drain(lib, server, wire)
        if lib.nghttp2_session_mem_recv(client, bytes(wire), len(wire)) != len(wire):
            raise Nghttp2Unavailable("self-test: the client rejected the server's response")
        if HEADERS not in _seen[2] or HEADERS not in _seen[1] or sid != 1:
            raise Nghttp2Unavailable(f"self-test: frames not seen (server {_seen[2]}, "
                                     f"client {_seen[1]}): the declared layouts are wrong")
        del keep, keep2
    finally:
        for p in (client_p, server_p):
            if p[0] != ffi.NULL:
                lib.nghttp2_session_del(p[0])
        lib.nghttp2_session_callbacks_del(cbs[0])
        _seen.clear()
    return version_string()
