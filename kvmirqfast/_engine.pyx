# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The engine: eventfd write -> epoll -> irqfd record -> route -> LAPIC, without the GIL.

One native thread blocks in epoll_wait on every assigned eventfd (edge-triggered).  For each
wakeup it does what KVM's irqfd_wakeup does: take the irqfd's route, consume the eventfd counter,
deliver an MSI at once ("inatomic"), and hand anything else to the deferred worker, a Python
thread that plays irqfd_inject.  The counters of a whole batch are read by one io_uring_enter
through the engine's own references to the eventfds (fixed files), as KVM reads through its
eventfd_ctx rather than an fd number.  A halted vCPU runs the same batch itself (engine_halt):
it sleeps in epoll_wait on the same set, so a device write wakes it directly, as KVM delivers
inside write() and kicks the vCPU; the engine thread stands aside meanwhile.

Ordering rules, stated once:
* ``batch_seq`` is odd while the engine holds records returned by epoll_wait.  The control plane
  changes a record (DEAD flag, route word) with a seq_cst store and then calls synchronize(),
  which waits out a batch that was in flight.  Either the engine's seq_cst increment comes first
  (and we wait for it), or it comes after our store (and the engine sees the new value).  This is
  KVM's synchronize_srcu() after an irqfd update, in a dozen lines.
* The engine loads the route before it consumes the counter, so a write it consumes was made
  after the route it delivers with was current (see Vm._retarget).
* Batches run one at a time (batch_lock), the engine thread's or a halted vCPU's; only the batch
  touches the io_uring SQ/CQ.  Fixed-file slots change (pin/unpin) from the control plane, and
  a slot is emptied only after its record is dead and synchronized.
* A vCPU asleep in epoll_wait publishes ``harvesting`` before its last look at the IRR, and a
  deliverer publishes the IRR before reading it (lapic_kick), so a delivery from elsewhere
  either is seen or writes the kick eventfd that wakes it.
* The engine publishes ``in_wait`` before it looks at ``pollers`` and sleeps in epoll_wait; a vCPU
  coming to halt-poll publishes ``pollers`` before it looks at ``in_wait``.  So either the
  engine stands aside, or the vCPU writes the aside eventfd, which wakes the engine out of
  epoll_wait (only the waiting engine drains it).  Left there, every write would wake it, and
  the spinning vCPU would take the event first, so it would never come out.  (A vCPU that
  sleeps in epoll_wait needs none of this: epoll wakes one waiter per write, the engine, which
  returns with the event and stands aside.)
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.ref cimport PyObject
from libc.stdint cimport uint32_t, uint64_t, int64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from posix.unistd cimport getpid

from kvmirqfast._sys cimport *
from kvmirqfast._lapic cimport (apic_bus_t, lapic_t, ApicBus, Lapic, apic_bus_deliver,
                                deliverable, lapic_sleep, route_kind, ROUTE_MSI, ROUTE_NONE)

import os
import resource


# Not tracked by the cycle collector: a record refers only to immutable values (key, gsi,
# routing entry) and its resampler, none of which refers back, so it can never be part of a
# cycle.  Tracked, every assign fed the collector one more long-lived object (~0.4 us of
# collections per assign/deassign with 16,384 assigned, here).
@cython.no_gc
cdef class IrqfdRecord:
    """One irqfd as the engine sees it: its eventfd, its route word, and its state.

    The Python attributes (key, gsi, entry, resampler, resamplefd, direct) belong to the
    control plane; the engine only reads ``rec``.
    """

    def __cinit__(self, int fd, key, gsi=None, entry=None, bint direct=False):
        memset(&self.rec, 0, sizeof(irqfd_t))
        self.rec.fd = fd
        self.rec.slot = -1
        self.rec.owner = <void *>self
        self.key = key
        self.gsi = gsi
        self.entry = entry
        self.direct = direct
        self.resampler = None
        self.resamplefd = None
        self.handled = 0

    @property
    def fd(self):
        return self.rec.fd

    @property
    def data_ptr(self):
        """The epoll registration's data (this record's address), as /proc fdinfo shows it."""
        return <Py_ssize_t>&self.rec

    @property
    def route(self):
        return kif_load64(&self.rec.route)

    property assign_count:
        """The count found in the eventfd at assign (delivered then, left in the counter)."""
        def __get__(self):
            return self.rec.assign_count
        def __set__(self, uint64_t v):
            self.rec.assign_count = v

    @property
    def pinned(self):
        """True if the engine holds its own reference to the eventfd (see Engine.pin)."""
        return self.rec.slot >= 0

    @property
    def slot(self):
        """The io_uring fixed-file slot of that reference, or -1."""
        return self.rec.slot

    @property
    def defer_count(self):
        return kif_load32(&self.rec.defer_count)

    @property
    def dead(self):
        return bool(kif_load32(&self.rec.flags) & IRQFD_DEAD)

    @property
    def inject_pending(self):
        return bool(kif_load32(&self.rec.inject_pending))

    def mark_pending_at_assign(self):
        """A count found at assign was delivered by the control plane: skip the wakeup that
        epoll_ctl(ADD) raises for it, and do not consume it (KVM leaves it in the counter)."""
        kif_or32(&self.rec.flags, IRQFD_PENDING_AT_ASSIGN)

    def clear_inject_pending(self):
        """Called by the deferred worker before it injects: a new event re-queues the record."""
        kif_store32(&self.rec.inject_pending, 0)

    @staticmethod
    def native_size():
        """Bytes of native state per irqfd (the irqfd_t record)."""
        return sizeof(irqfd_t)


