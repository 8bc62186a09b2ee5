# C types for ringwalk.py when it is compiled (Cython pure-Python mode, setup.py).
cimport cython

cdef extern from *:
    """
    /* the mapping's address (the caller keeps the object, and with it the memory) */
    static const unsigned char *fp_ring_base(PyObject *obj) {
        Py_buffer b;
        if (PyObject_GetBuffer(obj, &b, PyBUF_SIMPLE) < 0) return NULL;
        PyBuffer_Release(&b);
        return (const unsigned char *)b.buf;
    }
    static CYTHON_INLINE void fp_ring_prefetch(const unsigned char *p) {
        __builtin_prefetch(p, 0, 3);
    }
    """
    const unsigned char *fp_ring_base(object obj) except NULL
    void fp_ring_prefetch(const unsigned char *p) noexcept

cdef bint _PREFETCH
cdef unsigned long long PREFETCH_BYTES

@cython.locals(mask="unsigned long long", tail="unsigned long long",
               head="unsigned long long", off="unsigned long long",
               word="unsigned long long", n="unsigned long long", need="unsigned long long",
               at="unsigned long long", count=Py_ssize_t, bad=Py_ssize_t,
               spans=bint, prefetch=bint, base="const unsigned char *",
               pf="unsigned long long", ahead="unsigned long long",
               data="unsigned long long", m32="unsigned long long", hi="unsigned long long")
cpdef tuple walk(object q, object buf, unsigned long long size, unsigned long long maxp,
                 object handler, object decode, object out, object errors,
                 Py_ssize_t max_records, long long[::1] starts=*, long long[::1] ends=*)
