# C types for jsonline.py when it is compiled (Cython pure-Python mode, setup.py).
cimport cython

cdef class _Clock:
    cdef public long long sec
    cdef public str prefix


@cython.locals(ta=double, tt=double, th=double, tcs=double, tc=double, tsent=double,
               tfb=double, te=double, us="long long", ms=dict)
cpdef dict phases_ms(object ctx)

cdef Py_ssize_t _TS, _REQUEST_ID, _WORKER, _LISTENER, _REMOTE, _METHOD, _PATH, _STATUS
cdef Py_ssize_t _BYTES_IN, _BYTES_OUT, _UPSTREAM, _UPSTREAM_ADDR, _REUSED, _TLS_RESUMED
cdef Py_ssize_t _TLS_VERSION, _TIMES, _ERROR, _PROTOCOL, _STREAM, _TRACE_ID, _SPAN_ID
cdef Py_ssize_t _GRPC_STATUS

@cython.locals(f=tuple, ts=double, sec="long long", frac=int, end=double, start=double,
               d=double, clock=_Clock, us="long long")
cpdef json_record(object ctx, dict ms)

@cython.locals(lines=list)
cpdef tuple json_batch(list items)
