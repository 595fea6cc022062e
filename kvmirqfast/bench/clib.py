"""The C side, compiled at run time: baselines, producer, ping-pong device, real-KVM loops."""

import atexit
import ctypes
import os
import shutil
import subprocess
import tempfile




# ================================================================================================
# The C side: baselines, producer, ping-pong device, real-KVM loops
# ================================================================================================
C_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <linux/io_uring.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static inline void relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void nap_ns(uint64_t ns)
{
    struct timespec ts = { (time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull) };
    if (ns)
        nanosleep(&ts, NULL);
}

/* Producer: write 1 to fds[0..k) round-robin until *stop.  rate > 0 paces it (events/s). */
uint64_t kb_produce(const int *fds, int k, volatile int *stop, double rate,
                    volatile uint64_t *count)
{
    uint64_t one = 1, n = 0, t0 = now_ns();
    int i = 0, j;
    while (!*stop) {
        for (j = 0; j < 64; j++) {
            if (write(fds[i], &one, 8) == 8)
                n++;
            if (++i == k)
                i = 0;
        }
        *count = n;
        if (rate > 0) {
            uint64_t due = t0 + (uint64_t)((double)n * 1e9 / rate), t = now_ns();
            if (due > t) {
                struct timespec ts = { (time_t)((due - t) / 1000000000ull),
                                       (long)((due - t) % 1000000000ull) };
                nanosleep(&ts, NULL);
            }
        }
    }
    return n;
}

/* Naive C consumer: level-triggered epoll_wait + one read() per event, set an IRR bit.
   mode bits (for profiling the engine's choices): 1 = EPOLLET, 2 = preadv2(RWF_NOWAIT) instead
   of read(), 4 = batches of 512 events (the engine's MAX_EVENTS) instead of 1024, 8 = no read
   at all (with EPOLLET: one delivery per edge, the counter keeps growing: not KVM's semantics). */
struct kb_consumer {
    volatile uint64_t events, delivered, batches;
    volatile int stop;
    int ready;
    uint32_t irr[8];
};

#define KB_MAX_EVENTS 1024
int kb_consume(const int *fds, int k, struct kb_consumer *st, int mode)
{
    struct epoll_event ev, evs[KB_MAX_EVENTS];
    uint64_t v;
    struct iovec iov = { &v, 8 };
    int epfd = epoll_create1(EPOLL_CLOEXEC), i, n, r;
    int maxev = (mode & 4) ? 512 : KB_MAX_EVENTS;
    if (epfd < 0)
        return -errno;
    for (i = 0; i < k; i++) {
        ev.events = EPOLLIN | ((mode & 1) ? EPOLLET : 0);
        ev.data.u64 = (uint64_t)i;
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fds[i], &ev) < 0) {
            int e = errno;
            close(epfd);
            return -e;
        }
    }
    st->ready = 1;
    while (!st->stop) {
        n = epoll_wait(epfd, evs, maxev, 20);
        if (n <= 0)
            continue;
        for (i = 0; i < n; i++) {
            int idx = (int)evs[i].data.u64;
            if (mode & 8)
                r = 8;                  /* edge only: the counter is never read */
            else if (mode & 2)
                r = (int)preadv2(fds[idx], &iov, 1, -1, RWF_NOWAIT);
            else
                r = (int)read(fds[idx], &v, 8);
            if (r == 8) {
                int vec = 0x20 + idx % 224;
                st->irr[vec >> 5] |= 1u << (vec & 31);
                st->delivered++;
            }
        }
        st->events += n;
        st->batches++;
    }
    close(epfd);
    return 0;
}

/* The path past epoll: io_uring multishot reads (Linux 6.7+).  One READ_MULTISHOT per eventfd
   (a fixed file), 8-byte buffers from a provided-buffer ring; each write's wake-up queues the
   read of that counter, which the consumer's io_uring_enter runs (DEFER_TASKRUN) and reports
   as a completion: no epoll_wait and no read() per event, and the counter is still consumed,
   as KVM does.  Why the engine does not work this way: see README, Benchmarks.  Returns 0, or
   -errno (-EOPNOTSUPP where the kernel lacks multishot reads) before st->ready. */
#define KB_OP_READ_MULTISHOT 49
#define KB_NBUF 32768
struct kb_ring {
    int fd;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *rings;
    size_t rings_len, sqes_len;
};

