# C types for ringwalk.py when it is compiled (Cython pure-Python mode, setup.py).
cimport cython

@cython.locals(mask="unsigned long long", tail="unsigned long long",
               head="unsigned long long", off="unsigned long long",
               word="unsigned long long", n="unsigned long long", need="unsigned long long",
               at="unsigned long long", count=Py_ssize_t, bad=Py_ssize_t,
               spans=bint,
               data="unsigned long long", m32="unsigned long long", hi="unsigned long long")
cpdef tuple walk(object q, object buf, unsigned long long size, unsigned long long maxp,
                 object handler, object decode, object out, object errors,
                 Py_ssize_t max_records, long long[::1] starts=*, long long[::1] ends=*)
