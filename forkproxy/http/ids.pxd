# C types for ids.py (Cython pure-Python mode, setup.py's COMPILED), and the C
# helpers its compiled code calls: request ids, trace ids as big-endian bytes, the traceparent
# line written straight into a bytes object.
cimport cython

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    static void fp_put_be64(char *out, uint64_t v) {
        int i;
        for (i = 7; i >= 0; i--) { out[i] = (char)(v & 0xFF); v >>= 8; }
    }

    static void fp_put_hex64(char *out, uint64_t v) {
        static const char digits[] = "0123456789abcdef";
        int i;
        for (i = 15; i >= 0; i--) { out[i] = digits[v & 0xF]; v >>= 4; }
    }

    /* PREFIX then the count in lower-case hex, at least 8 digits (b"%s%08x") */
    static PyObject *fp_request_id(PyObject *prefix, uint64_t count) {
        static const char digits[] = "0123456789abcdef";
        char hex[16];
        int n = 0, i;
        Py_ssize_t plen;
        PyObject *b;
        char *o;
        if (!PyBytes_Check(prefix)) {
            PyErr_SetString(PyExc_TypeError, "the request id prefix is not bytes");
            return NULL;
        }
        do { hex[n++] = digits[count & 0xF]; count >>= 4; } while (count);
        while (n < 8) hex[n++] = '0';
        plen = PyBytes_GET_SIZE(prefix);
        b = PyBytes_FromStringAndSize(NULL, plen + n);
        if (b == NULL) return NULL;
        o = PyBytes_AS_STRING(b);
        memcpy(o, PyBytes_AS_STRING(prefix), plen);
        for (i = 0; i < n; i++) o[plen + i] = hex[n - 1 - i];
        return b;
    }

    /* 8 bytes, big-endian */
    static PyObject *fp_id8(uint64_t v) {
        PyObject *b = PyBytes_FromStringAndSize(NULL, 8);
        if (b != NULL) fp_put_be64(PyBytes_AS_STRING(b), v);
        return b;
    }

    /* the 8-byte high half, then low big-endian: a 16-byte trace id */
    static PyObject *fp_trace_id(PyObject *high, uint64_t low) {
        PyObject *b;
        if (!PyBytes_Check(high) || PyBytes_GET_SIZE(high) != 8) {
            PyErr_SetString(PyExc_ValueError, "the trace id's high half is not 8 bytes");
            return NULL;
        }
        b = PyBytes_FromStringAndSize(NULL, 16);
        if (b == NULL) return NULL;
        memcpy(PyBytes_AS_STRING(b), PyBytes_AS_STRING(high), 8);
        fp_put_be64(PyBytes_AS_STRING(b) + 8, low);
        return b;
    }

    /* b"traceparent: 00-" HIGH_HEX LOW_HEX "-" SPAN_HEX "-0F CR LF", F = sampled */
    static PyObject *fp_traceparent_line(PyObject *high_hex, uint64_t low, uint64_t span,
                                         int sampled) {
        static const char prefix[] = "traceparent: 00-";
        PyObject *b;
        char *o;
        if (!PyBytes_Check(high_hex) || PyBytes_GET_SIZE(high_hex) != 16) {
            PyErr_SetString(PyExc_ValueError, "the trace id's high half is not 16 hex digits");
            return NULL;
        }
        b = PyBytes_FromStringAndSize(NULL, 16 + 16 + 16 + 1 + 16 + 5);
        if (b == NULL) return NULL;
        o = PyBytes_AS_STRING(b);
        memcpy(o, prefix, 16);
        memcpy(o + 16, PyBytes_AS_STRING(high_hex), 16);
        fp_put_hex64(o + 32, low);
        o[48] = '-';
        fp_put_hex64(o + 49, span);
        memcpy(o + 65, sampled ? "-01\\r\\n" : "-00\\r\\n", 5);
        return b;
    }
    """
    object fp_request_id(object prefix, unsigned long long count)
    object fp_id8(unsigned long long v)
    object fp_trace_id(object high, unsigned long long low)
    object fp_traceparent_line(object high_hex, unsigned long long low,
                               unsigned long long span, bint sampled)

cdef unsigned long long _M64, _STEP

cdef class RequestIds:
    cdef public bytes prefix
    cdef public unsigned long long count

    @cython.locals(count="unsigned long long")
    cpdef bytes next(self)

cdef class IdGenerator:
    cdef unsigned long long _next
    cdef public bytes high, high_hex
    cdef object _threshold
    cdef bint _sample_all
    cdef unsigned long long _below

    cpdef unsigned long long next(self)
    cpdef bytes span_id(self)
    cpdef bytes trace_id(self)
    @cython.locals(low="unsigned long long", span="unsigned long long", sampled=bint)
    cpdef tuple new_trace(self, object threshold)
