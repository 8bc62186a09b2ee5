"""cffi (ABI mode) binding to the system's libnghttp2: a declared subset of its API.

Why nghttp2 and not the pure-Python ``h2``: the framing, HPACK and flow control of one
request cost about a fifth of the CPU in C (docs/BENCHMARKS.md, "HTTP/2 engine").
ABI mode needs no compiler: the declarations below were written from Debian's
``nghttp2.h`` (libnghttp2-dev 1.52) and only the runtime ``libnghttp2.so.14`` is loaded.
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

import cffi

__all__ = ["Nghttp2Unavailable", "ffi", "library", "self_test", "MIN_VERSION"]

ffi = cffi.FFI()
ffi.cdef("""
typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef struct nghttp2_option nghttp2_option;

typedef struct { int age; int version_num; const char *version_str; const char *proto_str; }
    nghttp2_info;
/* nghttp2.h declares the name and value as uint8_t *: char * has the same layout and
   lets one ffi.new() initialise a whole array from ffi.from_buffer() pointers */
typedef struct { char *name; char *value; size_t namelen; size_t valuelen; uint8_t flags; }
    nghttp2_nv;
typedef struct { size_t length; int32_t stream_id; uint8_t type; uint8_t flags; uint8_t reserved; }
    nghttp2_frame_hd;
typedef struct { int32_t stream_id; int32_t weight; uint8_t exclusive; } nghttp2_priority_spec;
typedef struct { nghttp2_frame_hd hd; size_t padlen; } nghttp2_data;
typedef struct { nghttp2_frame_hd hd; size_t padlen; nghttp2_priority_spec pri_spec;
                 nghttp2_nv *nva; size_t nvlen; int cat; } nghttp2_headers;
typedef struct { nghttp2_frame_hd hd; nghttp2_priority_spec pri_spec; } nghttp2_priority;
typedef struct { nghttp2_frame_hd hd; uint32_t error_code; } nghttp2_rst_stream;
typedef struct { int32_t settings_id; uint32_t value; } nghttp2_settings_entry;
typedef struct { nghttp2_frame_hd hd; size_t niv; nghttp2_settings_entry *iv; } nghttp2_settings;
typedef struct { nghttp2_frame_hd hd; size_t padlen; nghttp2_nv *nva; size_t nvlen;
                 int32_t promised_stream_id; uint8_t reserved; } nghttp2_push_promise;
typedef struct { nghttp2_frame_hd hd; uint8_t opaque_data[8]; } nghttp2_ping;
typedef struct { nghttp2_frame_hd hd; int32_t last_stream_id; uint32_t error_code;
                 uint8_t *opaque_data; size_t opaque_data_len; uint8_t reserved; } nghttp2_goaway;
typedef struct { nghttp2_frame_hd hd; int32_t window_size_increment; uint8_t reserved; }
    nghttp2_window_update;
typedef struct { nghttp2_frame_hd hd; void *payload; } nghttp2_extension;
typedef union {
    nghttp2_frame_hd hd; nghttp2_data data; nghttp2_headers headers; nghttp2_priority priority;
    nghttp2_rst_stream rst_stream; nghttp2_settings settings; nghttp2_push_promise push_promise;
    nghttp2_ping ping; nghttp2_goaway goaway; nghttp2_window_update window_update;
    nghttp2_extension ext;
} nghttp2_frame;
typedef union { int fd; void *ptr; } nghttp2_data_source;
typedef ssize_t (*nghttp2_data_source_read_callback)(
    nghttp2_session *, int32_t, uint8_t *, size_t, uint32_t *, nghttp2_data_source *, void *);
typedef struct { nghttp2_data_source source; nghttp2_data_source_read_callback read_callback; }
    nghttp2_data_provider;

typedef int (*nghttp2_on_frame_recv_callback)(nghttp2_session *, const nghttp2_frame *, void *);
typedef int (*nghttp2_on_frame_send_callback)(nghttp2_session *, const nghttp2_frame *, void *);
typedef int (*nghttp2_on_begin_headers_callback)(nghttp2_session *, const nghttp2_frame *, void *);
typedef int (*nghttp2_on_header_callback)(nghttp2_session *, const nghttp2_frame *,
    const uint8_t *, size_t, const uint8_t *, size_t, uint8_t, void *);
typedef int (*nghttp2_on_invalid_header_callback)(nghttp2_session *, const nghttp2_frame *,
    const uint8_t *, size_t, const uint8_t *, size_t, uint8_t, void *);
typedef int (*nghttp2_on_data_chunk_recv_callback)(nghttp2_session *, uint8_t, int32_t,
    const uint8_t *, size_t, void *);
typedef int (*nghttp2_on_stream_close_callback)(nghttp2_session *, int32_t, uint32_t, void *);
typedef int (*nghttp2_on_begin_frame_callback)(nghttp2_session *, const nghttp2_frame_hd *, void *);

nghttp2_info *nghttp2_version(int least_version);
const char *nghttp2_strerror(int lib_error_code);