static int kb_ring_setup(struct kb_ring *r, unsigned entries, unsigned cq_entries)
{
    struct io_uring_params p;
    memset(r, 0, sizeof(*r));
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    p.cq_entries = cq_entries;
    r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (r->fd < 0)
        return -errno;
    if (!(p.features & IORING_FEAT_SINGLE_MMAP) || !(p.features & IORING_FEAT_EXT_ARG)) {
        close(r->fd);
        return -EOPNOTSUPP;
    }
    r->rings_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    if (p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe) > r->rings_len)
        r->rings_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    r->rings = mmap(0, r->rings_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                    IORING_OFF_SQ_RING);
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(0, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                   IORING_OFF_SQES);
    if (r->rings == MAP_FAILED || r->sqes == MAP_FAILED) {
        close(r->fd);
        return -ENOMEM;
    }
    r->sq_tail = (unsigned *)((char *)r->rings + p.sq_off.tail);
    r->sq_mask = (unsigned *)((char *)r->rings + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)((char *)r->rings + p.sq_off.array);
    r->cq_head = (unsigned *)((char *)r->rings + p.cq_off.head);
    r->cq_tail = (unsigned *)((char *)r->rings + p.cq_off.tail);
    r->cq_mask = (unsigned *)((char *)r->rings + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)((char *)r->rings + p.cq_off.cqes);
    return 0;
}

static void kb_ring_free(struct kb_ring *r)
{
    munmap(r->sqes, r->sqes_len);
    munmap(r->rings, r->rings_len);
    close(r->fd);
}

static void kb_arm_read_multishot(struct kb_ring *r, int slot)
{
    unsigned tail = *r->sq_tail, idx = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[idx];
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = KB_OP_READ_MULTISHOT;
    sqe->flags = IOSQE_FIXED_FILE | IOSQE_BUFFER_SELECT;
    sqe->fd = slot;
    sqe->buf_group = 0;
    sqe->user_data = (uint64_t)slot;
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
}

/* Submit `submit` SQEs and wait up to 20 ms for one completion. */
static int kb_ring_enter(struct kb_ring *r, unsigned submit)
{
    struct __kernel_timespec ts = { 0, 20000000 };
    struct io_uring_getevents_arg arg;
    memset(&arg, 0, sizeof(arg));
    arg.ts = (uint64_t)(uintptr_t)&ts;
    if (syscall(__NR_io_uring_enter, r->fd, submit, 1,
                IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG, &arg, sizeof(arg)) < 0)
        return errno == ETIME || errno == EINTR ? 0 : -errno;
    return 0;
}

