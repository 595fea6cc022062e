# C declarations used by the native core: epoll, eventfd reads, threads, clocks, atomics.
# Everything the .pyx files need from C is declared here, so they read as Cython.

from libc.stdint cimport uint32_t, uint64_t, int64_t

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EINTR
        EAGAIN
        ENOENT
        EINVAL

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CTL_MOD
        EPOLLIN
        EPOLLET
        EPOLLHUP
        EPOLLERR

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK
    int eventfd(unsigned int initval, int flags)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, long offset, int flags)
    enum:
        RWF_NOWAIT

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
    int close(int fd)

cdef extern from "<time.h>" nogil:
    ctypedef int clockid_t
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(clockid_t clk, timespec *ts)
    int nanosleep(const timespec *req, timespec *rem)
    enum:
        CLOCK_MONOTONIC

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                       void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_getcpuclockid(pthread_t thread, clockid_t *clk)
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, const void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m, const timespec *abstime)
    int pthread_cond_signal(pthread_cond_t *c)
    int pthread_cond_broadcast(pthread_cond_t *c)

cdef extern from "kvmirqfast_atomic.h" nogil:
    uint64_t kif_load64(const uint64_t *p)
    uint64_t kif_load64_acquire(const uint64_t *p)
    uint64_t kif_load64_relaxed(const uint64_t *p)
    void kif_store64(uint64_t *p, uint64_t v)
    void kif_store64_relaxed(uint64_t *p, uint64_t v)
    uint64_t kif_add64(uint64_t *p, uint64_t v)
    uint64_t kif_add64_relaxed(uint64_t *p, uint64_t v)
    uint32_t kif_load32(const uint32_t *p)
    uint32_t kif_load32_relaxed(const uint32_t *p)
    void kif_store32(uint32_t *p, uint32_t v)
    uint32_t kif_or32(uint32_t *p, uint32_t v)
    uint32_t kif_and32(uint32_t *p, uint32_t v)
    uint32_t kif_add32(uint32_t *p, uint32_t v)
    uint32_t kif_sub32(uint32_t *p, uint32_t v)
    bint kif_cas32(uint32_t *p, uint32_t expected, uint32_t desired)
    void kif_cpu_relax()
    long kif_futex_wait(uint32_t *p, uint32_t val, const timespec *timeout)
    long kif_futex_wake(uint32_t *p, int n)
    uint64_t kif_now_ns()
    int kif_gettid()
    long kif_kcmp_epoll_tfd(int fd, int epfd, int tfd)
    long kif_kcmp_file(int fd1, int fd2)
    int64_t kif_eventfd_count(int fd)
    int kif_eventfd_info(int fd, int64_t *id, uint64_t *count)
    void kif_eventfd_signal(int fd)
    void kif_eventfd_drain(int fd)

cdef extern from "kvmirqfast_uring.h" nogil:
    struct kif_ring:
        int fd
    void kif_ring_free(kif_ring *r)
    int kif_ring_init(kif_ring *r, unsigned entries, unsigned nfiles)
    int kif_ring_set_file(kif_ring *r, unsigned slot, int fd)
    int kif_ring_clear_files(kif_ring *r, unsigned first, unsigned n)
    enum: KIF_CLEAR_MAX
    void kif_ring_prep_read(kif_ring *r, unsigned slot, void *buf, uint64_t user_data)
    int kif_ring_submit_wait(kif_ring *r, unsigned submit, unsigned wait)
    int kif_ring_reap(kif_ring *r, uint64_t *user_data, int *res)
