"""Helpers shared by the conformance tests: raw uAPI calls only, nothing backend-specific."""

import struct

from kvmirqfast import uapi
from kvmirqfast.arch.x86 import msi_address, msi_data

IOAPIC = uapi.KVM_IRQCHIP_IOAPIC
# struct kvm_ioapic_state inside the kvm_irqchip union (after chip_id and pad): base_address (u64),
# ioregsel, id, irr, pad (u32 each), then redirtbl[24] (u64 each).
_IRQCHIP_UNION = 8
_IOAPIC_IRR = _IRQCHIP_UNION + 16
_IOAPIC_REDIRTBL = _IRQCHIP_UNION + 24
REDIR_REMOTE_IRR = 1 << 14
REDIR_LEVEL = 1 << 15
REDIR_MASKED = 1 << 16


def msi(gsi, dest, vector, logical=False):
    """A packed MSI routing entry for ``gsi`` (0 for a direct irqfd's embedded entry)."""
    lo, hi = msi_address(dest, logical)
    return uapi.pack_msi_entry(gsi, lo, hi, msi_data(vector))


def set_routing(vm, entries):
    return vm.ioctl(uapi.KVM_SET_GSI_ROUTING, uapi.pack_routing(entries))


def irqfd(vm, fd, gsi, flags=0, resamplefd=0):
    return vm.ioctl(uapi.KVM_IRQFD, bytearray(uapi.pack_irqfd(fd, gsi, flags, resamplefd)))


def irqfd_direct(vm, fd, entry, flags=0, resamplefd=0):
    """KVM_IRQFD_DIRECT with a packed routing ``entry`` (its gsi must be 0)."""
    return vm.ioctl(uapi.KVM_IRQFD_DIRECT,
                    bytearray(uapi.pack_irqfd_direct(fd, entry, flags, resamplefd)))


def errno_of(fn, *args):
    """The errno ``fn(*args)`` fails with; 0 if it succeeds."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def eventfd_count(fd):
    """An eventfd's counter, read without consuming it."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("eventfd-count:"):
                return int(line.split()[1], 16)
    raise AssertionError("not an eventfd")


def get_ioapic(vm):
    """KVM_GET_IRQCHIP(IOAPIC): the whole struct kvm_irqchip as a bytearray."""
    return bytearray(vm.ioctl(uapi.KVM_GET_IRQCHIP, uapi.IRQCHIP.pack(IOAPIC, 0, b"")))


def ioapic_redirection(vm, pin):
    return struct.unpack_from("<Q", get_ioapic(vm), _IOAPIC_REDIRTBL + 8 * pin)[0]


def ioapic_irr(vm):
    return struct.unpack_from("<I", get_ioapic(vm), _IOAPIC_IRR)[0]


def program_ioapic_pin(vm, pin, vector, dest=0, level=False, masked=False):
    """Program one redirection entry with KVM_GET_IRQCHIP / KVM_SET_IRQCHIP (fixed, physical)."""
    st = get_ioapic(vm)
    bits = vector | (REDIR_LEVEL if level else 0) | (REDIR_MASKED if masked else 0) | dest << 56
    struct.pack_into("<Q", st, _IOAPIC_REDIRTBL + 8 * pin, bits)
    vm.ioctl(uapi.KVM_SET_IRQCHIP, bytes(st))


def take(cpu, timeout=2.0):
    """HLT until an interrupt comes, acknowledge and EOI it; return its vector (None if none)."""
    if not cpu.wait_interrupt(timeout=timeout):
        return None
    vector = cpu.ack()
    assert cpu.eoi() == vector
    return vector