int kb_consume_multishot(const int *fds, int k, struct kb_consumer *st)
{
    struct kb_ring r;
    struct io_uring_buf_ring *br = NULL;
    struct io_uring_buf_reg reg;
    uint64_t *bufs = NULL;
    unsigned armed = 0, head, tail;
    uint16_t btail = 0;
    int i, err, probe = -1, nfiles = k + 1;
    int *files = NULL;
    err = kb_ring_setup(&r, 4096, 65536);
    if (err)
        return err;
    files = malloc(sizeof(int) * nfiles);
    bufs = calloc(KB_NBUF, 8);
    if (posix_memalign((void **)&br, 4096, KB_NBUF * sizeof(struct io_uring_buf)) || !files
        || !bufs) {
        err = -ENOMEM;
        goto out;
    }
    for (i = 0; i < KB_NBUF; i++) {
        br->bufs[i].addr = (uint64_t)(uintptr_t)&bufs[i];
        br->bufs[i].len = 8;
        br->bufs[i].bid = (uint16_t)i;
    }
    btail = KB_NBUF;                    /* 65536 wraps to 0: the ring is full */
    __atomic_store_n(&br->tail, (uint16_t)KB_NBUF, __ATOMIC_RELEASE);
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (uint64_t)(uintptr_t)br;
    reg.ring_entries = KB_NBUF;
    reg.bgid = 0;
    if (syscall(__NR_io_uring_register, r.fd, IORING_REGISTER_PBUF_RING, &reg, 1) < 0) {
        err = -errno;
        goto out;
    }
    /* Probe with an eventfd of our own (slot k): does this kernel do multishot reads? */
    probe = eventfd(1, EFD_CLOEXEC | EFD_NONBLOCK);
    for (i = 0; i < k; i++)
        files[i] = fds[i];
    files[k] = probe;
    if (probe < 0 || syscall(__NR_io_uring_register, r.fd, IORING_REGISTER_FILES, files,
                             nfiles) < 0) {
        err = -errno;
        goto out;
    }
    kb_arm_read_multishot(&r, k);
    if ((err = kb_ring_enter(&r, 1)) < 0)
        goto out;
    head = *r.cq_head;
    if (head == __atomic_load_n(r.cq_tail, __ATOMIC_ACQUIRE) || r.cqes[head & *r.cq_mask].res != 8) {
        err = -EOPNOTSUPP;
        goto out;
    }
    __atomic_store_n(r.cq_head, head + 1, __ATOMIC_RELEASE);
    br->bufs[btail & (KB_NBUF - 1)].addr = (uint64_t)(uintptr_t)&bufs[r.cqes[head & *r.cq_mask].flags >> IORING_CQE_BUFFER_SHIFT];
    br->bufs[btail & (KB_NBUF - 1)].len = 8;
    br->bufs[btail & (KB_NBUF - 1)].bid = (uint16_t)(r.cqes[head & *r.cq_mask].flags >> IORING_CQE_BUFFER_SHIFT);
    btail++;
    __atomic_store_n(&br->tail, btail, __ATOMIC_RELEASE);
    for (i = 0; i < k; i++) {
        kb_arm_read_multishot(&r, i);
        if (++armed == 2048) {
            if ((err = kb_ring_enter(&r, armed)) < 0)
                goto out;
            armed = 0;
        }
    }
    st->ready = 1;
    while (!st->stop) {
        if ((err = kb_ring_enter(&r, armed)) < 0)
            goto out;
        armed = 0;
        head = *r.cq_head;
        tail = __atomic_load_n(r.cq_tail, __ATOMIC_ACQUIRE);
        if (head == tail)
            continue;
        for (; head != tail; head++) {
            struct io_uring_cqe *c = &r.cqes[head & *r.cq_mask];
            int idx = (int)c->user_data;
            st->events++;
            if (c->res == 8 && idx < k) {
                int vec = 0x20 + idx % 224;
                uint16_t bid = (uint16_t)(c->flags >> IORING_CQE_BUFFER_SHIFT);
                st->irr[vec >> 5] |= 1u << (vec & 31);
                st->delivered++;
                br->bufs[btail & (KB_NBUF - 1)].addr = (uint64_t)(uintptr_t)&bufs[bid];
                br->bufs[btail & (KB_NBUF - 1)].len = 8;
                br->bufs[btail & (KB_NBUF - 1)].bid = bid;
                btail++;
            }
            if (!(c->flags & IORING_CQE_F_MORE) && idx < k) {
                kb_arm_read_multishot(&r, idx);      /* ended (out of buffers): re-arm */
                armed++;
            }
        }
        __atomic_store_n(r.cq_head, head, __ATOMIC_RELEASE);
        __atomic_store_n(&br->tail, btail, __ATOMIC_RELEASE);
        st->batches++;
    }
    err = 0;
out:
    kb_ring_free(&r);                   /* cancels the reads and drops the files */
    if (probe >= 0)
        close(probe);
    free(files);
    free(bufs);
    free(br);
    return err;
}

/* Wait for an eventfd: spin up to spin_ns with non-blocking reads, then block. */
static int wait_fd(int fd, uint64_t spin_ns, int nonblock)
{
    uint64_t v, t0;
    struct pollfd p;
    if (!nonblock)
        return read(fd, &v, 8) == 8 ? 0 : -1;
    t0 = spin_ns ? now_ns() : 0;
    for (;;) {
        if (read(fd, &v, 8) == 8)
            return 0;
        if (errno != EAGAIN)
            return -1;
        if (spin_ns && now_ns() - t0 < spin_ns) {
            relax();
            continue;
        }
        p.fd = fd;
        p.events = POLLIN;
        poll(&p, 1, -1);
    }
}

/* Ping-pong device side: write out_fd, wait for in_fd; one round-trip sample (ns) per iteration.
   in_fd must be non-blocking iff spin_ns > 0.  Returns the number of samples taken. */
