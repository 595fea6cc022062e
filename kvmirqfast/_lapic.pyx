# cython: language_level=3, boundscheck=False, wraparound=False
"""Local APIC state per vCPU (IRR, ISR, TMR, ID, LDR, DFR, SPIV) and the bus that routes to it.

The engine thread and any Python thread may deliver at once: IRR/TMR bits are set with atomic
OR, cleared with atomic AND.  ack() and eoi() are meant to be called by the vCPU's own thread,
as a guest acknowledges its own interrupts; they are still atomic so misuse cannot corrupt IRR.
"""

from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memset
from kvmirqfast._sys cimport (kif_load32, kif_load32_relaxed, kif_store32, kif_or32, kif_and32,
                              kif_load64_relaxed, kif_cas32)

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)


cdef list bits_to_vectors(const uint32_t *reg):
    cdef list out = []
    cdef int w, b
    cdef uint32_t v
    for w in range(8):
        v = kif_load32_relaxed(&reg[w])
        for b in range(32):
            if v & (1u << b):
                out.append(w * 32 + b)
    return out


cdef void vectors_to_bits(uint32_t *reg, vectors) except *:
    cdef uint32_t tmp[8]
    cdef int w
    memset(tmp, 0, sizeof(tmp))
    for v in vectors:
        if not 0 <= v <= 255:
            raise ValueError(f"vector {v} out of range 0..255")
        tmp[v >> 5] |= 1u << (v & 31)
    for w in range(8):
        kif_store32(&reg[w], tmp[w])


def x86_msi_route_word(uint32_t address_lo, uint32_t address_hi, uint32_t data,
                       bint x2apic_format=False):
    """An x86 MSI address/data pair, decoded as ``arch.x86.decode_msi`` does, packed into a
    route word (layout in _lapic.pxd): what ``irqfd.msi_route_word(decode_msi(...))`` gives,
    without building the decoded message (assign and retarget do this once per call).  O(1).
    """
    cdef uint64_t dest = (address_lo >> 12) & 0xFF             # address bits 19:12
    if x2apic_format:
        dest |= <uint64_t>(address_hi >> 8) << 8                # address_hi bits 31:8
    return (data & 0xFF                                         # vector
            | ((data >> 8) & 7) << 8                            # delivery mode
            | ((address_lo >> 2) & 1) << 11                     # destination mode logical
            | ((data >> 15) & 1) << 12                          # level triggered
            | <uint64_t>ROUTE_MSI << 13
            | dest << 32)


cdef class Lapic:
    """One vCPU's local APIC, in KVM's reset state except where the caller enables it.

    Reset values match KVM: ID = vcpu id, LDR 0, DFR 0xFFFFFFFF (flat), SPIV 0xFF
    (software-disabled: fixed interrupts are dropped until SPIV bit 8 is set).
    """

    def __cinit__(self, uint32_t vcpu_id):
        if posix_memalign(&self.mem, 64, sizeof(lapic_t)) != 0:
            raise MemoryError()
        self.l = <lapic_t *>self.mem
        memset(self.l, 0, sizeof(lapic_t))
        self.l.vcpu_id = vcpu_id
        self.l.apic_id = vcpu_id
        self.l.dfr = 0xFFFFFFFF
        self.l.spiv = 0xFF
        self.l.kickfd = -1

    def __dealloc__(self):
        free(self.mem)

    # -- registers (the KVM_GET_LAPIC/KVM_SET_LAPIC view) -------------------------------------
    @property
    def vcpu_id(self):
        return self.l.vcpu_id

    property apic_id:
        def __get__(self):
            return kif_load32(&self.l.apic_id)
        def __set__(self, uint32_t v):
            kif_store32(&self.l.apic_id, v)

    property ldr:
        def __get__(self):
            return kif_load32(&self.l.ldr)
        def __set__(self, uint32_t v):
            kif_store32(&self.l.ldr, v)

    property dfr:
        def __get__(self):
            return kif_load32(&self.l.dfr)
        def __set__(self, uint32_t v):
            kif_store32(&self.l.dfr, v)

    property spiv:
        def __get__(self):
            return kif_load32(&self.l.spiv)
        def __set__(self, uint32_t v):
            kif_store32(&self.l.spiv, v)

    @property
    def enabled(self):
        return bool(kif_load32(&self.l.spiv) & SPIV_ENABLED)

    @property
    def accepted(self):
        """Interrupts this LAPIC has accepted since creation."""
        return kif_load64_relaxed(&self.l.accepted)

    def irr(self):
        """Vectors requested (IRR), ascending.  O(256)."""
        return bits_to_vectors(self.l.irr)

    def isr(self):
        """Vectors in service (ISR), ascending.  O(256)."""
        return bits_to_vectors(self.l.isr)

    def tmr(self):
        """Vectors last delivered level-triggered (TMR), ascending.  O(256)."""
        return bits_to_vectors(self.l.tmr)

    def set_registers(self, irr=None, isr=None, tmr=None):
        """Replace whole bit arrays (KVM_SET_LAPIC); a bad vector raises ValueError, changing none."""
        for vs in (irr, isr, tmr):
            if vs is not None:
                for v in vs:
                    if not isinstance(v, int) or not 0 <= v <= 255:
                        raise ValueError(f"vector {v!r} out of range 0..255")
        if tmr is not None:
            vectors_to_bits(self.l.tmr, tmr)
        if isr is not None:
            vectors_to_bits(self.l.isr, isr)
        if irr is not None:
            vectors_to_bits(self.l.irr, irr)
            lapic_kick(self.l)

    # -- the guest's side: INTA, EOI (HLT is Engine.halt: it harvests while it sleeps) --------
    def has_interrupt(self):
        """True if an interrupt is deliverable now (IRR above the in-service priority class)."""
        return deliverable(self.l) >= 0

    cdef int _ack(self) noexcept:
        cdef int v
        cdef uint32_t bit
        while True:
            v = deliverable(self.l)
            if v < 0:
                return -1
            bit = 1u << (v & 31)
            if kif_and32(&self.l.irr[v >> 5], ~bit) & bit:   # we won the bit
                kif_or32(&self.l.isr[v >> 5], bit)
                return v

    cdef int _eoi(self, bint *level) noexcept:
        cdef int v = highest_bit(self.l.isr)
        cdef uint32_t bit
        if v < 0:
            return -1
        bit = 1u << (v & 31)
        kif_and32(&self.l.isr[v >> 5], ~bit)
        level[0] = (kif_load32(&self.l.tmr[v >> 5]) & bit) != 0
        return v

    def ack(self):
        """INTA: move the deliverable vector from IRR to ISR and return it, or None.  O(1)."""
        cdef int v = self._ack()
        return None if v < 0 else v

    def eoi(self):
        """EOI: end the highest in-service vector.  Returns (vector, level_triggered) or None."""
        cdef bint level = False
        cdef int v = self._eoi(&level)
        return None if v < 0 else (v, level)

    def take_nmi(self):
        """Consume one pending NMI; True if there was one."""
        cdef uint32_t n
        while True:
            n = kif_load32(&self.l.nmi_pending)
            if n == 0:
                return False
            if kif_cas32(&self.l.nmi_pending, n, n - 1):
                return True

    @property
    def nmi_pending(self):
        return kif_load32(&self.l.nmi_pending)

    def shutdown(self):
        """Wake every sleeper for good (VM close)."""
        kif_store32(&self.l.shutdown, 1)
        lapic_kick(self.l)


