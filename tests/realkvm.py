"""A thin wrapper over a real /dev/kvm VM fd, for differential tests.

It exposes the same ``ioctl(request, arg)`` shape as ``kvmirqfast.Vm`` so a test can run one
sequence of raw ioctls on both and compare.  Tests that use it are marked ``requires_kvm`` and
skip, with the reason, where /dev/kvm is absent or unusable.
"""

import fcntl
import os

import pytest

from kvmirqfast import uapi
from kvmirqfast.kvm import kvm_usable


KVM_USABLE, KVM_REASON = kvm_usable()
requires_kvm = pytest.mark.skipif(not KVM_USABLE, reason=KVM_REASON or "kvm usable")


class RealVcpu:
    def __init__(self, fd, vcpu_id):
        self.fd = fd
        self.id = vcpu_id

    def ioctl(self, request, arg=0):
        return fcntl.ioctl(self.fd, request, arg)

    def get_lapic(self):
        return bytearray(self.ioctl(uapi.KVM_GET_LAPIC, bytes(uapi.LAPIC_STATE_SIZE)))

    def set_lapic(self, state):
        self.ioctl(uapi.KVM_SET_LAPIC, bytes(state))

    def enable_lapic(self):
        """Software-enable the LAPIC (SPIV bit 8), as a guest does at boot."""
        st = self.get_lapic()
        uapi.set_lapic_reg(st, uapi.APIC_SPIV, uapi.lapic_reg(st, uapi.APIC_SPIV) | 0x1FF)
        self.set_lapic(st)

    def pending(self):
        """Vectors in the IRR."""
        return uapi.lapic_vectors(self.get_lapic(), uapi.APIC_IRR)

    def close(self):
        os.close(self.fd)


class RealVm:
    """A real KVM VM fd with the ``ioctl`` method of ``kvmirqfast.Vm``."""

    def __init__(self, irqchip=False):
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.fd = fcntl.ioctl(self.kvm, uapi.KVM_CREATE_VM, 0)
        self.vcpus = []
        if irqchip:
            self.ioctl(uapi.KVM_CREATE_IRQCHIP, 0)

    def ioctl(self, request, arg=0):
        return fcntl.ioctl(self.fd, request, arg)

    def create_vcpu(self, vcpu_id, lapic_enabled=True):
        v = RealVcpu(self.ioctl(uapi.KVM_CREATE_VCPU, vcpu_id), vcpu_id)
        if lapic_enabled:
            v.enable_lapic()
        self.vcpus.append(v)
        return v

    def close(self):
        for v in self.vcpus:
            v.close()
        os.close(self.fd)
        os.close(self.kvm)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