int kb_pp_device(int out_fd, int in_fd, int iters, uint64_t spin_ns, uint64_t budget_ns,
                 uint64_t *samples, volatile int *done)
{
    uint64_t one = 1, start = now_ns(), t0;
    int i;
    for (i = 0; i < iters; i++) {
        if (*done || now_ns() - start > budget_ns)      /* done: the responder gave up */
            break;
        t0 = now_ns();
        if (write(out_fd, &one, 8) != 8)
            break;
        if (wait_fd(in_fd, spin_ns, spin_ns != 0) < 0)
            break;
        samples[i] = now_ns() - t0;
    }
    *done = 1;
    return i;
}

struct pp_resp { int a, b, iters, cpu; uint64_t spin; volatile int *done; volatile int ready; };

static void pin_self(int cpu)
{
    cpu_set_t set;
    if (cpu < 0)
        return;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof(set), &set);
}

static void *pp_responder(void *arg)
{
    struct pp_resp *r = arg;
    uint64_t one = 1, v;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLET };
    int ep = -1;
    pin_self(r->cpu);
    if (r->spin >= 2) {                 /* the engine's syscalls: epoll_wait, then read */
        ep = epoll_create1(EPOLL_CLOEXEC);
        epoll_ctl(ep, EPOLL_CTL_ADD, r->a, &ev);
    }
    __atomic_store_n(&r->ready, 1, __ATOMIC_RELEASE);
    for (;;) {
        if (r->spin >= 2) {             /* 2: blocking epoll_wait; 3: spinning epoll_wait(0) */
            if (epoll_wait(ep, &ev, 1, r->spin == 2 ? -1 : 0) < 1 || read(r->a, &v, 8) != 8) {
                if (*r->done) {
                    close(ep);
                    return NULL;
                }
                if (r->spin == 3)
                    relax();
                continue;
            }
        } else if (r->spin) {
            while (read(r->a, &v, 8) != 8) {
                if (*r->done)
                    return NULL;
                relax();
            }
        } else if (read(r->a, &v, 8) != 8) {
            return NULL;
        }
        if (*r->done) {
            if (ep >= 0)
                close(ep);
            return NULL;
        }
        write(r->b, &one, 8);
    }
}

/* C ping-pong between two threads: blocking reads (spin = 0), both sides spinning (1),
   blocking with the responder in epoll_wait + read (2: what a harvesting vCPU does), or both
   spinning with the responder on epoll_wait(0) + read (3: what a halt-polling vCPU does).
   resp_cpu >= 0 pins the responder there (the caller, the device side, pins itself).  Once
   the responder is about to wait, the device rests settle_ns before the first write. */
int kb_pp_c(int iters, int spin, uint64_t budget_ns, uint64_t *samples, int resp_cpu,
            uint64_t settle_ns)
{
    volatile int done = 0;
    uint64_t big = 1;
    int flags = EFD_CLOEXEC | (spin & 1 ? EFD_NONBLOCK : 0), n;
    struct pp_resp r;
    pthread_t t;
    r.a = eventfd(0, flags | (spin == 2 ? EFD_NONBLOCK : 0));
    r.b = eventfd(0, flags);
    r.iters = iters;
    r.spin = spin;
    r.cpu = resp_cpu;
    r.done = &done;
    if (r.a < 0 || r.b < 0)
        return -errno;
    r.ready = 0;
    if (pthread_create(&t, NULL, pp_responder, &r) != 0)
        return -EAGAIN;
    while (!__atomic_load_n(&r.ready, __ATOMIC_ACQUIRE))
        nap_ns(1000000);
    nap_ns(settle_ns);
    n = kb_pp_device(r.a, r.b, iters, spin & 1 ? ~0ull : 0, budget_ns, samples, &done);
    write(r.a, &big, 8);              /* release a responder blocked in read() */
    pthread_join(t, NULL);
    close(r.a);
    close(r.b);
    return n;
}

/* The work of a ping-pong round trip without its wake-ups: one thread makes both sides'
   system calls (write a; [epoll_wait(0) on a;] read a; write b; read b).  ns per round trip,
   or -errno. */
int64_t kb_pp_work(int iters, int use_epoll)
{
    uint64_t one = 1, v, t0;
    struct epoll_event ev = { .events = EPOLLIN };
    int a = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), b = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    int ep = epoll_create1(EPOLL_CLOEXEC), i, err = 0;
    if (a < 0 || b < 0 || ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, a, &ev) < 0)
        err = -errno;
    t0 = now_ns();
    for (i = 0; i < iters && !err; i++) {
        if (write(a, &one, 8) != 8 || (use_epoll && epoll_wait(ep, &ev, 1, 0) != 1)
            || read(a, &v, 8) != 8 || write(b, &one, 8) != 8 || read(b, &v, 8) != 8)
            err = -EIO;
    }
    t0 = now_ns() - t0;
    close(a);
    close(b);
    close(ep);
    return err ? err : (int64_t)(t0 / (uint64_t)iters);
}

