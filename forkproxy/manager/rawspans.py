# cython: boundscheck=False, wraparound=False
"""Spans from ring records read into C structs (compiled only: rawbatch.py's record path).

The manager's compiled record path (rawbatch.py) scans each ring record into one reused
C struct (rawrecord.pxd) and never makes its Python object. :class:`RawTrace` applies the
sampling rules to that struct (sampling.sample_batch's rules: rawrecord's
fp_may_sample), keeps the tracer's queue bound and counts, and has
:class:`RawFiller` (spanfill.Filler with a fill from the struct) write the request's spans
into the open export request while the batch's bytes are there: the same template
image, slots and cached attributes as Filler.encode_fast, read from the struct (ids and
strings point into the batch's bytes). What it cannot write (a shape without a template
yet, an id the templates leave to the builder) is decoded by msgspec and appended as an
object; records the scanner does not take are decoded and offered to
Tracer.offer_batch. As plain Python this module is imported but never used: the
Collector then decodes every record. tests/test_tracing_raw.py checks the bytes against
the object path; docs/BENCHMARKS.md "Tracing cost in the manager", round 4.
"""

from __future__ import annotations

import msgspec

from forkproxy.context import decoder
from forkproxy.manager import spanfill
from forkproxy.manager.spanfill import Filler, slot_kind

#: the template slots' kinds (spanfill's, C ints there and here) and the longest server span
K_TID, K_SID, K_PSID, K_START, K_END, K_TIME, K_CHILD = [
    slot_kind(name) for name in ("tid", "sid", "psid", "start", "end", "n0", "c0")]
MAX_BODY = spanfill.MAX_BODY


