"""The uAPI layer: ``vm.ioctl(request, arg)`` with KVM's byte layouts, returns and errnos.

Argument conventions are fcntl.ioctl's: an int is a value (a NULL-ish pointer for struct ioctls:
EFAULT); ``bytes`` (at most 1 KiB) is copied and the copy returned; a mutable buffer is updated in
place and the int result returned.
"""

import errno
import os
import struct

import pytest

from kvmirqfast import IrqchipEntry, MsiEntry, Vm, msi_address, msi_data, uapi
from helpers_irqfd import (WAIT, enable_lapic, fdinfo_count, fds, lapic_irr, stays,  # noqa: F401
                           wait_until)

IOAPIC = uapi.KVM_IRQCHIP_IOAPIC
DEASSIGN = uapi.KVM_IRQFD_FLAG_DEASSIGN
RESAMPLE = uapi.KVM_IRQFD_FLAG_RESAMPLE
MODIFY = uapi.KVM_IRQFD_DIRECT_FLAG_MODIFY


def msi_raw(dest, vector, gsi=0, level=False):
    lo, hi = msi_address(dest)
    return uapi.pack_msi_entry(gsi, lo, hi, msi_data(vector, 0, level))


def routing(*entries):
    return uapi.pack_routing(entries)


def err(fn, *args):
    """The errno of an OSError raised by fn(*args); 0 if it returned."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


@pytest.fixture
def vm():
    v = Vm()
    v.ioctl(uapi.KVM_CREATE_IRQCHIP, 0)
    yield v
    v.close()


@pytest.fixture
def cpus(vm):
    out = []
    for i in range(2):
        c = vm.ioctl(uapi.KVM_CREATE_VCPU, i)
        enable_lapic(c)
        out.append(c)
    return out


def irqfd(vm, fd, gsi, flags=0, resamplefd=0, kind=bytes):
    return vm.ioctl(uapi.KVM_IRQFD, kind(uapi.pack_irqfd(fd, gsi, flags, resamplefd)))


def direct(vm, fd, entry, flags=0, resamplefd=0, pad=0, kind=bytes):
    buf = uapi.IRQFD_DIRECT.pack(fd, flags, resamplefd, pad, bytes(entry))
    return vm.ioctl(uapi.KVM_IRQFD_DIRECT, kind(buf))


def expect(cpus, want):
    target = [sorted(want.get(i, [])) for i in range(len(cpus))]
    wait_until(lambda: [lapic_irr(c) for c in cpus] == target)
    assert [lapic_irr(c) for c in cpus] == target


# --- layouts and numbers --------------------------------------------------------------------------
class TestLayout:
    def test_struct_sizes_match_kvm_h(self):
        assert uapi.IRQFD.size == 32
        assert uapi.MSI.size == 32
        assert uapi.ROUTING_ENTRY.size == 48
        assert uapi.IRQ_LEVEL.size == 8
        assert uapi.IRQFD_DIRECT.size == 64

    def test_request_numbers_match_kvm_h(self):
        assert uapi.KVM_CREATE_IRQCHIP == 0xAE60
        assert uapi.KVM_IRQ_LINE == 0x4008AE61
        assert uapi.KVM_IRQ_LINE_STATUS == 0xC008AE67
        assert uapi.KVM_SET_GSI_ROUTING == 0x4008AE6A
        assert uapi.KVM_IRQFD == 0x4020AE76
        assert uapi.KVM_SIGNAL_MSI == 0x4020AEA5
        assert uapi.KVM_CREATE_VCPU == 0xAE41
        assert uapi.KVM_GET_LAPIC == 0x8400AE8E
        assert uapi.KVM_SET_LAPIC == 0x4400AE8F
        assert uapi.ioc_size(uapi.KVM_IRQFD_DIRECT) == 64

    def test_pack_irqfd_direct_layout(self):
        entry = msi_raw(1, 0x41)
        buf = uapi.pack_irqfd_direct(7, entry, MODIFY, 9)
        assert len(buf) == 64
        assert struct.unpack_from("<IIII", buf) == (7, MODIFY, 9, 0)
        assert buf[16:] == entry

    def test_check_extension(self, vm):
        ce = uapi.KVM_CHECK_EXTENSION
        assert vm.ioctl(ce, uapi.KVM_CAP_IRQFD) == 1
        assert vm.ioctl(ce, uapi.KVM_CAP_IRQFD_RESAMPLE) == 1
        assert vm.ioctl(ce, uapi.KVM_CAP_SIGNAL_MSI) == 1
        assert vm.ioctl(ce, uapi.KVM_CAP_IRQ_ROUTING) == 4096
        assert vm.ioctl(ce, uapi.KVM_CAP_IRQFD_DIRECT) > 0
        assert vm.ioctl(ce, 0xFFFF) == 0


# --- argument conventions ---------------------------------------------------------------------------
class TestConventions:
    def test_unknown_request_is_enotty_on_a_vm_einval_on_a_vcpu(self, vm, cpus):
        assert err(vm.ioctl, 0xAEFE, b"\0" * 8) == errno.ENOTTY
        assert err(vm.ioctl, uapi._IOW(uapi.KVMIO, 0xF0, 16), bytes(16)) == errno.ENOTTY
        assert err(cpus[0].ioctl, 0xAEFE, 0) == errno.EINVAL     # KVM: kvm_arch_vcpu_ioctl

    @pytest.mark.parametrize("req", [uapi.KVM_IRQFD, uapi.KVM_SIGNAL_MSI, uapi.KVM_IRQFD_DIRECT,
                                     uapi.KVM_SET_GSI_ROUTING, uapi.KVM_IRQ_LINE])
    def test_int_argument_to_a_struct_ioctl_is_efault(self, vm, req):
        assert err(vm.ioctl, req, 0) == errno.EFAULT
        assert vm.irqfd_count() == 0

    def test_bytes_argument_returns_bytes(self, vm, cpus, fds):
        efd = fds.eventfd()
        arg = uapi.pack_irqfd(efd, 5)
        out = irqfd(vm, efd, 5, kind=bytes)
        assert isinstance(out, bytes) and out == arg
        assert vm.irqfd_count() == 1

    def test_bytearray_argument_returns_int(self, vm, cpus, fds):
        efd = fds.eventfd()
        buf = bytearray(uapi.pack_irqfd(efd, 5))
        assert vm.ioctl(uapi.KVM_IRQFD, buf) == 0
        assert buf == uapi.pack_irqfd(efd, 5)

    def test_signal_msi_result_is_seen_only_with_a_mutable_buffer(self, vm, cpus):
        lo, hi = msi_address(1)
        arg = uapi.pack_msi(lo, hi, msi_data(0x51))
        assert vm.ioctl(uapi.KVM_SIGNAL_MSI, bytearray(arg)) == 1
        assert vm.ioctl(uapi.KVM_SIGNAL_MSI, arg) == arg            # bytes: the copy comes back
        assert vm.ioctl(uapi.KVM_SIGNAL_MSI, bytearray(arg), False) == arg
        assert lapic_irr(cpus[1]) == [0x51]

    def test_irq_line_status_is_written_in_place(self, vm, cpus):
        vm.ioctl(uapi.KVM_SET_GSI_ROUTING, routing(msi_raw(0, 0x70, gsi=40)))
        buf = bytearray(uapi.pack_irq_level(40, 1))
        assert vm.ioctl(uapi.KVM_IRQ_LINE_STATUS, buf) == 0
        assert struct.unpack("<iI", buf) == (1, 1)
        buf = bytearray(uapi.pack_irq_level(41, 1))                 # no route: status -1
        assert vm.ioctl(uapi.KVM_IRQ_LINE_STATUS, buf) == 0
        assert struct.unpack("<i", buf[:4]) == (-1,)
        out = vm.ioctl(uapi.KVM_IRQ_LINE_STATUS, uapi.pack_irq_level(41, 1))
        assert isinstance(out, bytes) and struct.unpack("<iI", out) == (-1, 1)
        out = vm.ioctl(uapi.KVM_IRQ_LINE_STATUS, bytearray(uapi.pack_irq_level(40, 1)), False)
        assert isinstance(out, bytes) and struct.unpack("<iI", out) == (1, 1)
        assert lapic_irr(cpus[0]) == [0x70]

    def test_irq_line_does_not_write_a_status(self, vm, cpus):
        vm.ioctl(uapi.KVM_SET_GSI_ROUTING, routing(msi_raw(0, 0x70, gsi=40)))
        buf = bytearray(uapi.pack_irq_level(40, 1))
        assert vm.ioctl(uapi.KVM_IRQ_LINE, buf) == 0
        assert buf == uapi.pack_irq_level(40, 1)
        assert lapic_irr(cpus[0]) == [0x70]

    def test_bytes_over_1k_is_a_valueerror_like_fcntl(self, vm):
        big = bytes(routing(*[msi_raw(0, 0x41, gsi=g) for g in range(30)]))
        assert len(big) > 1024
        with pytest.raises(ValueError):
            vm.ioctl(uapi.KVM_SET_GSI_ROUTING, big)

    def test_closed_vm_is_ebadf(self, fds):
        v = Vm(irqchip=True)
        c = v.create_vcpu(0)
        v.close()
        efd = fds.eventfd()
        assert err(v.ioctl, uapi.KVM_IRQFD, uapi.pack_irqfd(efd, 1)) == errno.EBADF
        assert err(c.ioctl, uapi.KVM_GET_LAPIC, bytes(1024)) == errno.EBADF

    def test_string_request_is_typeerror(self, vm):
        with pytest.raises(TypeError):
            vm.ioctl("KVM_IRQFD", b"")


# --- irqchip, vCPUs, LAPIC --------------------------------------------------------------------------
class TestVcpuIoctls:
    def test_create_irqchip_twice_and_after_vcpu(self):
        with Vm() as v:
            assert v.ioctl(uapi.KVM_CREATE_IRQCHIP, 0) == 0
            assert err(v.ioctl, uapi.KVM_CREATE_IRQCHIP, 0) == errno.EEXIST
        with Vm() as v:
            v.ioctl(uapi.KVM_CREATE_VCPU, 0)
            assert err(v.ioctl, uapi.KVM_CREATE_IRQCHIP, 0) == errno.EINVAL

    def test_create_vcpu_errors(self, vm):
        vm.ioctl(uapi.KVM_CREATE_VCPU, 3)
        assert err(vm.ioctl, uapi.KVM_CREATE_VCPU, 3) == errno.EEXIST
        assert err(vm.ioctl, uapi.KVM_CREATE_VCPU, 5000) == errno.EINVAL

    def test_vcpu_from_ioctl_starts_with_the_lapic_disabled(self, vm):
        c = vm.ioctl(uapi.KVM_CREATE_VCPU, 0)
        lapic = bytes(c.ioctl(uapi.KVM_GET_LAPIC, bytes(1024)))
        assert uapi.lapic_reg(lapic, uapi.APIC_SPIV) & uapi.APIC_SPIV_APIC_ENABLED == 0
        arg = bytearray(uapi.pack_msi(*msi_address(0), msi_data(0x41)))
        assert vm.ioctl(uapi.KVM_SIGNAL_MSI, arg) == 0
        enable_lapic(c)
        assert vm.ioctl(uapi.KVM_SIGNAL_MSI, bytearray(arg)) == 1
        assert lapic_irr(c) == [0x41]

    def test_get_lapic_shows_irr_isr_tmr(self, vm, cpus):
        vm.ioctl(uapi.KVM_SIGNAL_MSI, bytearray(uapi.pack_msi(*msi_address(0),
                                                             msi_data(0x61, 0, True))))
        vm.ioctl(uapi.KVM_SIGNAL_MSI, bytearray(uapi.pack_msi(*msi_address(0), msi_data(0x52))))
        assert cpus[0].ack() == 0x61
        st = bytes(cpus[0].ioctl(uapi.KVM_GET_LAPIC, bytes(1024)))
        assert uapi.lapic_vectors(st, uapi.APIC_IRR) == [0x52]
        assert uapi.lapic_vectors(st, uapi.APIC_ISR) == [0x61]
        assert uapi.lapic_vectors(st, uapi.APIC_TMR) == [0x61]
        assert uapi.lapic_reg(st, uapi.APIC_ID) >> 24 == 0

    def test_set_lapic_with_a_bytearray(self, vm, cpus):
        st = bytearray(1024)
        assert cpus[1].ioctl(uapi.KVM_GET_LAPIC, st) == 0
        uapi.set_lapic_reg(st, uapi.APIC_LDR, 0x04 << 24)
        assert cpus[1].ioctl(uapi.KVM_SET_LAPIC, st) == 0
        lo, hi = msi_address(0x04, logical=True)
        assert vm.ioctl(uapi.KVM_SIGNAL_MSI, bytearray(uapi.pack_msi(lo, hi, msi_data(0x44)))) == 1
        assert lapic_irr(cpus[1]) == [0x44] and lapic_irr(cpus[0]) == []

    def test_get_irqchip_shows_the_ioapic_redirection(self, vm):
        vm.ioapic.set_redirection(7, 0x47, dest_id=3, level_trigger=True)
        out = vm.ioctl(uapi.KVM_GET_IRQCHIP, struct.pack("<II", IOAPIC, 0) + bytes(512))
        bits = struct.unpack_from("<Q", out, 8 + 24 + 8 * 7)[0]
        assert bits & 0xFF == 0x47
        assert bits >> 56 == 3
        assert bits & (1 << 15)


# --- KVM_SET_GSI_ROUTING ----------------------------------------------------------------------------
class TestSetGsiRouting:
    def test_before_irqchip_is_einval(self):
        with Vm() as v:
            assert err(v.ioctl, uapi.KVM_SET_GSI_ROUTING, routing()) == errno.EINVAL

    def test_small_table_as_bytes(self, vm, cpus, fds):
        vm.ioctl(uapi.KVM_SET_GSI_ROUTING, bytes(routing(msi_raw(1, 0x41, gsi=9))))
        efd = fds.eventfd()
        irqfd(vm, efd, 9)
        os.eventfd_write(efd, 1)
        expect(cpus, {1: [0x41]})

    def test_4096_entries_in_a_bytearray(self, vm, cpus, fds):
        buf = routing(*[msi_raw(g % 2, 0x20 + g % 0xE0, gsi=g) for g in range(4096)])
        assert len(buf) > 1024 and isinstance(buf, bytearray)
        assert vm.ioctl(uapi.KVM_SET_GSI_ROUTING, buf) == 0
        assert len(vm.gsi_routing) == 4096
        efd = fds.eventfd()
        irqfd(vm, efd, 4095)                          # -> vCPU 1, vector 0x20 + 4095 % 0xE0
        os.eventfd_write(efd, 1)
        expect(cpus, {1: [0x20 + 4095 % 0xE0]})

    def test_4097_entries_is_einval_and_keeps_the_old_table(self, vm):
        before = vm.gsi_routing
        buf = routing(*[msi_raw(0, 0x41, gsi=g) for g in range(4097)])
        assert err(vm.ioctl, uapi.KVM_SET_GSI_ROUTING, buf) == errno.EINVAL
        assert vm.gsi_routing is before

    def test_buffer_shorter_than_nr_entries_is_efault(self, vm):
        buf = routing(*[msi_raw(0, 0x41, gsi=g) for g in range(30)])
        struct.pack_into("<I", buf, 0, 31)
        assert err(vm.ioctl, uapi.KVM_SET_GSI_ROUTING, buf) == errno.EFAULT

    def test_header_flags_is_einval(self, vm):
        assert err(vm.ioctl, uapi.KVM_SET_GSI_ROUTING, uapi.pack_routing([], 1)) == errno.EINVAL

    def test_empty_table(self, vm):
        assert vm.ioctl(uapi.KVM_SET_GSI_ROUTING, routing()) == 0
        buf = bytearray(uapi.pack_irq_level(4, 1))
        vm.ioctl(uapi.KVM_IRQ_LINE_STATUS, buf)
        assert struct.unpack_from("<i", buf)[0] == -1


# --- KVM_IRQFD ---------------------------------------------------------------------------------------
class TestIrqfd:
    def test_assign_and_deliver(self, vm, cpus, fds):
        vm.ioctl(uapi.KVM_SET_GSI_ROUTING, routing(msi_raw(1, 0x66, gsi=20)))
        efd = fds.eventfd()
        assert irqfd(vm, efd, 20, kind=bytearray) == 0
        os.eventfd_write(efd, 1)
        expect(cpus, {1: [0x66]})

    def test_deassign(self, vm, cpus, fds):
        vm.ioctl(uapi.KVM_SET_GSI_ROUTING, routing(msi_raw(1, 0x66, gsi=20)))
        efd = fds.eventfd()
        irqfd(vm, efd, 20)
        assert irqfd(vm, efd, 20, DEASSIGN, kind=bytearray) == 0
        assert vm.irqfd_count() == 0
        os.eventfd_write(efd, 1)
        assert stays(lambda: lapic_irr(cpus[1]) == [])

    def test_deassign_unknown_pair_is_zero(self, vm, fds):
        efd = fds.eventfd()
        irqfd(vm, efd, 20)
        assert irqfd(vm, efd, 21, DEASSIGN, kind=bytearray) == 0
        assert vm.irqfd_count() == 1

    def test_deassign_with_resample_flag_is_a_deassign(self, vm, fds):
        efd = fds.eventfd()
        irqfd(vm, efd, 20)
        assert irqfd(vm, efd, 20, DEASSIGN | RESAMPLE, fds.closed_fd(), kind=bytearray) == 0
        assert vm.irqfd_count() == 0

    @pytest.mark.parametrize("flags", [4, 8, 1 << 31, DEASSIGN | 4])
    def test_unknown_flags_are_einval(self, vm, fds, flags):
        assert err(irqfd, vm, fds.eventfd(), 1, flags) == errno.EINVAL
        assert vm.irqfd_count() == 0

    def test_fd_errors(self, vm, fds):
        r, _w = fds.pipe()
        assert err(irqfd, vm, fds.closed_fd(), 1) == errno.EBADF
        assert err(irqfd, vm, fds.closed_fd(), 1, DEASSIGN) == errno.EBADF
        assert err(irqfd, vm, 0xFFFFFFFF, 1) == errno.EBADF           # -1 as the kernel's int
        assert err(irqfd, vm, r, 1) == errno.EINVAL
        assert err(irqfd, vm, r, 1, DEASSIGN) == errno.EINVAL
        assert vm.irqfd_count() == 0

    def test_resample_errors(self, vm, fds):
        r, _w = fds.pipe()
        efd = fds.eventfd()
        assert err(irqfd, vm, efd, 20, RESAMPLE, fds.closed_fd()) == errno.EBADF
        assert err(irqfd, vm, efd, 20, RESAMPLE, r) == errno.EINVAL
        assert vm.irqfd_count() == 0
        assert irqfd(vm, efd, 20, RESAMPLE, fds.eventfd(), kind=bytearray) == 0

    def test_busy(self, vm, fds):
        efd = fds.eventfd()
        irqfd(vm, efd, 1)
        assert err(irqfd, vm, efd, 1) == errno.EBUSY
        assert err(irqfd, vm, efd, 2) == errno.EBUSY
        assert err(irqfd, vm, fds.dup(efd), 3) == errno.EBUSY
        assert err(direct, vm, efd, msi_raw(0, 0x41)) == errno.EBUSY
        assert vm.irqfd_count() == 1

    def test_gsi_5000_is_accepted(self, vm, fds):
        assert irqfd(vm, fds.eventfd(), 5000, kind=bytearray) == 0

    def test_before_irqchip(self, fds):
        with Vm() as v:
            efd = fds.eventfd()
            assert err(irqfd, v, efd, 1) == errno.EINVAL
            assert err(irqfd, v, efd, 1, RESAMPLE, fds.eventfd()) == errno.EINVAL
            assert err(irqfd, v, fds.closed_fd(), 1) == errno.EINVAL     # irqchip checked first
            assert irqfd(v, efd, 1, DEASSIGN, kind=bytearray) == 0

    def test_level_pin_with_resamplefd(self, vm, cpus, fds):
        vm.ioapic.set_redirection(17, 0x67, level_trigger=True)
        efd, rfd = fds.eventfd(), fds.eventfd()
        irqfd(vm, efd, 17, RESAMPLE, rfd)
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [0x67]})
        assert cpus[0].ack() == 0x67
        assert cpus[0].eoi() == 0x67
        assert wait_until(lambda: fdinfo_count(rfd) == 1)
        assert not vm.ioapic.line_level(17)


# --- KVM_SIGNAL_MSI ----------------------------------------------------------------------------------
class TestSignalMsi:
    def test_flags(self, vm, cpus):
        lo, hi = msi_address(0)
        ok = bytearray(uapi.pack_msi(lo, hi, msi_data(0x41), uapi.KVM_MSI_VALID_DEVID, 5))
        assert vm.ioctl(uapi.KVM_SIGNAL_MSI, ok) == 1
        for flags in (2, 4, 1 << 31):
            assert err(vm.ioctl, uapi.KVM_SIGNAL_MSI,
                       bytearray(uapi.pack_msi(lo, hi, msi_data(0x42), flags))) == errno.EINVAL
        assert lapic_irr(cpus[0]) == [0x41]

    def test_before_irqchip_is_einval(self):
        with Vm() as v:
            assert err(v.ioctl, uapi.KVM_SIGNAL_MSI, uapi.pack_msi(0xFEE00000, 0, 0x41)) \
                == errno.EINVAL

    def test_no_destination_is_zero(self, vm, cpus):
        assert vm.ioctl(uapi.KVM_SIGNAL_MSI,
                        bytearray(uapi.pack_msi(*msi_address(7), msi_data(0x41)))) == 0

    def test_broadcast_counts_every_lapic(self, vm, cpus):
        assert vm.ioctl(uapi.KVM_SIGNAL_MSI,
                        bytearray(uapi.pack_msi(*msi_address(0xFF), msi_data(0x41)))) == 2


# --- KVM_IRQ_LINE --------------------------------------------------------------------------------------
class TestIrqLine:
    def test_before_irqchip_is_enxio(self):
        with Vm() as v:
            assert err(v.ioctl, uapi.KVM_IRQ_LINE, uapi.pack_irq_level(4, 1)) == errno.ENXIO
            assert err(v.ioctl, uapi.KVM_IRQ_LINE_STATUS, uapi.pack_irq_level(4, 1)) \
                == errno.ENXIO

    def test_ioapic_edge_status(self, vm, cpus):
        vm.ioapic.set_redirection(16, 0x56, dest_id=1)
        st = lambda level: struct.unpack_from(   # noqa: E731
            "<i", vm.ioctl(uapi.KVM_IRQ_LINE_STATUS, uapi.pack_irq_level(16, level)))[0]
        assert st(1) == 1
        assert st(1) == 0                  # held high: coalesced
        assert st(0) == 1
        assert lapic_irr(cpus[1]) == [0x56]


# --- KVM_IRQFD_DIRECT ----------------------------------------------------------------------------------
class TestIrqfdDirect:
    def test_assign_deliver_modify_deassign(self, vm, cpus, fds):
        efd = fds.eventfd()
        assert direct(vm, efd, msi_raw(0, 0x41), kind=bytearray) == 0
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [0x41]})
        assert direct(vm, efd, msi_raw(1, 0x42), MODIFY, kind=bytearray) == 0
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [0x41], 1: [0x42]})
        assert direct(vm, efd, bytes(48), DEASSIGN, kind=bytearray) == 0
        assert vm.irqfd_count() == 0
        os.eventfd_write(efd, 1)
        assert stays(lambda: fdinfo_count(efd) == 1)

    def test_bytes_argument_returns_the_copy(self, vm, fds):
        efd = fds.eventfd()
        buf = uapi.pack_irqfd_direct(efd, msi_raw(0, 0x41))
        assert vm.ioctl(uapi.KVM_IRQFD_DIRECT, buf) == buf
        assert vm.irqfd_count() == 1

    def test_irqchip_entry_and_resample(self, vm, cpus, fds):
        vm.ioapic.set_redirection(10, 0x4A, dest_id=1, level_trigger=True)
        efd, rfd = fds.eventfd(), fds.eventfd()
        direct(vm, efd, uapi.pack_irqchip_entry(0, IOAPIC, 10), RESAMPLE, rfd)
        os.eventfd_write(efd, 1)
        expect(cpus, {1: [0x4A]})
        cpus[1].ack()
        cpus[1].eoi()
        assert wait_until(lambda: fdinfo_count(rfd) == 1)

    def test_msi_with_devid(self, vm, cpus, fds):
        efd = fds.eventfd()
        lo, hi = msi_address(1)
        entry = uapi.pack_msi_entry(0, lo, hi, msi_data(0x43), uapi.KVM_MSI_VALID_DEVID, 99)
        assert direct(vm, efd, entry, kind=bytearray) == 0
        os.eventfd_write(efd, 1)
        expect(cpus, {1: [0x43]})

    @pytest.mark.parametrize("flags", [8, 16, 1 << 31, MODIFY | 8])
    def test_unknown_flags_are_einval(self, vm, fds, flags):
        assert err(direct, vm, fds.eventfd(), msi_raw(0, 0x41), flags) == errno.EINVAL
        assert vm.irqfd_count() == 0

    def test_nonzero_pad_is_einval(self, vm, fds):
        assert err(direct, vm, fds.eventfd(), msi_raw(0, 0x41), 0, 0, 1) == errno.EINVAL
        assert vm.irqfd_count() == 0

    def test_entry_gsi_must_be_zero(self, vm, fds):
        assert err(direct, vm, fds.eventfd(), msi_raw(0, 0x41, gsi=1)) == errno.EINVAL
        assert vm.irqfd_count() == 0

    @pytest.mark.parametrize("entry", [
        uapi.pack_irqchip_entry(0, IOAPIC, 24),
        uapi.pack_irqchip_entry(0, 0, 8),
        uapi.pack_irqchip_entry(0, 3, 0),
        uapi.pack_routing_entry(0, 0),
        uapi.pack_routing_entry(0, uapi.KVM_IRQ_ROUTING_S390_ADAPTER),
        uapi.pack_routing_entry(0, uapi.KVM_IRQ_ROUTING_HV_SINT),
        uapi.pack_routing_entry(0, uapi.KVM_IRQ_ROUTING_XEN_EVTCHN, 0,
                                struct.pack("<III", 1, 0, 0xFFFFFFFF)),
        uapi.pack_routing_entry(0, 6),
        uapi.pack_msi_entry(0, 0xFEE00000, 0, 0x41, flags=2),
        uapi.pack_routing_entry(0, uapi.KVM_IRQ_ROUTING_IRQCHIP, 1,
                                uapi.ROUTING_IRQCHIP.pack(IOAPIC, 1)),
    ], ids=["ioapic_pin24", "pic_pin8", "irqchip3", "type0", "s390", "hv_sint", "xen_evtchn",
            "type6", "msi_flag2", "irqchip_flag1"])
    def test_bad_entries_are_einval(self, vm, fds, entry):
        efd = fds.eventfd()
        assert err(direct, vm, efd, entry) == errno.EINVAL
        direct(vm, efd, msi_raw(0, 0x41))
        assert err(direct, vm, efd, entry, MODIFY) == errno.EINVAL
        assert vm.irqfd_count() == 1

    def test_deassign_of_unknown_eventfd_is_enoent(self, vm, fds):
        efd = fds.eventfd()
        assert err(direct, vm, efd, bytes(48), DEASSIGN) == errno.ENOENT
        irqfd(vm, efd, 3)                                    # a legacy irqfd is not direct
        assert err(direct, vm, efd, bytes(48), DEASSIGN) == errno.ENOENT
        assert vm.irqfd_count() == 1

    def test_deassign_ignores_the_entry(self, vm, fds):
        efd = fds.eventfd()
        direct(vm, efd, msi_raw(0, 0x41))
        garbage = uapi.pack_routing_entry(77, 99, 5, b"\xff" * 32)
        assert direct(vm, efd, garbage, DEASSIGN, kind=bytearray) == 0
        assert vm.irqfd_count() == 0

    def test_deassign_through_a_dup(self, vm, fds):
        efd = fds.eventfd()
        direct(vm, efd, msi_raw(0, 0x41))
        assert direct(vm, fds.dup(efd), bytes(48), DEASSIGN, kind=bytearray) == 0
        assert vm.irqfd_count() == 0

    @pytest.mark.parametrize("flags", [DEASSIGN | MODIFY, DEASSIGN | RESAMPLE,
                                       DEASSIGN | MODIFY | RESAMPLE, MODIFY | RESAMPLE])
    def test_contradictory_flags_are_einval(self, vm, fds, flags):
        efd = fds.eventfd()
        direct(vm, efd, msi_raw(0, 0x41))
        assert err(direct, vm, efd, msi_raw(0, 0x42), flags, fds.eventfd()) == errno.EINVAL
        assert vm.irqfd_count() == 1

    def test_modify_of_unknown_eventfd_is_enoent(self, vm, fds):
        assert err(direct, vm, fds.eventfd(), msi_raw(0, 0x41), MODIFY) == errno.ENOENT

    def test_fd_errors(self, vm, fds):
        r, _w = fds.pipe()
        assert err(direct, vm, fds.closed_fd(), msi_raw(0, 0x41)) == errno.EBADF
        assert err(direct, vm, fds.closed_fd(), bytes(48), DEASSIGN) == errno.EBADF
        assert err(direct, vm, r, msi_raw(0, 0x41)) == errno.EINVAL
        assert err(direct, vm, fds.eventfd(), msi_raw(0, 0x41), RESAMPLE,
                   fds.closed_fd()) == errno.EBADF
        assert err(direct, vm, fds.eventfd(), msi_raw(0, 0x41), RESAMPLE, r) == errno.EINVAL
        assert vm.irqfd_count() == 0

    def test_busy(self, vm, fds):
        efd = fds.eventfd()
        direct(vm, efd, msi_raw(0, 0x41))
        assert err(direct, vm, efd, msi_raw(0, 0x42)) == errno.EBUSY
        assert err(direct, vm, fds.dup(efd), msi_raw(0, 0x42)) == errno.EBUSY
        assert err(irqfd, vm, efd, 1) == errno.EBUSY

    def test_before_irqchip_is_einval(self, fds):
        with Vm() as v:
            assert err(direct, v, fds.eventfd(), msi_raw(0, 0x41)) == errno.EINVAL

    def test_short_buffer_reads_zero_padding(self, vm, fds):
        # A 16-byte buffer is padded to 1 KiB (with zeros here): the entry is type 0, EINVAL.
        buf = bytearray(struct.pack("<IIII", fds.eventfd(), 0, 0, 0))
        assert err(vm.ioctl, uapi.KVM_IRQFD_DIRECT, buf) == errno.EINVAL
        assert vm.irqfd_count() == 0

    def test_many_direct_irqfds_through_ioctl(self, vm, cpus, fds):
        efds = [fds.eventfd() for _ in range(300)]
        for i, e in enumerate(efds):
            direct(vm, e, msi_raw(i % 2, 0x20 + i // 2))
        assert vm.irqfd_count() == 300
        for e in efds:
            os.eventfd_write(e, 1)
        expect(cpus, {0: [0x20 + i // 2 for i in range(0, 300, 2)],
                      1: [0x20 + i // 2 for i in range(1, 300, 2)]})
