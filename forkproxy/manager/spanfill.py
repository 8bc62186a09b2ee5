# cython: boundscheck=False, wraparound=False
"""Span templates filled in C: a batch's requests written into a reused buffer by one
compiled loop (Cython compiles this file with spanfill.pxd's C types: setup.py COMPILED).

spantemplate.py splits a shape's serialised spans into constants and fixed-width slots.
A :class:`Template` holds them as one image (the constants, each slot zeroed) and the
slots' offsets and kinds. :meth:`Filler.encode_fast` copies each request's image into the
batch's buffer, stores its ids, its times in Unix nanoseconds (C doubles, truncated as
``int()`` truncates), its phase spans' ids and the server span's length in place, and
appends the cached variable attributes: no Python call per request but the caches'
look-ups, no ``struct.pack`` of ~60 arguments.

The C parts that plain Python has no words for (memcpy, stores of C integers, a field
read at its offset) are C functions in spanfill.pxd with Python equivalents here under
the same names. Run as plain Python it writes the same bytes, more slowly than the
generated ``struct`` fill: spans.py uses it only when compiled (``COMPILED``);
tests/test_tracing.py checks both fills against the protobuf builder in both builds.
"""

from __future__ import annotations

from array import array
from struct import pack_into

from forkproxy.context import RequestContext

try:
    import cython

    COMPILED = cython.compiled
except ImportError:  # no Cython where the package runs: it is plain Python
    COMPILED = False

#: slot kinds (spantemplate.SLOT_FORMATS' names): time i in Unix nanoseconds is
#: K_TIME + i, the id of phase span i K_CHILD + i
K_TID, K_SID, K_PSID, K_START, K_END, K_VN, K_TIME, K_CHILD = 0, 1, 2, 3, 4, 5, 16, 32
#: the server span's length is a 2-byte varint in a template: shorter bodies only
MAX_BODY = 1 << 14
#: a buffer's first size (grown when a request's spans would not fit: they are
#: measured first)
FIRST_BUFFER = 1 << 16
#: room left at the start of a buffer for the export request's envelope (the enclosing
#: messages' tags and lengths, the resource and the scope: Filler.take)
HEAD_ROOM = 512
#: buffers kept for reuse once their export request was sent (a new one of ~0.5 MiB per
#: batch would cost its page faults every time)
SPARE_BUFFERS = 2


def slot_kind(name: str) -> int:
    """A slot's kind from its name in spantemplate.SLOT_FORMATS ("vn" the length)."""
    fixed = {"tid": K_TID, "sid": K_SID, "psid": K_PSID, "start": K_START, "end": K_END,
             "vn": K_VN}
    if name in fixed:
        return fixed[name]
    return (K_TIME if name[0] == "n" else K_CHILD) + int(name[1:])


def slot_width(kind: int) -> int:
    return 16 if kind == K_TID else 2 if kind == K_VN else 8


class Template:
    """One shape's spans as an image and its slots (``fill`` and ``body_len`` are the
    struct-packing fill's: spantemplate.compile_fill)."""

    def __init__(self, pieces: list, body_len: int, fill):
        image = bytearray()
        offsets = []
        kinds = []
        for what, val in pieces:
            if what == "const":
                image += val
            else:
                kind = slot_kind(val)
                offsets.append(len(image))
                kinds.append(kind)
                image += bytes(slot_width(kind))
        self.image = bytes(image)
        self.size = len(image)
        self.offsets = array("i", offsets)
        self.kinds = array("i", kinds)
        self.nslots = len(offsets)
        self.body_len = body_len
        self.fill = fill


# -- stores and loads: C functions in spanfill.pxd when compiled, these otherwise ------


def _put(buf, at, data):
    """Copies ``data`` into ``buf`` at ``at``; returns the offset after it."""
    end = at + len(data)
    buf[at:end] = data
    return end


def _put_u64(buf, at, v):
    """Stores ``v`` as 8 little-endian bytes (protobuf's fixed64, our child ids)."""
    pack_into("<Q", buf, at, v)


