"""The guest's side of a vCPU: its LAPIC, HLT (``wait_interrupt``), INTA (``ack``) and EOI."""

from .ioctl import vcpu_ioctl


class Vcpu:
    """One vCPU: its LAPIC, and the guest's side of interrupt handling (HLT, INTA, EOI)."""

    def __init__(self, vm, vcpu_id, lapic):
        self._vm = vm
        self.id = vcpu_id
        self.lapic = lapic          # None when the VM has no in-kernel irqchip (as KVM)

    def _need_lapic(self):
        self._vm._check_open()
        if self.lapic is None:
            raise RuntimeError(f"vCPU {self.id} has no in-kernel LAPIC: create the irqchip "
                               "before the vCPUs")
        return self.lapic

    def pending(self):
        """Vectors pending in the LAPIC IRR, ascending.  O(256)."""
        return self._need_lapic().irr()

    def in_service(self):
        """Vectors in service (ISR), ascending.  O(256)."""
        return self._need_lapic().isr()

    def wait_interrupt(self, timeout=None, poll_ns=None):
        """Block, like HLT, until an interrupt is deliverable; True if one is, False on timeout.

        Runs without the GIL.  ``poll_ns`` (default: the VM's ``poll_ns``) is halt-polling: for
        that long the vCPU spins and harvests the eventfds itself, so a device write reaches it
        without waking the engine thread; then it sleeps.  Returns False if the VM is closed.
        """
        lapic, vm = self.lapic, self._vm
        if lapic is None or vm._closed or vm._forked:
            lapic = self._need_lapic()
        engine = vm._engine
        return engine.halt(lapic, timeout, engine.poll_ns if poll_ns is None else poll_ns)

    def ack(self):
        """Acknowledge (INTA): move the highest deliverable vector from IRR to ISR; return it.

        Returns None if nothing is deliverable.  O(1).
        """
        lapic, vm = self.lapic, self._vm
        if lapic is None or vm._closed or vm._forked:   # inlined _need_lapic: INTA is hot
            lapic = self._need_lapic()
        return lapic.ack()

    def eoi(self):
        """End of interrupt for the highest in-service vector; return it (None if none).

        A level-triggered vector is broadcast to the IOAPIC, which clears remote IRR, runs the
        pin's ack notifiers (irqfd resamplers) and re-delivers a line that is still high.
        """
        lapic, vm = self.lapic, self._vm
        if lapic is None or vm._closed or vm._forked:
            lapic = self._need_lapic()
        r = lapic.eoi()
        if r is None:
            return None
        vector, level = r
        if level or self._vm._resamplers:      # the vectors KVM forwards to the IOAPIC
            self._vm._lapic_eoi(vector, level)
        return vector

    def take_nmi(self):
        """Consume a pending NMI; True if there was one."""
        return self._need_lapic().take_nmi()

    def ioctl(self, request, arg=0, mutate_flag=True):
        """``fcntl.ioctl`` on this vCPU fd: KVM_GET_LAPIC, KVM_SET_LAPIC, KVM_GET/SET_MP_STATE."""
        return vcpu_ioctl(self, request, arg, mutate_flag)

    def __repr__(self):
        return f"<Vcpu {self.id} pending={self.pending() if self.lapic else None}>"
