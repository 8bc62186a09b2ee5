# The ``json`` access log line of a record scanned into a C struct (rawrecord.pxd),
# written in C: the same bytes msgspec writes for jsonline.JsonLine (field order,
# omit_defaults, msgspec's string escapes, floats as msgspec prints them). Declarations
# only: no module of this name runs; rawbatch.py calls fp_line. A record whose values are
# out of this writer's range (a duration of 1e12 µs or more, a timestamp outside
# [0, 1e11)) gets fp_line() == 0 and takes the Python line. tests/test_rawbatch.py
# compares the two byte for byte.

from forkproxy.manager.rawrecord cimport fp_rec

cdef extern from *:
    """
    typedef struct { char *buf; Py_ssize_t len, cap; } fp_out;

    /* room for more bytes at o->buf + o->len; -1 with MemoryError */
    static int fp_reserve(fp_out *o, Py_ssize_t more) {
        Py_ssize_t cap;
        char *b;
        if (o->len + more <= o->cap) return 0;
        cap = o->cap ? o->cap : 1 << 16;
        while (cap < o->len + more) cap *= 2;
        b = (char *)PyMem_Realloc(o->buf, (size_t)cap);
        if (b == NULL) { PyErr_NoMemory(); return -1; }
        o->buf = b;
        o->cap = cap;
        return 0;
    }

    static int fp_out_put(fp_out *o, const char *p, Py_ssize_t n) {
        if (fp_reserve(o, n) < 0) return -1;
        memcpy(o->buf + o->len, p, (size_t)n);
        o->len += n;
        return 0;
    }

    static fp_out *fp_out_new(void) {
        fp_out *o = (fp_out *)PyMem_Calloc(1, sizeof(fp_out));
        if (o == NULL) PyErr_NoMemory();
        return o;
    }

    static void fp_out_free(fp_out *o) {
        if (o != NULL) PyMem_Free(o->buf);
        PyMem_Free(o);
    }

    static PyObject *fp_out_bytes(fp_out *o) {
        return PyBytes_FromStringAndSize(o->len ? o->buf : "", o->len);
    }

    /* the bytes written so far, without a copy: valid until the next write or reset */
    static PyObject *fp_out_view(fp_out *o) {
        return PyMemoryView_FromMemory(o->len ? o->buf : (char *)"", o->len, PyBUF_READ);
    }

    #define FP_LIT(w, s) (memcpy((w), (s), sizeof(s) - 1), (w) += sizeof(s) - 1)

    static const char fp_hexd[] = "0123456789abcdef";

    /* a JSON string as msgspec writes it: the short escapes, u00XX escapes for the other
       control characters, '"' and backslash escaped, everything else as it is */
    static char *fp_jstr(char *w, const unsigned char *p, Py_ssize_t n) {
        Py_ssize_t i;
        *w++ = '"';
        for (i = 0; i < n; i++) {
            unsigned char b = p[i];
            if (b >= 0x20 && b != '"' && b != '\\\\') { *w++ = (char)b; continue; }
            *w++ = '\\\\';
            switch (b) {
            case '"': *w++ = '"'; break;
            case '\\\\': *w++ = '\\\\'; break;
            case '\\b': *w++ = 'b'; break;
            case '\\t': *w++ = 't'; break;
            case '\\n': *w++ = 'n'; break;
            case '\\f': *w++ = 'f'; break;
            case '\\r': *w++ = 'r'; break;
            default:
                *w++ = 'u'; *w++ = '0'; *w++ = '0';
                *w++ = fp_hexd[b >> 4]; *w++ = fp_hexd[b & 15];
            }
        }
        *w++ = '"';
        return w;
    }

    static char *fp_jhex(char *w, const unsigned char *p, Py_ssize_t n) {
        Py_ssize_t i;
        *w++ = '"';
        for (i = 0; i < n; i++) {
            *w++ = fp_hexd[p[i] >> 4];
            *w++ = fp_hexd[p[i] & 15];
        }
        *w++ = '"';
        return w;
    }

    static char *fp_jint(char *w, long long v) {
        char tmp[24];
        int n = 0;
        unsigned long long u;
        if (v < 0) { *w++ = '-'; u = 0ULL - (unsigned long long)v; }
        else u = (unsigned long long)v;
        do { tmp[n++] = (char)('0' + u % 10); u /= 10; } while (u);
        while (n) *w++ = tmp[--n];
        return w;
    }

    /* us / 1000.0 as msgspec prints it (the shortest repr): for 0 <= us < 1e12 it is
       the integer part, '.', and the thousandths without trailing zeros ("12.0") */
    static char *fp_jms(char *w, long long us) {
        int f = (int)(us % 1000);
        w = fp_jint(w, us / 1000);
        *w++ = '.';
        *w++ = (char)('0' + f / 100);
        if (f % 100) {
            *w++ = (char)('0' + f / 10 % 10);
            if (f % 10) *w++ = (char)('0' + f % 10);
        }
        return w;
    }

    /* int(x * 1e6 + 0.5) for 0 <= x, or -1 past the writer's range */
    static CYTHON_INLINE long long fp_us(double x) {
        double v = x * 1e6 + 0.5;
        if (!(v < 1e12)) return -1;
        return (long long)v;
    }

    typedef struct { const char *s; size_t n; } fp_key;
    #define FP_KEY(s) {(s), sizeof(s) - 1}
    static const fp_key fp_phase_keys[6] = {
        FP_KEY("\\"accept_to_headers\\":"), FP_KEY("\\"tls_handshake\\":"),
        FP_KEY("\\"upstream_connect\\":"), FP_KEY("\\"request_send\\":"),
        FP_KEY("\\"upstream_first_byte\\":"), FP_KEY("\\"response_body\\":")};

    /* the phases in µs (jsonline.phases_ms's conditions), -2: did not happen;
       returns -1 if one is out of range */
    static int fp_phases_us(const fp_rec *r, long long *us) {
        double ta = r->t[0], tt = r->t[1], th = r->t[2], tcs = r->t[3], tc = r->t[4],
               tsent = r->t[5], tfb = r->t[6], te = r->t[7];
        int i;
        for (i = 0; i < 6; i++) us[i] = -2;
        if (ta) {
            if (th && th >= ta) us[0] = fp_us(th - ta);
            if (tt && tt >= ta) us[1] = fp_us(tt - ta);
        }
        if (tcs && tc && tc >= tcs) us[2] = fp_us(tc - tcs);
        if (tc && tsent && tsent >= tc) us[3] = fp_us(tsent - tc);
        if (tsent && tfb && tfb >= tsent) us[4] = fp_us(tfb - tsent);
        if (tfb && te && te >= tfb) us[5] = fp_us(te - tfb);
        for (i = 0; i < 6; i++) if (us[i] == -1) return -1;
        return 0;
    }

    /* a string that needs no escape (the record's FP_ESC flag is clear) */
    static CYTHON_INLINE char *fp_jstr_plain(char *w, const unsigned char *p, Py_ssize_t n) {
        *w++ = '"';
        memcpy(w, p, (size_t)n);
        w += n;
        *w++ = '"';
        return w;
    }

    #define FP_S(w, f) ((w) = esc ? fp_jstr((w), r->f.p, r->f.n) \\
                              : fp_jstr_plain((w), r->f.p, r->f.n))

    /* One line into o: 1, or 0 when the Python line is needed, -1 on MemoryError.
       prefix: "YYYY-MM-DDTHH:MM:SS" of int(ts); frac: int((ts - int(ts)) * 1000). */
    static int fp_line(fp_out *o, const fp_rec *r, const char *prefix, int frac,
                       Py_ssize_t rec_len) {
        long long us[6], dur;
        double start = r->t[2] ? r->t[2] : r->t[0], end = r->t[7];
        char *w;
        int i, first = 1, esc = r->flags & FP_ESC;
        if (fp_phases_us(r, us) < 0) return 0;
        dur = (end && start && end >= start) ? fp_us(end - start) : 0;
        if (dur < 0) return 0;
        if (fp_reserve(o, 600 + 6 * rec_len) < 0) return -1;
        w = o->buf + o->len;
        FP_LIT(w, "{\\"ts\\":\\"");
        memcpy(w, prefix, 19); w += 19;
        *w++ = '.';
        *w++ = (char)('0' + frac / 100); *w++ = (char)('0' + frac / 10 % 10);
        *w++ = (char)('0' + frac % 10);
        FP_LIT(w, "Z\\",\\"request_id\\":"); FP_S(w, request_id);
        FP_LIT(w, ",\\"remote\\":"); FP_S(w, remote);
        FP_LIT(w, ",\\"method\\":"); FP_S(w, method);
        FP_LIT(w, ",\\"path\\":"); FP_S(w, path);
        FP_LIT(w, ",\\"status\\":"); w = fp_jint(w, r->status);
        FP_LIT(w, ",\\"bytes_out\\":"); w = fp_jint(w, r->bytes_out);
        FP_LIT(w, ",\\"upstream\\":"); FP_S(w, upstream);
        FP_LIT(w, ",\\"upstream_addr\\":"); FP_S(w, upstream_addr);
        FP_LIT(w, ",\\"duration_ms\\":"); w = fp_jms(w, dur);
        FP_LIT(w, ",\\"phases\\":{");
        for (i = 0; i < 6; i++) {
            if (us[i] < 0) continue;
            if (!first) *w++ = ',';
            first = 0;
            memcpy(w, fp_phase_keys[i].s, fp_phase_keys[i].n);
            w += fp_phase_keys[i].n;
            w = fp_jms(w, us[i]);
        }
        FP_LIT(w, "},\\"tls_resumed\\":");
        if (r->tls_resumed < 0) FP_LIT(w, "null");
        else if (r->tls_resumed) FP_LIT(w, "true");
        else FP_LIT(w, "false");
        FP_LIT(w, ",\\"worker\\":"); w = fp_jint(w, r->worker);
        FP_LIT(w, ",\\"listener\\":"); FP_S(w, listener);
        FP_LIT(w, ",\\"bytes_in\\":"); w = fp_jint(w, r->bytes_in);
        FP_LIT(w, ",\\"upstream_reused\\":");
        if (r->reused) FP_LIT(w, "true"); else FP_LIT(w, "false");
        FP_LIT(w, ",\\"tls_version\\":"); FP_S(w, tls_version);
        FP_LIT(w, ",\\"error\\":"); FP_S(w, error);
        FP_LIT(w, ",\\"trace_id\\":"); w = fp_jhex(w, r->trace_id.p, r->trace_id.n);
        FP_LIT(w, ",\\"span_id\\":"); w = fp_jhex(w, r->span_id.p, r->span_id.n);
        FP_LIT(w, ",\\"protocol\\":"); FP_S(w, protocol);
        if (r->stream) { FP_LIT(w, ",\\"stream\\":"); w = fp_jint(w, r->stream); }
        if (r->has_grpc) {
            if (r->path.n) { FP_LIT(w, ",\\"grpc_method\\":"); FP_S(w, path); }
            FP_LIT(w, ",\\"grpc_status\\":"); w = fp_jint(w, r->grpc_status);
        }
        FP_LIT(w, "}\\n");
        o->len = w - o->buf;
        return 1;
    }
    """
    ctypedef struct fp_out:
        char *buf
        Py_ssize_t len, cap

    fp_out *fp_out_new() except NULL
    void fp_out_free(fp_out *o) noexcept
    bytes fp_out_bytes(fp_out *o)
    object fp_out_view(fp_out *o)
    int fp_out_put(fp_out *o, const char *p, Py_ssize_t n) except -1
    int fp_line(fp_out *o, const fp_rec *r, const char *prefix, int frac,
                Py_ssize_t rec_len) except -1
