"""Hostile and malformed ioctls: wrong request sizes, ints for struct pointers, unknown requests,
bad field values.  Each case names the errno KVM returns; every backend must return the same.

Only calls whose outcome does not depend on memory past the argument are listed: ``fcntl.ioctl``
copies a ``bytes`` argument into a 1 KiB buffer whose tail is garbage, so a too-short struct is
not a defined call on real KVM.  A ``bytearray`` over 1 KiB is passed as is, so reading past it
is a defined EFAULT.
"""

import errno
import os

import pytest

from kvmirqfast import uapi as U

from ._util import IOAPIC, msi

VM, VCPU = "vm", "vcpu"
PIC = U.KVM_IRQCHIP_PIC_MASTER


def routing(*entries, flags=0):
    return U.pack_routing(entries, flags)


def enable_cap(cap, flags=0, arg0=0):
    return U.ENABLE_CAP.pack(cap, flags, arg0, 0, 0, 0)


# (id, target, request, argument (a callable gets the test's fds), errno)
CASES = [
    # -- request numbers that are not KVM's: ENOTTY on a VM fd --------------------------------
    ("vm-unknown-nr", VM, U._IO(U.KVMIO, 0xEE), 0, errno.ENOTTY),
    ("vm-tty-ioctl", VM, 0x5401, bytes(64), errno.ENOTTY),
    ("vm-irqfd-wrong-size", VM, U._IOW(U.KVMIO, 0x76, 16), bytes(16), errno.ENOTTY),
    ("vm-irqfd-wrong-dir", VM, U._IOWR(U.KVMIO, 0x76, U.IRQFD.size), bytes(32), errno.ENOTTY),
    ("vm-routing-wrong-size", VM, U._IOW(U.KVMIO, 0x6A, 16), bytes(16), errno.ENOTTY),
    ("vm-msi-wrong-size", VM, U._IOW(U.KVMIO, 0xA5, 16), bytes(16), errno.ENOTTY),
    ("vm-direct-wrong-size", VM, U._IOW(U.KVMIO, 0xF7, 32), bytes(32), errno.ENOTTY),
    # ... and EINVAL on a vCPU fd (kvm_vcpu_ioctl / kvm_arch_vcpu_ioctl's default)
    ("vcpu-unknown-nr", VCPU, U._IO(U.KVMIO, 0xEE), 0, errno.EINVAL),
    ("vcpu-tty-ioctl", VCPU, 0x5401, bytes(64), errno.EINVAL),
    ("vcpu-get-lapic-wrong-size", VCPU, U._IOR(U.KVMIO, 0x8E, 512), bytes(512), errno.EINVAL),
    # -- an int where a struct pointer goes: EFAULT (0 is NULL; we follow no pointer) --------
    *[(f"int-{name}", VM, req, 0, errno.EFAULT) for name, req in (
        ("irqfd", U.KVM_IRQFD), ("irqfd-direct", U.KVM_IRQFD_DIRECT),
        ("set-gsi-routing", U.KVM_SET_GSI_ROUTING), ("signal-msi", U.KVM_SIGNAL_MSI),
        ("irq-line", U.KVM_IRQ_LINE), ("irq-line-status", U.KVM_IRQ_LINE_STATUS),
        ("get-irqchip", U.KVM_GET_IRQCHIP), ("set-irqchip", U.KVM_SET_IRQCHIP),
        ("enable-cap", U.KVM_ENABLE_CAP))],
    ("int-irqfd-nonnull", VM, U.KVM_IRQFD, 0x1000, errno.EFAULT),
    *[(f"int-{name}", VCPU, req, 0, errno.EFAULT) for name, req in (
        ("get-lapic", U.KVM_GET_LAPIC), ("set-lapic", U.KVM_SET_LAPIC),
        ("get-mp-state", U.KVM_GET_MP_STATE), ("set-mp-state", U.KVM_SET_MP_STATE))],
    # -- a struct shorter than it says: a bytearray over 1 KiB is passed as is -----------------
    ("routing-nr-past-buffer", VM, U.KVM_SET_GSI_ROUTING,
     bytearray(U.ROUTING_HEADER.pack(100, 0)) + bytearray(2000), errno.EFAULT),
    # -- bad field values ---------------------------------------------------------------------
    ("routing-flags", VM, U.KVM_SET_GSI_ROUTING, routing(flags=1), errno.EINVAL),
    ("routing-4097", VM, U.KVM_SET_GSI_ROUTING, bytearray(U.ROUTING_HEADER.pack(4097, 0)),
     errno.EINVAL),
    ("routing-nr-without-entries", VM, U.KVM_SET_GSI_ROUTING,
     bytearray(U.ROUTING_HEADER.pack(2, 0)), errno.EINVAL),
    ("routing-gsi-4096", VM, U.KVM_SET_GSI_ROUTING, routing(msi(4096, 0, 0x40)), errno.EINVAL),
    ("routing-type-99", VM, U.KVM_SET_GSI_ROUTING, routing(U.pack_routing_entry(1, 99)),
     errno.EINVAL),
    ("routing-entry-flags", VM, U.KVM_SET_GSI_ROUTING,
     routing(U.pack_routing_entry(1, U.KVM_IRQ_ROUTING_IRQCHIP, 1, U.ROUTING_IRQCHIP.pack(2, 1))),
     errno.EINVAL),
    ("routing-pic-pin-8", VM, U.KVM_SET_GSI_ROUTING, routing(U.pack_irqchip_entry(1, PIC, 8)),
     errno.EINVAL),
    ("routing-ioapic-pin-24", VM, U.KVM_SET_GSI_ROUTING,
     routing(U.pack_irqchip_entry(1, IOAPIC, 24)), errno.EINVAL),
    ("routing-chip-3", VM, U.KVM_SET_GSI_ROUTING, routing(U.pack_irqchip_entry(1, 3, 1)),
     errno.EINVAL),
    ("routing-one-gsi-two-ioapic-pins", VM, U.KVM_SET_GSI_ROUTING,
     routing(U.pack_irqchip_entry(1, IOAPIC, 1), U.pack_irqchip_entry(1, IOAPIC, 2)),
     errno.EINVAL),
    ("irqfd-flags", VM, U.KVM_IRQFD, lambda f: U.pack_irqfd(f.efd, 1, 1 << 5), errno.EINVAL),
    ("irqfd-fd-minus-1", VM, U.KVM_IRQFD, U.pack_irqfd(0xFFFFFFFF, 1), errno.EBADF),
    ("irqfd-closed-fd", VM, U.KVM_IRQFD, lambda f: U.pack_irqfd(f.closed, 1), errno.EBADF),
    ("irqfd-pipe", VM, U.KVM_IRQFD, lambda f: U.pack_irqfd(f.pipe, 1), errno.EINVAL),
    ("irqfd-resamplefd-pipe", VM, U.KVM_IRQFD,
     lambda f: U.pack_irqfd(f.efd, 1, U.KVM_IRQFD_FLAG_RESAMPLE, f.pipe), errno.EINVAL),
    ("irqfd-resamplefd-closed", VM, U.KVM_IRQFD,
     lambda f: U.pack_irqfd(f.efd, 1, U.KVM_IRQFD_FLAG_RESAMPLE, f.closed), errno.EBADF),
    ("direct-pad", VM, U.KVM_IRQFD_DIRECT,
     lambda f: U.IRQFD_DIRECT.pack(f.efd, 0, 0, 1, msi(0, 0, 0x40)), errno.EINVAL),
    ("direct-closed-fd", VM, U.KVM_IRQFD_DIRECT,
     lambda f: U.pack_irqfd_direct(f.closed, msi(0, 0, 0x40)), errno.EBADF),
    ("signal-msi-flags", VM, U.KVM_SIGNAL_MSI, U.pack_msi(0xFEE00000, 0, 0x40, flags=2),
     errno.EINVAL),
    ("get-irqchip-chip-3", VM, U.KVM_GET_IRQCHIP, U.IRQCHIP.pack(3, 0, b""), errno.EINVAL),
    ("set-irqchip-chip-3", VM, U.KVM_SET_IRQCHIP, U.IRQCHIP.pack(3, 0, b""), errno.EINVAL),
    ("enable-cap-unknown", VM, U.KVM_ENABLE_CAP, enable_cap(0x7FFF), errno.EINVAL),
    ("enable-cap-x2apic-flags", VM, U.KVM_ENABLE_CAP, enable_cap(U.KVM_CAP_X2APIC_API, flags=1),
     errno.EINVAL),
    ("enable-cap-x2apic-bad-bits", VM, U.KVM_ENABLE_CAP,
     enable_cap(U.KVM_CAP_X2APIC_API, arg0=0x100), errno.EINVAL),
    ("set-mp-state-99", VCPU, U.KVM_SET_MP_STATE, U.MP_STATE.pack(99), errno.EINVAL),
    # -- things that exist already -------------------------------------------------------------
    ("create-irqchip-twice", VM, U.KVM_CREATE_IRQCHIP, 0, errno.EEXIST),
    ("create-vcpu-0-twice", VM, U.KVM_CREATE_VCPU, 0, errno.EEXIST),
]