class RawFiller(Filler):
    """spanfill.Filler that also writes a request's spans from its C struct (fill_rec)."""

    def __init__(self, tpls):
        super().__init__(tpls)
        self.r_key = None  # fill_rec's last shape and its template
        self.r_tpl = None
        self.sizes = tpls.sizes  # the body sizes' attributes (cleared, never replaced)
        #: the last record's path and client, and their attributes (_rec_attrs)
        self.last_path = self.last_client = None
        self.last_a_path = self.last_a_client = b""
        #: fill_rec's paths and clients by their bytes: the ids' str and attributes
        self.path_names, self.path_attrs, self.client_names, self.client_attrs = [], [], [], []

    def begin_raw(self):
        """Before a batch of fill_rec: forgets the last shape it saw (its template may
        have been evicted), and the paths and clients seen once FP_NAMES_MAX were."""
        self.r_key = None
        self.r_tpl = None
        if not self.path_tab:  # made on first use (~1 MiB each)
            self.path_tab = fp_names_new()  # noqa: F821
            self.client_tab = fp_names_new()  # noqa: F821
        if len(self.path_names) > FP_NAMES_MAX or len(self.client_names) > FP_NAMES_MAX:  # noqa: F821
            fp_names_clear(self.path_tab)  # noqa: F821
            fp_names_clear(self.client_tab)  # noqa: F821
            self.path_names, self.path_attrs = [], []
            self.client_names, self.client_attrs = [], []

    def __dealloc__(self):
        fp_free(self.path_tab)  # noqa: F821
        fp_free(self.client_tab)  # noqa: F821

    def _rec_attrs(self, r):
        """The record's url.path and client.address attributes, serialised: the last
        record's when its bytes are the same (a keep-alive connection's requests come
        together), else found by their bytes (fp_intern: no str made but the first
        time), else the caches'."""
        if self.last_path is not None and fp_str_is(r.path, self.last_path):  # noqa: F821
            a_path = self.last_a_path
        else:
            a_path = self._path_attr(r)
        if self.last_client is not None and fp_str_is(r.remote, self.last_client):  # noqa: F821
            return a_path, self.last_a_client
        tpls = self.tpls
        i = fp_intern(self.client_tab, self.client_names, r.remote)  # noqa: F821
        if i < len(self.client_attrs):
            a_client = self.client_attrs[i]
        else:
            remote = self.client_names[i]
            a_client = tpls.clients.get(remote) or tpls.miss(tpls.clients, "client.address",
                                                             remote)
            self.client_attrs.append(a_client)
        self.last_client = self.client_names[i]
        self.last_a_client = a_client
        return a_path, a_client

    def _path_attr(self, r):
        """_rec_attrs' url.path attribute found by the path's bytes."""
        i = fp_intern(self.path_tab, self.path_names, r.path)  # noqa: F821
        if i < len(self.path_attrs):
            a_path = self.path_attrs[i]
        else:
            path = self.path_names[i]
            a_path = self.tpls.paths.get(path) or self.tpls.path_miss(path)
            self.path_attrs.append(a_path)
        self.last_path = self.path_names[i]
        self.last_a_path = a_path
        return a_path

    def _rec_bits(self, r):
        """shape_bits of the record in ``r``."""
        ids = r.trace_id.n << 8 | r.span_id.n << 4 | r.parent_span_id.n
        return ids << 6 | phase_bits(r.t[0], r.t[1], r.t[2], r.t[3], r.t[4],  # noqa: F821
                                     r.t[5], r.t[6], r.t[7])

    def _rec_key(self, r, bits):
        """shape_key of the record in ``r`` (its strings made: only when its shape is not
        the last record's)."""
        s = fp_str_new  # noqa: F821
        resumed = None if r.tls_resumed < 0 else r.tls_resumed == 1
        return (s(r.listener), s(r.route), s(r.upstream), s(r.upstream_addr), s(r.method),
                r.status, s(r.error), s(r.tls_version), resumed, r.reused != 0, r.retries,
                s(r.protocol), bits)

    def _rec_same(self, r, bits, key):
        """Whether the record's shape key is ``key`` (compared in place, nothing made)."""
        eq = fp_str_is  # noqa: F821
        resumed = None if r.tls_resumed < 0 else r.tls_resumed == 1
        return (bits == key[12] and r.status == key[5] and r.retries == key[10]
                and eq(r.listener, key[0]) and eq(r.route, key[1])
                and eq(r.upstream, key[2]) and eq(r.upstream_addr, key[3])
                and eq(r.method, key[4]) and eq(r.error, key[6])
                and eq(r.tls_version, key[7]) and resumed is key[8]
                and (r.reused != 0) is key[9] and eq(r.protocol, key[11]))

    def _rec_slots(self, pos, tpl, r, base, body):
        """fill_slots for the record in ``r``."""
        buf = self.buf
        t7 = r.t[7]
        off = r.ts - t7
        for s in range(tpl.nslots):
            kind = tpl.kinds[s]
            at = pos + tpl.offsets[s]
            if kind >= K_CHILD:
                fp_put_u64(buf, at, base ^ (kind - K_CHILD))  # noqa: F821
            elif kind >= K_TIME:
                fp_put_u64(buf, at, fp_to_ns(r.t[kind - K_TIME], off))  # noqa: F821
            elif kind == K_TID:
                fp_put_str(buf, at, r.trace_id)  # noqa: F821
            elif kind == K_SID:
                fp_put_str(buf, at, r.span_id)  # noqa: F821
            elif kind == K_PSID:
                fp_put_str(buf, at, r.parent_span_id)  # noqa: F821
            elif kind == K_END:
                fp_put_u64(buf, at, fp_to_ns(t7, off))  # noqa: F821
            elif kind == K_START:
                t = r.t[0]
                if t == 0:
                    t = r.t[2]
                if t == 0:
                    t = t7
                fp_put_u64(buf, at, fp_to_ns(t, off))  # noqa: F821
            else:  # K_VN
                buf[at] = (body & 0x7F) | 0x80
                buf[at + 1] = body >> 7

    def fill_rec(self, r):
        """encode_fast for one record read into the C struct ``r`` (its strings point
        into the batch's bytes): 1 if its spans were written, 0 if it has no template
        yet, or the template cannot take it (the caller decodes it for append)."""
        bits = self._rec_bits(r)
        key = self.r_key
        if key is not None and self._rec_same(r, bits, key):
            tpl = self.r_tpl
        else:
            key = self._rec_key(r, bits)
            found = self.tpls.templates.get(key)
            if found is None or found is False:
                return 0
            tpl = found
            self.r_key = key
            self.r_tpl = tpl
        base = fp_le_u64_at(r.span_id.p)  # noqa: F821 (8 bytes: the key says so)
        if base < 8:  # a child id would be 0 (base ^ i)
            return 0
        tpls = self.tpls
        a_path, a_client = self._rec_attrs(r)
        a_out = a_in = a_state = b""
        sizes = self.sizes
        size = r.bytes_out
        if size:
            a_out = sizes.get(size) or tpls.miss(sizes, "http.response.body.size", size)
        size = r.bytes_in
        if size:
            a_in = sizes.get(-size) or tpls.miss(sizes, "http.request.body.size", size,
                                                 -size)
        if r.tracestate.n:
            a_state = tpls.value(None, fp_str_new(r.tracestate))  # noqa: F821
        extra = len(a_path) + len(a_client) + len(a_out) + len(a_in) + len(a_state)
        body = tpl.body_len + extra
        if body >= MAX_BODY:  # a longer length than the template's 2-byte varint
            return 0
        pos = self.pos
        end = pos + tpl.size + extra
        if end > len(self.buf):
            self.reserve(pos, end)
        buf = self.buf
        fp_put(buf, pos, tpl.image)  # noqa: F821
        self._rec_slots(pos, tpl, r, base, body)
        self.pos = put_attrs(  # noqa: F821
            buf, pos + tpl.size, a_path, a_client, a_out, a_in, a_state)
        self.fast += 1
        return 1