cdef class VcpuCore:
    """The guest's hot side of a vCPU in native code: HLT, INTA, EOI.  ``vcpu.Vcpu`` is the
    Python class over it (registers, ioctls, errors).  Each call is O(1)."""

    def __init__(self, vm, Lapic lapic, engine):
        self._vm = vm
        self.lapic = lapic
        self._engine = engine

    cdef Lapic _checked(self):
        # A shut-down LAPIC means a closed VM (or a fork child): let the Python side raise.
        if self.lapic is None or self.lapic.l.shutdown:
            return self._need_lapic()
        return self.lapic

    def wait_interrupt(self, timeout=None, poll_ns=None):
        """Block, like HLT, until an interrupt is deliverable; True if one is, False on timeout.

        Runs without the GIL.  ``poll_ns`` (default: the VM's ``poll_ns``) is halt-polling: for
        that long the vCPU spins and harvests the eventfds itself, so a device write reaches it
        without waking the engine thread; then it sleeps (in epoll_wait on the engine's
        eventfds, if no other vCPU does: see ``Vm.vcpu_harvest``).  False if the VM is closed.
        """
        cdef Lapic lapic = self._checked()
        if deliverable(lapic.l) >= 0:
            return True                          # no need to drop the GIL
        engine = self._engine
        return engine.halt(lapic, timeout, engine.poll_ns if poll_ns is None else poll_ns)

    def ack(self):
        """Acknowledge (INTA): move the highest deliverable vector from IRR to ISR; return it.

        Returns None if nothing is deliverable.
        """
        cdef int v = self._checked()._ack()
        return None if v < 0 else v

    def eoi(self):
        """End of interrupt for the highest in-service vector; return it (None if none).

        A level-triggered vector is broadcast to the IOAPIC, which clears remote IRR, runs the
        pin's ack notifiers (irqfd resamplers) and re-delivers a line that is still high.
        """
        cdef bint level = False
        cdef int v = self._checked()._eoi(&level)
        if v < 0:
            return None
        if level or self._vm._resamplers:        # the vectors KVM forwards to the IOAPIC
            self._vm._lapic_eoi(v, level)
        return v


cdef class ApicBus:
    """The set of LAPICs an interrupt message can reach.  Adding is safe while delivering."""

    def __cinit__(self):
        memset(&self.bus, 0, sizeof(apic_bus_t))
        self._owners = []

    def add(self, Lapic lapic not None):
        cdef uint32_t n = self.bus.nr
        if n >= MAX_VCPUS:
            raise ValueError(f"at most {MAX_VCPUS} vCPUs")
        self.bus.lapics[n] = lapic.l
        self._owners.append(lapic)           # keeps the LAPIC memory alive as long as the bus
        kif_store32(&self.bus.nr, n + 1)     # publish after the slot is filled

    def __len__(self):
        return self.bus.nr

    def deliver(self, uint64_t route):
        """Deliver one decoded MSI route word; KVM's return (-1 no destination, else accepted)."""
        cdef int r
        with nogil:
            r = apic_bus_deliver(&self.bus, route)
        return r
