# C types for rawbatch.py (Cython pure-Python mode, setup.py's COMPILED).
cimport cython
from forkproxy.manager.histogram cimport Histogram, PhaseGroup
from forkproxy.manager.rawjson cimport (fp_line, fp_out, fp_out_bytes, fp_out_free,
                                        fp_out_new, fp_out_put, fp_out_view)
from forkproxy.manager.rawrecord cimport (FP_NAMES_MAX, fp_buffer_data, fp_cell_add,
                                          fp_cells, fp_cells_clear, fp_cells_free,
                                          fp_cells_new, fp_free, fp_intern,
                                          fp_intern_field, fp_name_slot,
                                          fp_names_clear, fp_names_new, fp_rec, fp_rec_new,
                                          fp_scan)
from forkproxy.manager.rawspans cimport RawTrace
from forkproxy.manager.recordpass cimport _duration_bucket, _fine_bucket

cdef long[::1] _F2P
cdef unsigned long long K_REQ, K_REUSE, K_BIN, K_BOUT, K_DUR, K_GRP, K_REJ, K_RETRY
cdef unsigned long long K_TUN, K_GRPC

cdef _flush_rare(object m, unsigned long long kind, str a, str b, unsigned long long x,
                 long long n)

@cython.locals(i=Py_ssize_t)
cdef void _observe(Histogram p, Histogram h, double v) noexcept

cdef class RawBatch:
    cdef public object view
    cdef const unsigned char *base
    cdef public long long[::1] starts, ends
    cdef Py_ssize_t size
    cdef public Py_ssize_t max_records, n, bad, lines, scanned
    cdef Py_ssize_t start, end
    cdef public bint busy
    cdef public object sink
    cdef public list names
    cdef fp_name_slot *names_tab
    cdef fp_cells *cells
    cdef fp_rec *rec
    cdef fp_out *out
    cdef list objs
    cdef public RawTrace tr
    cdef long long tls_new, tls_resumed, sec
    cdef bytes prefix
    cdef Histogram ph_hdr, ph_tls, ph_conn, ph_send, ph_fb, ph_body

    @cython.locals(start="long long", end="long long", size="long long", k=Py_ssize_t)
    cdef _check(self)

    cpdef attach(self, object buf)
    cpdef detach(self)

    @cython.locals(r="fp_rec *", start=Py_ssize_t, end=Py_ssize_t, k=Py_ssize_t,
                   t=RawTrace)
    cpdef trace(self, object tracer)

    @cython.locals(fast=Py_ssize_t, r="fp_rec *", start=Py_ssize_t, end=Py_ssize_t,
                   k=Py_ssize_t, t=RawTrace, tracing=bint)
    cpdef bytes process(self, object m, bint lines, object tracer=*)

    cdef _slow(self, object m, Py_ssize_t start, Py_ssize_t end, bint lines, bint tracing)
    cdef _put(self, bytes line)
    cdef _hand_over(self)

    @cython.locals(ts=double, sec="long long", frac=int)
    cdef _line(self, fp_rec *r, Py_ssize_t start, Py_ssize_t end)

    @cython.locals(c="fp_cells *", tab="fp_name_slot *", lid=Py_ssize_t, uid=Py_ssize_t,
                   rid=Py_ssize_t, x="unsigned long long")
    cdef _count(self, object m, fp_rec *r)

    @cython.locals(c="fp_cells *", ci=Py_ssize_t)
    cdef PhaseGroup _group(self, object m, Py_ssize_t rid, Py_ssize_t uid)

    @cython.locals(c="fp_cells *", ci=Py_ssize_t)
    cdef Histogram _duration(self, object m, Py_ssize_t lid, Py_ssize_t uid)

    @cython.locals(c="fp_cells *", x="unsigned long long")
    cdef _rare(self, object m, fp_rec *r, Py_ssize_t lid, Py_ssize_t uid)

    cdef _hold(self, Py_ssize_t ci, object obj)

    @cython.locals(ta=double, tt=double, th=double, tcs=double, tc=double, tsent=double,
                   tfb=double, te=double, start=double, v=double, i=Py_ssize_t,
                   h=Histogram, g=PhaseGroup)
    cdef _time(self, object m, fp_rec *r, Py_ssize_t lid, Py_ssize_t uid, Py_ssize_t rid)

    @cython.locals(c="fp_cells *", ci=Py_ssize_t, key="unsigned long long",
                   kind="unsigned long long", x="unsigned long long", n="long long")
    cdef _flush(self, object m)