# Package divergences: case id -> (backend, reason).  Each is a strict xfail on that backend.
DIVERGENCES = {}     # case id -> (backend, reason) for a deliberate divergence


class Fds:
    """The fds a case may name: an eventfd, a pipe, and a number that is surely not open."""

    def __init__(self, make_eventfd):
        self.efd = make_eventfd()
        self.pipe, self._w = os.pipe()
        self.closed = 4093
        while _is_open(self.closed):
            self.closed -= 1

    def close(self):
        os.close(self.pipe)
        os.close(self._w)


def _is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


BY_ID = {c[0]: c[1:] for c in CASES}


@pytest.mark.parametrize("case", list(BY_ID))
def test_malformed_ioctl_errno(request, kvm_backend, kvm_vm, kvm_vcpus, kvm_eventfd, case):
    target, req, arg, expected = BY_ID[case]
    backend, reason = DIVERGENCES.get(case, (None, None))
    if backend == kvm_backend:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    (cpu,) = kvm_vcpus(1)
    fds = Fds(kvm_eventfd)
    try:
        if callable(arg):
            arg = arg(fds)
        with pytest.raises(OSError) as ei:
            (kvm_vm if target == VM else cpu).ioctl(req, arg)
        assert ei.value.errno == expected, f"{case}: {ei.value}"
    finally:
        fds.close()