def _le_u64(data):
    """The first 8 bytes of ``data`` as a little-endian integer."""
    return int.from_bytes(data[:8], "little")


def _member_offset(descr):
    """What locates a field of a record: compiled, its offset in the object (from the
    struct's member descriptor, as CPython's own LOAD_ATTR_SLOT finds it); here its
    name, for getattr."""
    return descr.__name__


# compiled, these names are spanfill.pxd's C functions and the module's dict entries are
# not used (gevent's way of giving pure-Python mode a fallback for C code)
locals().update(fp_put=_put, fp_put_u64=_put_u64, fp_le_u64=_le_u64, fp_member=getattr,
                fp_member_offset=_member_offset)

#: where RequestContext's fields are (fp_member(ctx, O_PATH) is ctx.path)
O_TS, O_LISTENER, O_REMOTE, O_METHOD, O_PATH, O_STATUS, O_BYTES_IN, O_BYTES_OUT, \
    O_UPSTREAM, O_UPSTREAM_ADDR, O_REUSED, O_TLS_RESUMED, O_TLS_VERSION, O_TIMES, O_ERROR, \
    O_RETRIES, O_PROTOCOL, O_ROUTE, O_TRACE_ID, O_SPAN_ID, O_PARENT_SPAN_ID, \
    O_TRACESTATE = [
        fp_member_offset(RequestContext.__dict__[name]) for name in (  # noqa: F821
            "ts", "listener", "remote", "method", "path", "status", "bytes_in", "bytes_out",
            "upstream", "upstream_addr", "reused", "tls_resumed", "tls_version", "times",
            "error", "retries", "protocol", "route", "trace_id", "span_id",
            "parent_span_id", "tracestate")]


def to_ns(t, off):
    """A worker's monotonic time in Unix nanoseconds (as spans.SpanEncoder.add computes
    it: ``int((t + off) * 1e9)``)."""
    return int((t + off) * 1e9)


def phase_bits(t0, t1, t2, t3, t4, t5, t6, t7):
    """Which phase spans a request has (their times present and in order), one bit
    each: the shape keys' common part, for a decoded record and a C struct alike."""
    return ((t0 != 0 and t1 != 0 and t1 >= t0)
            | (t0 != 0 and t2 != 0 and t2 >= t0) << 1
            | (t3 != 0 and t4 != 0 and t4 >= t3) << 2
            | (t4 != 0 and t5 != 0 and t5 >= t4) << 3
            | (t5 != 0 and t6 != 0 and t6 >= t5) << 4
            | (t6 != 0 and t7 != 0 and t7 >= t6) << 5)


def shape_bits(ctx, times):
    """The part of ctx's shape key that is not a label: its ids' lengths and its
    phase_bits (``times``: ctx.times, N_TIMES of them)."""
    m = fp_member  # noqa: F821
    return (len(m(ctx, O_TRACE_ID)) << 8 | len(m(ctx, O_SPAN_ID)) << 4
            | len(m(ctx, O_PARENT_SPAN_ID))) << 6 | phase_bits(
                times[0], times[1], times[2], times[3], times[4], times[5], times[6],
                times[7])


def shape_key(ctx, times) -> tuple:
    """The key of ctx's template: the labels of its server span, and shape_bits."""
    m = fp_member  # noqa: F821
    return (m(ctx, O_LISTENER), m(ctx, O_ROUTE), m(ctx, O_UPSTREAM), m(ctx, O_UPSTREAM_ADDR),
            m(ctx, O_METHOD), m(ctx, O_STATUS), m(ctx, O_ERROR), m(ctx, O_TLS_VERSION),
            m(ctx, O_TLS_RESUMED), m(ctx, O_REUSED), m(ctx, O_RETRIES), m(ctx, O_PROTOCOL),
            shape_bits(ctx, times))


