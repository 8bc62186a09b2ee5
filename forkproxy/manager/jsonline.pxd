# C types for jsonline.py when it is compiled (Cython pure-Python mode, setup.py).
cimport cython

cdef class _Clock:
    cdef public long long sec
    cdef public str prefix


@cython.locals(ta=double, tt=double, th=double, tcs=double, tc=double, tsent=double,
               tfb=double, te=double, us="long long", ms=dict)
cpdef dict phases_ms(object ctx)

@cython.locals(ts=double, sec="long long", frac=int, end=double, start=double, d=double,
               clock=_Clock, us="long long")
cpdef json_record(object ctx, dict ms)

@cython.locals(lines=list)
cpdef tuple json_batch(list items)
