# cython: boundscheck=False, wraparound=False
"""The manager's record path without a Python object per record (compiled only).

A batch of ring records is read where it stands in the ring (``Ring.drain_spans`` says
where; the Collector releases the space after the batch), each record by a C scanner
(rawrecord.pxd) into one reusable C struct: numbers as C values, strings as pointers into
the ring's bytes. From the struct the counters and
histograms are updated (recordpass.count_batch and time_batch's semantics, record by
record in ring order, so the float sums are the same additions in the same order) and
the JSON access log line is written in C (rawjson.pxd: the bytes msgspec writes).

The counters' label strings are interned (an id per distinct listener, upstream and
route); a batch's counts add up in C cells keyed by those ids and go into the Metrics'
dicts once per batch (:meth:`RawBatch._flush`). A record the scanner does not take (a
gauges record, a non-ASCII string, an unexpected type or number) is decoded by
msgspec where it stands and takes the Python path (count_batch, time_batch,
json_line), so the access log keeps ring order. As plain Python (FORKPROXY_PURE_PYTHON=1,
no compiler) this module is not used: ``COMPILED`` is False and the Collector decodes
every record with msgspec as before. Measured in docs/BENCHMARKS.md ("Round 4").
"""

from __future__ import annotations

import time
from array import array

import msgspec

from forkproxy.context import RequestContext, decoder
from forkproxy.manager.histogram import DURATION_BUCKETS, FINE_TO_PHASE, Histogram, PhaseGroup
from forkproxy.manager.jsonline import json_line, phases_ms
from forkproxy.manager.rawspans import RawTrace
from forkproxy.manager.recordpass import count_batch, time_batch

try:
    import cython

    COMPILED = cython.compiled
except ImportError:  # pragma: no cover - plain Python without Cython installed
    COMPILED = False

#: the phase bucket of each fine bucket, as C longs (rawbatch.pxd)
_F2P = array("l", FINE_TO_PHASE)

#: a cell key's kind (bits 56-63); bits 0-15 and 16-31 hold name ids, 32-55 a number
K_REQ = 1 << 56  # requests: listener, upstream, status
K_REUSE = 2 << 56  # reuse: upstream, reused
K_BIN = 3 << 56  # bytes_in: listener
K_BOUT = 4 << 56  # bytes_out: listener
K_DUR = 5 << 56  # the duration histogram of listener, upstream
K_GRP = 6 << 56  # the critical-path report's PhaseGroup of route, upstream
K_REJ = 7 << 56  # rejected: reason
K_RETRY = 8 << 56  # retries: upstream
K_TUN = 9 << 56  # tunnels: upstream
K_GRPC = 10 << 56  # grpc: listener, upstream, grpc status

#: records per batch at most (the Collector's BATCH), and the cells one record can
#: start (one per K_ kind): the tables are sized for them
MAX_RECORDS = 1024
CELLS_PER_RECORD = 10
#: with a ``sink``, the lines go to it whenever this much is written (see process;
#: 128 KiB: half the write(2) calls of 64 KiB and 0.04 µs less system time per record
#: in scripts/replay-bench, docs/BENCHMARKS.md "Round 6")
LINES_CHUNK = 128 * 1024


def _observe(p, h, v):
    """A phase's value into its histogram ``p`` and the report's ``h`` (one search)."""
    i = _fine_bucket(v)  # noqa: F821
    p.buckets[_F2P[i]] += 1
    p.sum += v
    h.buckets[i] += 1
    h.sum += v
    h.sumsq += v * v


def _flush_rare(m, kind, a: str, b: str, x: int, n: int) -> None:
    """A rare counter's cell into the Metrics (RawBatch._flush)."""
    if kind == K_REJ:
        m.rejected[a] = m.rejected.get(a, 0) + n
    elif kind == K_RETRY:
        m.retries[b] = m.retries.get(b, 0) + n
    elif kind == K_TUN:
        m.tunnels[b] = m.tunnels.get(b, 0) + n
    elif kind == K_GRPC:
        k = (a, b, x)
        m.grpc[k] = m.grpc.get(k, 0) + n