cdef inline void defer_inject(engine_t *e, irqfd_t *irqfd) noexcept nogil:
    # Like schedule_work(&irqfd->inject): queue once; a record already queued is not queued again.
    if not kif_cas32(&irqfd.inject_pending, 0, 1):
        return
    pthread_mutex_lock(&e.dlock)
    irqfd.defer_next = e.dhead
    e.dhead = irqfd
    pthread_cond_signal(&e.dcond)
    pthread_mutex_unlock(&e.dlock)


cdef inline uint64_t consume(int fd) noexcept nogil:
    # eventfd_ctx_do_read(): take the counter; 0 if there was none.  RWF_NOWAIT because the
    # user's eventfd may be blocking and someone else may have read it first; we must never
    # block here.
    cdef uint64_t count = 0
    cdef iovec iov
    iov.iov_base = &count
    iov.iov_len = 8
    if preadv2(fd, &iov, 1, -1, RWF_NOWAIT) != 8:
        return 0
    return count


cdef inline void irqfd_inject(engine_t *e, irqfd_t *irqfd, uint64_t route,
                              engine_stats_t *st) noexcept nogil:
    # The counter was consumed: deliver with the route loaded before consuming.
    if route_kind(route) == ROUTE_MSI:           # kvm_arch_set_irq_inatomic
        if apic_bus_deliver(e.bus, route) < 0:
            st.no_target += 1
        st.delivered += 1
    else:                                        # -EWOULDBLOCK: irqchip lines, no route
        kif_add32(&irqfd.defer_count, 1)
        defer_inject(e, irqfd)
        st.deferred += 1


cdef int engine_batch(engine_t *e, epoll_event *events, int n,
                      engine_stats_t *st) noexcept nogil:
    """irqfd_wakeup for a batch: take each counter, then deliver with the irqfd's route.

    With io_uring every counter of the batch is read by one io_uring_enter through our own
    reference to the eventfd (a fixed file); without it, one read per event through the fd.
    Returns BATCH_KICKED / BATCH_ASIDE if the batch held the kick / aside eventfd.
    """
    cdef irqfd_t *recs[MAX_EVENTS]
    cdef uint64_t routes[MAX_EVENTS]
    cdef uint64_t counts[MAX_EVENTS]
    cdef irqfd_t *irqfd
    cdef uint32_t flags
    cdef uint64_t ud
    cdef int i, k = 0, res, got
    cdef int seen = 0
    for i in range(n):
        irqfd = <irqfd_t *>events[i].data.ptr
        if <uintptr_t>irqfd <= ASIDE_TAG:        # the stop eventfd (NULL), the kick, the aside
            if <uintptr_t>irqfd == KICK_TAG:
                seen |= BATCH_KICKED
                st.kicks += 1
            elif <uintptr_t>irqfd == ASIDE_TAG:
                seen |= BATCH_ASIDE
            continue
        st.events += 1
        flags = kif_load32(&irqfd.flags)
        if flags & IRQFD_DEAD:
            continue                             # deassigned after epoll_wait returned it
        if flags & (IRQFD_PENDING_AT_ASSIGN | IRQFD_UNCONSUMED):
            # A count found at assign was delivered then, and KVM leaves it in the counter: a
            # wakeup that finds only that count (the one epoll_ctl ADD or MOD raises for a
            # readable eventfd) takes nothing.  Rare, so a slow look at the count is fine.
            if kif_eventfd_count(irqfd.fd) <= <int64_t>irqfd.assign_count:
                if flags & IRQFD_PENDING_AT_ASSIGN:
                    kif_or32(&irqfd.flags, IRQFD_UNCONSUMED)
                    kif_and32(&irqfd.flags, ~(<uint32_t>IRQFD_PENDING_AT_ASSIGN))
                continue
            # Written since: the count is taken below, left-over included, as KVM's next
            # wakeup would (the control plane's drain may race us to it: one of us gets it).
            kif_and32(&irqfd.flags, ~(<uint32_t>(IRQFD_PENDING_AT_ASSIGN | IRQFD_UNCONSUMED)))
        routes[k] = kif_load64(&irqfd.route)     # before consuming: see the module docstring
        if e.has_ring and irqfd.slot >= 0:
            recs[k] = irqfd
            kif_ring_prep_read(&e.ring, irqfd.slot, &counts[k], k)
            k += 1
        elif consume(irqfd.fd):
            irqfd_inject(e, irqfd, routes[k], st)
        else:
            st.empty += 1
    if k == 0:
        return seen
    got = 0
    if kif_ring_submit_wait(&e.ring, k, k) >= 0:
        while kif_ring_reap(&e.ring, &ud, &res):
            got += 1
            if res == 8:
                irqfd_inject(e, recs[ud], routes[ud], st)
            else:
                st.empty += 1
    if got < k:                                  # cannot happen for eventfd reads; be safe
        e.has_ring = False
    return seen