def same_shape(ctx, bits, key):
    """Whether ctx's shape key (its shape_bits ``bits``) is ``key``, compared field by
    field: no tuple made, nothing hashed."""
    m = fp_member  # noqa: F821
    return (bits == key[12] and m(ctx, O_LISTENER) == key[0] and m(ctx, O_ROUTE) == key[1]
            and m(ctx, O_UPSTREAM) == key[2] and m(ctx, O_UPSTREAM_ADDR) == key[3]
            and m(ctx, O_METHOD) == key[4] and m(ctx, O_STATUS) == key[5]
            and m(ctx, O_ERROR) == key[6] and m(ctx, O_TLS_VERSION) == key[7]
            and m(ctx, O_TLS_RESUMED) is key[8] and m(ctx, O_REUSED) is key[9]
            and m(ctx, O_RETRIES) == key[10] and m(ctx, O_PROTOCOL) == key[11])


def put_attrs(buf, at, a_path, a_client, a_out, a_in, a_state):
    """A request's variable attributes after its template's image: the path and the
    client always, the body sizes and the tracestate when it had them (each given as
    its serialised attribute, b"" for none). Returns the offset after them. Both fills
    write them so: this one's and rawspans' from the C struct."""
    at = fp_put(buf, at, a_path)  # noqa: F821
    at = fp_put(buf, at, a_client)  # noqa: F821
    if a_out:
        at = fp_put(buf, at, a_out)  # noqa: F821
    if a_in:
        at = fp_put(buf, at, a_in)  # noqa: F821
    if a_state:
        at = fp_put(buf, at, a_state)  # noqa: F821
    return at


def fill_slots(buf, pos, tpl, ctx, times, sid, base, body):
    """Stores a request's ids, times (Unix nanoseconds), phase span ids and server span
    length (``body``, a 2-byte varint) in the slots of its template's image at ``pos``."""
    m = fp_member  # noqa: F821
    t7 = times[7]
    ts = m(ctx, O_TS)
    off = ts - t7
    for s in range(tpl.nslots):
        kind = tpl.kinds[s]
        at = pos + tpl.offsets[s]
        if kind >= K_CHILD:
            fp_put_u64(buf, at, base ^ (kind - K_CHILD))  # noqa: F821
        elif kind >= K_TIME:
            fp_put_u64(buf, at, to_ns(times[kind - K_TIME], off))  # noqa: F821
        elif kind == K_TID:
            fp_put(buf, at, m(ctx, O_TRACE_ID))  # noqa: F821
        elif kind == K_SID:
            fp_put(buf, at, sid)  # noqa: F821
        elif kind == K_PSID:
            fp_put(buf, at, m(ctx, O_PARENT_SPAN_ID))  # noqa: F821
        elif kind == K_END:
            fp_put_u64(buf, at, to_ns(t7, off))  # noqa: F821
        elif kind == K_START:  # accept, else the request head, else the end
            t = times[0]
            if t == 0:
                t = times[2]
            if t == 0:
                t = t7
            fp_put_u64(buf, at, to_ns(t, off))  # noqa: F821
        else:  # K_VN
            buf[at] = (body & 0x7F) | 0x80
            buf[at + 1] = body >> 7