int nghttp2_session_callbacks_new(nghttp2_session_callbacks **callbacks_ptr);
void nghttp2_session_callbacks_del(nghttp2_session_callbacks *callbacks);
void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *,
    nghttp2_on_frame_recv_callback);
void nghttp2_session_callbacks_set_on_frame_send_callback(nghttp2_session_callbacks *,
    nghttp2_on_frame_send_callback);
void nghttp2_session_callbacks_set_on_begin_headers_callback(nghttp2_session_callbacks *,
    nghttp2_on_begin_headers_callback);
void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *,
    nghttp2_on_header_callback);
void nghttp2_session_callbacks_set_on_invalid_header_callback(nghttp2_session_callbacks *,
    nghttp2_on_invalid_header_callback);
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *,
    nghttp2_on_data_chunk_recv_callback);
void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *,
    nghttp2_on_stream_close_callback);
void nghttp2_session_callbacks_set_on_begin_frame_callback(nghttp2_session_callbacks *,
    nghttp2_on_begin_frame_callback);

int nghttp2_option_new(nghttp2_option **option_ptr);
void nghttp2_option_del(nghttp2_option *option);
void nghttp2_option_set_no_auto_window_update(nghttp2_option *option, int val);
void nghttp2_option_set_max_deflate_dynamic_table_size(nghttp2_option *option, size_t val);
void nghttp2_option_set_max_outbound_ack(nghttp2_option *option, size_t val);
void nghttp2_option_set_max_settings(nghttp2_option *option, size_t val);
void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *option, uint64_t burst,
    uint64_t rate);
void nghttp2_option_set_max_continuations(nghttp2_option *option, size_t val);
void nghttp2_option_set_no_closed_streams(nghttp2_option *option, int val);

int nghttp2_session_server_new2(nghttp2_session **session_ptr,
    const nghttp2_session_callbacks *callbacks, void *user_data, const nghttp2_option *option);
int nghttp2_session_client_new(nghttp2_session **session_ptr,
    const nghttp2_session_callbacks *callbacks, void *user_data);
int nghttp2_session_client_new2(nghttp2_session **session_ptr,
    const nghttp2_session_callbacks *callbacks, void *user_data, const nghttp2_option *option);
uint32_t nghttp2_session_get_remote_settings(nghttp2_session *session, int id);
int nghttp2_submit_window_update(nghttp2_session *session, uint8_t flags, int32_t stream_id,
    int32_t window_size_increment);
void nghttp2_session_del(nghttp2_session *session);
ssize_t nghttp2_session_mem_recv(nghttp2_session *session, const uint8_t *in, size_t inlen);
ssize_t nghttp2_session_mem_send(nghttp2_session *session, const uint8_t **data_ptr);
int nghttp2_session_want_read(nghttp2_session *session);
int nghttp2_session_want_write(nghttp2_session *session);
int nghttp2_session_resume_data(nghttp2_session *session, int32_t stream_id);
int nghttp2_session_consume(nghttp2_session *session, int32_t stream_id, size_t size);
int nghttp2_session_consume_connection(nghttp2_session *session, size_t size);
int32_t nghttp2_session_get_stream_remote_window_size(nghttp2_session *session,
    int32_t stream_id);
int32_t nghttp2_session_get_remote_window_size(nghttp2_session *session);
int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *session);
int nghttp2_session_terminate_session(nghttp2_session *session, uint32_t error_code);

int nghttp2_submit_settings(nghttp2_session *session, uint8_t flags,
    const nghttp2_settings_entry *iv, size_t niv);
int nghttp2_submit_response(nghttp2_session *session, int32_t stream_id,
    const nghttp2_nv *nva, size_t nvlen, const nghttp2_data_provider *data_prd);
int32_t nghttp2_submit_headers(nghttp2_session *session, uint8_t flags, int32_t stream_id,
    const nghttp2_priority_spec *pri_spec, const nghttp2_nv *nva, size_t nvlen,
    void *stream_user_data);
int nghttp2_submit_trailer(nghttp2_session *session, int32_t stream_id,
    const nghttp2_nv *nva, size_t nvlen);
int nghttp2_submit_rst_stream(nghttp2_session *session, uint8_t flags, int32_t stream_id,
    uint32_t error_code);
int nghttp2_submit_goaway(nghttp2_session *session, uint8_t flags, int32_t last_stream_id,
    uint32_t error_code, const uint8_t *opaque_data, size_t opaque_data_len);
int nghttp2_submit_shutdown_notice(nghttp2_session *session);
int nghttp2_submit_ping(nghttp2_session *session, uint8_t flags, const uint8_t *opaque_data);
int32_t nghttp2_submit_request(nghttp2_session *session, const nghttp2_priority_spec *pri_spec,
    const nghttp2_nv *nva, size_t nvlen, const nghttp2_data_provider *data_prd,
    void *stream_user_data);
""")

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
            # every declared function must resolve (a missing one raises AttributeError);
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