cdef void *engine_main(void *arg) noexcept nogil:
    cdef engine_t *e = <engine_t *>arg
    cdef epoll_event events[MAX_EVENTS]
    cdef engine_stats_t st
    cdef int n, i, timeout, seen
    cdef uint64_t last_event = 0
    memset(&st, 0, sizeof(st))
    kif_store32(<uint32_t *>&e.tid, <uint32_t>kif_gettid())
    while not kif_load32(&e.stop):
        if stand_aside(e):
            continue
        timeout = -1
        if e.poll_ns and not kif_load32(&e.pollers) and kif_now_ns() - last_event < e.poll_ns:
            timeout = 0                          # halt-polling: spin instead of sleeping
            st.polls += 1
        else:
            kif_store32(&e.in_wait, 1)           # then pollers: see the module docstring
            if kif_load32(&e.pollers):
                kif_store32(&e.in_wait, 0)
                continue
        n = epoll_wait(e.epfd, events, MAX_EVENTS, timeout)
        if timeout:
            kif_store32(&e.in_wait, 0)
        if n <= 0:
            if timeout == 0:
                kif_cpu_relax()
            continue
        seen = run_batch(e, events, n, &st)
        if seen & BATCH_ASIDE:
            kif_eventfd_drain(e.asidefd)
        if seen & BATCH_KICKED and kif_cas32(&e.harvester, 0, 1):
            kif_eventfd_drain(e.kickfd)          # a late kick for a harvester that has left
            kif_store32(&e.harvester, 0)
        # (A kick while a vCPU harvests is its: level-triggered, it stays for that vCPU, and
        # stand_aside keeps us out of epoll_wait meanwhile.)
        if e.poll_ns:
            last_event = kif_now_ns()
        publish_stats(e, &st)
    publish_stats(e, &st)
    return NULL