class Filler:
    """The compiled fill of a SpanEncoder's templates (``tpls``: spantemplate.Templates,
    whose caches of templates and attributes it shares)."""

    def __init__(self, tpls):
        self.tpls = tpls
        self.buf = bytearray(FIRST_BUFFER)
        self.pos = HEAD_ROOM  # the spans written since the last take() end here
        self.spare = []
        self.fast = 0
        #: requests in the open export request (SpanEncoder.count: a C field here, which
        #: rawspans.RawTrace reads and writes once per batch of records)
        self.count = 0

    def reserve(self, used, need):
        """Grows the buffer to at least ``need`` bytes, keeping its first ``used``."""
        size = len(self.buf)
        while size < need:
            size *= 2
        buf = bytearray(size)
        buf[:used] = self.buf[:used]
        self.buf = buf

    def written(self):
        """The bytes of spans written since the last take()."""
        return self.pos - HEAD_ROOM

    def add(self, data):
        """Appends spans serialised elsewhere (the slow builder's)."""
        end = self.pos + len(data)
        if end > len(self.buf):
            self.reserve(self.pos, end)
        self.pos = fp_put(self.buf, self.pos, data)  # noqa: F821

    def take(self, prefix):
        """``prefix`` (the envelope) and the spans written since the last call, as a view
        of their buffer, which is the caller's until it gives it back (recycle); the
        next spans go into another buffer."""
        buf = self.buf
        pos = self.pos
        self.buf = self.spare.pop() if self.spare else bytearray(len(buf))
        self.pos = HEAD_ROOM
        if len(prefix) > HEAD_ROOM:  # a very long service name: copied
            return memoryview(prefix + buf[HEAD_ROOM:pos])
        start = HEAD_ROOM - len(prefix)
        buf[start:HEAD_ROOM] = prefix
        return memoryview(buf)[start:pos]

    def recycle(self, view):
        """Takes back a buffer take() gave out, once its bytes were sent."""
        buf = view.obj
        view.release()
        if type(buf) is bytearray and len(self.spare) < SPARE_BUFFERS:
            self.spare.append(buf)

    def discard(self):
        """Forgets the spans written since the last take()."""
        self.pos = HEAD_ROOM

    def encode_fast(self, batch, slow):
        """Writes the spans of the requests in ``batch`` that have a template after those
        written before (see take); appends the others to ``slow``."""
        tpls = self.tpls
        templates = tpls.templates
        paths = tpls.paths
        clients = tpls.clients
        sizes = tpls.sizes
        m = fp_member  # noqa: F821
        buf = self.buf
        max_body = MAX_BODY
        pos = self.pos
        last_key = None
        last_tpl = None
        for ctx in batch:
            if type(ctx) is not RequestContext:  # the offsets below are its fields'
                slow.append(ctx)
                continue
            times = m(ctx, O_TIMES)
            if len(times) != 8:  # not N_TIMES times (never from this version's workers)
                slow.append(ctx)
                continue
            if last_key is not None and same_shape(ctx, shape_bits(ctx, times), last_key):
                tpl = last_tpl  # the shape of the request before: compared, not hashed
            else:
                key = shape_key(ctx, times)
                found = templates.get(key)
                if found is None:
                    found = tpls.make(ctx, key)
                if found is False:
                    slow.append(ctx)
                    continue
                tpl = found
                last_key = key
                last_tpl = tpl
            sid = m(ctx, O_SPAN_ID)
            base = fp_le_u64(sid)  # noqa: F821 (8 bytes: the key holds the ids' lengths)
            if base < 8:  # a child id would be 0 (base ^ i)
                slow.append(ctx)
                continue
            path = m(ctx, O_PATH)
            remote = m(ctx, O_REMOTE)
            a_path = paths.get(path) or tpls.path_miss(path)
            a_client = clients.get(remote) or tpls.miss(clients, "client.address", remote)
            a_out = a_in = a_state = b""
            size = m(ctx, O_BYTES_OUT)
            if size:
                a_out = sizes.get(size) or tpls.miss(sizes, "http.response.body.size", size)
            size = m(ctx, O_BYTES_IN)
            if size:
                a_in = sizes.get(-size) or tpls.miss(sizes, "http.request.body.size", size,
                                                     -size)
            state = m(ctx, O_TRACESTATE)
            if state:
                a_state = tpls.value(None, state)
            extra = len(a_path) + len(a_client) + len(a_out) + len(a_in) + len(a_state)
            body = tpl.body_len + extra
            if body >= max_body:  # a longer length than the template's 2-byte varint
                slow.append(ctx)
                continue
            end = pos + tpl.size + extra
            if end > len(buf):
                self.reserve(pos, end)
                buf = self.buf
            fp_put(buf, pos, tpl.image)  # noqa: F821
            fill_slots(buf, pos, tpl, ctx, times, sid, base, body)
            pos = put_attrs(buf, pos + tpl.size, a_path, a_client, a_out, a_in, a_state)
            self.pos = pos
            self.fast += 1