def test_check_extension_of_unknown_cap_is_zero(kvm_vm):
    assert kvm_vm.ioctl(U.KVM_CHECK_EXTENSION, 0x7FFF) == 0
    assert kvm_vm.ioctl(U.KVM_CHECK_EXTENSION, U.KVM_CAP_IRQ_ROUTING) == U.KVM_MAX_IRQ_ROUTES


def test_check_extension_given_a_buffer_is_zero(request, kvm_backend, kvm_vm):
    # fcntl passes the buffer's address as the argument: KVM sees a huge, unknown capability.
    assert kvm_vm.ioctl(U.KVM_CHECK_EXTENSION, bytearray(8)) == 0    # the int result


def test_every_ioctl_on_a_closed_vm_is_ebadf(kvm_vm, kvm_vcpus):
    (cpu,) = kvm_vcpus(1)
    kvm_vm.close()
    for target, req, arg in ((kvm_vm, U.KVM_CHECK_EXTENSION, 0),
                             (kvm_vm, U.KVM_IRQFD, bytes(32)),
                             (kvm_vm, U.KVM_IRQFD_DIRECT, bytes(64)),
                             (cpu, U.KVM_GET_LAPIC, bytes(1024))):
        with pytest.raises(OSError) as ei:
            target.ioctl(req, arg)
        assert ei.value.errno == errno.EBADF


def test_rejected_calls_leave_the_vm_working(kvm_vm, kvm_vcpus, kvm_eventfd):
    (cpu,) = kvm_vcpus(1)
    efd = kvm_eventfd()
    kvm_vm.ioctl(U.KVM_SET_GSI_ROUTING, routing(msi(1, 0, 0x44)))
    kvm_vm.ioctl(U.KVM_IRQFD, U.pack_irqfd(efd, 1))
    for _, target, req, arg, _ in CASES:
        if target == VM and not callable(arg) and req not in (U.KVM_CREATE_IRQCHIP,
                                                              U.KVM_CREATE_VCPU):
            with pytest.raises(OSError):
                kvm_vm.ioctl(req, arg)
    os.eventfd_write(efd, 1)
    assert cpu.wait_interrupt(timeout=2) and cpu.ack() == 0x44
