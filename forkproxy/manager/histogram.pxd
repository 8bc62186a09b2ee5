# C types for histogram.py when it is compiled (Cython pure-Python mode, setup.py).
# recordpass.pxd cimports these classes: its timing walk adds to the sums as C doubles.

cdef bint COMPILED

cdef class Histogram:
    cdef public tuple bounds
    cdef public long long[::1] buckets
    cdef public double sum
    cdef public double sumsq

cdef class PhaseGroup:
    cdef public Histogram hdr, tls, conn, send, fb, body, total
