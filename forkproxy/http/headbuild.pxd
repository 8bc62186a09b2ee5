# C for headbuild.py (Cython pure-Python mode, setup.py's COMPILED): the upstream request
# head, its length added up first, then its parts copied into one bytes object.
cimport cython

cdef extern from *:
    """
    #include <string.h>

    #define FP_PUT(o, s, n) (memcpy((o), (s), (n)), (o) += (n))
    #define FP_LIT(o, lit) FP_PUT(o, lit, sizeof(lit) - 1)

    /* None (a new reference) when a part is not what this writes: the caller formats
       that head in Python */
    static PyObject *fp_request_head(PyObject *method, PyObject *path, PyObject *host,
                                     PyObject *headers, PyObject *ff, PyObject *remote,
                                     PyObject *scheme, PyObject *rid, PyObject *extra,
                                     PyObject *tail) {
        PyObject *parts[8] = {path, host, ff, remote, scheme, rid, extra, tail};
        PyObject *b, *h, *name, *value;
        Py_ssize_t total, i, nh, mlen;
        const char *m;
        char *o;
        if (!PyUnicode_Check(method) || !PyUnicode_IS_COMPACT_ASCII(method)
                || !PyList_Check(headers))
            Py_RETURN_NONE;
        m = (const char *)PyUnicode_DATA(method);
        mlen = PyUnicode_GET_LENGTH(method);
        total = mlen + sizeof(" ") - 1 + sizeof(" HTTP/1.1\\r\\nHost: ") - 1
                + sizeof("\\r\\nX-Forwarded-For: ") - 1 + sizeof("\\r\\nX-Forwarded-Proto: ") - 1
                + sizeof("\\r\\nX-Request-Id: ") - 1 + sizeof("\\r\\n") - 1;
        for (i = 0; i < 8; i++) {
            if (!PyBytes_CheckExact(parts[i])) Py_RETURN_NONE;
            total += PyBytes_GET_SIZE(parts[i]);
        }
        if (PyBytes_GET_SIZE(ff)) total += 2;  /* ", " before the client's address */
        nh = PyList_GET_SIZE(headers);
        for (i = 0; i < nh; i++) {
            h = PyList_GET_ITEM(headers, i);
            if (!PyTuple_CheckExact(h) || PyTuple_GET_SIZE(h) != 2) Py_RETURN_NONE;
            name = PyTuple_GET_ITEM(h, 0);
            value = PyTuple_GET_ITEM(h, 1);
            if (!PyBytes_CheckExact(name) || !PyBytes_CheckExact(value)) Py_RETURN_NONE;
            total += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4;
        }
        b = PyBytes_FromStringAndSize(NULL, total);
        if (b == NULL) return NULL;
        o = PyBytes_AS_STRING(b);
        FP_PUT(o, m, mlen);
        FP_LIT(o, " ");
        FP_PUT(o, PyBytes_AS_STRING(path), PyBytes_GET_SIZE(path));
        FP_LIT(o, " HTTP/1.1\\r\\nHost: ");
        FP_PUT(o, PyBytes_AS_STRING(host), PyBytes_GET_SIZE(host));
        FP_LIT(o, "\\r\\n");
        for (i = 0; i < nh; i++) {
            h = PyList_GET_ITEM(headers, i);
            name = PyTuple_GET_ITEM(h, 0);
            value = PyTuple_GET_ITEM(h, 1);
            FP_PUT(o, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name));
            FP_LIT(o, ": ");
            FP_PUT(o, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value));
            FP_LIT(o, "\\r\\n");
        }
        FP_LIT(o, "X-Forwarded-For: ");
        if (PyBytes_GET_SIZE(ff)) {
            FP_PUT(o, PyBytes_AS_STRING(ff), PyBytes_GET_SIZE(ff));
            FP_LIT(o, ", ");
        }
        FP_PUT(o, PyBytes_AS_STRING(remote), PyBytes_GET_SIZE(remote));
        FP_LIT(o, "\\r\\nX-Forwarded-Proto: ");
        FP_PUT(o, PyBytes_AS_STRING(scheme), PyBytes_GET_SIZE(scheme));
        FP_LIT(o, "\\r\\nX-Request-Id: ");
        FP_PUT(o, PyBytes_AS_STRING(rid), PyBytes_GET_SIZE(rid));
        FP_LIT(o, "\\r\\n");
        FP_PUT(o, PyBytes_AS_STRING(extra), PyBytes_GET_SIZE(extra));
        FP_PUT(o, PyBytes_AS_STRING(tail), PyBytes_GET_SIZE(tail));
        return b;
    }
    """
    object fp_request_head(object method, object path, object host, object headers,
                           object ff, object remote, object scheme, object rid,
                           object extra, object tail)

cpdef bytes request_head(str method, object path, object host, object headers,
                         object forwarded_for, object remote, object scheme, object rid,
                         object extra, object tail)
