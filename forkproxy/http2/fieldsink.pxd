# C parts of fieldsink.py (Cython's pure-Python mode: the .py file is the source)
cimport cython

cdef extern from *:
    """
    #include <stdlib.h>
    #include <string.h>
    #include <nghttp2/nghttp2.h>

    /* blocks a memo sink remembers (a response's head and its trailers: two kinds
       that alternate), and the largest it remembers */
    #define FP_SINK_MEMO 2
    #define FP_SINK_MEMO_MAX 2048

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
        int fail;          /* a block past the limit fails the callback (the stream is
                              reset) instead of being dropped for a 431 */
        int memo;          /* take() gives the list of the same block again (below) */
        char *mbuf[FP_SINK_MEMO];      /* the blocks remembered, as buf has them */
        size_t mused[FP_SINK_MEMO];
        PyObject *mlist[FP_SINK_MEMO]; /* the lists made of them */
        int mnext;                     /* the slot the next new block takes */
    } fp_sink;

    /* a buffer grown past this for a large block is freed once it was taken */
    #define FP_SINK_KEEP 4096

    static void fp_sink_init(fp_sink *s, Py_ssize_t limit, int fail, int memo) {
        memset(s, 0, sizeof(*s));
        s->limit = (size_t)limit;
        s->fail = fail;
        s->memo = memo;
    }

    static void fp_sink_free(fp_sink *s) {
        free(s->buf);
        s->buf = NULL;
        s->cap = s->used = 0;
    }

    /* everything, the remembered blocks too (the sink's end) */
    static void fp_sink_dealloc(fp_sink *s) {
        int i;
        fp_sink_free(s);
        for (i = 0; i < FP_SINK_MEMO; i++) {
            free(s->mbuf[i]);
            s->mbuf[i] = NULL;
            Py_CLEAR(s->mlist[i]);
        }
    }

    /* the list of a remembered block with the same fields as the one taken, or NULL */
    static PyObject *fp_sink_recall(fp_sink *s) {
        int i;
        for (i = 0; i < FP_SINK_MEMO; i++) {
            if (s->mlist[i] != NULL && s->mused[i] == s->used
                    && memcmp(s->mbuf[i], s->buf, s->used) == 0) {
                Py_INCREF(s->mlist[i]);
                return s->mlist[i];
            }
        }
        return NULL;
    }

    /* remember the block taken and its list (a failed copy: not remembered) */
    static void fp_sink_remember(fp_sink *s, PyObject *list) {
        int i = s->mnext;
        char *copy;
        if (s->used > FP_SINK_MEMO_MAX)
            return;
        copy = (char *)realloc(s->mbuf[i], s->used ? s->used : 1);
        if (copy == NULL)
            return;
        memcpy(copy, s->buf, s->used);
        s->mbuf[i] = copy;
        s->mused[i] = s->used;
        Py_INCREF(list);
        Py_XSETREF(s->mlist[i], list);
        s->mnext = (i + 1) % FP_SINK_MEMO;
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
            return s->fail ? NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE : 0;
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
        if (s->memo && (out = fp_sink_recall(s)) != NULL) {
            s->used = 0;
            s->count = 0;
            return out;
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
        if (s->memo)
            fp_sink_remember(s, out);
        s->used = 0;
        s->count = 0;
        if (s->cap > FP_SINK_KEEP)
            fp_sink_free(s);
        return out;
    }

    /* The upstream client's on_frame_recv: the Python callback (set once, by address)
       only for the frames forkproxy/http2/client.py acts on; the others (a DATA frame
       that does not end its stream, a SETTINGS or PING ACK... WINDOW_UPDATE,
       RST_STREAM) are done with here, two C to Python calls fewer per gRPC call. */
    static nghttp2_on_frame_recv_callback fp_client_frame_next = NULL;

    static int fp_client_frame_recv(nghttp2_session *session, const nghttp2_frame *frame,
                                    void *user_data) {
        switch (frame->hd.type) {
        case NGHTTP2_HEADERS:
        case NGHTTP2_GOAWAY:
            break;
        case NGHTTP2_DATA:
            if (!(frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
                return 0;
            break;
        case NGHTTP2_SETTINGS:
            if (frame->hd.flags & NGHTTP2_FLAG_ACK)
                return 0;
            break;
        case NGHTTP2_PING:
            if (!(frame->hd.flags & NGHTTP2_FLAG_ACK))
                return 0;
            break;
        default:
            return 0;
        }
        return fp_client_frame_next(session, frame, user_data);
    }

    static Py_ssize_t fp_client_frame_callback(Py_ssize_t next) {
        fp_client_frame_next = (nghttp2_on_frame_recv_callback)next;
        return (Py_ssize_t)&fp_client_frame_recv;
    }

    static Py_ssize_t fp_sink_address(fp_sink *s) { return (Py_ssize_t)s; }
    static Py_ssize_t fp_header_callback_address(void) { return (Py_ssize_t)&fp_on_header; }
    """
    ctypedef struct fp_sink:
        int cat
    void fp_sink_init(fp_sink *s, Py_ssize_t limit, int fail, int memo)
    void fp_sink_dealloc(fp_sink *s)
    object fp_sink_take(fp_sink *s, int sid)
    Py_ssize_t fp_sink_address(fp_sink *s)
    Py_ssize_t fp_header_callback_address()
    Py_ssize_t fp_client_frame_callback(Py_ssize_t next)


cdef class CFieldSink:
    cdef fp_sink sink

    cpdef take(self, int sid)