/* ns for `iters` eventfd writes round-robin over fds[0..k). */
uint64_t kb_write_rr(const int *fds, int k, uint64_t iters)
{
    uint64_t one = 1, t0 = now_ns(), i;
    int j = 0;
    for (i = 0; i < iters; i++) {
        write(fds[j], &one, 8);
        if (++j == k)
            j = 0;
    }
    return now_ns() - t0;
}

/* KVM_IRQFD on fds[0..n) (gsi = i % gsi_mod): ns in total, or -errno. */
int64_t kb_irqfd_loop(int vmfd, unsigned long req, const int *fds, int n, uint32_t gsi_mod,
                      uint32_t flags)
{
    struct { uint32_t fd, gsi, flags, resamplefd; uint8_t pad[16]; } a;
    uint64_t t0 = now_ns();
    int i;
    for (i = 0; i < n; i++) {
        memset(&a, 0, sizeof(a));
        a.fd = (uint32_t)fds[i];
        a.gsi = (uint32_t)i % gsi_mod;
        a.flags = flags;
        if (ioctl(vmfd, req, &a) < 0)
            return -errno;
    }
    return (int64_t)(now_ns() - t0);
}
"""


class _ConsumerState(ctypes.Structure):
    _fields_ = [("events", ctypes.c_uint64), ("delivered", ctypes.c_uint64),
                ("batches", ctypes.c_uint64), ("stop", ctypes.c_int), ("ready", ctypes.c_int),
                ("irr", ctypes.c_uint32 * 8)]


_CLIB = None
_CLIB_REASON = None


def c_library():
    """Compile (once per process) and load the C helpers.  Returns (lib or None, reason)."""
    global _CLIB, _CLIB_REASON
    if _CLIB is not None or _CLIB_REASON is not None:
        return _CLIB, _CLIB_REASON
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        _CLIB_REASON = "no C compiler (set $CC or install cc): C baselines skipped"
        return None, _CLIB_REASON
    tmp = tempfile.mkdtemp(prefix="kvmirqfast-bench-")
    atexit.register(shutil.rmtree, tmp, True)
    src, so = os.path.join(tmp, "kb.c"), os.path.join(tmp, "kb.so")
    with open(src, "w") as f:
        f.write(C_SOURCE)
    proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", so, src],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        _CLIB_REASON = f"{cc} failed: {proc.stderr.strip()[:300]}; C baselines skipped"
        return None, _CLIB_REASON
    lib = ctypes.CDLL(so)                     # CDLL: every call releases the GIL
    P = ctypes.POINTER
    u64, i32 = ctypes.c_uint64, ctypes.c_int
    lib.kb_produce.argtypes = [P(i32), i32, P(i32), ctypes.c_double, P(u64)]
    lib.kb_produce.restype = u64
    lib.kb_consume.argtypes = [P(i32), i32, P(_ConsumerState), i32]
    lib.kb_consume.restype = i32
    lib.kb_consume_multishot.argtypes = [P(i32), i32, P(_ConsumerState)]
    lib.kb_consume_multishot.restype = i32
    lib.kb_pp_device.argtypes = [i32, i32, i32, u64, u64, P(u64), P(i32)]
    lib.kb_pp_device.restype = i32
    lib.kb_pp_c.argtypes = [i32, i32, u64, P(u64), i32, u64]
    lib.kb_pp_c.restype = i32
    lib.kb_pp_work.argtypes = [i32, i32]
    lib.kb_pp_work.restype = ctypes.c_int64
    lib.kb_write_rr.argtypes = [P(i32), i32, u64]
    lib.kb_write_rr.restype = u64
    lib.kb_irqfd_loop.argtypes = [i32, ctypes.c_ulong, P(i32), i32, ctypes.c_uint32,
                                  ctypes.c_uint32]
    lib.kb_irqfd_loop.restype = ctypes.c_int64
    _CLIB = lib
    return lib, None


def _int_array(values):
    return (ctypes.c_int * len(values))(*values)
