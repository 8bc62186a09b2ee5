# C types of spanfill.py (Cython's pure-Python mode: the .py file is the source)
cimport cython
from forkproxy.manager.recordslots cimport fp_member, fp_member_offset

cdef extern from *:
    """
    #include <string.h>
    /* the callers reserve the room (Filler.reserve) */
    static CYTHON_INLINE Py_ssize_t fp_put(PyObject *buf, Py_ssize_t at, PyObject *data) {
        Py_ssize_t n = PyBytes_GET_SIZE(data);
        memcpy(PyByteArray_AS_STRING(buf) + at, PyBytes_AS_STRING(data), (size_t)n);
        return at + n;
    }

    static CYTHON_INLINE void fp_put_u64(PyObject *buf, Py_ssize_t at, unsigned long long v) {
        unsigned char *p = (unsigned char *)PyByteArray_AS_STRING(buf) + at;
        int i;
        for (i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
    }

    static CYTHON_INLINE unsigned long long fp_le_u64(PyObject *data) {
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
        unsigned long long v = 0;
        int i;
        for (i = 0; i < 8; i++) v |= (unsigned long long)p[i] << (8 * i);
        return v;
    }

    """
    Py_ssize_t fp_put(bytearray buf, Py_ssize_t at, bytes data)
    void fp_put_u64(bytearray buf, Py_ssize_t at, unsigned long long v)
    unsigned long long fp_le_u64(bytes data)

cdef int K_TID, K_SID, K_PSID, K_START, K_END, K_VN, K_TIME, K_CHILD
cdef Py_ssize_t O_TS, O_LISTENER, O_REMOTE, O_METHOD, O_PATH, O_STATUS, O_BYTES_IN
cdef Py_ssize_t O_BYTES_OUT, O_UPSTREAM, O_UPSTREAM_ADDR, O_REUSED, O_TLS_RESUMED
cdef Py_ssize_t O_TLS_VERSION, O_TIMES, O_ERROR, O_RETRIES, O_PROTOCOL, O_ROUTE
cdef Py_ssize_t O_TRACE_ID, O_SPAN_ID, O_PARENT_SPAN_ID, O_TRACESTATE


cdef class Template:
    cdef readonly bytes image
    cdef readonly Py_ssize_t size
    cdef readonly Py_ssize_t nslots
    cdef readonly Py_ssize_t body_len
    cdef readonly object fill
    cdef int[::1] offsets
    cdef int[::1] kinds


cdef unsigned long long to_ns(double t, double off)

cdef int phase_bits(double t0, double t1, double t2, double t3, double t4, double t5,
                    double t6, double t7)

cdef long shape_bits(ctx, list times) except? -1

cpdef tuple shape_key(ctx, list times)

cdef bint same_shape(ctx, long bits, tuple key) except -1


@cython.locals(t7=double, ts=double, off=double, t=double, s=Py_ssize_t, kind=int,
               at=Py_ssize_t)
cdef Py_ssize_t put_attrs(bytearray buf, Py_ssize_t at, bytes a_path, bytes a_client,
                          bytes a_out, bytes a_in, bytes a_state) except -1

cdef void fill_slots(bytearray buf, Py_ssize_t pos, Template tpl, ctx, list times, bytes sid,
                     unsigned long long base, Py_ssize_t body) except *


cdef class Filler:
    cdef readonly object tpls
    cdef bytearray buf
    cdef Py_ssize_t pos
    cdef list spare
    cdef public Py_ssize_t fast
    cdef public Py_ssize_t count

    cpdef Py_ssize_t written(self)
    cpdef add(self, bytes data)
    @cython.locals(pos=Py_ssize_t, start=Py_ssize_t, buf=bytearray)
    cpdef take(self, bytes prefix)
    cpdef recycle(self, view)
    cpdef discard(self)

    cpdef reserve(self, Py_ssize_t used, Py_ssize_t need)

    @cython.locals(templates=dict, paths=dict, clients=dict, sizes=dict, buf=bytearray,
                   pos=Py_ssize_t, times=list, key=tuple, tpl=Template, sid=bytes,
                   base=cython.ulonglong, a_path=bytes, a_client=bytes, a_out=bytes,
                   a_in=bytes, a_state=bytes, extra=Py_ssize_t, body=Py_ssize_t,
                   end=Py_ssize_t, at=Py_ssize_t, max_body=Py_ssize_t, last_key=tuple,
                   last_tpl=Template)
    cpdef encode_fast(self, list batch, list slow)

