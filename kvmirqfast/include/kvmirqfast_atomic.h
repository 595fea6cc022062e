/* Thin wrappers over GCC/Clang __atomic builtins, so Cython code can use C11-style atomics.
 * Names say the memory order: _relaxed, _acquire, _release; unsuffixed ones are seq_cst. */
#ifndef KVMIRQFAST_ATOMIC_H
#define KVMIRQFAST_ATOMIC_H
#include <stdint.h>
#include <sched.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <time.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static inline uint64_t kif_load64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline uint64_t kif_load64_acquire(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t kif_load64_relaxed(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void kif_store64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline void kif_store64_relaxed(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline uint64_t kif_add64(uint64_t *p, uint64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t kif_add64_relaxed(uint64_t *p, uint64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_RELAXED); }

static inline uint32_t kif_load32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline uint32_t kif_load32_relaxed(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void kif_store32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t kif_or32(uint32_t *p, uint32_t v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t kif_and32(uint32_t *p, uint32_t v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t kif_add32(uint32_t *p, uint32_t v) { return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t kif_sub32(uint32_t *p, uint32_t v) { return __atomic_sub_fetch(p, v, __ATOMIC_SEQ_CST); }
static inline int kif_cas32(uint32_t *p, uint32_t expected, uint32_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline void kif_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* futex(2) on a 32-bit word: sleep while *p == val (up to timeout, NULL = forever); wake n sleepers. */
static inline long kif_futex_wait(uint32_t *p, uint32_t val, const struct timespec *timeout) {
    return syscall(SYS_futex, p, FUTEX_WAIT_PRIVATE, val, timeout, NULL, 0);
}
static inline long kif_futex_wake(uint32_t *p, int n) {
    return syscall(SYS_futex, p, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}

/* kcmp(KCMP_EPOLL_TFD): 0 if fd refers to the file registered in epfd under the number tfd
 * (its first registration), 1/2 if another file, -1 with errno on error (ENOENT: none). */
struct kif_kcmp_epoll_slot { uint32_t efd, tfd, toff; };
static inline long kif_kcmp_epoll_tfd(int fd, int epfd, int tfd) {
    struct kif_kcmp_epoll_slot slot = { (uint32_t)epfd, (uint32_t)tfd, 0 };
    pid_t pid = getpid();
    return syscall(SYS_kcmp, pid, pid, 7 /* KCMP_EPOLL_TFD */, fd, &slot);
}

/* kcmp(KCMP_FILE): 0 if fd1 and fd2 refer to the same open file, -1 on error. */
static inline long kif_kcmp_file(int fd1, int fd2) {
    pid_t pid = getpid();
    return syscall(SYS_kcmp, pid, pid, 0 /* KCMP_FILE */, fd1, fd2);
}

/* Add 1 to an eventfd (a kick); EAGAIN at a saturated counter still leaves it readable. */
static inline void kif_eventfd_signal(int fd) {
    uint64_t one = 1;
    if (write(fd, &one, 8) < 0) { /* nothing to do: the fd is readable either way */ }
}

/* Take an eventfd's counter without blocking (the fd must be EFD_NONBLOCK). */
static inline void kif_eventfd_drain(int fd) {
    uint64_t count;
    if (read(fd, &count, 8) < 0) { /* EAGAIN: already drained */ }
}

/* What /proc/self/fdinfo says of the eventfd behind fd: 0 with its id (-1 on kernels without
 * "eventfd-id") and counter, read without consuming it; -EBADF for a closed fd, -EINVAL for an
 * fd that is not an eventfd.  ~5 us here (open + read + close of a proc file). */
static inline int kif_eventfd_info(int fd, int64_t *id, uint64_t *count) {
    char path[64], buf[1024];
    if (fd < 0) return -EBADF;
    snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
    int f = open(path, O_RDONLY | O_CLOEXEC);
    if (f < 0) return (errno == ENOENT || errno == ESRCH) ? -EBADF : -errno;
    ssize_t n = read(f, buf, sizeof(buf) - 1);
    close(f);
    if (n <= 0) return -EBADF;
    buf[n] = 0;
    /* Every field starts a line and the first is "pos:", so "\n<field>:" finds it. */
    char *c = strstr(buf, "\neventfd-count:");
    if (!c) return -EINVAL;
    *count = strtoull(c + 15, NULL, 16);
    char *i = strstr(buf, "\neventfd-id:");
    *id = i ? strtoll(i + 12, NULL, 10) : -1;
    return 0;
}

/* The eventfd counter of fd without consuming it; -1 on error.  Slow (a proc file): only for the
 * rare wakeup that follows an assign with a count pending. */
static inline int64_t kif_eventfd_count(int fd) {
    int64_t id;
    uint64_t count;
    return kif_eventfd_info(fd, &id, &count) == 0 ? (int64_t)count : -1;
}

/* The calling thread's kernel id (for /proc/self/task/<tid>). */
static inline int kif_gettid(void) { return (int)syscall(SYS_gettid); }

static inline uint64_t kif_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
#endif
