# C for headscan.py (Cython pure-Python mode, setup.py's COMPILED): one loop over a head's
# bytes, checking each against the grammar of the .py's regexes, and the same results built.
cimport cython

cdef extern from *:
    """
    #include <string.h>

    /* byte classes of the .py's regexes: a token character (field names), a value
       character (HTAB, SP, VCHAR, obs-text: values and reasons), a target character
       (the origin-form target's URI characters) */
    #define FP_TCHAR 1
    #define FP_VCHAR 2
    #define FP_UCHAR 4
    static unsigned char fp_class[256];
    static int fp_class_ready = 0;

    static void fp_class_init(void) {
        int c;
        const char *t = "!#$%&'*+-.^_`|~";
        const char *u = "-._~!$&'()*+,;=:@/?%";
        for (c = 0; c < 256; c++) {
            unsigned char k = 0;
            int alnum = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
            if (alnum || (c && strchr(t, c))) k |= FP_TCHAR;
            if (c == '\\t' || (c >= 0x20 && c <= 0x7e) || c >= 0x80) k |= FP_VCHAR;
            if (alnum || (c && strchr(u, c))) k |= FP_UCHAR;
            fp_class[c] = k;
        }
        fp_class_ready = 1;
    }

    /* s[0:n] equals the lower-case lit[0:n], ASCII letters compared without case */
    static int fp_ieq(const unsigned char *s, const char *lit, Py_ssize_t n) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) {
            unsigned char c = s[i];
            if (c >= 'A' && c <= 'Z') c += 32;
            if (c != (unsigned char)lit[i]) return 0;
        }
        return 1;
    }

    /* the end of the field at h[p] ("name:value" then CRLF): the index of its CR, or -1
       when it is not one; *colon gets the colon's index */
    static Py_ssize_t fp_field(const unsigned char *h, Py_ssize_t n, Py_ssize_t p,
                               Py_ssize_t *colon) {
        Py_ssize_t start = p;
        while (p < n && (fp_class[h[p]] & FP_TCHAR)) p++;
        if (p == start || p >= n || h[p] != ':') return -1;
        *colon = p++;
        while (p < n && (fp_class[h[p]] & FP_VCHAR)) p++;
        if (p + 1 >= n || h[p] != '\\r' || h[p + 1] != '\\n') return -1;
        return p;
    }

    /* 0: a field name the response fast path takes as it comes; 1: Content-Length;
       2: Connection; -1: a hop-by-hop field (the full parser's) */
    static int fp_response_field(const unsigned char *s, Py_ssize_t n) {
        switch (n) {
        case 2: return fp_ieq(s, "te", 2) ? -1 : 0;
        case 7: return fp_ieq(s, "trailer", 7) || fp_ieq(s, "upgrade", 7) ? -1 : 0;
        case 10:
            if (fp_ieq(s, "connection", 10)) return 2;
            return fp_ieq(s, "keep-alive", 10) ? -1 : 0;
        case 14: return fp_ieq(s, "content-length", 14);
        case 16: return fp_ieq(s, "proxy-connection", 16) ? -1 : 0;
        case 17: return fp_ieq(s, "transfer-encoding", 17) ? -1 : 0;
        case 18: return fp_ieq(s, "proxy-authenticate", 18) ? -1 : 0;
        case 19: return fp_ieq(s, "proxy-authorization", 19) ? -1 : 0;
        }
        return 0;
    }

    /* a Content-Length value (after the colon) as the .py reads it: blanks before the
       digits, 1-18 digits, no leading zero; -1 otherwise */
    static long long fp_content_length(const unsigned char *v, Py_ssize_t n) {
        Py_ssize_t i = 0;
        long long x = 0;
        while (i < n && (v[i] == ' ' || v[i] == '\\t')) i++;
        if (i == n || n - i > 18 || (v[i] == '0' && n - i > 1)) return -1;
        for (; i < n; i++) {
            if (v[i] < '0' || v[i] > '9') return -1;
            x = x * 10 + (v[i] - '0');
        }
        return x;
    }

    /* a Connection value: 0 close, 1 keep-alive, -1 anything else */
    static int fp_connection(const unsigned char *v, Py_ssize_t n) {
        while (n && (v[0] == ' ' || v[0] == '\\t')) v++, n--;
        while (n && (v[n - 1] == ' ' || v[n - 1] == '\\t')) n--;
        if (n == 5 && fp_ieq(v, "close", 5)) return 0;
        if (n == 10 && fp_ieq(v, "keep-alive", 10)) return 1;
        return -1;
    }

    /* a new tuple of n new references, each stolen (all dropped when one is NULL: its
       error is set) */
    static PyObject *fp_tuple(Py_ssize_t n, PyObject *const *items) {
        PyObject *t = NULL;
        Py_ssize_t i;
        for (i = 0; i < n && items[i] != NULL; i++) {}
        if (i == n) t = PyTuple_New(n);
        if (t == NULL) {
            for (i = 0; i < n; i++) Py_XDECREF(items[i]);
            return NULL;
        }
        for (i = 0; i < n; i++) PyTuple_SET_ITEM(t, i, items[i]);
        return t;
    }

    /* a new (name, value) tuple of two slices of h */
    static PyObject *fp_pair(const unsigned char *h, Py_ssize_t a, Py_ssize_t an,
                             Py_ssize_t b, Py_ssize_t bn) {
        PyObject *items[2] = {PyBytes_FromStringAndSize((const char *)h + a, an),
                              PyBytes_FromStringAndSize((const char *)h + b, bn)};
        return fp_tuple(2, items);
    }

    /* headscan.judge_response_head for a bytes head: None, or (status, length, keep,
       the head to relay) */
    static PyObject *fp_judge_response_head(PyObject *obj) {
        const unsigned char *h = (const unsigned char *)PyBytes_AS_STRING(obj);
        Py_ssize_t n = PyBytes_GET_SIZE(obj), p = 13, colon, end;
        Py_ssize_t cut = -1, cut_end = -1;  /* the Connection line, CRLF before it */
        long long length = -1;
        int keep, what;
        PyObject *out;
        char *o;
        if (!fp_class_ready) fp_class_init();
        if (n < 17 || memcmp(h, "HTTP/1.", 7) || (h[7] != '0' && h[7] != '1')
                || h[8] != ' ' || h[9] < '2' || h[9] > '5'  /* 1xx: interim, 101 */
                || h[10] < '0' || h[10] > '9' || h[11] < '0' || h[11] > '9' || h[12] != ' ')
            Py_RETURN_NONE;
        keep = h[7] == '1';  /* HTTP/1.1: persistent unless "Connection: close" */
        while (p < n && (fp_class[h[p]] & FP_VCHAR)) p++;
        if (p + 1 >= n || h[p] != '\\r' || h[p + 1] != '\\n') Py_RETURN_NONE;
        p += 2;
        while (p < n && h[p] != '\\r') {
            end = fp_field(h, n, p, &colon);
            if (end < 0) Py_RETURN_NONE;
            what = fp_response_field(h + p, colon - p);
            if (what < 0) Py_RETURN_NONE;
            if (what == 1) {
                if (length >= 0) Py_RETURN_NONE;  /* two Content-Length fields */
                length = fp_content_length(h + colon + 1, end - colon - 1);
                if (length < 0) Py_RETURN_NONE;
            } else if (what == 2) {
                if (cut >= 0) Py_RETURN_NONE;  /* two Connection fields */
                keep = fp_connection(h + colon + 1, end - colon - 1);
                if (keep < 0) Py_RETURN_NONE;
                cut = p - 2;
                cut_end = end;
            }
            p = end + 2;
        }
        if (p + 2 != n || h[p + 1] != '\\n' || length < 0) Py_RETURN_NONE;
        if (cut < 0 && h[7] == '1') {
            Py_INCREF(obj);
            out = obj;
        } else {
            if (cut < 0) cut = cut_end = 0;
            out = PyBytes_FromStringAndSize(NULL, n - (cut_end - cut));
            if (out == NULL) return NULL;
            o = PyBytes_AS_STRING(out);
            memcpy(o, h, cut);
            memcpy(o + cut, h + cut_end, n - cut_end);
            o[7] = '1';  /* an HTTP/1.0 upstream's head is relayed as HTTP/1.1 */
        }
        {
            PyObject *items[4] = {
                PyLong_FromLong((h[9] - '0') * 100 + (h[10] - '0') * 10 + h[11] - '0'),
                PyLong_FromLongLong(length), PyBool_FromLong(keep), out};
            return fp_tuple(4, items);
        }
    }

    /* the request fields the fast path acts on (headscan.REQUEST_SPECIAL) */
    static const struct { const char *name; Py_ssize_t len; } fp_special[] = {
    #define FP_NAME(s) {s, sizeof(s) - 1}
        FP_NAME("te"), FP_NAME("host"), FP_NAME("expect"), FP_NAME("upgrade"),
        FP_NAME("trailer"), FP_NAME("connection"), FP_NAME("keep-alive"),
        FP_NAME("tracestate"), FP_NAME("traceparent"), FP_NAME("x-request-id"),
        FP_NAME("content-length"), FP_NAME("content_length"), FP_NAME("x-forwarded-for"),
        FP_NAME("proxy-connection"), FP_NAME("transfer-encoding"),
        FP_NAME("transfer_encoding"),
    #undef FP_NAME
    };

    /* the lower-case name of REQUEST_SPECIAL that s[0:n] is (a new reference), NULL when
       it is none of them (no error set) */
    static PyObject *fp_special_name(const unsigned char *s, Py_ssize_t n, int *failed) {
        size_t i;
        *failed = 0;
        if (n < 2 || n > 17) return NULL;
        for (i = 0; i < sizeof(fp_special) / sizeof(fp_special[0]); i++) {
            if (fp_special[i].len == n && fp_ieq(s, fp_special[i].name, n)) {
                PyObject *b = PyBytes_FromStringAndSize(fp_special[i].name, n);
                *failed = b == NULL;
                return b;
            }
        }
        return NULL;
    }

    /* headscan.scan_request_head for a bytes head: None, or (is_get, target,
       minor_is_0, fields, specials, header_bytes) */
    static PyObject *fp_scan_request_head(PyObject *obj) {
        const unsigned char *h = (const unsigned char *)PyBytes_AS_STRING(obj);
        Py_ssize_t n = PyBytes_GET_SIZE(obj), p, target, colon, end, v, header_bytes;
        int is_get, failed;
        PyObject *lists[2], *field, *low;
        if (!fp_class_ready) fp_class_init();
        if (n >= 4 && !memcmp(h, "GET ", 4)) is_get = 1, p = 4;
        else if (n >= 5 && !memcmp(h, "HEAD ", 5)) is_get = 0, p = 5;
        else Py_RETURN_NONE;
        target = p;
        if (p >= n || h[p] != '/') Py_RETURN_NONE;
        for (p++; p < n && (fp_class[h[p]] & FP_UCHAR); p++) {}
        if (n - p < 13 || memcmp(h + p, " HTTP/1.", 8) || (h[p + 8] != '0' && h[p + 8] != '1')
                || h[p + 9] != '\\r' || h[p + 10] != '\\n')
            Py_RETURN_NONE;
        header_bytes = p - target;
        lists[0] = PyList_New(0);  /* forwarded as they came */
        lists[1] = PyList_New(0);  /* REQUEST_SPECIAL's */
        if (lists[0] == NULL || lists[1] == NULL) goto error;
        for (end = p + 11; end < n && h[end] != '\\r'; end += 2) {
            Py_ssize_t start = end;
            end = fp_field(h, n, start, &colon);
            if (end < 0) {
                Py_DECREF(lists[0]);
                Py_DECREF(lists[1]);
                Py_RETURN_NONE;
            }
            for (v = colon + 1; v < end && (h[v] == ' ' || h[v] == '\\t'); v++) {}
            header_bytes += (colon - start) + (end - v) + 4;
            low = fp_special_name(h + start, colon - start, &failed);
            if (failed) goto error;
            if (low == NULL) {
                field = fp_pair(h, start, colon - start, v, end - v);
            } else {
                PyObject *items[2] = {low, PyBytes_FromStringAndSize((const char *)h + v, end - v)};
                field = fp_tuple(2, items);
            }
            if (field == NULL || PyList_Append(lists[low != NULL], field) < 0) {
                Py_XDECREF(field);
                goto error;
            }
            Py_DECREF(field);
        }
        if (end + 2 != n || h[end + 1] != '\\n') {
            Py_DECREF(lists[0]);
            Py_DECREF(lists[1]);
            Py_RETURN_NONE;
        }
        {
            PyObject *items[6] = {
                PyBool_FromLong(is_get),
                PyBytes_FromStringAndSize((const char *)h + target, p - target),
                PyBool_FromLong(h[p + 8] == '0'), lists[0], lists[1],
                PyLong_FromSsize_t(header_bytes)};
            return fp_tuple(6, items);
        }
    error:
        Py_XDECREF(lists[0]);
        Py_XDECREF(lists[1]);
        return NULL;
    }
    """
    object fp_judge_response_head(object head)
    object fp_scan_request_head(object head)

cpdef object judge_response_head(object head)
cpdef object scan_request_head(object head)
