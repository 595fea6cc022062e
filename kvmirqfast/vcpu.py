"""The guest's side of a vCPU: its LAPIC, HLT (``wait_interrupt``), INTA (``ack``) and EOI."""

from ._lapic import VcpuCore
from .ioctl import vcpu_ioctl


class Vcpu(VcpuCore):
    """One vCPU: its LAPIC, and the guest's side of interrupt handling.

    ``wait_interrupt`` (HLT), ``ack`` (INTA) and ``eoi`` are native (``_lapic.VcpuCore``);
    ``lapic`` is None when the VM has no in-kernel irqchip (as KVM).
    """

    def __init__(self, vm, vcpu_id, lapic):
        super().__init__(vm, lapic, vm._engine)
        self.id = vcpu_id

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

    def take_nmi(self):
        """Consume a pending NMI; True if there was one."""
        return self._need_lapic().take_nmi()

    def ioctl(self, request, arg=0, mutate_flag=True):
        """``fcntl.ioctl`` on this vCPU fd: KVM_GET_LAPIC, KVM_SET_LAPIC, KVM_GET/SET_MP_STATE."""
        return vcpu_ioctl(self, request, arg, mutate_flag)

    def __repr__(self):
        return f"<Vcpu {self.id} pending={self.pending() if self.lapic else None}>"
