/* A minimal io_uring for the engine: a fixed-file table that holds each assigned eventfd (our own
 * reference, like KVM's eventfd_ctx reference, without using a slot of the fd table), and reads
 * of those files batched into one io_uring_enter per epoll batch.
 *
 * Threading: one batch at a time touches the SQ and CQ (the engine's batch_lock: the engine
 * thread's or a halted vCPU's).  kif_ring_set_file (a register call) may come from any thread.
 */
#ifndef KVMIRQFAST_URING_H
#define KVMIRQFAST_URING_H
#include <errno.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

struct kif_ring {
    int fd;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ptr, *cq_ptr;
    size_t sq_len, cq_len, sqes_len;
};

static inline void kif_ring_free(struct kif_ring *r) {
    if (r->sqes) munmap(r->sqes, r->sqes_len);
    if (r->cq_ptr && r->cq_ptr != r->sq_ptr) munmap(r->cq_ptr, r->cq_len);
    if (r->sq_ptr) munmap(r->sq_ptr, r->sq_len);
    if (r->fd >= 0) close(r->fd);
    memset(r, 0, sizeof(*r));
    r->fd = -1;
}

/* Set up a ring with `entries` SQEs and a sparse table of `nfiles` fixed files. 0 or -errno. */
static inline int kif_ring_init(struct kif_ring *r, unsigned entries, unsigned nfiles) {
    struct io_uring_params p;
    struct io_uring_rsrc_register reg;
    memset(r, 0, sizeof(*r));
    memset(&p, 0, sizeof(p));
    r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (r->fd < 0) { r->fd = -1; return -errno; }
    r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_len > r->sq_len) r->sq_len = r->cq_len;
        r->cq_len = r->sq_len;
    }
    r->sq_ptr = mmap(0, r->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                     IORING_OFF_SQ_RING);
    if (r->sq_ptr == MAP_FAILED) { r->sq_ptr = 0; goto fail; }
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        r->cq_ptr = r->sq_ptr;
    } else {
        r->cq_ptr = mmap(0, r->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                         IORING_OFF_CQ_RING);
        if (r->cq_ptr == MAP_FAILED) { r->cq_ptr = 0; goto fail; }
    }
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(0, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                   IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) { r->sqes = 0; goto fail; }
    r->sq_head = (unsigned *)((char *)r->sq_ptr + p.sq_off.head);
    r->sq_tail = (unsigned *)((char *)r->sq_ptr + p.sq_off.tail);
    r->sq_mask = (unsigned *)((char *)r->sq_ptr + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)((char *)r->sq_ptr + p.sq_off.array);
    r->cq_head = (unsigned *)((char *)r->cq_ptr + p.cq_off.head);
    r->cq_tail = (unsigned *)((char *)r->cq_ptr + p.cq_off.tail);
    r->cq_mask = (unsigned *)((char *)r->cq_ptr + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)((char *)r->cq_ptr + p.cq_off.cqes);
    memset(&reg, 0, sizeof(reg));
    reg.nr = nfiles;
    reg.flags = IORING_RSRC_REGISTER_SPARSE;
    if (syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_FILES2, &reg, sizeof(reg)) < 0)
        goto fail;
    return 0;
fail:;
    int err = errno ? errno : ENOMEM;
    kif_ring_free(r);
    return -err;
}

/* Put `fd`'s file in fixed slot `slot` (the ring takes its own reference); fd -1 empties it. */
static inline int kif_ring_set_file(struct kif_ring *r, unsigned slot, int fd) {
    struct io_uring_rsrc_update2 up;
    int fds[1] = { fd };
    memset(&up, 0, sizeof(up));
    up.offset = slot;
    up.data = (uint64_t)(uintptr_t)fds;
    up.nr = 1;
    if (syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_FILES_UPDATE2, &up, sizeof(up)) < 0)
        return -errno;
    return 0;
}

/* Empty fixed-file slots [first, first + n) in one register call (n <= KIF_CLEAR_MAX);
 * dropping a slot's file puts our reference to it. */
#define KIF_CLEAR_MAX 64
static inline int kif_ring_clear_files(struct kif_ring *r, unsigned first, unsigned n) {
    struct io_uring_rsrc_update2 up;
    int fds[KIF_CLEAR_MAX];
    if (n > KIF_CLEAR_MAX)
        return -EINVAL;
    memset(fds, 0xff, sizeof(fds));         /* every entry -1 */
    memset(&up, 0, sizeof(up));
    up.offset = first;
    up.data = (uint64_t)(uintptr_t)fds;
    up.nr = n;
    if (syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_FILES_UPDATE2, &up, sizeof(up)) < 0)
        return -errno;
    return 0;
}

/* Queue an 8-byte non-blocking read of fixed file `slot` into `buf` (the caller keeps at most
 * `entries` queued between submits).  RWF_NOWAIT: an empty counter completes with -EAGAIN at
 * once instead of arming a poll that would consume a later write. */
static inline void kif_ring_prep_read(struct kif_ring *r, unsigned slot, void *buf,
                                      uint64_t user_data) {
    unsigned tail = *r->sq_tail, idx = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[idx];
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = IORING_OP_READ;
    sqe->flags = IOSQE_FIXED_FILE;
    sqe->fd = (int)slot;
    sqe->off = (uint64_t)-1;
    sqe->addr = (uint64_t)(uintptr_t)buf;
    sqe->len = 8;
    sqe->rw_flags = RWF_NOWAIT;
    sqe->user_data = user_data;
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
}

/* Submit what is queued and wait until `wait` completions are there. >= 0 or -errno. */
static inline int kif_ring_submit_wait(struct kif_ring *r, unsigned submit, unsigned wait) {
    long ret;
    do {
        ret = syscall(__NR_io_uring_enter, r->fd, submit, wait, IORING_ENTER_GETEVENTS, 0, 0);
    } while (ret < 0 && errno == EINTR);
    return ret < 0 ? -errno : (int)ret;
}

/* Take one completion: 1 and its user_data/res, or 0 if the CQ is empty. */
static inline int kif_ring_reap(struct kif_ring *r, uint64_t *user_data, int *res) {
    unsigned head = *r->cq_head;
    if (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) return 0;
    struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
    *user_data = cqe->user_data;
    *res = cqe->res;
    __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
    return 1;
}
#endif