class RawTrace:
    """One batch's sampling and spans from the C structs (RawBatch.process, in the
    metrics pass, and RawBatch.trace): :meth:`begin` takes the tracer's rules, room and
    open export request; :meth:`rec` each record scanned; :meth:`end` gives back the
    counts. ``objs``: records for Tracer.offer_batch (decoded: the scanner's leftovers);
    ``error``: an exception from encoding (the rest of the batch is not traced; the
    tracer drops its open export request, as offer_batch does)."""

    def __init__(self):
        self.on = False
        self.owner = None  # the tracer whose TraceState ``st`` is
        self.st = None
        self.tracer = None
        self.enc = None
        self.filler = None
        self.objs = []
        self.error = None

    def begin(self, tracer):
        """Takes the tracer's rules, room and open export request from its TraceState
        (C fields; the state found once per tracer: no Python attribute read per batch)."""
        if tracer is not self.owner:
            self.owner = tracer
            self.st = tracer.state
        st = self.st
        self.everything = st.everything
        self.below = st.below
        self.slower_than = st.slower_than
        self.tracer = tracer
        self.enc = st.enc
        self.filler = st.filler
        self.size = st.size
        self.room = st.queue_size - st.queued
        self.count = self.filler.count  # the open export request's
        self.sampled = self.dropped = self.kept = 0
        if self.objs:  # Tracer.offer_raw takes them (and leaves an empty list)
            self.objs = []
        self.error = None
        self.filler.begin_raw()
        self.on = True

    def rec(self, r, view, start, end):
        """The record scanned into ``r`` (its bytes: view[start:end]): sampled or not,
        and if so its spans written (or it is dropped for want of room)."""
        try:
            keep = fp_may_sample(r, self.everything, self.below, self.slower_than)  # noqa: F821
            if keep < 0:  # a trace id that is not 16 bytes: sample_batch decides
                self.decoded(view, start, end)
                return
            if not keep:
                return
            self.sampled += 1
            if self.room <= 0:
                self.dropped += 1
                return
            self.room -= 1
            self.kept += 1
            if self.filler.fill_rec(r):
                self.count += 1
            else:
                self._append(view, start, end)
            if self.count >= self.size:
                self.filler.count = self.count
                self.tracer._close_batch()
                self.count = 0
        except Exception as e:  # a bug in encoding: never break the record path
            self.error = e
            self.on = False

    def decoded(self, view, start, end):
        """A record for the object path (Tracer.offer_batch), decoded."""
        try:
            self.objs.append(decoder.decode(view[start:end]))
        except msgspec.DecodeError:
            pass

    def _append(self, view, start, end):
        """A sampled record fill_rec did not take, decoded for SpanEncoder.append (its
        spans not written, e.g. times protobuf cannot hold: that request alone is lost,
        and counted)."""
        self.filler.count = self.count
        try:
            self.enc.append([decoder.decode(view[start:end])])
        except Exception as e:  # the builder raised before writing anything
            self.kept -= 1
            self.tracer._failed(1, f"encoding: {e!r}")
        self.count = self.filler.count

    def end(self):
        """The batch's counts into the tracer's TraceState."""
        if self.tracer is None:
            return
        self.filler.count = self.count
        st = self.st
        st.sampled += self.sampled
        st.dropped += self.dropped
        st.queued += self.kept
        self.tracer = self.enc = self.filler = None
        self.on = False
