# C types of rawspans.py (Cython's pure-Python mode: the .py file is the source)
cimport cython
from forkproxy.manager.rawrecord cimport (FP_NAMES_MAX, fp_free, fp_intern, fp_may_sample,
                                          fp_name_slot, fp_names_clear, fp_names_new, fp_rec,
                                          fp_str)
from forkproxy.manager.sampling cimport TraceState
from forkproxy.manager.spanfill cimport (Filler, Template, fp_put, fp_put_u64, phase_bits,
                                          put_attrs)

cdef extern from *:
    """
    /* fp_str: a record's field in the C struct (rawrecord.pxd, cimported above: ASCII,
       pointing into the batch's bytes) */
    static CYTHON_INLINE void fp_put_str(PyObject *buf, Py_ssize_t at, fp_str s) {
        memcpy(PyByteArray_AS_STRING(buf) + at, s.p, (size_t)s.n);
    }

    static CYTHON_INLINE unsigned long long fp_le_u64_at(const unsigned char *p) {
        unsigned long long v = 0;
        int i;
        for (i = 0; i < 8; i++) v |= (unsigned long long)p[i] << (8 * i);
        return v;
    }

    /* whether the ASCII bytes of s are the str obj (a key's label) */
    static CYTHON_INLINE int fp_str_is(fp_str s, PyObject *obj) {
        return PyUnicode_IS_ASCII(obj) && PyUnicode_GET_LENGTH(obj) == s.n
            && memcmp(PyUnicode_DATA(obj), s.p, (size_t)s.n) == 0;
    }

    /* spanfill.to_ns inlined (a call per time slot across modules otherwise): a
       worker's monotonic time in Unix nanoseconds, int((t + off) * 1e9) */
    static CYTHON_INLINE unsigned long long fp_to_ns(double t, double off) {
        return (unsigned long long)((t + off) * 1e9);
    }

    static PyObject *fp_str_new(fp_str s) {
        return PyUnicode_DecodeASCII((const char *)s.p, s.n, NULL);
    }
    """
    void fp_put_str(bytearray buf, Py_ssize_t at, fp_str s)
    unsigned long long fp_le_u64_at(const unsigned char *p)
    bint fp_str_is(fp_str s, str obj)
    str fp_str_new(fp_str s)
    unsigned long long fp_to_ns(double t, double off)

cdef int K_TID, K_SID, K_PSID, K_START, K_END, K_TIME, K_CHILD
cdef Py_ssize_t MAX_BODY


cdef class RawFiller(Filler):
    cdef object r_key
    cdef Template r_tpl
    cdef fp_name_slot *path_tab
    cdef fp_name_slot *client_tab
    cdef list path_names, path_attrs, client_names, client_attrs
    cdef dict sizes
    cdef str last_path, last_client
    cdef bytes last_a_path, last_a_client

    cpdef begin_raw(self)
    @cython.locals(i=Py_ssize_t, a_path=bytes, a_client=bytes)
    cdef tuple _rec_attrs(self, fp_rec *r)
    @cython.locals(i=Py_ssize_t, a_path=bytes)
    cdef bytes _path_attr(self, fp_rec *r)
    @cython.locals(ids=long)
    cdef long _rec_bits(self, fp_rec *r)
    cdef tuple _rec_key(self, fp_rec *r, long bits)
    @cython.locals(key=tuple)
    cdef bint _rec_same(self, fp_rec *r, long bits, object key) except -1
    @cython.locals(buf=bytearray, t7=double, off=double, t=double, s=Py_ssize_t, kind=int,
                   at=Py_ssize_t)
    cdef void _rec_slots(self, Py_ssize_t pos, Template tpl, fp_rec *r,
                         unsigned long long base, Py_ssize_t body) except *
    @cython.locals(bits=long, key=tuple, tpl=Template, base=cython.ulonglong, tpls=object,
                   a_path=bytes, a_client=bytes, a_out=bytes, a_in=bytes, a_state=bytes,
                   extra=Py_ssize_t, body=Py_ssize_t, pos=Py_ssize_t, end=Py_ssize_t,
                   at=Py_ssize_t, buf=bytearray, size="long long", sizes=dict)
    cdef int fill_rec(self, fp_rec *r) except -1


cdef class RawTrace:
    cdef public bint on
    cdef object owner
    cdef TraceState st
    cdef public object tracer, enc
    cdef RawFiller filler
    cdef public list objs
    cdef public object error
    cdef bint everything
    cdef unsigned long long below
    cdef double slower_than
    cdef Py_ssize_t size, room, count, sampled, dropped, kept

    @cython.locals(st=TraceState)
    cpdef begin(self, object tracer)
    @cython.locals(keep=int)
    cdef rec(self, fp_rec *r, object view, Py_ssize_t start, Py_ssize_t end)
    cpdef decoded(self, object view, Py_ssize_t start, Py_ssize_t end)
    cdef _append(self, object view, Py_ssize_t start, Py_ssize_t end)
    @cython.locals(st=TraceState)
    cpdef end(self)
