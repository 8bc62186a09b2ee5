# C types for recordpass.py when it is compiled (Cython pure-Python mode, setup.py).
cimport cython
from forkproxy.manager.histogram cimport Histogram, PhaseGroup

cdef double[::1] _FINE, _DURATION
cdef long[::1] _F2P
cdef Py_ssize_t _N_FINE, _N_DURATION
cdef bint COMPILED

@cython.locals(lo=Py_ssize_t, hi=Py_ssize_t, mid=Py_ssize_t)
cdef Py_ssize_t _fine_bucket(double v) noexcept

@cython.locals(lo=Py_ssize_t, hi=Py_ssize_t, mid=Py_ssize_t)
cdef Py_ssize_t _duration_bucket(double v) noexcept

@cython.locals(requests=dict, tls=dict, reuse=dict, bytes_in=dict, bytes_out=dict)
cpdef count_batch(object m, list reqs)

@cython.locals(durations=dict, groups=dict, ph=dict, compiled=bint, f2p="long[::1]",
               c_hdr="long long[::1]", c_tls="long long[::1]", c_conn="long long[::1]",
               c_send="long long[::1]", c_fb="long long[::1]", c_body="long long[::1]",
               s_hdr=double, s_tls=double, s_conn=double, s_send=double, s_fb=double,
               s_body=double, ta=double, tt=double, th=double, tcs=double, tc=double,
               tsent=double, tfb=double, te=double, start=double, v=double, i=Py_ssize_t,
               h=Histogram, g=PhaseGroup)
cpdef time_batch(object m, list reqs)
