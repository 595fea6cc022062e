# The local APIC model the hot path writes into, and the "APIC bus" that finds destinations.
#
# A route word (uint64) is the decoded form of one MSI routing entry, built by the control plane
# (kvmirqfast.route_word) and read by the engine with a single atomic load, so a reader never
# sees half of an old entry and half of a new one:
#   bits  0-7   vector
#   bits  8-10  delivery mode (0 fixed, 1 lowest priority, 4 NMI; others are not modelled)
#   bit   11    destination mode logical
#   bit   12    level triggered
#   bits 13-15  kind: ROUTE_NONE, ROUTE_MSI (deliverable in the engine), ROUTE_SLOW (defer)
#   bits 32-63  destination id

from libc.stdint cimport uint32_t, uint64_t, int64_t
from kvmirqfast._sys cimport (kif_load32, kif_load32_relaxed, kif_store32, kif_or32, kif_and32,
                              kif_add32, kif_sub32, kif_add64_relaxed, kif_futex_wait,
                              kif_futex_wake, kif_eventfd_signal, kif_now_ns, timespec)

cdef enum:
    MAX_VCPUS = 256
    DM_FIXED = 0
    DM_LOWEST = 1
    DM_NMI = 4
    ROUTE_NONE = 0
    ROUTE_MSI = 1
    ROUTE_SLOW = 2
    SPIV_ENABLED = 0x100

cdef struct lapic_t:
    uint32_t irr[8]        # set by any deliverer (atomic OR), cleared by ack
    uint32_t tmr[8]        # level-triggered vectors; written before the IRR bit it describes
    uint32_t isr[8]        # in service: touched by ack/eoi only
    uint32_t apic_id       # xAPIC ID (the ID register holds it in bits 31:24)
    uint32_t ldr           # raw LDR register
    uint32_t dfr           # raw DFR register (0xFFFFFFFF flat, 0x0FFFFFFF cluster)
    uint32_t spiv          # bit 8: software enabled; interrupts to a disabled LAPIC are dropped
    uint32_t wake_seq      # futex word: bumped on every delivery
    uint32_t waiters       # vCPU threads sleeping on wake_seq
    uint32_t nmi_pending
    uint32_t vcpu_id
    uint32_t shutdown      # set at VM close: sleepers return
    uint32_t harvesting    # the vCPU sleeps in epoll_wait on the engine's set (see Engine.halt)
    int kickfd             # the eventfd that wakes it there (the engine's), set before harvesting
    uint64_t accepted      # interrupts accepted (statistics)

cdef struct apic_bus_t:
    uint32_t nr            # published with a release store after lapics[nr] is filled
    lapic_t *lapics[MAX_VCPUS]


cdef extern from *:
    int __builtin_clz(unsigned int x) nogil


cdef inline int highest_bit(const uint32_t *reg) noexcept nogil:
    cdef int w
    cdef uint32_t v
    for w in range(7, -1, -1):
        v = kif_load32_relaxed(&reg[w])
        if v:
            return w * 32 + 31 - __builtin_clz(v)
    return -1


cdef inline int deliverable(lapic_t *l) noexcept nogil:
    """The vector the guest would take next (highest IRR above the in-service class), or -1."""
    cdef int irr = highest_bit(l.irr)
    cdef int isr
    if irr < 0:
        return -1
    isr = highest_bit(l.isr)
    if isr >= 0 and (irr & 0xF0) <= (isr & 0xF0):
        return -1
    return irr


cdef inline uint64_t route_kind(uint64_t route) noexcept nogil:
    return (route >> 13) & 7


cdef inline void lapic_kick(lapic_t *l) noexcept nogil:
    # The vCPU publishes `waiters` (or `harvesting`) before re-checking the IRR and sleeping, and
    # we publish the IRR before reading them (all seq_cst), so either it sees the interrupt or we
    # see it asleep: on the futex, or in epoll_wait, where only its kick eventfd reaches it.
    kif_add32(&l.wake_seq, 1)
    if kif_load32(&l.waiters):
        kif_futex_wake(&l.wake_seq, 0x7fffffff)
    if kif_load32(&l.harvesting):
        kif_eventfd_signal(l.kickfd)


cdef inline bint lapic_sleep(lapic_t *l, int64_t timeout_ns) noexcept nogil:
    """HLT on the futex until an interrupt is deliverable (True), timeout (<0: none) or shutdown."""
    cdef uint64_t start = kif_now_ns()
    cdef uint32_t seq
    cdef timespec ts
    cdef int64_t left
    while not kif_load32(&l.shutdown):
        seq = kif_load32(&l.wake_seq)
        kif_add32(&l.waiters, 1)
        if deliverable(l) >= 0:
            kif_sub32(&l.waiters, 1)
            return True
        if timeout_ns >= 0:
            left = timeout_ns - <int64_t>(kif_now_ns() - start)
            if left <= 0:
                kif_sub32(&l.waiters, 1)
                return False
            ts.tv_sec = left // 1000000000
            ts.tv_nsec = left % 1000000000
            kif_futex_wait(&l.wake_seq, seq, &ts)
        else:
            kif_futex_wait(&l.wake_seq, seq, NULL)
        kif_sub32(&l.waiters, 1)
        if deliverable(l) >= 0:
            return True
    return False


