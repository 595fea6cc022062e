# The data plane: one engine thread that waits on every assigned eventfd and delivers.

from libc.stdint cimport int64_t, uint32_t, uint64_t
from kvmirqfast._sys cimport pthread_t, pthread_mutex_t, pthread_cond_t, kif_ring
from kvmirqfast._lapic cimport apic_bus_t, ApicBus, Lapic

cdef enum:
    IRQFD_DEAD = 1          # deassigned: the engine must not touch its eventfd or route again
    IRQFD_PENDING_AT_ASSIGN = 2   # a count found at assign was delivered: skip ADD's wakeup
    IRQFD_UNCONSUMED = 4    # that count is still in the counter (KVM never read it); set only
                            # by the engine's wakeup, cleared when the counter is taken
    MAX_EVENTS = 512        # epoll_wait batch
    KICK_TAG = 1            # epoll data of the kick eventfd (records are pointers, never 1)
    ASIDE_TAG = 2           # epoll data of the aside eventfd (see engine_halt)
    BATCH_KICKED = 1        # run_batch: the kick eventfd was in the batch
    BATCH_ASIDE = 2         # run_batch: the aside eventfd was in the batch
    HARVEST_LEASE_NS = 1000000  # a vCPU that took an interrupt is expected back within this
    IDLE_HARVEST_NS = 10000000  # a harvester asleep this long is idle: the engine naps deeply
    STALE_MAX = 64          # unpinned slots that may keep their eventfd until released together

# One assigned irqfd.  The epoll registration's data.ptr points here, so a wakeup goes straight
# from the eventfd to its route: no lookup on the hot path.
cdef struct irqfd_t:
    uint64_t route          # route word (see _lapic.pxd); atomic, replaced whole by the control plane
    uint32_t flags          # IRQFD_DEAD; atomic
    uint32_t inject_pending # on the deferred list; like schedule_work(), a second request coalesces
    int fd                  # the eventfd, as registered in epoll
    uint32_t defer_count    # deferred requests, coalesced or not (lets a retarget settle old ones)
    int slot                # our reference to the eventfd: its io_uring fixed-file slot, or -1
    uint32_t _pad
    uint64_t assign_count   # the count found at assign (delivered without consuming)
    irqfd_t *defer_next     # deferred list link, protected by engine_t.dlock
    void *owner             # the IrqfdRecord that owns this memory (borrowed)
    irqfd_t *index_left     # the VM's index by eventfd identity (_index.pyx): control plane only
    irqfd_t *index_right
    int64_t index_key

cdef struct engine_stats_t:
    uint64_t events         # eventfd wakeups harvested from epoll
    uint64_t delivered      # delivered in the engine thread ("inatomic")
    uint64_t deferred       # handed to the deferred worker ("would block")
    uint64_t no_target      # MSI that matched no LAPIC
    uint64_t empty          # wakeups whose counter was already 0 (raced with a reader)
    uint64_t batches        # epoll_wait calls that returned events
    uint64_t polls          # epoll_wait(timeout 0) calls made while halt-polling
    uint64_t kicks          # kick-eventfd wakeups seen (deliveries to a vCPU asleep in epoll)

cdef struct engine_t:
    int epfd
    int wakefd              # registered with data.ptr NULL: wakes the engine to stop
    uint32_t stop
    uint32_t _pad
    uint64_t batch_seq      # odd while the engine holds records from epoll_wait (see synchronize)
    uint64_t poll_ns        # halt-polling window before blocking; 0 = block at once
    apic_bus_t *bus
    kif_ring ring           # fixed files (our eventfd references) and batched reads
    bint has_ring           # io_uring is usable; else reads go through the registered fd
    pthread_mutex_t batch_lock  # one batch at a time: the engine's or a halt-polling vCPU's
    uint32_t pollers        # vCPUs halt-polling (harvesting themselves): the engine stands aside
    uint32_t _pad2
    uint64_t poll_lease     # until then a vCPU is expected back to poll (monotonic ns)
    int kickfd              # level-triggered in the set (data KICK_TAG): wakes a harvesting vCPU
    int asidefd             # level-triggered in the set (data ASIDE_TAG): sends the engine aside
    uint32_t in_wait        # 1 while the engine thread sleeps in epoll_wait
    int tid                 # the engine thread's kernel id (0 before it runs)
    uint32_t harvester      # token: 1 while a vCPU sleeps in epoll_wait on our set (Engine.halt)
    uint32_t vcpu_harvest   # knob: may a halted vCPU harvest instead of sleeping on its futex
    uint32_t users          # vCPU threads inside halt(); close() waits them out
    uint32_t sleepers       # vCPU threads halted on their futex (not harvesting)
    uint32_t aside_long     # the engine stands aside without a deadline: wake it on leaving
    uint32_t aside_seq      # futex word of the engine standing aside; bumped to call it back
    uint64_t harvest_since  # when the harvester token was taken (monotonic ns)
    engine_stats_t vstats   # what halt-polling vCPUs harvested (atomic adds)
    pthread_mutex_t dlock   # protects dhead and dstop
    pthread_cond_t dcond
    irqfd_t *dhead
    uint32_t dstop
    engine_stats_t stats

cdef class IrqfdRecord:
    cdef irqfd_t rec
    cdef public object key
    cdef public object gsi
    cdef public object entry
    cdef public object resampler
    cdef public object resamplefd
    cdef public bint direct
    cdef public unsigned int handled       # defer_count already injected (see Vm._run_deferred)

cdef class Engine:
    cdef engine_t *e
    cdef ApicBus bus
    cdef pthread_t thread
    cdef bint started
    cdef bint closed
    cdef int owner_pid          # fork(): a child must not join the parent's thread
    cdef int created_pid        # fork(): a child must not empty the parent's io_uring slots
    cdef list _free_slots       # free fixed-file slots (control plane, under the Vm lock)
    cdef list _stale_slots      # unpinned slots still holding their eventfd (see Engine.unpin)
    cdef set _pinned            # slots holding a file, cleared before the ring goes to the pool
    cdef unsigned nfiles
    cdef unsigned next_slot     # slots below it have been used; above, never
    cdef public object ring_error   # why io_uring is not used, or None
    cdef void _stop_thread(self) noexcept
    cdef void _release(self) noexcept
    cdef void _release_locked(self) noexcept
    cdef void _flush_stale(self) noexcept
    cdef void _unpin(self, IrqfdRecord r)
    cdef bint _unregister(self, IrqfdRecord r, int fd) noexcept
    cdef void _kill(self, IrqfdRecord r) noexcept
    cdef void _synchronize(self) noexcept
