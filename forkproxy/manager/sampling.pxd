# C types of sampling.py (Cython's pure-Python mode: the .py file is the source)
cimport cython
from forkproxy.manager.recordslots cimport fp_member, fp_member_offset

cdef extern from *:
    """
    static CYTHON_INLINE unsigned long long fp_id_low_u64(PyObject *trace_id) {
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(trace_id) + 8;
        unsigned long long v = 0;
        int i;
        for (i = 0; i < 8; i++) v = (v << 8) | p[i];
        return v;
    }
    """
    unsigned long long fp_id_low_u64(bytes trace_id)


cdef Py_ssize_t O_TRACE_ID, O_TRACE_FLAGS, O_STATUS, O_ERROR, O_TIMES
cdef Py_ssize_t I_ACCEPT, I_HEADERS, I_END


@cython.locals(everything=bint, below=cython.ulonglong, sampled=Py_ssize_t,
               dropped=Py_ssize_t, trace_id=bytes, keep=bint, flags=long, status=long,
               error=str, t=list, start=double, end=double)
cpdef tuple sample_batch(items, list queue, Py_ssize_t room, threshold, double slower_than)


cdef class TraceState:
    cdef public bint everything
    cdef public unsigned long long below
    cdef public double slower_than
    cdef public Py_ssize_t size, queue_size, queued, sampled, dropped
    cdef public object enc, filler

    cpdef set_rules(self, threshold, double slower_than, Py_ssize_t size,
                    Py_ssize_t queue_size)
