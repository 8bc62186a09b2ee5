# C types of sampling.py (Cython's pure-Python mode: the .py file is the source)
cimport cython


@cython.locals(everything=bint, sampled=Py_ssize_t, dropped=Py_ssize_t, room=Py_ssize_t,
               trace_id=bytes, t=list, start=double, slower_than=double)
cpdef tuple sample_batch(items, queue, Py_ssize_t room, threshold, double slower_than)
