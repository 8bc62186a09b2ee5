# C side of libcalls.py (Cython pure-Python mode, setup.py's COMPILED): the libc calls
# os has no binding for, made directly (pyconfig.h defines _GNU_SOURCE, which
# sync_file_range needs).
cimport cython

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <malloc.h>
    #include <stdint.h>
    #include <sys/prctl.h>

    static void fp_set_name(const char *name) {
        (void)prctl(PR_SET_NAME, (unsigned long)name, 0UL, 0UL, 0UL);
    }

    static void fp_set_pdeathsig(int sig) {
        (void)prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0UL, 0UL, 0UL);
    }

    static void fp_malloc_trim(void) {
        (void)malloc_trim(0);
    }

    /* 0, or the errno of a failed sync_file_range(SYNC_FILE_RANGE_WRITE) */
    static int fp_start_writeback(int fd, int64_t offset, int64_t nbytes) {
        return sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) == 0 ? 0 : errno;
    }
    """
    void fp_set_name(const char *name)
    void fp_set_pdeathsig(int sig)
    void fp_malloc_trim()
    int fp_start_writeback(int fd, long long offset, long long nbytes)
