# C parts of fieldsink.py (Cython's pure-Python mode: the .py file is the source)
cimport cython

cdef extern from *:
    """
    #include <stdlib.h>
    #include <string.h>
    #include <nghttp2/nghttp2.h>

    /* A session's header block being received. nghttp2's user_data points here, and
       the handle comes first: the Python callbacks find their session as user_data[0]
       (forkproxy/http2/base.py). */
    typedef struct {
        void *handle;
        int32_t sid;       /* the block collected; 0: none */
        int cat;           /* its nghttp2_headers_category */
        int oversize;      /* it passed the limit: its fields are dropped */
        size_t size;       /* the header list size so far (RFC 9113 section 6.5.2) */
        size_t limit;      /* SETTINGS_MAX_HEADER_LIST_SIZE */
        char *buf;         /* per field: name length, value length (size_t), name, value */
        size_t used, cap;
        Py_ssize_t count;
    } fp_sink;

    /* a buffer grown past this for a large block is freed once it was taken */
    #define FP_SINK_KEEP 4096

    static void fp_sink_init(fp_sink *s, Py_ssize_t limit) {
        memset(s, 0, sizeof(*s));
        s->limit = (size_t)limit;
    }

    static void fp_sink_free(fp_sink *s) {
        free(s->buf);
        s->buf = NULL;
        s->cap = s->used = 0;
    }

    /* nghttp2's on_header_callback: copy one field of the block (no Python, no GIL) */
    static int fp_on_header(nghttp2_session *session, const nghttp2_frame *frame,
                            const uint8_t *name, size_t namelen, const uint8_t *value,
                            size_t valuelen, uint8_t flags, void *user_data) {
        fp_sink *s = (fp_sink *)user_data;
        size_t need;
        (void)session; (void)flags;
        if (frame->hd.stream_id != s->sid) {  /* a new block (blocks never interleave) */
            s->sid = frame->hd.stream_id;
            s->cat = frame->headers.cat;
            s->oversize = 0;
            s->size = 0;
            s->used = 0;
            s->count = 0;
        }
        if (s->oversize)
            return 0;
        s->size += namelen + valuelen + 32;
        if (s->size > s->limit) {
            s->oversize = 1;
            s->used = 0;
            s->count = 0;
            return 0;
        }
        need = s->used + 2 * sizeof(size_t) + namelen + valuelen;
        if (need > s->cap) {
            size_t cap = s->cap ? s->cap : 1024;
            char *buf;
            while (cap < need)
                cap *= 2;
            buf = (char *)realloc(s->buf, cap);
            if (buf == NULL)
                return NGHTTP2_ERR_CALLBACK_FAILURE;
            s->buf = buf;
            s->cap = cap;
        }
        memcpy(s->buf + s->used, &namelen, sizeof(size_t));
        memcpy(s->buf + s->used + sizeof(size_t), &valuelen, sizeof(size_t));
        s->used += 2 * sizeof(size_t);
        memcpy(s->buf + s->used, name, namelen);
        memcpy(s->buf + s->used + namelen, value, valuelen);
        s->used += namelen + valuelen;
        s->count++;
        return 0;
    }

    /* block sid's fields as a list of (name, value) bytes, None if it passed the limit;
       the sink is then empty */
    static PyObject *fp_sink_take(fp_sink *s, int32_t sid) {
        PyObject *out, *name, *value, *pair;
        size_t at = 0, namelen, valuelen;
        Py_ssize_t i;
        if (s->sid != sid)  /* a block without fields */
            return PyList_New(0);
        s->sid = 0;
        if (s->oversize) {
            s->oversize = 0;
            Py_RETURN_NONE;
        }
        out = PyList_New(s->count);
        if (out == NULL)
            return NULL;
        for (i = 0; i < s->count; i++) {
            memcpy(&namelen, s->buf + at, sizeof(size_t));
            memcpy(&valuelen, s->buf + at + sizeof(size_t), sizeof(size_t));
            at += 2 * sizeof(size_t);
            name = PyBytes_FromStringAndSize(s->buf + at, (Py_ssize_t)namelen);
            value = name ? PyBytes_FromStringAndSize(s->buf + at + namelen,
                                                      (Py_ssize_t)valuelen) : NULL;
            pair = value ? PyTuple_New(2) : NULL;
            if (pair == NULL) {
                Py_XDECREF(name);
                Py_XDECREF(value);
                Py_DECREF(out);
                s->used = 0;
                s->count = 0;
                return NULL;
            }
            PyTuple_SET_ITEM(pair, 0, name);
            PyTuple_SET_ITEM(pair, 1, value);
            PyList_SET_ITEM(out, i, pair);
            at += namelen + valuelen;
        }
        s->used = 0;
        s->count = 0;
        if (s->cap > FP_SINK_KEEP)
            fp_sink_free(s);
        return out;
    }

    static Py_ssize_t fp_sink_address(fp_sink *s) { return (Py_ssize_t)s; }
    static Py_ssize_t fp_header_callback_address(void) { return (Py_ssize_t)&fp_on_header; }
    """
    ctypedef struct fp_sink:
        int cat
    void fp_sink_init(fp_sink *s, Py_ssize_t limit)
    void fp_sink_free(fp_sink *s)
    object fp_sink_take(fp_sink *s, int sid)
    Py_ssize_t fp_sink_address(fp_sink *s)
    Py_ssize_t fp_header_callback_address()


cdef class CFieldSink:
    cdef fp_sink sink

    cpdef take(self, int sid)