cdef inline int lapic_accept(lapic_t *l, uint32_t dm, uint32_t vector, bint level) noexcept nogil:
    """__apic_accept_irq: 1 if the LAPIC took the interrupt, 0 if it dropped it."""
    cdef uint32_t word = vector >> 5, bit = 1u << (vector & 31)
    if dm == DM_FIXED or dm == DM_LOWEST:
        if not (kif_load32_relaxed(&l.spiv) & SPIV_ENABLED):
            return 0
        if (kif_load32_relaxed(&l.tmr[word]) & bit) != (bit if level else 0):
            if level:                                # TMR changes only when the trigger does
                kif_or32(&l.tmr[word], bit)
            else:
                kif_and32(&l.tmr[word], ~bit)
        kif_or32(&l.irr[word], bit)
    elif dm == DM_NMI:
        kif_add32(&l.nmi_pending, 1)
    else:
        return 0
    kif_add64_relaxed(&l.accepted, 1)
    lapic_kick(l)
    return 1


cdef inline bint lapic_match(lapic_t *l, uint32_t dest, bint logical) noexcept nogil:
    """kvm_apic_match_dest for xAPIC-mode LAPICs; 0xFF is broadcast in both modes."""
    cdef uint32_t ldr, mda
    if dest == 0xFF:
        return True
    if not logical:
        return l.apic_id == dest
    ldr = kif_load32_relaxed(&l.ldr) >> 24
    if kif_load32_relaxed(&l.dfr) == ~(<uint32_t>0):       # flat model: 8-bit mask
        return (ldr & dest) != 0
    mda = dest & 0xFF                                     # cluster model: 4-bit cluster, 4-bit mask
    return (ldr >> 4) == (mda >> 4) and (ldr & mda & 0xF) != 0


cdef inline lapic_t *lowest_priority_target(apic_bus_t *bus, uint32_t n, uint32_t dest,
                                            bint logical, uint32_t vector) noexcept nogil:
    """KVM's lowest-priority arbitration with vector hashing: the (vector % k)-th candidate.

    Logical destinations list candidates in destination-bit order (the LAPIC whose LDR holds
    bit 0 first, ...), as KVM's logical map does; broadcast lists them in vCPU order.
    """
    cdef lapic_t *cands[MAX_VCPUS]
    cdef uint32_t k = 0, i, bit, nbits
    cdef uint32_t ldr, cluster_model
    if logical and dest != 0xFF:
        cluster_model = kif_load32_relaxed(&bus.lapics[0].dfr) != ~(<uint32_t>0) if n else 0
        nbits = 4 if cluster_model else 8
        for bit in range(nbits):
            if not (dest >> bit) & 1:
                continue
            for i in range(n):
                if lapic_match(bus.lapics[i], (dest & 0xF0) | (1u << bit) if cluster_model
                               else (1u << bit), True):
                    cands[k] = bus.lapics[i]
                    k += 1
                    break
    else:
        for i in range(n):
            if lapic_match(bus.lapics[i], dest, logical):
                cands[k] = bus.lapics[i]
                k += 1
    if k == 0:
        return NULL
    return cands[vector % k]


cdef inline int apic_bus_deliver(apic_bus_t *bus, uint64_t route) noexcept nogil:
    """kvm_irq_delivery_to_apic: -1 if no LAPIC matched, else how many accepted.

    Lowest priority picks one LAPIC (see lowest_priority_target), except that a physical
    broadcast is delivered to all, as KVM turns it into fixed delivery.  O(vCPUs).
    """
    cdef uint32_t vector = route & 0xFF, dm = (route >> 8) & 7
    cdef bint logical = (route >> 11) & 1, level = (route >> 12) & 1
    cdef uint32_t dest = <uint32_t>(route >> 32)
    cdef uint32_t n = kif_load32(&bus.nr), i
    cdef lapic_t *target
    cdef int r = -1
    if dm == DM_LOWEST and (logical or dest != 0xFF):
        target = lowest_priority_target(bus, n, dest, logical, vector)
        if target == NULL:
            return -1
        return lapic_accept(target, dm, vector, level)
    for i in range(n):
        if lapic_match(bus.lapics[i], dest, logical):
            if r < 0:
                r = 0
            r += lapic_accept(bus.lapics[i], dm, vector, level)
    return r


cdef class Lapic:
    cdef lapic_t *l
    cdef void *mem
    cdef int _ack(self) noexcept
    cdef int _eoi(self, bint *level) noexcept


cdef class VcpuCore:
    cdef readonly Lapic lapic       # None without an in-kernel irqchip (as KVM)
    cdef readonly object _vm
    cdef object _engine
    cdef Lapic _checked(self)


cdef class ApicBus:
    cdef apic_bus_t bus
    cdef list _owners
