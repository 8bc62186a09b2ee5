# C parts of sendpath.py (Cython's pure-Python mode: the .py file is the source)
cimport cython

cdef extern from *:
    """
    #include <stdlib.h>
    #include <string.h>
    #include <nghttp2/nghttp2.h>

    /* a whole response body: nghttp2's data_source.ptr points here */
    typedef struct {
        const char *data;
        size_t size;
        size_t off;
    } fp_body;

    static void fp_body_init(fp_body *b, PyObject *data) {
        b->data = PyBytes_AS_STRING(data);
        b->size = (size_t)PyBytes_GET_SIZE(data);
        b->off = 0;
    }

    /* nghttp2's data-source read callback (no Python, no GIL): the next piece, EOF
       (which ends the stream) with the last byte */
    static ssize_t fp_read_body(nghttp2_session *session, int32_t sid, uint8_t *buf,
                                size_t length, uint32_t *flags,
                                nghttp2_data_source *source, void *user_data) {
        fp_body *b = (fp_body *)source->ptr;
        size_t n = b->size - b->off;
        (void)session; (void)sid; (void)user_data;
        if (n > length)
            n = length;
        memcpy(buf, b->data + b->off, n);
        b->off += n;
        if (b->off == b->size)
            *flags |= NGHTTP2_DATA_FLAG_EOF;
        return (ssize_t)n;
    }

    typedef ssize_t (*fp_mem_send_fn)(nghttp2_session *, const uint8_t **);

    /* the frames of one drain are gathered here (one thread: the GIL is held, and
       nghttp2 refuses mem_send from inside its own callbacks) */
    static char *fp_out;
    static size_t fp_out_cap;

    static int fp_out_append(const uint8_t *p, size_t n, size_t used) {
        if (used + n > fp_out_cap) {
            size_t cap = fp_out_cap ? fp_out_cap : 65536;
            char *buf;
            while (cap < used + n)
                cap *= 2;
            buf = (char *)realloc(fp_out, cap);
            if (buf == NULL)
                return -1;
            fp_out = buf;
            fp_out_cap = cap;
        }
        memcpy(fp_out + used, p, n);
        return 0;
    }

    /* the frames as bytes; on an error (bytes before it, the error code) */
    static PyObject *fp_drain(Py_ssize_t session_addr, Py_ssize_t fn_addr) {
        nghttp2_session *session = (nghttp2_session *)session_addr;
        fp_mem_send_fn send = (fp_mem_send_fn)fn_addr;
        const uint8_t *p = NULL;
        ssize_t n;
        size_t used = 0;
        PyObject *data;
        for (;;) {
            n = send(session, &p);
            if (n <= 0)
                break;
            /* nghttp2 reuses its buffer at the next call: copied first */
            if (fp_out_append(p, (size_t)n, used) < 0)
                return PyErr_NoMemory();
            used += (size_t)n;
        }
        data = PyBytes_FromStringAndSize(fp_out, (Py_ssize_t)used);
        if (fp_out_cap > 4 * 65536) {  /* a large turn's buffer is not kept */
            free(fp_out);
            fp_out = NULL;
            fp_out_cap = 0;
        }
        if (data == NULL || n == 0)
            return data;
        return Py_BuildValue("(Nn)", data, n);
    }

    static Py_ssize_t fp_body_address(fp_body *b) { return (Py_ssize_t)b; }
    static Py_ssize_t fp_read_body_address(void) { return (Py_ssize_t)&fp_read_body; }
    """
    ctypedef struct fp_body:
        size_t off
    void fp_body_init(fp_body *b, bytes data)
    object fp_drain(Py_ssize_t session, Py_ssize_t fn)
    Py_ssize_t fp_body_address(fp_body *b)
    Py_ssize_t fp_read_body_address()


cdef class BodySource:
    cdef fp_body body
    cdef bytes data
