# C types for ringpush.py (Cython pure-Python mode, setup.py's COMPILED), and the push
# itself in C: the stores into the shared mapping are C11 atomics with release order, so
# the compiler keeps them in the order ring.py's docstring gives ("Ordering").
cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <sys/eventfd.h>

    #define FP_RING_DATA 4096
    #define FP_RING_HEAD 0
    #define FP_RING_TAIL 8
    #define FP_RING_DROPPED 16
    #define FP_RING_WAITING 24
    #define FP_RING_WRAP 0xFFFFFFFFULL
    #define FP_RING_HI 0xFFFFFFFF00000000ULL

    /* Append one record of n payload bytes: 1 pushed, 0 dropped (full, or longer than
       half the ring). ring.py's Ring.push, step for step: payload, then header, then
       head (the commit), then the doorbell if the consumer sleeps. *limit is the
       producer's cached tail + size; it is refreshed from tail only when a push seems not
       to fit. */
    static int fp_ring_push(unsigned char *map, const char *p, uint64_t n, uint64_t size,
                            uint64_t half, uint64_t *limit, int efd) {
        uint64_t *q = (uint64_t *)map;
        uint64_t head = __atomic_load_n(&q[FP_RING_HEAD], __ATOMIC_RELAXED);
        uint64_t need = (n + 15) & ~(uint64_t)7;
        uint64_t off = head & (size - 1);
        uint64_t room = size - off;
        uint64_t end = need <= room ? head + need : head + room + need;
        unsigned char *at;
        if (end > *limit && need <= half)
            *limit = __atomic_load_n(&q[FP_RING_TAIL], __ATOMIC_ACQUIRE) + size;
        if (end > *limit || need > half) {
            __atomic_store_n(&q[FP_RING_DROPPED],
                             __atomic_load_n(&q[FP_RING_DROPPED], __ATOMIC_RELAXED) + 1,
                             __ATOMIC_RELAXED);
            if (__atomic_load_n(&q[FP_RING_WAITING], __ATOMIC_RELAXED)) {
                __atomic_store_n(&q[FP_RING_WAITING], 0, __ATOMIC_RELAXED);
                eventfd_write(efd, 1);
            }
            return 0;
        }
        if (need > room) {  /* a wrap marker, then the record at offset 0 */
            __atomic_store_n((uint64_t *)(map + FP_RING_DATA + off),
                             FP_RING_WRAP | ((head << 29) & FP_RING_HI), __ATOMIC_RELEASE);
            head += room;
            off = 0;
        }
        at = map + FP_RING_DATA + off;
        memcpy(at + 8, p, n);
        __atomic_store_n((uint64_t *)at, n | ((head << 29) & FP_RING_HI), __ATOMIC_RELEASE);
        __atomic_store_n(&q[FP_RING_HEAD], head + need, __ATOMIC_RELEASE);
        if (__atomic_load_n(&q[FP_RING_WAITING], __ATOMIC_RELAXED)) {
            __atomic_store_n(&q[FP_RING_WAITING], 0, __ATOMIC_RELAXED);
            eventfd_write(efd, 1);
        }
        return 1;
    }
    """
    int fp_ring_push(unsigned char *map, const char *p, unsigned long long n,
                     unsigned long long size, unsigned long long half,
                     unsigned long long *limit, int efd) nogil

cdef class Producer:
    cdef object _mapping
    cdef unsigned char[::1] _view
    cdef unsigned char *_base
    cdef unsigned long long _size, _half, _limit
    cdef int _efd

    @cython.locals(p="const char *", n=Py_ssize_t, buf="Py_buffer", ok=int)
    cpdef bint push(self, object payload)
    cpdef void reset(self)
    cpdef void close(self)
