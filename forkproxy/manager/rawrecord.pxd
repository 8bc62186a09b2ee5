# A ring record (context.py's RequestContext, msgpack, array_like, tag 1) read into a C
# struct, and the C helpers of the compiled record path (rawbatch.pxd cimports these).
# Declarations only: no module of this name runs. Anything the scanner does not take
# (another tag, another field count or type, a non-ASCII string, a number out of the
# range the C counters keep) makes fp_scan return -1: that record is
# decoded by msgspec and takes the Python path (rawbatch.py).

cdef extern from *:
    """
    #include <string.h>
    #include <stdint.h>

    typedef struct { const unsigned char *p; Py_ssize_t n; } fp_str;

    /* a string that JSON must escape (a control character, '"' or a backslash) */
    #define FP_ESC 1

    typedef struct {
        double ts;
        long long worker, status, bytes_in, bytes_out, stream;
        fp_str request_id, listener, remote, method, path, upstream, upstream_addr,
               tls_version, error, protocol, route, trace_id, span_id, parent_span_id,
               tracestate;
        int reused, tls_resumed;  /* tls_resumed: -1 = None (plain-text listener) */
        int flags;
        double t[8];
        /* the rare fields (Metrics.count_rare); has_grpc: grpc_status is not None */
        fp_str reject;
        long long retries, grpc_status, trace_flags;
        int tunnel, has_grpc;
    } fp_rec;

    typedef struct { const unsigned char *p, *end; int flags; } fp_cur;

    static int fp_get_int(fp_cur *c, long long *v) {
        unsigned char b;
        unsigned long long u = 0;
        int n, i, sign;
        if (c->p >= c->end) return -1;
        b = *c->p++;
        if (b <= 0x7f) { *v = b; return 0; }
        if (b >= 0xe0) { *v = (long long)(signed char)b; return 0; }
        switch (b) {
        case 0xcc: n = 1; sign = 0; break;
        case 0xcd: n = 2; sign = 0; break;
        case 0xce: n = 4; sign = 0; break;
        case 0xcf: n = 8; sign = 0; break;
        case 0xd0: n = 1; sign = 1; break;
        case 0xd1: n = 2; sign = 1; break;
        case 0xd2: n = 4; sign = 1; break;
        case 0xd3: n = 8; sign = 1; break;
        default: return -1;
        }
        if (c->end - c->p < n) return -1;
        for (i = 0; i < n; i++) u = (u << 8) | c->p[i];
        c->p += n;
        if (sign) {
            if (n < 8 && (u >> (8 * n - 1)) & 1) u |= ~0ULL << (8 * n);
            *v = (long long)u;
        } else {
            if (u > (unsigned long long)INT64_MAX) return -1;
            *v = (long long)u;
        }
        return 0;
    }

    static int fp_get_f64(fp_cur *c, double *v) {
        uint64_t u = 0;
        int i;
        if (c->end - c->p < 9 || c->p[0] != 0xcb) return -1;
        for (i = 1; i <= 8; i++) u = (u << 8) | c->p[i];
        memcpy(v, &u, 8);
        c->p += 9;
        return 0;
    }

    static int fp_get_len(fp_cur *c, Py_ssize_t *n, int nbytes) {
        Py_ssize_t v = 0;
        int i;
        if (c->end - c->p < nbytes) return -1;
        for (i = 0; i < nbytes; i++) v = (v << 8) | c->p[i];
        c->p += nbytes;
        *n = v;
        return 0;
    }

    /* Whether a byte of a word is >= 0x80 (its bit in FP_HIGHS), and, for words without
       one, whether a byte is < 0x20, '"' or a backslash (FP_ESCW's FP_HIGHS bits): the
       "has a byte less than" and "has a zero byte" tests of a 64-bit word (their
       per-byte bits may be wrong, their "any" is exact when no byte is >= 0x80, which is
       checked first). */
    #define FP_ONES 0x0101010101010101ULL
    #define FP_HIGHS 0x8080808080808080ULL
    #define FP_ESCW(v) ((((v) - 0x20 * FP_ONES) & ~(v)) \\
                        | ((((v) ^ (0x22 * FP_ONES)) - FP_ONES) & ~((v) ^ (0x22 * FP_ONES))) \\
                        | ((((v) ^ (0x5c * FP_ONES)) - FP_ONES) & ~((v) ^ (0x5c * FP_ONES))))

    /* A string's n bytes at p (room: bytes readable from p, >= n): -1 if one is not ASCII;
       else FP_ESC into *flags if one needs a JSON escape. Eight bytes a step; the last
       step reads a whole word when the record has the room (its other bytes masked to
       'A'), bytewise otherwise. */
    static CYTHON_INLINE int fp_str_check(const unsigned char *p, Py_ssize_t n,
                                          Py_ssize_t room, int *flags) {
        Py_ssize_t i = 0;
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        uint64_t hi = 0, esc = 0, v, keep;
        for (; i + 8 <= n; i += 8) {
            memcpy(&v, p + i, 8);
            hi |= v;
            esc |= FP_ESCW(v);
        }
        if (i < n && room - i >= 8) {
            memcpy(&v, p + i, 8);
            keep = ~0ULL >> (8 * (8 - (n - i)));
            v = (v & keep) | (0x41 * FP_ONES & ~keep);
            hi |= v;
            esc |= FP_ESCW(v);
            i = n;
        }
        if (hi & FP_HIGHS) return -1;
        if (esc & FP_HIGHS) *flags |= FP_ESC;
    #endif
        for (; i < n; i++) {
            unsigned char b = p[i];
            if (b >= 0x80) return -1;
            if (b < 0x20 || b == '"' || b == '\\\\') *flags |= FP_ESC;
        }
        return 0;
    }

    /* a str: ASCII only (anything else is left to msgspec, which checks UTF-8) */
    static int fp_get_str(fp_cur *c, fp_str *s) {
        unsigned char b;
        Py_ssize_t n;
        if (c->p >= c->end) return -1;
        b = *c->p++;
        if (b >= 0xa0 && b <= 0xbf) n = b & 0x1f;
        else if (b == 0xd9) { if (fp_get_len(c, &n, 1)) return -1; }
        else if (b == 0xda) { if (fp_get_len(c, &n, 2)) return -1; }
        else if (b == 0xdb) { if (fp_get_len(c, &n, 4)) return -1; }
        else return -1;
        if (c->end - c->p < n) return -1;
        if (fp_str_check(c->p, n, c->end - c->p, &c->flags) < 0) return -1;
        s->p = c->p;
        s->n = n;
        c->p += n;
        return 0;
    }

    static int fp_get_bin(fp_cur *c, fp_str *s) {
        unsigned char b;
        Py_ssize_t n;
        if (c->p >= c->end) return -1;
        b = *c->p++;
        if (b == 0xc4) { if (fp_get_len(c, &n, 1)) return -1; }
        else if (b == 0xc5) { if (fp_get_len(c, &n, 2)) return -1; }
        else if (b == 0xc6) { if (fp_get_len(c, &n, 4)) return -1; }
        else return -1;
        if (c->end - c->p < n) return -1;
        s->p = c->p;
        s->n = n;
        c->p += n;
        return 0;
    }

    /* a bool (0xc2, 0xc3), or with nil_ok None (0xc0) as -1 */
    static int fp_get_bool(fp_cur *c, int *v, int nil_ok) {
        unsigned char b;
        if (c->p >= c->end) return -1;
        b = *c->p++;
        if (b == 0xc2 || b == 0xc3) { *v = b == 0xc3; return 0; }
        if (b == 0xc0 && nil_ok) { *v = -1; return 0; }
        return -1;
    }

    /* 0: the record is in r; -1: decode it with msgspec instead (see above) */
    static int fp_scan(const unsigned char *p, Py_ssize_t n, fp_rec *r) {
        fp_cur c;
        long long tag;
        int i;
        if (n < 4 || p[0] != 0xdc || p[1] != 0 || p[2] != 30) return -1;
        c.p = p + 3; c.end = p + n; c.flags = 0;
        if (fp_get_int(&c, &tag) || tag != 1
            || fp_get_f64(&c, &r->ts) || fp_get_str(&c, &r->request_id)
            || fp_get_int(&c, &r->worker) || fp_get_str(&c, &r->listener)
            || fp_get_str(&c, &r->remote) || fp_get_str(&c, &r->method)
            || fp_get_str(&c, &r->path) || fp_get_int(&c, &r->status)
            || fp_get_int(&c, &r->bytes_in) || fp_get_int(&c, &r->bytes_out)
            || fp_get_str(&c, &r->upstream) || fp_get_str(&c, &r->upstream_addr)
            || fp_get_bool(&c, &r->reused, 0) || fp_get_bool(&c, &r->tls_resumed, 1)
            || fp_get_str(&c, &r->tls_version))
            return -1;
        if (c.p >= c.end || *c.p++ != 0x98) return -1;
        for (i = 0; i < 8; i++)
            if (fp_get_f64(&c, &r->t[i])) return -1;
        if (fp_get_str(&c, &r->error) || fp_get_str(&c, &r->reject)
            || fp_get_int(&c, &r->retries) || fp_get_bool(&c, &r->tunnel, 0)
            || fp_get_str(&c, &r->protocol) || fp_get_int(&c, &r->stream)
            || fp_get_str(&c, &r->route) || fp_get_bin(&c, &r->trace_id)
            || fp_get_bin(&c, &r->span_id) || fp_get_bin(&c, &r->parent_span_id)
            || fp_get_int(&c, &r->trace_flags) || fp_get_str(&c, &r->tracestate))
            return -1;
        /* grpc_status (None or an int), and the end of the record */
        if (c.p < c.end && *c.p == 0xc0) { r->has_grpc = 0; r->grpc_status = 0; c.p++; }
        else if (fp_get_int(&c, &r->grpc_status)) return -1;
        else r->has_grpc = 1;
        if (c.p != c.end) return -1;
        /* the counters' keys and sums stay in what the C cells hold */
        if (r->status < 0 || r->status > 0xffff || r->bytes_in < 0 || r->bytes_out < 0
            || r->bytes_in > (1LL << 48) || r->bytes_out > (1LL << 48)
            || r->retries < -(1LL << 40) || r->retries > (1LL << 40)
            || r->grpc_status < 0 || r->grpc_status > 0xffff) return -1;
        r->flags = c.flags;
        return 0;
    }

    /* Whether a sampling rule keeps the record (sampling.sample_batch's rules): 1 or 0;
       -1 for a trace id that is not 16 bytes (never from a worker: the caller decodes
       the record and lets sample_batch decide). */
    static int fp_may_sample(const fp_rec *r, int everything, unsigned long long below,
                             double slower_than) {
        unsigned long long low = 0;
        double start;
        int i;
        if (r->trace_id.n == 0) return 0;
        if (everything || (r->trace_flags & 1)) return 1;
        if (r->trace_id.n != 16) return -1;
        for (i = 8; i < 16; i++) low = (low << 8) | r->trace_id.p[i];
        if (low < below || r->status >= 500 || r->error.n) return 1;
        start = r->t[0];
        if (start == 0) start = r->t[2];
        return start != 0 && r->t[7] - start > slower_than;
    }

    /* 64-bit hash of a short string (8 bytes at a time) */
    static CYTHON_INLINE uint64_t fp_hash(const unsigned char *p, Py_ssize_t n) {
        uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)n, w;
        while (n >= 8) {
            memcpy(&w, p, 8);
            h = (h ^ w) * 0xff51afd7ed558ccdULL;
            h ^= h >> 32;
            p += 8; n -= 8;
        }
        if (n) {
            w = 0;
            memcpy(&w, p, (size_t)n);
            h = (h ^ w) * 0xff51afd7ed558ccdULL;
            h ^= h >> 32;
        }
        return h ^ (h >> 29);
    }

    /* Interned strings: ids of the names the counters are keyed by (listener, upstream,
       route). A table of FP_NAMES_SLOTS (hash, id + 1) pairs; names: a list of str, the
       id's string. Returns the id, or -1 with a Python error set. */
    #define FP_NAMES_SLOTS (1 << 16)
    #define FP_NAMES_MAX (1 << 14)

    typedef struct { uint64_t hash; Py_ssize_t id1; } fp_name_slot;

    static Py_ssize_t fp_intern(fp_name_slot *tab, PyObject *names, fp_str s) {
        uint64_t h = fp_hash(s.p, s.n);
        size_t i = (size_t)h & (FP_NAMES_SLOTS - 1);
        PyObject *str;
        Py_ssize_t id;
        for (;;) {
            fp_name_slot *slot = &tab[i];
            if (slot->id1 == 0) break;
            if (slot->hash == h) {
                str = PyList_GET_ITEM(names, slot->id1 - 1);
                if (PyUnicode_GET_LENGTH(str) == s.n
                    && memcmp(PyUnicode_DATA(str), s.p, (size_t)s.n) == 0)
                    return slot->id1 - 1;
            }
            i = (i + 1) & (FP_NAMES_SLOTS - 1);
        }
        str = PyUnicode_DecodeASCII((const char *)s.p, s.n, NULL);
        if (str == NULL) return -1;
        id = PyList_GET_SIZE(names);
        if (PyList_Append(names, str) < 0) { Py_DECREF(str); return -1; }
        Py_DECREF(str);
        tab[i].hash = h;
        tab[i].id1 = id + 1;
        return id;
    }

    /* Per-batch cells: a 64-bit key (kind and ids, rawbatch.py) -> a cell number, given
       in the order first seen; the cell's count and key live in rawbatch's arrays. */
    #define FP_CELL_SLOTS (1 << 16)

    typedef struct { uint64_t key; Py_ssize_t cell1; } fp_cell_slot;

    /* the cell of key, or a new one (*fresh set); ncells: cells in use; slot_of[cell]:
       its slot (to clear the table after the batch) */
    static CYTHON_INLINE Py_ssize_t fp_cell(fp_cell_slot *tab, uint64_t key,
                                           Py_ssize_t *ncells, Py_ssize_t *slot_of,
                                           int *fresh) {
        uint64_t h = key * 0x9E3779B97F4A7C15ULL;
        size_t i = (size_t)(h >> 48);
        for (;;) {
            fp_cell_slot *slot = &tab[i];
            if (slot->cell1 == 0) {
                slot->key = key;
                slot->cell1 = ++*ncells;
                slot_of[slot->cell1 - 1] = (Py_ssize_t)i;
                *fresh = 1;
                return slot->cell1 - 1;
            }
            if (slot->key == key) { *fresh = 0; return slot->cell1 - 1; }
            i = (i + 1) & (FP_CELL_SLOTS - 1);
        }
    }
    /* A batch's cells and the table that finds them (see fp_cell). */
    typedef struct {
        fp_cell_slot *tab;
        Py_ssize_t n, cap;
        Py_ssize_t *slot_of;
        uint64_t *keys;
        long long *counts;
        int fresh;
    } fp_cells;

    /* add v to the cell of key (a new cell starts at 0; c->fresh says it is new) */
    static CYTHON_INLINE Py_ssize_t fp_cell_add(fp_cells *c, uint64_t key, long long v) {
        int fresh;
        Py_ssize_t i = fp_cell(c->tab, key, &c->n, c->slot_of, &fresh);
        if (fresh) { c->keys[i] = key; c->counts[i] = 0; }
        c->fresh = fresh;
        c->counts[i] += v;
        return i;
    }

    /* forget the batch's cells (only the slots they used are cleared) */
    static void fp_cells_clear(fp_cells *c) {
        Py_ssize_t i;
        for (i = 0; i < c->n; i++) c->tab[c->slot_of[i]].cell1 = 0;
        c->n = 0;
    }

    static void fp_cells_free(fp_cells *c) {
        if (c == NULL) return;
        PyMem_Free(c->tab); PyMem_Free(c->slot_of); PyMem_Free(c->keys);
        PyMem_Free(c->counts); PyMem_Free(c);
    }

    /* cells for cap cells at most (cap <= FP_CELL_SLOTS / 4: the table never fills),
       NULL with MemoryError (or ValueError) */
    static fp_cells *fp_cells_new(Py_ssize_t cap) {
        fp_cells *c;
        if (cap > FP_CELL_SLOTS / 4) {
            PyErr_SetString(PyExc_ValueError, "too many cells for the cell table");
            return NULL;
        }
        c = (fp_cells *)PyMem_Calloc(1, sizeof(fp_cells));
        if (c != NULL) {
            c->cap = cap;
            c->tab = (fp_cell_slot *)PyMem_Calloc(FP_CELL_SLOTS, sizeof(fp_cell_slot));
            c->slot_of = (Py_ssize_t *)PyMem_Calloc((size_t)cap, sizeof(Py_ssize_t));
            c->keys = (uint64_t *)PyMem_Calloc((size_t)cap, sizeof(uint64_t));
            c->counts = (long long *)PyMem_Calloc((size_t)cap, sizeof(long long));
            if (c->tab && c->slot_of && c->keys && c->counts) return c;
            fp_cells_free(c);
        }
        PyErr_NoMemory();
        return NULL;
    }

    /* After a names table's slots: the last name of each of FP_LASTS record fields
       (fp_intern_field), a copy of its bytes and its id + 1 (0: none yet). */
    #define FP_LASTS 4
    #define FP_LAST_MAX 56
    typedef struct { Py_ssize_t n, id1; unsigned char s[FP_LAST_MAX]; } fp_last;
    #define FP_NAMES_BYTES (FP_NAMES_SLOTS * sizeof(fp_name_slot) + FP_LASTS * sizeof(fp_last))

    static fp_name_slot *fp_names_new(void) {
        fp_name_slot *t = (fp_name_slot *)PyMem_Calloc(1, FP_NAMES_BYTES);
        if (t == NULL) PyErr_NoMemory();
        return t;
    }

    static void fp_names_clear(fp_name_slot *t) {
        memset(t, 0, FP_NAMES_BYTES);
    }

    /* fp_intern for field k (< FP_LASTS) of a record: a name equal to the field's last
       one (consecutive records of one listener, upstream, route) takes its id without
       the hash and the table probe. */
    static CYTHON_INLINE Py_ssize_t fp_intern_field(fp_name_slot *tab, PyObject *names,
                                                    fp_str s, int k) {
        fp_last *last = (fp_last *)(tab + FP_NAMES_SLOTS) + k;
        Py_ssize_t id;
        if (last->id1 && s.n == last->n && memcmp(s.p, last->s, (size_t)s.n) == 0)
            return last->id1 - 1;
        id = fp_intern(tab, names, s);
        if (id >= 0 && s.n <= FP_LAST_MAX) {
            last->n = s.n;
            last->id1 = id + 1;
            memcpy(last->s, s.p, (size_t)s.n);
        }
        return id;
    }

    static void fp_free(void *p) { PyMem_Free(p); }

    static fp_rec *fp_rec_new(void) {
        fp_rec *r = (fp_rec *)PyMem_Calloc(1, sizeof(fp_rec));
        if (r == NULL) PyErr_NoMemory();
        return r;
    }

    /* the address of a writable buffer (the caller keeps the object, and with it the
       memory, alive and unresized: RawBatch holds an export of it) */
    static const unsigned char *fp_buffer_data(PyObject *obj) {
        Py_buffer b;
        if (PyObject_GetBuffer(obj, &b, PyBUF_WRITABLE) < 0) return NULL;
        PyBuffer_Release(&b);
        return (const unsigned char *)b.buf;
    }
    """
    ctypedef struct fp_str:
        const unsigned char *p
        Py_ssize_t n

    ctypedef struct fp_rec:
        double ts
        long long worker, status, bytes_in, bytes_out, stream
        fp_str request_id, listener, remote, method, path, upstream, upstream_addr
        fp_str tls_version, error, protocol, route, trace_id, span_id, parent_span_id
        fp_str tracestate
        int reused, tls_resumed
        int flags
        double t[8]
        fp_str reject
        long long retries, grpc_status, trace_flags
        int tunnel, has_grpc

    ctypedef struct fp_name_slot:
        unsigned long long hash
        Py_ssize_t id1

    ctypedef struct fp_cell_slot:
        unsigned long long key
        Py_ssize_t cell1

    int FP_ESC, FP_NAMES_SLOTS, FP_NAMES_MAX, FP_CELL_SLOTS
    int fp_scan(const unsigned char *p, Py_ssize_t n, fp_rec *r) noexcept
    int fp_may_sample(const fp_rec *r, int everything, unsigned long long below,
                      double slower_than) noexcept
    Py_ssize_t fp_intern(fp_name_slot *tab, list names, fp_str s) except -1
    Py_ssize_t fp_intern_field(fp_name_slot *tab, list names, fp_str s, int k) except -1
    ctypedef struct fp_cells:
        Py_ssize_t n, cap
        unsigned long long *keys
        long long *counts
        int fresh

    Py_ssize_t fp_cell_add(fp_cells *c, unsigned long long key, long long v) noexcept
    void fp_cells_clear(fp_cells *c) noexcept
    void fp_cells_free(fp_cells *c) noexcept
    fp_cells *fp_cells_new(Py_ssize_t cap) except NULL
    fp_name_slot *fp_names_new() except NULL
    void fp_names_clear(fp_name_slot *t) noexcept
    fp_rec *fp_rec_new() except NULL
    void fp_free(void *p) noexcept
    const unsigned char *fp_buffer_data(object obj) except NULL