cdef inline bint stand_aside(engine_t *e) noexcept nogil:
    # While a vCPU halt-polls or sleeps in epoll_wait (or is expected back soon: the lease), it
    # harvests the eventfds itself; if the engine also sat in epoll_wait, every write would wake
    # it for nothing, on a CPU the device needs.  Sleep until the lease ends, then look again;
    # while a vCPU is in halt, sleep the whole 1 ms: its lease is renewed at every interrupt (by
    # at most poll_ns), and waking at each old end would preempt a polling vCPU every ~200 us.
    # A vCPU that leaves without an interrupt wakes us; behind a sleeping harvester, sleep until
    # it leaves.
    cdef uint32_t seq = kif_load32(&e.aside_seq)     # before the checks: a call-back is not lost
    cdef uint32_t pollers = kif_load32(&e.pollers)
    cdef uint64_t now = kif_now_ns(), lease = kif_load64(&e.poll_lease)
    cdef timespec ts
    cdef uint64_t nap
    if not pollers and (now >= lease or kif_load32(&e.sleepers)):
        return False
    nap = lease - now if (lease > now and not pollers) else HARVEST_LEASE_NS
    if nap > HARVEST_LEASE_NS:
        nap = HARVEST_LEASE_NS
    if (lease <= now and kif_load32(&e.harvester)
            and now - kif_load64(&e.harvest_since) >= IDLE_HARVEST_NS):
        # An idle VM: sleep until the harvester leaves; it wakes us if it sees aside_long, and
        # we look at the token again after publishing aside_long (both seq_cst), so either it
        # sees the flag or we see it gone.
        kif_store32(&e.aside_long, 1)
        if not kif_load32(&e.harvester):
            kif_store32(&e.aside_long, 0)
            return True                          # it just left: look again
        nap = 100000000
    ts.tv_sec = <long>(nap // 1000000000)
    ts.tv_nsec = <long>(nap % 1000000000)
    kif_futex_wait(&e.aside_seq, seq, &ts)
    kif_store32(&e.aside_long, 0)
    return True


cdef inline int run_batch(engine_t *e, epoll_event *events, int n,
                          engine_stats_t *st) noexcept nogil:
    # The engine thread and halt-polling vCPU threads harvest the same epoll set; each event
    # goes to one of them.  batch_lock lets one batch run at a time (the io_uring SQ/CQ have one
    # user); batch_seq is odd while it runs (see synchronize).
    cdef int seen
    cdef uint64_t before = st.events
    pthread_mutex_lock(&e.batch_lock)
    if kif_load32(&e.stop):                      # closing: the records may be going away
        pthread_mutex_unlock(&e.batch_lock)
        return 0
    kif_add64(&e.batch_seq, 1)                   # odd: we hold records
    seen = engine_batch(e, events, n, st)
    if st.events != before:                      # a batch of irqfd wakeups, not only a kick
        st.batches += 1
    kif_add64(&e.batch_seq, 1)                   # even: records released
    pthread_mutex_unlock(&e.batch_lock)
    return seen


cdef inline void add_moved(uint64_t *to, uint64_t v) noexcept nogil:
    if v:                                        # a locked add only for a counter that moved
        kif_add64_relaxed(to, v)


cdef inline void add_stats(engine_stats_t *to, engine_stats_t *st) noexcept nogil:
    # After each halt that harvested.
    add_moved(&to.events, st.events)
    add_moved(&to.delivered, st.delivered)
    add_moved(&to.deferred, st.deferred)
    add_moved(&to.no_target, st.no_target)
    add_moved(&to.empty, st.empty)
    add_moved(&to.batches, st.batches)
    add_moved(&to.kicks, st.kicks)


cdef inline void publish_stats(engine_t *e, engine_stats_t *st) noexcept nogil:
    kif_store64_relaxed(&e.stats.events, st.events)
    kif_store64_relaxed(&e.stats.delivered, st.delivered)
    kif_store64_relaxed(&e.stats.deferred, st.deferred)
    kif_store64_relaxed(&e.stats.no_target, st.no_target)
    kif_store64_relaxed(&e.stats.empty, st.empty)
    kif_store64_relaxed(&e.stats.batches, st.batches)
    kif_store64_relaxed(&e.stats.polls, st.polls)
    kif_store64_relaxed(&e.stats.kicks, st.kicks)


def eventfd_info(int fd):
    """(id, counter) of the eventfd behind ``fd`` from /proc/self/fdinfo, without consuming the
    counter; id is None on kernels without "eventfd-id".  OSError(EBADF) for a closed fd,
    OSError(EINVAL) for an fd that is not an eventfd.  O(1), about 5 us."""
    cdef int64_t ident = -1
    cdef uint64_t count = 0
    cdef int rc
    with nogil:
        rc = kif_eventfd_info(fd, &ident, &count)
    if rc < 0:
        raise OSError(-rc, f"fd {fd}: " + ("not an eventfd" if rc == -EINVAL
                                           else os.strerror(-rc)))
    return (None if ident < 0 else ident), count


# -- HLT: a vCPU waits for an interrupt, harvesting the eventfds itself ----------------------
# A device write then wakes the halted vCPU directly, as in KVM, where the write delivers and
# kicks the vCPU: one thread wake-up, not two (device -> engine -> vCPU).  One vCPU at a time
# sleeps in epoll_wait (the harvester token); the others sleep on their futex and the engine
# delivers for them.  While a vCPU harvests, or is expected back soon (the lease), the engine
# stands aside.

cdef inline void drop_aside(engine_t *e, bint sleeper) noexcept nogil:
    # The aside eventfd is the engine's while it waits (it drains it on waking); one we see
    # with the engine not waiting is left over from a race both sides won: drop it.  A vCPU
    # about to sleep in epoll_wait lets the waking engine run first rather than spin on it.
    if not kif_load32(&e.in_wait):
        kif_eventfd_drain(e.asidefd)
    elif sleeper:
        sched_yield()


cdef bint poll_harvest(engine_t *e, lapic_t *l, uint64_t poll_ns,
                       engine_stats_t *st) noexcept nogil:
    # halt_poll_ns: spin on epoll_wait(0), delivering whatever arrives, until our LAPIC has an
    # interrupt or the window ends.
    cdef epoll_event events[MAX_EVENTS]
    cdef uint64_t start = kif_now_ns()
    cdef int n
    while not kif_load32(&e.stop) and not kif_load32(&l.shutdown):
        if deliverable(l) >= 0:
            return True
        if kif_now_ns() - start >= poll_ns:
            return False
        n = epoll_wait(e.epfd, events, MAX_EVENTS, 0)
        if n > 0:
            if run_batch(e, events, n, st) & BATCH_ASIDE:
                drop_aside(e, False)
        else:
            kif_cpu_relax()
    return False


cdef bint sleep_harvest(engine_t *e, lapic_t *l, int64_t timeout_ns, uint64_t start,
                        engine_stats_t *st) noexcept nogil:
    # HLT in epoll_wait until timeout_ns after start (<0: none); the caller holds the harvester
    # token.  A delivery to our LAPIC from anywhere else writes the kick eventfd (lapic_kick),
    # which only the token holder drains.
    cdef epoll_event events[MAX_EVENTS]
    cdef int64_t left
    cdef int n, ms, seen
    cdef bint got = False
    l.kickfd = e.kickfd
    while not kif_load32(&e.stop) and not kif_load32(&l.shutdown):
        kif_store32(&l.harvesting, 1)            # seq_cst, before the IRR check: see lapic_kick
        if deliverable(l) >= 0:
            got = True
            break
        ms = -1
        if timeout_ns >= 0:
            left = timeout_ns - <int64_t>(kif_now_ns() - start)
            if left <= 0:
                break
            ms = <int>((left + 999999) // 1000000)
        n = epoll_wait(e.epfd, events, MAX_EVENTS, ms)
        kif_store32(&l.harvesting, 0)            # awake: our own deliveries need no kick
        if n < 0:
            break                                # EINTR: let the caller look at signals
        seen = run_batch(e, events, n, st) if n > 0 else 0
        if seen & BATCH_ASIDE:
            drop_aside(e, True)
        if seen & BATCH_KICKED:
            kif_eventfd_drain(e.kickfd)          # drained before the IRR is looked at again
    kif_store32(&l.harvesting, 0)
    return got


cdef inline void leave_harvest(engine_t *e, bint got, uint64_t lease_ns) noexcept nogil:
    # Took an interrupt: the vCPU will be back soon, keep the engine aside a while (unless other
    # vCPUs sleep on their futex: they need the engine now).  Otherwise hand the eventfds back.
    if got and not kif_load32(&e.sleepers):
        kif_store64(&e.poll_lease, kif_now_ns() + lease_ns)
    kif_sub32(&e.pollers, 1)
    if not got or kif_load32(&e.sleepers) or kif_load32(&e.aside_long):
        call_engine_back(e)


cdef inline void call_engine_back(engine_t *e) noexcept nogil:
    kif_add32(&e.aside_seq, 1)
    kif_futex_wake(&e.aside_seq, 1)


cdef bint engine_halt(engine_t *e, lapic_t *l, int64_t timeout_ns, uint64_t poll_ns,
                      engine_stats_t *st) noexcept nogil:
    """HLT for one vCPU: poll (harvesting), then sleep in epoll_wait if the harvester token is
    free, else on the futex.  True once an interrupt is deliverable."""
    cdef uint64_t start = kif_now_ns()
    cdef int64_t left = timeout_ns
    cdef bint got = False
    if deliverable(l) >= 0:
        return True
    if timeout_ns == 0:
        return False                             # a look, not a halt
    kif_add32(&e.users, 1)                       # close() waits for users to leave
    if kif_load32(&e.stop):
        kif_sub32(&e.users, 1)
        return False
    kif_add32(&e.pollers, 1)
    if poll_ns and kif_load32(&e.in_wait):       # the engine sleeps in epoll_wait: send it
        kif_eventfd_signal(e.asidefd)            # aside (see the module docstring)
    if poll_ns:
        got = poll_harvest(e, l, poll_ns if (timeout_ns < 0 or <int64_t>poll_ns < timeout_ns)
                           else <uint64_t>timeout_ns, st)
        if timeout_ns >= 0:
            left = timeout_ns - <int64_t>(kif_now_ns() - start)
    if got or (timeout_ns >= 0 and left <= 0):
        leave_harvest(e, got, poll_ns if poll_ns < HARVEST_LEASE_NS else HARVEST_LEASE_NS)
    elif kif_load32(&e.vcpu_harvest) and kif_cas32(&e.harvester, 0, 1):
        kif_store64(&e.harvest_since, kif_now_ns() if poll_ns else start)
        got = sleep_harvest(e, l, timeout_ns, start, st)
        kif_store32(&e.harvester, 0)
        leave_harvest(e, got, HARVEST_LEASE_NS)
    else:
        kif_add32(&e.sleepers, 1)                # before leaving: the engine must not lease
        leave_harvest(e, False, 0)
        got = lapic_sleep(l, left)
        kif_sub32(&e.sleepers, 1)
    kif_sub32(&e.users, 1)
    return got


# Rings are kept for reuse rather than torn down: tearing down an io_uring that held files
# finishes asynchronously and can make another blocking system call of this process (a
# KVM_CREATE_VM on a real /dev/kvm, say) fail with EINTR.  Protected by the GIL.
cdef kif_ring _ring_pool[16]
cdef unsigned _ring_pool_nfiles[16]
cdef int _ring_pool_n = 0


cdef int ring_take(kif_ring *ring, unsigned nfiles):
    global _ring_pool_n
    cdef int i
    if getpid() != _pool_pid:                    # after fork(): the pool is the parent's
        return kif_ring_init(ring, MAX_EVENTS, nfiles)
    for i in range(_ring_pool_n - 1, -1, -1):
        if _ring_pool_nfiles[i] == nfiles:
            ring[0] = _ring_pool[i]
            _ring_pool_n -= 1
            _ring_pool[i] = _ring_pool[_ring_pool_n]
            _ring_pool_nfiles[i] = _ring_pool_nfiles[_ring_pool_n]
            return 0
    return kif_ring_init(ring, MAX_EVENTS, nfiles)


cdef void ring_give(kif_ring *ring, unsigned nfiles) noexcept:
    global _ring_pool_n
    if _ring_pool_n < 16 and getpid() == _pool_pid:
        _ring_pool[_ring_pool_n] = ring[0]
        _ring_pool_nfiles[_ring_pool_n] = nfiles
        _ring_pool_n += 1
    else:
        kif_ring_free(ring)
    ring.fd = -1


cdef int _pool_pid = getpid()


cdef uint64_t drain_counter(IrqfdRecord r, int fd) noexcept:
    """Engine.drain: the writes pending on r's eventfd through ``fd``, taken; 0 if none."""
    cdef uint32_t flags = kif_load32(&r.rec.flags)
    if flags & (IRQFD_PENDING_AT_ASSIGN | IRQFD_UNCONSUMED):
        if kif_eventfd_count(fd) <= <int64_t>r.rec.assign_count:
            return 0
        kif_and32(&r.rec.flags, ~(<uint32_t>(IRQFD_PENDING_AT_ASSIGN | IRQFD_UNCONSUMED)))
    return consume(fd)                          # non-blocking: not worth a GIL hand-off


cdef class Engine:
    """The engine thread, its epoll set and its deferred queue.

    ``Engine(bus)`` creates the epoll fd; ``start()`` starts the thread; ``close()`` stops it and
    releases every fd it owns.  Registration and route changes are safe while the thread runs.
    """

    def __cinit__(self, ApicBus bus not None, bint use_ring=True):
        cdef epoll_event ev
        cdef int rc
        self.bus = bus
        self.e = <engine_t *>calloc(1, sizeof(engine_t))
        if self.e == NULL:
            raise MemoryError()
        self.e.epfd = -1
        self.e.wakefd = -1
        self.e.kickfd = -1
        self.e.asidefd = -1
        self.e.vcpu_harvest = 1
        self.e.ring.fd = -1
        self.created_pid = getpid()
        self.e.bus = &bus.bus
        pthread_mutex_init(&self.e.dlock, NULL)
        pthread_mutex_init(&self.e.batch_lock, NULL)
        pthread_cond_init(&self.e.dcond, NULL)
        self.e.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.e.epfd < 0:
            raise OSError(errno, os.strerror(errno))
        self.e.wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.e.wakefd < 0:
            raise OSError(errno, os.strerror(errno))
        ev.events = EPOLLIN
        ev.data.ptr = NULL
        if epoll_ctl(self.e.epfd, EPOLL_CTL_ADD, self.e.wakefd, &ev) < 0:
            raise OSError(errno, os.strerror(errno))
        self.e.kickfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.e.kickfd < 0:
            raise OSError(errno, os.strerror(errno))
        ev.events = EPOLLIN                      # level-triggered: stays until its vCPU drains it
        ev.data.ptr = <void *>KICK_TAG
        if epoll_ctl(self.e.epfd, EPOLL_CTL_ADD, self.e.kickfd, &ev) < 0:
            raise OSError(errno, os.strerror(errno))
        self.e.asidefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.e.asidefd < 0:
            raise OSError(errno, os.strerror(errno))
        ev.events = EPOLLIN                      # level-triggered: stays until the engine drains it
        ev.data.ptr = <void *>ASIDE_TAG
        if epoll_ctl(self.e.epfd, EPOLL_CTL_ADD, self.e.asidefd, &ev) < 0:
            raise OSError(errno, os.strerror(errno))
        self._free_slots = []
        self._stale_slots = []
        self.ring_error = None
        self._pinned = set()
        if use_ring:
            nfiles = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 65536)
            rc = ring_take(&self.e.ring, nfiles)
            if rc == 0:
                self.e.has_ring = True
                self.nfiles = nfiles
            else:
                self.ring_error = os.strerror(-rc)
        else:
            self.ring_error = "disabled"

    def __dealloc__(self):
        if self.e != NULL:
            self._stop_thread()
            self._release()
            pthread_mutex_destroy(&self.e.dlock)
            pthread_mutex_destroy(&self.e.batch_lock)
            pthread_cond_destroy(&self.e.dcond)
            free(self.e)
            self.e = NULL

    def start(self):
        """Start the engine thread."""
        if self.started or self.closed:
            raise RuntimeError("engine already started or closed")
        if pthread_create(&self.thread, NULL, engine_main, self.e) != 0:
            raise OSError(errno, "pthread_create failed")
        self.started = True
        self.owner_pid = getpid()

    cdef void _stop_thread(self) noexcept:
        cdef uint64_t one = 1
        if not self.started:
            return
        if getpid() != self.owner_pid:          # forked child: the thread is not ours
            self.started = False
            return
        kif_store32(&self.e.stop, 1)
        write(self.e.wakefd, &one, 8)
        call_engine_back(self.e)                # if it stands aside for a polling vCPU
        with nogil:
            pthread_join(self.thread, NULL)
        self.started = False

    cdef void _release(self) noexcept:
        if getpid() != self.created_pid:
            # A fork()ed child: the parent's engine thread may have held batch_lock at the
            # fork, and no thread of this process will ever release the copy.  Nothing here
            # runs a batch, so there is nothing to exclude.
            self._release_locked()
            return
        with nogil:
            pthread_mutex_lock(&self.e.batch_lock)
        self._release_locked()
        pthread_mutex_unlock(&self.e.batch_lock)

    cdef void _release_locked(self) noexcept:
        if self.e.ring.fd >= 0:
            # After fork() the io_uring is the parent's too (the child's fd is one more
            # reference to the same ring): a child only lets go of its fd, or it would empty
            # the parent's slots under its engine.
            if getpid() == self.created_pid:
                for slot in self._pinned:        # drop our references to every eventfd
                    kif_ring_set_file(&self.e.ring, slot, -1)
            self._pinned = set()
            self._stale_slots = []
            ring_give(&self.e.ring, self.nfiles)
            self.e.has_ring = False
        if self.e.epfd >= 0:
            close(self.e.epfd)
            self.e.epfd = -1
        if self.e.wakefd >= 0:
            close(self.e.wakefd)
            self.e.wakefd = -1
        if self.e.kickfd >= 0:
            close(self.e.kickfd)
            self.e.kickfd = -1
        if self.e.asidefd >= 0:
            close(self.e.asidefd)
            self.e.asidefd = -1

    def close(self):
        """Stop the thread, wake the deferred worker for good, close the epoll and wake fds.

        vCPU threads halted in ``halt`` return (the LAPICs should be shut down first: a vCPU
        asleep on its futex is woken by that, not by us); we wait for them before closing fds.
        """
        cdef timespec ts
        if self.closed:
            return
        self._stop_thread()
        kif_store32(&self.e.stop, 1)             # also when the thread never started
        kif_eventfd_signal(self.e.wakefd)        # level-triggered: every harvester sees it
        ts.tv_sec = 0
        ts.tv_nsec = 50000
        with nogil:
            while kif_load32(&self.e.users):
                nanosleep(&ts, NULL)
        pthread_mutex_lock(&self.e.dlock)
        self.e.dstop = 1
        self.e.dhead = NULL                      # the worker will not inject these any more
        pthread_cond_broadcast(&self.e.dcond)
        pthread_mutex_unlock(&self.e.dlock)
        self._release()
        self.closed = True

    property poll_ns:
        """Halt-polling window: after events, spin this long on epoll before sleeping."""
        def __get__(self):
            return self.e.poll_ns
        def __set__(self, uint64_t v):
            self.e.poll_ns = v

    # -- control plane ----------------------------------------------------------------------
    def register(self, IrqfdRecord r not None):
        """Add the record's eventfd to the epoll set.  An event already pending is delivered.

        Raises OSError (EBADF, EPERM for a non-pollable fd, ENOSPC/ENOMEM at limits); nothing
        is registered then.  O(log n) in the kernel's epoll tree.
        """
        cdef epoll_event ev
        if self.closed:
            raise RuntimeError("engine closed")
        ev.events = EPOLLIN | EPOLLET
        ev.data.ptr = &r.rec
        if epoll_ctl(self.e.epfd, EPOLL_CTL_ADD, r.rec.fd, &ev) < 0:
            raise OSError(errno, os.strerror(errno))

    def unregister(self, IrqfdRecord r not None, int fd):
        """Detach a record through ``fd``: after True, the engine never touches it again.

        ``fd`` must refer to the record's eventfd under the number it was registered with;
        epoll checks that for us (DEL fails with ENOENT otherwise) and then nothing changes
        and False is returned.  One epoll_ctl + a grace period.
        """
        return self._unregister(r, fd)

    cdef bint _unregister(self, IrqfdRecord r, int fd) noexcept:
        if not self.closed and epoll_ctl(self.e.epfd, EPOLL_CTL_DEL, fd, NULL) != 0:
            return False
        self._kill(r)
        return True

    cdef void _kill(self, IrqfdRecord r) noexcept:
        kif_or32(&r.rec.flags, IRQFD_DEAD)
        self._synchronize()

    def kill(self, IrqfdRecord r not None):
        """Mark a record dead without touching epoll (its registration is gone or unreachable).

        Edge-triggered, a dead record that still gets wakeups never reads its eventfd, so it
        costs a wakeup per write and nothing else.
        """
        self._kill(r)

    def is_registered(self, IrqfdRecord r not None, int fd):
        """True if epoll holds ``fd``'s current file under the number ``fd`` (EPOLL_CTL_MOD).

        For the record last assigned under that number, True means ``fd`` still refers to its
        eventfd.  One system call, O(log n).  MOD re-arms the registration: a readable eventfd
        raises one more wakeup, which takes nothing unless something was written (see
        IRQFD_UNCONSUMED).  (kcmp KCMP_EPOLL_TFD would not re-arm, but walks every
        registration: O(n).)
        """
        cdef epoll_event ev
        if self.closed:
            return False
        ev.events = EPOLLIN | EPOLLET
        ev.data.ptr = &r.rec
        return epoll_ctl(self.e.epfd, EPOLL_CTL_MOD, fd, &ev) == 0

    def pin(self, IrqfdRecord r not None, int fd):
        """Take our own reference to ``fd``'s eventfd (a fixed file) and read through it.

        KVM holds the eventfd_ctx, not an fd number: with this, closing or reusing the fd
        number the irqfd was assigned with changes nothing, and no fd-table slot is used.
        Returns False where io_uring is unavailable (reads then use the fd number).  One
        io_uring register call.  O(1).
        """
        cdef int slot, rc
        cdef list origin
        if not self.e.has_ring:
            return False
        if self._stale_slots:                    # overwriting puts the old file: one call
            origin = self._stale_slots
        elif self._free_slots:
            origin = self._free_slots
        elif self.next_slot < self.nfiles:
            origin = None
        else:
            return False
        if origin is None:
            slot = self.next_slot
            self.next_slot += 1
        else:
            slot = origin.pop()
        rc = kif_ring_set_file(&self.e.ring, slot, fd)
        if rc < 0:
            # A failed update may already have emptied the slot; stale is right either way.
            self._stale_slots.append(slot)
            self._pinned.add(slot)
            raise OSError(-rc, os.strerror(-rc))
        r.rec.slot = slot
        self._pinned.add(slot)
        return True

    def unpin(self, IrqfdRecord r not None):
        """Give up r's slot (after r is dead and synchronized: the engine reads it no more).

        The slot keeps its reference to the eventfd until pin() reuses it or STALE_MAX slots
        wait, then released in runs of consecutive slots: deassign makes no system call for
        it.  KVM, too, puts the eventfd after deassign returns (from a workqueue).  O(1)
        amortized.
        """
        self._unpin(r)

    cdef void _unpin(self, IrqfdRecord r):
        cdef int slot = r.rec.slot
        if slot < 0:
            return
        r.rec.slot = -1
        if self.e.has_ring:
            self._stale_slots.append(slot)
            if len(self._stale_slots) >= STALE_MAX:
                self._flush_stale()

    cdef void _flush_stale(self) noexcept:
        cdef list slots = sorted(self._stale_slots)
        cdef Py_ssize_t i = 0, j, n = len(slots)
        cdef int first
        self._stale_slots = []
        while i < n:
            first = slots[i]
            j = i + 1
            while j < n and j - i < KIF_CLEAR_MAX and <int>slots[j] == first + (j - i):
                j += 1
            if kif_ring_clear_files(&self.e.ring, first, j - i) == 0:
                for slot in slots[i:j]:
                    self._pinned.discard(slot)
                    self._free_slots.append(slot)
            else:                                # keep them: a later flush or close() retries
                self._stale_slots.extend(slots[i:j])
            i = j

    @property
    def stale_slots(self):
        """Slots given up by unpin() that still hold their eventfd (at most STALE_MAX)."""
        return len(self._stale_slots)

    @property
    def uses_ring(self):
        return bool(self.e.has_ring)

    @property
    def thread_id(self):
        """The engine thread's kernel id (/proc/self/task/<id>), 0 until it runs."""
        return <int>kif_load32(<uint32_t *>&self.e.tid)

    @property
    def ring_fd(self):
        """The io_uring that holds our eventfd references (its fdinfo lists them), or -1."""
        return self.e.ring.fd if self.e.has_ring else -1

    @staticmethod
    def same_file(int fd1, int fd2):
        """True if the two descriptors refer to the same open file (kcmp KCMP_FILE)."""
        return kif_kcmp_file(fd1, fd2) == 0

    @property
    def epfd(self):
        return self.e.epfd

    def set_route(self, IrqfdRecord r not None, uint64_t route):
        """Replace a record's route word (one atomic store; call synchronize() afterwards)."""
        kif_store64(&r.rec.route, route)

    def drain(self, IrqfdRecord r not None, int fd):
        """Take the writes pending on r's eventfd through ``fd``; the count taken (0: none).

        A count delivered at assign without consuming (as KVM does) is not taken again, and is
        left in the counter as KVM leaves it, unless writes came on top of it (then the engine
        may race us to it: one of us gets it).  Used at retarget and deassign (Vm._drain).
        """
        return drain_counter(r, fd)

    def detach(self, IrqfdRecord r not None, int fd):
        """Deassign's data-plane half in one call: remove r's registration through ``fd``
        (epoll checks that fd is r's), wait out a batch in flight, take what was written before
        (KVM flushes it at deassign) and give up our reference to the eventfd.

        Returns the count taken (0: none), or -1 if ``fd`` is not r's registration (then
        nothing changed).  One epoll_ctl and one read (the slot is given up lazily, see
        unpin): O(log n) in the kernel.
        """
        if not self._unregister(r, fd):
            return -1
        count = drain_counter(r, fd)
        self._unpin(r)
        return count

    property vcpu_harvest:
        """May a halted vCPU sleep in epoll_wait on our set and take device writes itself (one
        wake-up per interrupt instead of two)?  Default True; False: the engine delivers all."""
        def __get__(self):
            return bool(self.e.vcpu_harvest)
        def __set__(self, bint v):
            kif_store32(&self.e.vcpu_harvest, v)

    def halted(self):
        """vCPU threads asleep in halt(): the harvester (if it is in epoll_wait) + futex sleepers.

        For tests and monitoring; O(vCPUs)."""
        cdef uint32_t i, n = 0
        for i in range(kif_load32(&self.e.bus.nr)):
            n += kif_load32(&self.e.bus.lapics[i].harvesting)
        return n + kif_load32(&self.e.sleepers)

    def halt(self, Lapic lapic not None, timeout=None, uint64_t poll_ns=0):
        """HLT for the vCPU of ``lapic``: True once an interrupt is deliverable, False on timeout
        or close.  Spins ``poll_ns`` first (halt-polling), harvesting the eventfds meanwhile;
        then sleeps, in epoll_wait on our set if no other vCPU does (see engine_halt), else on
        its futex.  No GIL; wakes every 50 ms to let Python handle signals.
        """
        cdef int64_t chunk = 50000000, total, t
        cdef uint64_t poll = poll_ns
        cdef engine_stats_t st
        cdef bint got
        total = -1 if timeout is None else <int64_t>(float(timeout) * 1e9)
        memset(&st, 0, sizeof(st))
        while True:
            t = chunk if (total < 0 or total > chunk) else total
            with nogil:
                got = engine_halt(self.e, lapic.l, t, poll, &st)
            if got or self.closed or lapic.l.shutdown:
                break
            if total >= 0:
                total -= t
                if total <= 0:
                    break
            PyErr_CheckSignals()
            poll = 0
        if st.batches or st.kicks:
            add_stats(&self.e.vstats, &st)
        return got

    def synchronize(self):
        """Wait until the engine holds no record it held when this was called.  Usually O(1)."""
        self._synchronize()

    cdef void _synchronize(self) noexcept:
        cdef uint64_t s
        if not self.started:
            return
        s = kif_load64(&self.e.batch_seq)
        if s & 1:
            with nogil:
                while kif_load64(&self.e.batch_seq) == s:
                    kif_cpu_relax()

    def deliver(self, uint64_t route):
        """Deliver one route word now from the calling thread (KVM_SIGNAL_MSI, IOAPIC)."""
        cdef int r
        with nogil:
            r = apic_bus_deliver(self.e.bus, route)
        return r

    def take_deferred(self, timeout=None):
        """Block (without the GIL) until records need the slow path; return them oldest first.

        Returns [] on timeout or once the engine is closed.  The records stay inject_pending
        until the caller clears them.
        """
        cdef irqfd_t *head
        cdef irqfd_t *nxt
        cdef irqfd_t *rev = NULL
        cdef timespec ts
        cdef double t = -1.0 if timeout is None else float(timeout)
        with nogil:
            pthread_mutex_lock(&self.e.dlock)
            if self.e.dhead == NULL and not self.e.dstop:
                if t < 0:
                    pthread_cond_wait(&self.e.dcond, &self.e.dlock)
                else:
                    clock_gettime(0, &ts)         # CLOCK_REALTIME, as pthread_cond_timedwait wants
                    ts.tv_sec += <long>t
                    ts.tv_nsec += <long>((t - <long>t) * 1e9)
                    if ts.tv_nsec >= 1000000000:
                        ts.tv_sec += 1
                        ts.tv_nsec -= 1000000000
                    pthread_cond_timedwait(&self.e.dcond, &self.e.dlock, &ts)
            head = NULL if self.e.dstop else self.e.dhead
            self.e.dhead = NULL
            pthread_mutex_unlock(&self.e.dlock)
            while head != NULL:                   # the list is LIFO: reverse it
                nxt = head.defer_next
                head.defer_next = rev
                rev = head
                head = nxt
        out = []
        while rev != NULL:
            out.append(<object><PyObject *>rev.owner)
            rev = rev.defer_next
        return out

    def stats(self):
        """Counters since start, as a dict (see engine_stats_t), plus the thread's CPU time."""
        cdef clockid_t clk
        cdef timespec ts
        cdef engine_stats_t *a = &self.e.stats
        cdef engine_stats_t *v = &self.e.vstats
        d = {
            "events": kif_load64_relaxed(&a.events) + kif_load64_relaxed(&v.events),
            "delivered": kif_load64_relaxed(&a.delivered) + kif_load64_relaxed(&v.delivered),
            "deferred": kif_load64_relaxed(&a.deferred) + kif_load64_relaxed(&v.deferred),
            "no_target": kif_load64_relaxed(&a.no_target) + kif_load64_relaxed(&v.no_target),
            "empty": kif_load64_relaxed(&a.empty) + kif_load64_relaxed(&v.empty),
            "batches": kif_load64_relaxed(&a.batches) + kif_load64_relaxed(&v.batches),
            "vcpu_harvested": kif_load64_relaxed(&v.events),
            "polls": kif_load64_relaxed(&self.e.stats.polls),
            "kicks": kif_load64_relaxed(&a.kicks) + kif_load64_relaxed(&v.kicks),
            "cpu_ns": None,
        }
        if self.started and pthread_getcpuclockid(self.thread, &clk) == 0:
            if clock_gettime(clk, &ts) == 0:
                d["cpu_ns"] = ts.tv_sec * 1000000000 + ts.tv_nsec
        return d