class RawBatch:
    """A batch of ring records where they stand: record ``k`` is ``view[starts[k]:
    ends[k]]`` (:meth:`attach` gives the buffer, a ring's mapping); ``n`` records.
    :meth:`process` counts them into a Metrics and returns their JSON lines. One per
    Collector (``busy`` while it is being processed).
    """

    def __init__(self, max_records: int = MAX_RECORDS):
        self.view = None
        self.size = 0
        self.starts = array("q", bytes(8 * max_records))
        self.ends = array("q", bytes(8 * max_records))
        self.max_records = max_records
        self.n = 0
        self.bad = 0  # records that did not decode (the Collector counts them)
        self.scanned = 0  # records of the last batch read by the C scanner
        self.busy = False
        self.names: list[str] = []
        self.names_tab = fp_names_new()  # noqa: F821
        if not 0 < max_records <= MAX_RECORDS:  # the cell and name tables' sizes
            raise ValueError(f"RawBatch: at most {MAX_RECORDS} records a batch")
        self.cells = fp_cells_new(CELLS_PER_RECORD * max_records + 16)  # noqa: F821
        self.rec = fp_rec_new()  # noqa: F821
        self.out = fp_out_new()  # noqa: F821
        self.objs: list = []
        self.tr = RawTrace()
        self.tls_new = self.tls_resumed = 0
        self.sec = -1
        self.prefix = b""
        self.lines = 0
        self.sink = None

    def __dealloc__(self):
        fp_cells_free(self.cells)  # noqa: F821
        fp_free(self.names_tab)  # noqa: F821
        fp_free(self.rec)  # noqa: F821
        fp_out_free(self.out)  # noqa: F821

    def attach(self, buf) -> None:
        """The batch's records are in ``buf`` (a writable buffer: Ring.buffer), which
        must stay mapped until :meth:`detach`."""
        self.base = fp_buffer_data(buf)  # noqa: F821
        self.view = buf
        self.size = len(buf)

    def detach(self) -> None:
        self.view = None
        self.size = 0
        self.n = 0

    def _check(self) -> None:
        """``n``, ``starts`` and ``ends`` describe records inside the attached buffer
        (the loops read them unchecked: set by Ring.drain_spans, but all are public)."""
        if not 0 <= self.n <= self.max_records:
            raise ValueError(f"RawBatch: {self.n} records, room for {self.max_records}")
        if self.n and self.view is None:
            raise ValueError("RawBatch: no buffer attached")
        size = self.size
        for k in range(self.n):
            start, end = self.starts[k], self.ends[k]
            if start < 0 or end < start or end > size:
                raise ValueError(f"RawBatch: record {k} at [{start}, {end})")

    def records(self) -> list:
        """The batch decoded by msgspec (records that do not decode are left out): what
        the tracer and the console format read."""
        self._check()
        out = []
        for k in range(self.n):
            try:
                out.append(decoder.decode(self.view[self.starts[k]:self.ends[k]]))
            except msgspec.DecodeError:
                pass
        return out

    def trace(self, tracer) -> None:
        """Tracing alone (rawspans.RawTrace over the batch, scanning it again; the
        manager traces in process()'s pass instead): ``self.tr`` then holds the records
        for Tracer.offer_batch and any encoding error (Tracer.offer_raw reads them)."""
        self._check()
        t = self.tr
        t.begin(tracer)
        r = self.rec
        try:
            for k in range(self.n):
                start, end = self.starts[k], self.ends[k]
                if fp_scan(self.base + start, end - start, r) != 0:  # noqa: F821
                    t.decoded(self.view, start, end)
                elif t.on:
                    t.rec(r, self.view, start, end)
        finally:
            t.end()

    def process(self, m, lines: bool, tracer=None) -> bytes:
        """Count the batch into Metrics ``m``; with ``lines``, return its JSON access log
        lines (``self.lines`` of them), else b"". With ``tracer``, trace it in the same
        pass (one scan per record: see trace).

        With a ``sink`` (``sink(view, n_lines)``, AccessLog.write_view), every
        LINES_CHUNK bytes of lines go to it as a view of the output buffer, no copy,
        while they are still in the CPU's cache (write(2) then copies them into the page
        cache at about half the cost of a 256 KiB batch's lines written at its end:
        docs/BENCHMARKS.md, "Round 5"); only the rest is returned."""
        self._check()
        if len(self.names) > FP_NAMES_MAX:  # noqa: F821 (forget labels no longer seen)
            fp_names_clear(self.names_tab)  # noqa: F821
            self.names = []
        ph = m.phases
        self.ph_hdr, self.ph_tls, self.ph_conn = (
            ph["accept_to_headers"], ph["tls_handshake"], ph["upstream_connect"])
        self.ph_send, self.ph_fb, self.ph_body = (
            ph["request_send"], ph["upstream_first_byte"], ph["response_body"])
        self.out.len = 0
        self.lines = 0
        self.bad = 0
        fast = 0
        r = self.rec
        t = self.tr
        tracing = tracer is not None
        if tracing:
            t.begin(tracer)
        try:
            for k in range(self.n):
                start, end = self.starts[k], self.ends[k]
                self.start, self.end = start, end
                if fp_scan(self.base + start, end - start, r) == 0:  # noqa: F821
                    fast += 1
                    self._count(m, r)
                    if lines:
                        self._line(r, start, end)
                        if self.out.len >= LINES_CHUNK and self.sink is not None:
                            self._hand_over()
                    if tracing and t.on:
                        t.rec(r, self.view, start, end)
                else:
                    self._slow(m, start, end, lines, tracing)
        finally:
            m.records += fast
            self.scanned = fast
            self._flush(m)
            if tracing:
                t.end()
        return fp_out_bytes(self.out)  # noqa: F821

    def _slow(self, m, start: int, end: int, lines: bool, tracing: bool) -> None:
        """One record through msgspec and the Python path (and to the tracer's)."""
        try:
            rec = decoder.decode(self.view[start:end])
        except msgspec.DecodeError:
            self.bad += 1
            return
        if type(rec) is not RequestContext:
            m.observe_gauges(rec)
            return
        one = [rec]
        if tracing:
            self.tr.objs.append(rec)
        count_batch(m, one)
        time_batch(m, one)
        if lines:
            self._put(json_line(rec, phases_ms(rec)))

    def _hand_over(self) -> None:
        """The lines written so far to the sink, then the output buffer is reused."""
        view = fp_out_view(self.out)  # noqa: F821
        try:
            self.sink(view, self.lines)
        finally:
            view.release()
            self.out.len = 0
            self.lines = 0

    def _put(self, line: bytes) -> None:
        fp_out_put(self.out, line, len(line))  # noqa: F821
        self.lines += 1

    def _line(self, r, start: int, end: int) -> None:
        """The record's JSON line, in C when its values are in rawjson's range."""
        ts = r.ts
        if 0.0 <= ts < 1e11:
            sec = int(ts)
            if sec != self.sec:
                self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode()
                self.sec = sec
            frac = int((ts - sec) * 1000)
            if fp_line(self.out, r, self.prefix, frac, end - start):  # noqa: F821
                self.lines += 1
                return
        rec = decoder.decode(self.view[start:end])
        self._put(json_line(rec, phases_ms(rec)))

    def _count(self, m, r) -> None:
        """count_batch for one scanned record (into the batch's cells), then time_batch."""
        c = self.cells
        tab, names = self.names_tab, self.names
        lid = fp_intern_field(tab, names, r.listener, 0)  # noqa: F821
        uid = fp_intern_field(tab, names, r.upstream, 1)  # noqa: F821
        rid = fp_intern_field(tab, names, r.route, 2)  # noqa: F821
        fp_cell_add(c, K_REQ | (r.status << 32) | (uid << 16) | lid, 1)  # noqa: F821
        if r.t[1]:  # T_TLS
            if r.tls_resumed == 1:
                self.tls_resumed += 1
            else:
                self.tls_new += 1
        if r.upstream.n and r.t[4]:  # T_CONNECTED
            x = r.reused
            fp_cell_add(c, K_REUSE | (x << 32) | (uid << 16), 1)  # noqa: F821
        if r.bytes_in:
            fp_cell_add(c, K_BIN | lid, r.bytes_in)  # noqa: F821
        if r.bytes_out:
            fp_cell_add(c, K_BOUT | lid, r.bytes_out)  # noqa: F821
        if r.error.n or r.reject.n or r.retries or r.tunnel or r.has_grpc:
            self._rare(m, r, lid, uid)
        self._time(m, r, lid, uid, rid)

    def _rare(self, m, r, lid: int, uid: int) -> None:
        """Metrics.count_rare for one scanned record; ``on_error`` gets it decoded."""
        c = self.cells
        if r.error.n and m.on_error is not None:
            m.on_error(decoder.decode(self.view[self.start:self.end]))
        if r.reject.n:
            x = fp_intern(self.names_tab, self.names, r.reject)  # noqa: F821
            fp_cell_add(c, K_REJ | x, 1)  # noqa: F821
        if r.retries:
            fp_cell_add(c, K_RETRY | (uid << 16), r.retries)  # noqa: F821
        if r.tunnel:
            fp_cell_add(c, K_TUN | (uid << 16), 1)  # noqa: F821
        if r.has_grpc:
            x = r.grpc_status
            fp_cell_add(c, K_GRPC | (x << 32) | (uid << 16) | lid, 1)  # noqa: F821

    def _group(self, m, rid: int, uid: int):
        c = self.cells
        ci = fp_cell_add(c, K_GRP | (uid << 16) | rid, 0)  # noqa: F821
        if not c.fresh:
            return self.objs[ci]
        key = (self.names[rid], self.names[uid])
        g = m.groups.get(key)
        if g is None:
            g = m.groups[key] = PhaseGroup()
        self._hold(ci, g)
        return g

    def _duration(self, m, lid: int, uid: int):
        c = self.cells
        ci = fp_cell_add(c, K_DUR | (uid << 16) | lid, 0)  # noqa: F821
        if not c.fresh:
            return self.objs[ci]
        key = (self.names[lid], self.names[uid])
        h = m.durations.get(key)
        if h is None:
            h = m.durations[key] = Histogram(DURATION_BUCKETS)
        self._hold(ci, h)
        return h

    def _hold(self, ci: int, obj) -> None:
        """objs[ci] = obj (cells are numbered in the order made: pad with None)."""
        objs = self.objs
        while len(objs) < ci:
            objs.append(None)
        objs.append(obj)

    def _time(self, m, r, lid: int, uid: int, rid: int) -> None:
        """time_batch for one scanned record (the same conditions, the same additions)."""
        ta, tt, th, tcs = r.t[0], r.t[1], r.t[2], r.t[3]
        tc, tsent, tfb, te = r.t[4], r.t[5], r.t[6], r.t[7]
        g = self._group(m, rid, uid)
        if te:
            start = th or ta
            if start and te >= start:  # not for a 400 answered before any timestamp
                h = self._duration(m, lid, uid)
                v = te - start
                h.buckets[_duration_bucket(v)] += 1  # noqa: F821
                h.sum += v
            start = ta or th
            if start and te >= start:
                h, v = g.total, te - start
                i = _fine_bucket(v)  # noqa: F821
                h.buckets[i] += 1
                h.sum += v
                h.sumsq += v * v
        if ta:
            if th and th >= ta:
                _observe(self.ph_hdr, g.hdr, th - ta)  # noqa: F821
            if tt and tt >= ta:
                _observe(self.ph_tls, g.tls, tt - ta)  # noqa: F821
        if tcs and tc and tc >= tcs and not r.reused:
            _observe(self.ph_conn, g.conn, tc - tcs)  # noqa: F821
        if tc and tsent and tsent >= tc:
            _observe(self.ph_send, g.send, tsent - tc)  # noqa: F821
        if tsent and tfb and tfb >= tsent:
            _observe(self.ph_fb, g.fb, tfb - tsent)  # noqa: F821
        if tfb and te and te >= tfb:
            _observe(self.ph_body, g.body, te - tfb)  # noqa: F821

    def _flush(self, m) -> None:
        """The batch's cells into the Metrics' dicts; then the cells are forgotten."""
        c = self.cells
        names = self.names
        requests, reuse, bytes_in, bytes_out = m.requests, m.reuse, m.bytes_in, m.bytes_out
        for ci in range(c.n):
            key = c.keys[ci]
            kind = (key >> 56) << 56
            a = names[key & 0xFFFF]
            b = names[(key >> 16) & 0xFFFF]
            x = (key >> 32) & 0xFFFFFF
            n = c.counts[ci]
            if kind == K_REQ:
                k = (a, b, x)
                requests[k] = requests.get(k, 0) + n
            elif kind == K_REUSE:
                k = (b, x == 1)
                reuse[k] = reuse.get(k, 0) + n
            elif kind == K_BIN:
                bytes_in[a] = bytes_in.get(a, 0) + n
            elif kind == K_BOUT:
                bytes_out[a] = bytes_out.get(a, 0) + n
            else:
                _flush_rare(m, kind, a, b, x, n)
        for resumed, n in ((False, self.tls_new), (True, self.tls_resumed)):
            if n:
                m.tls[resumed] = m.tls.get(resumed, 0) + n
        self.tls_new = self.tls_resumed = 0
        fp_cells_clear(c)  # noqa: F821
        self.objs.clear()
