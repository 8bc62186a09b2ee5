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
        char *ev;          /* the client's events queued during a call into nghttp2
                              (fp_ev_push), each an fp_event and its bytes */
        size_t ev_used, ev_cap;
        /* the server's Python frame-received callback (base.py's), which handles the
           frames the server's C one does not queue */
        int (*py_frame_recv)(nghttp2_session *, const nghttp2_frame *, void *);
        /* and its frame-sent one, for the frames sent that are not queued */
        int (*py_frame_send)(nghttp2_session *, const nghttp2_frame *, void *);
    } fp_sink;

    /* one queued event: a header block (its bytes as buf has them), a DATA chunk (its
       bytes), the end of a stream's DATA, a stream closed, GOAWAY, SETTINGS, PING ACK */
    typedef struct {
        int kind;
        int32_t sid;
        int64_t a, b;
        size_t len;        /* the bytes that follow */
        Py_ssize_t count;  /* a header block's fields */
    } fp_event;

    /* the kinds (forkproxy/http2/fieldsink.py has the same numbers) */
    #define FP_EV_HEADERS 1
    #define FP_EV_HEADERS_END 2
    #define FP_EV_DATA 3
    #define FP_EV_END 4
    #define FP_EV_CLOSED 5
    #define FP_EV_GOAWAY 6
    #define FP_EV_SETTINGS 7
    #define FP_EV_PONG 8
    /* the server's header blocks: a request's (the stream's first block) or another
       (trailers), with END_STREAM or not; a block past the limit has count -1 (None) */
    #define FP_EV_REQUEST 9
    #define FP_EV_REQUEST_END 10
    #define FP_EV_BLOCK 11
    #define FP_EV_BLOCK_END 12
    /* frames the server sent: DATA, DATA with END_STREAM, HEADERS with END_STREAM */
    #define FP_EV_SENT_DATA 13
    #define FP_EV_SENT_DATA_END 14
    #define FP_EV_SENT_HEADERS_END 15
    /* an event queue grown past this is freed once drained */
    #define FP_EV_KEEP 262144

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

    static void fp_ev_free(fp_sink *s) {
        free(s->ev);
        s->ev = NULL;
        s->ev_cap = s->ev_used = 0;
    }

    /* everything, the remembered blocks too (the sink's end) */
    static void fp_sink_dealloc(fp_sink *s) {
        int i;
        fp_sink_free(s);
        fp_ev_free(s);
        for (i = 0; i < FP_SINK_MEMO; i++) {
            free(s->mbuf[i]);
            s->mbuf[i] = NULL;
            Py_CLEAR(s->mlist[i]);
        }
    }

    /* the list of a remembered block with the same fields as the one taken, or NULL */
    static PyObject *fp_sink_recall(fp_sink *s, const char *buf, size_t used) {
        int i;
        for (i = 0; i < FP_SINK_MEMO; i++) {
            if (s->mlist[i] != NULL && s->mused[i] == used
                    && memcmp(s->mbuf[i], buf, used) == 0) {
                Py_INCREF(s->mlist[i]);
                return s->mlist[i];
            }
        }
        return NULL;
    }

    /* remember the block taken and its list (a failed copy: not remembered) */
    static void fp_sink_remember(fp_sink *s, const char *buf, size_t used,
                                 PyObject *list) {
        int i = s->mnext;
        char *copy;
        if (used > FP_SINK_MEMO_MAX)
            return;
        copy = (char *)realloc(s->mbuf[i], used ? used : 1);
        if (copy == NULL)
            return;
        memcpy(copy, buf, used);
        s->mbuf[i] = copy;
        s->mused[i] = used;
        Py_INCREF(list);
        Py_XSETREF(s->mlist[i], list);
        s->mnext = (i + 1) % FP_SINK_MEMO;
    }

    /* grow *buf (capacity *cap, doubling from first) to hold need bytes; -1: no memory */
    static int fp_grow(char **buf, size_t *cap, size_t need, size_t first) {
        size_t c;
        char *grown;
        if (need <= *cap)
            return 0;
        c = *cap ? *cap : first;
        while (c < need)
            c *= 2;
        grown = (char *)realloc(*buf, c);
        if (grown == NULL)
            return -1;
        *buf = grown;
        *cap = c;
        return 0;
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
        if (fp_grow(&s->buf, &s->cap, need, 1024) < 0)
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        memcpy(s->buf + s->used, &namelen, sizeof(size_t));
        memcpy(s->buf + s->used + sizeof(size_t), &valuelen, sizeof(size_t));
        s->used += 2 * sizeof(size_t);
        memcpy(s->buf + s->used, name, namelen);
        memcpy(s->buf + s->used + namelen, value, valuelen);
        s->used += namelen + valuelen;
        s->count++;
        return 0;
    }

    /* a block's fields (buf: count fields as fp_on_header stores them) as a list of
       (name, value) bytes; a memo sink's list of the same block again when it has one */
    static PyObject *fp_block_list(fp_sink *s, const char *buf, size_t used,
                                   Py_ssize_t count) {
        PyObject *out, *name, *value, *pair;
        size_t at = 0, namelen, valuelen;
        Py_ssize_t i;
        if (s->memo && (out = fp_sink_recall(s, buf, used)) != NULL)
            return out;
        out = PyList_New(count);
        if (out == NULL)
            return NULL;
        for (i = 0; i < count; i++) {
            memcpy(&namelen, buf + at, sizeof(size_t));
            memcpy(&valuelen, buf + at + sizeof(size_t), sizeof(size_t));
            at += 2 * sizeof(size_t);
            name = PyBytes_FromStringAndSize(buf + at, (Py_ssize_t)namelen);
            value = name ? PyBytes_FromStringAndSize(buf + at + namelen,
                                                      (Py_ssize_t)valuelen) : NULL;
            pair = value ? PyTuple_New(2) : NULL;
            if (pair == NULL) {
                Py_XDECREF(name);
                Py_XDECREF(value);
                Py_DECREF(out);
                return NULL;
            }
            PyTuple_SET_ITEM(pair, 0, name);
            PyTuple_SET_ITEM(pair, 1, value);
            PyList_SET_ITEM(out, i, pair);
            at += namelen + valuelen;
        }
        if (s->memo)
            fp_sink_remember(s, buf, used, out);
        return out;
    }

    /* block sid's fields as a list of (name, value) bytes, None if it passed the limit;
       the sink is then empty */
    static PyObject *fp_sink_take(fp_sink *s, int32_t sid) {
        PyObject *out;
        if (s->sid != sid)  /* a block without fields */
            return PyList_New(0);
        s->sid = 0;
        if (s->oversize) {
            s->oversize = 0;
            Py_RETURN_NONE;
        }
        out = fp_block_list(s, s->buf, s->used, s->count);
        s->used = 0;
        s->count = 0;
        if (s->cap > FP_SINK_KEEP)
            fp_sink_free(s);
        return out;
    }

    /* -- the upstream client's events, queued in C ------------------------------------
       During nghttp2_session_mem_recv/mem_send the client's callbacks only queue what
       happened (fp_ev_push); forkproxy/http2/client.py drains the queue once the call
       returned: one call into Python per read instead of one per frame, chunk and
       stream closed. */

    static int fp_ev_push(fp_sink *s, int kind, int32_t sid, int64_t a, int64_t b,
                          const char *bytes, size_t len, Py_ssize_t count) {
        fp_event e;
        size_t need = s->ev_used + sizeof(fp_event) + len;
        if (fp_grow(&s->ev, &s->ev_cap, need, 4096) < 0)
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        e.kind = kind;
        e.sid = sid;
        e.a = a;
        e.b = b;
        e.len = len;
        e.count = count;
        memcpy(s->ev + s->ev_used, &e, sizeof(fp_event));
        if (len)
            memcpy(s->ev + s->ev_used + sizeof(fp_event), bytes, len);
        s->ev_used = need;
        return 0;
    }

    /* the frames client.py acts on, queued (the others are done with here) */
    static int fp_client_frame_recv(nghttp2_session *session, const nghttp2_frame *frame,
                                    void *user_data) {
        fp_sink *s = (fp_sink *)user_data;
        int32_t sid = frame->hd.stream_id;
        int rv;
        (void)session;
        switch (frame->hd.type) {
        case NGHTTP2_HEADERS:
            if (s->sid != sid)  /* a block without fields */
                return fp_ev_push(s, (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)
                                  ? FP_EV_HEADERS_END : FP_EV_HEADERS, sid, 0, 0, NULL, 0, 0);
            /* (a block past the limit failed its callback: no frame_recv for it) */
            rv = fp_ev_push(s, (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)
                            ? FP_EV_HEADERS_END : FP_EV_HEADERS, sid, 0, 0,
                            s->buf, s->used, s->count);
            s->sid = 0;
            s->used = 0;
            s->count = 0;
            if (s->cap > FP_SINK_KEEP)
                fp_sink_free(s);
            return rv;
        case NGHTTP2_DATA:
            if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)
                return fp_ev_push(s, FP_EV_END, sid, 0, 0, NULL, 0, 0);
            return 0;
        case NGHTTP2_GOAWAY:
            return fp_ev_push(s, FP_EV_GOAWAY, 0, frame->goaway.last_stream_id,
                              frame->goaway.error_code, NULL, 0, 0);
        case NGHTTP2_SETTINGS:
            if (frame->hd.flags & NGHTTP2_FLAG_ACK)
                return 0;
            return fp_ev_push(s, FP_EV_SETTINGS, 0, 0, 0, NULL, 0, 0);
        case NGHTTP2_PING:
            if (!(frame->hd.flags & NGHTTP2_FLAG_ACK))
                return 0;
            return fp_ev_push(s, FP_EV_PONG, 0, 0, 0, NULL, 0, 0);
        default:
            return 0;
        }
    }

    static int fp_client_data_chunk(nghttp2_session *session, uint8_t flags, int32_t sid,
                                    const uint8_t *data, size_t len, void *user_data) {
        (void)session; (void)flags;
        return fp_ev_push((fp_sink *)user_data, FP_EV_DATA, sid, 0, 0,
                          (const char *)data, len, 0);
    }

    static int fp_client_stream_close(nghttp2_session *session, int32_t sid,
                                      uint32_t code, void *user_data) {
        (void)session;
        return fp_ev_push((fp_sink *)user_data, FP_EV_CLOSED, sid, code, 0, NULL, 0, 0);
    }

    /* -- the server session's events, queued in C --------------------------------------
       forkproxy/http2/session.py: header blocks, DATA chunks, the END_STREAM of DATA and
       stream closes are queued; every other frame received (RST_STREAM, control frames,
       GOAWAY, PING, an empty DATA frame: limits and counting) goes to the Python
       callback at once, which first handles what was queued before it, so the order is
       the Python callbacks' and a limit still stops nghttp2 mid-read. */
    static int fp_server_frame_recv(nghttp2_session *session, const nghttp2_frame *frame,
                                    void *user_data) {
        fp_sink *s = (fp_sink *)user_data;
        int32_t sid = frame->hd.stream_id;
        int end = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
        int kind, rv;
        switch (frame->hd.type) {
        case NGHTTP2_HEADERS:
            kind = frame->headers.cat == NGHTTP2_HCAT_REQUEST
                ? (end ? FP_EV_REQUEST_END : FP_EV_REQUEST)
                : (end ? FP_EV_BLOCK_END : FP_EV_BLOCK);
            if (s->sid != sid)  /* a block without fields */
                return fp_ev_push(s, kind, sid, 0, 0, NULL, 0, 0);
            rv = fp_ev_push(s, kind, sid, 0, 0, s->buf, s->oversize ? 0 : s->used,
                            s->oversize ? -1 : s->count);
            s->sid = 0;
            s->oversize = 0;
            s->used = 0;
            s->count = 0;
            if (s->cap > FP_SINK_KEEP)
                fp_sink_free(s);
            return rv;
        case NGHTTP2_DATA:
            if (end)
                return fp_ev_push(s, FP_EV_END, sid, 0, 0, NULL, 0, 0);
            if (frame->hd.length > 0)
                return 0;
            break;  /* an empty DATA frame: the control-frame budget */
        default:
            break;
        }
        return s->py_frame_recv(session, frame, user_data);
    }

    /* the frames sent the server acts on after the call (an answer that ended its
       stream before the request did, the DATA frames that earn WINDOW_UPDATEs) are
       queued; a HEADERS frame without END_STREAM needs nothing; RST_STREAM and GOAWAY
       (counting, the end of the connection) go to the Python callback at once */
    static int fp_server_frame_send(nghttp2_session *session, const nghttp2_frame *frame,
                                    void *user_data) {
        fp_sink *s = (fp_sink *)user_data;
        int end = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
        switch (frame->hd.type) {
        case NGHTTP2_DATA:
            return fp_ev_push(s, end ? FP_EV_SENT_DATA_END : FP_EV_SENT_DATA,
                              frame->hd.stream_id, 0, 0, NULL, 0, 0);
        case NGHTTP2_HEADERS:
            return end ? fp_ev_push(s, FP_EV_SENT_HEADERS_END, frame->hd.stream_id, 0, 0,
                                    NULL, 0, 0) : 0;
        default:
            return s->py_frame_send(session, frame, user_data);
        }
    }

    static void fp_sink_set_py_callbacks(fp_sink *s, Py_ssize_t recv, Py_ssize_t send) {
        s->py_frame_recv = (int (*)(nghttp2_session *, const nghttp2_frame *, void *))recv;
        s->py_frame_send = (int (*)(nghttp2_session *, const nghttp2_frame *, void *))send;
    }

    static Py_ssize_t fp_server_frame_send_address(void) {
        return (Py_ssize_t)&fp_server_frame_send;
    }

    static Py_ssize_t fp_server_frame_recv_address(void) {
        return (Py_ssize_t)&fp_server_frame_recv;
    }

    /* the queued events as a list of (kind, stream id, payload), in order; the queue is
       then empty (None: nothing was queued) */
    static PyObject *fp_sink_drain(fp_sink *s) {
        PyObject *out, *item, *payload, *kind, *sid;
        fp_event e;
        size_t at = 0;
        const char *bytes;
        if (s->ev_used == 0)
            Py_RETURN_NONE;
        out = PyList_New(0);
        if (out == NULL)
            goto fail;
        while (at < s->ev_used) {
            memcpy(&e, s->ev + at, sizeof(fp_event));
            bytes = s->ev + at + sizeof(fp_event);
            at += sizeof(fp_event) + e.len;
            switch (e.kind) {
            case FP_EV_HEADERS:
            case FP_EV_HEADERS_END:
            case FP_EV_REQUEST:
            case FP_EV_REQUEST_END:
            case FP_EV_BLOCK:
            case FP_EV_BLOCK_END:
                if (e.count < 0) {  /* past the limit */
                    payload = Py_None;
                    Py_INCREF(payload);
                } else {
                    payload = fp_block_list(s, bytes, e.len, e.count);
                }
                break;
            case FP_EV_DATA:
                payload = PyBytes_FromStringAndSize(bytes, (Py_ssize_t)e.len);
                break;
            case FP_EV_CLOSED:
                payload = PyLong_FromLongLong(e.a);
                break;
            case FP_EV_GOAWAY:
                payload = Py_BuildValue("(LL)", (long long)e.a, (long long)e.b);
                break;
            default:
                payload = Py_None;
                Py_INCREF(payload);
            }
            if (payload == NULL)
                goto fail;
            item = PyTuple_New(3);
            if (item == NULL) {
                Py_DECREF(payload);
                goto fail;
            }
            PyTuple_SET_ITEM(item, 2, payload);
            if ((kind = PyLong_FromLong(e.kind)) == NULL) {
                Py_DECREF(item);
                goto fail;
            }
            PyTuple_SET_ITEM(item, 0, kind);
            if ((sid = PyLong_FromLong(e.sid)) == NULL) {
                Py_DECREF(item);
                goto fail;
            }
            PyTuple_SET_ITEM(item, 1, sid);
            if (PyList_Append(out, item) < 0) {
                Py_DECREF(item);
                goto fail;
            }
            Py_DECREF(item);
        }
        s->ev_used = 0;
        if (s->ev_cap > FP_EV_KEEP)
            fp_ev_free(s);
        return out;
    fail:
        Py_XDECREF(out);
        s->ev_used = 0;
        return NULL;
    }

    static Py_ssize_t fp_client_frame_recv_address(void) {
        return (Py_ssize_t)&fp_client_frame_recv;
    }
    static Py_ssize_t fp_client_data_chunk_address(void) {
        return (Py_ssize_t)&fp_client_data_chunk;
    }
    static Py_ssize_t fp_client_stream_close_address(void) {
        return (Py_ssize_t)&fp_client_stream_close;
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
    object fp_sink_drain(fp_sink *s)
    Py_ssize_t fp_client_frame_recv_address()
    Py_ssize_t fp_client_data_chunk_address()
    Py_ssize_t fp_client_stream_close_address()
    Py_ssize_t fp_server_frame_recv_address()
    void fp_sink_set_py_callbacks(fp_sink *s, Py_ssize_t recv, Py_ssize_t send)
    Py_ssize_t fp_server_frame_send_address()


cdef class CFieldSink:
    cdef fp_sink sink

    cpdef take(self, int sid)
    cpdef drain(self)
