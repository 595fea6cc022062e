"""KVM_IRQFD and KVM_SET_GSI_ROUTING: what every backend must do as KVM does."""

import errno
import os

import pytest

from kvmirqfast import uapi
from kvmirqfast.arch.x86 import msi_address
from kvmirqfast.testing import settle, wait_for, wait_pending

from ._util import errno_of, eventfd_count, irqfd, msi, set_routing


def test_msi_irqfd_lands_on_target_vcpu_only(kvm_vm, kvm_vcpus, kvm_eventfd):
    cpu0, cpu1 = kvm_vcpus(2)
    set_routing(kvm_vm, [msi(30, 1, 0x51)])
    efd = kvm_eventfd()
    assert irqfd(kvm_vm, efd, 30) == 0
    os.eventfd_write(efd, 1)
    assert 0x51 in wait_pending(cpu1, [0x51])
    assert 0x51 not in cpu0.pending()


def test_delivery_consumes_the_eventfd_counter(kvm_vm, kvm_vcpus, kvm_eventfd):
    (cpu,) = kvm_vcpus(1)
    set_routing(kvm_vm, [msi(5, 0, 0x40)])
    efd = kvm_eventfd()
    irqfd(kvm_vm, efd, 5)
    os.eventfd_write(efd, 3)
    wait_pending(cpu, [0x40])
    assert wait_for(lambda: eventfd_count(efd) == 0)


def test_event_pending_at_assign_is_delivered_without_consuming(kvm_vm, kvm_vcpus, kvm_eventfd):
    (cpu,) = kvm_vcpus(1)
    set_routing(kvm_vm, [msi(5, 0, 0x42)])
    efd = kvm_eventfd(1)
    irqfd(kvm_vm, efd, 5)
    assert 0x42 in wait_pending(cpu, [0x42])
    settle()
    assert eventfd_count(efd) == 1            # KVM injects it without reading the counter


def test_same_eventfd_twice_is_ebusy_also_through_dup(kvm_vm, kvm_vcpus, kvm_eventfd):
    kvm_vcpus(1)
    set_routing(kvm_vm, [msi(1, 0, 0x40), msi(2, 0, 0x41)])
    efd = kvm_eventfd()
    irqfd(kvm_vm, efd, 1)
    assert errno_of(irqfd, kvm_vm, efd, 1) == errno.EBUSY
    assert errno_of(irqfd, kvm_vm, efd, 2) == errno.EBUSY
    dup = os.dup(efd)
    try:
        assert errno_of(irqfd, kvm_vm, dup, 2) == errno.EBUSY
    finally:
        os.close(dup)


def test_deassign_unknown_pair_succeeds_and_known_pair_stops_delivery(kvm_vm, kvm_vcpus,
                                                                       kvm_eventfd):
    (cpu,) = kvm_vcpus(1)
    set_routing(kvm_vm, [msi(7, 0, 0x47)])
    efd = kvm_eventfd()
    irqfd(kvm_vm, efd, 7)
    assert irqfd(kvm_vm, efd, 8, uapi.KVM_IRQFD_FLAG_DEASSIGN) == 0    # wrong gsi: no-op
    os.eventfd_write(efd, 1)
    wait_pending(cpu, [0x47])
    assert cpu.wait_interrupt(timeout=2) and cpu.ack() == 0x47
    cpu.eoi()
    assert irqfd(kvm_vm, efd, 7, uapi.KVM_IRQFD_FLAG_DEASSIGN) == 0
    os.eventfd_write(efd, 1)
    settle()
    assert 0x47 not in cpu.pending()
    assert eventfd_count(efd) == 1            # nobody consumes it any more


@pytest.mark.parametrize("case, expected", [
    ("pipe", errno.EINVAL), ("closed", errno.EBADF), ("flags", errno.EINVAL)])
def test_bad_irqfd_arguments(kvm_vm, kvm_vcpus, kvm_eventfd, case, expected):
    kvm_vcpus(1)
    r, w = os.pipe()
    try:
        if case == "pipe":
            got = errno_of(irqfd, kvm_vm, r, 1)
        elif case == "closed":
            os.close(w)
            w = None
            got = errno_of(irqfd, kvm_vm, 4000, 1)
        else:
            got = errno_of(irqfd, kvm_vm, kvm_eventfd(), 1, 1 << 5)
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
    assert got == expected


def test_4097_routes_and_gsi_4096_are_einval(kvm_vm, kvm_vcpus):
    kvm_vcpus(1)
    assert set_routing(kvm_vm, [msi(g, 0, 0x40) for g in range(4096)]) == 0
    assert errno_of(set_routing, kvm_vm, [msi(g, 0, 0x40) for g in range(4097)]) == errno.EINVAL
    assert errno_of(set_routing, kvm_vm, [msi(4096, 0, 0x40)]) == errno.EINVAL


def test_rejected_table_leaves_the_old_one_in_force(kvm_vm, kvm_vcpus, kvm_eventfd):
    (cpu,) = kvm_vcpus(1)
    set_routing(kvm_vm, [msi(9, 0, 0x49)])
    efd = kvm_eventfd()
    irqfd(kvm_vm, efd, 9)
    bad = [msi(9, 0, 0x4a), uapi.pack_irqchip_entry(10, uapi.KVM_IRQCHIP_IOAPIC, 24)]
    assert errno_of(set_routing, kvm_vm, bad) == errno.EINVAL
    os.eventfd_write(efd, 1)
    assert 0x49 in wait_pending(cpu, [0x49])
    assert 0x4a not in cpu.pending()


def test_routing_change_retargets_an_assigned_irqfd(kvm_vm, kvm_vcpus, kvm_eventfd):
    cpu0, cpu1 = kvm_vcpus(2)
    set_routing(kvm_vm, [msi(11, 0, 0x60)])
    efd = kvm_eventfd()
    irqfd(kvm_vm, efd, 11)
    set_routing(kvm_vm, [msi(11, 1, 0x61)])
    os.eventfd_write(efd, 1)
    assert 0x61 in wait_pending(cpu1, [0x61])
    assert 0x60 not in cpu0.pending()


def test_gsi_without_route_delivers_nothing_until_a_route_appears(kvm_vm, kvm_vcpus,
                                                                  kvm_eventfd):
    (cpu,) = kvm_vcpus(1)
    set_routing(kvm_vm, [])
    efd = kvm_eventfd()
    irqfd(kvm_vm, efd, 12)
    os.eventfd_write(efd, 1)
    settle()
    assert cpu.pending() == []
    set_routing(kvm_vm, [msi(12, 0, 0x62)])
    os.eventfd_write(efd, 1)
    assert 0x62 in wait_pending(cpu, [0x62])


def test_signal_msi_counts_accepting_lapics(kvm_vm, kvm_vcpus):
    cpu0, _ = kvm_vcpus(2)
    lo, hi = msi_address(0)
    assert kvm_vm.ioctl(uapi.KVM_SIGNAL_MSI, bytearray(uapi.pack_msi(lo, hi, 0x70))) == 1
    lo, hi = msi_address(9)
    assert kvm_vm.ioctl(uapi.KVM_SIGNAL_MSI, bytearray(uapi.pack_msi(lo, hi, 0x71))) == 0
    assert errno_of(kvm_vm.ioctl, uapi.KVM_SIGNAL_MSI,
                    bytearray(uapi.pack_msi(lo, hi, 0x71, flags=2))) == errno.EINVAL
    assert 0x70 in cpu0.pending()


def test_irq_line_status_without_route_is_minus_one(kvm_vm):
    buf = bytearray(uapi.pack_irq_level(100, 1))
    assert kvm_vm.ioctl(uapi.KVM_IRQ_LINE_STATUS, buf) == 0
    assert uapi.IRQ_LEVEL.unpack(buf)[0] == -1


def test_logical_flat_destination_reaches_the_matching_ldr(kvm_vm, kvm_vcpus):
    cpu0, cpu1 = kvm_vcpus(2)
    state = bytearray(cpu1.ioctl(uapi.KVM_GET_LAPIC, bytes(uapi.LAPIC_STATE_SIZE)))
    uapi.set_lapic_reg(state, uapi.APIC_LDR, 0x02000000)
    cpu1.ioctl(uapi.KVM_SET_LAPIC, bytes(state))
    lo, hi = msi_address(0x02, logical=True)
    assert kvm_vm.ioctl(uapi.KVM_SIGNAL_MSI, bytearray(uapi.pack_msi(lo, hi, 0x72))) == 1
    assert 0x72 in cpu1.pending() and 0x72 not in cpu0.pending()


def test_vcpu_acks_and_eois_in_priority_order(kvm_vm, kvm_vcpus):
    (cpu,) = kvm_vcpus(1)
    for vec in (0x41, 0x91, 0x61):
        lo, hi = msi_address(0)
        kvm_vm.ioctl(uapi.KVM_SIGNAL_MSI, bytearray(uapi.pack_msi(lo, hi, vec)))
    taken = []
    for _ in range(3):
        assert cpu.wait_interrupt(timeout=2)
        taken.append(cpu.ack())
        assert cpu.eoi() == taken[-1]
    assert taken == [0x91, 0x61, 0x41]
    assert cpu.pending() == []


def test_signal_msi_without_any_vcpu_is_eperm(kvm_vm):
    # No LAPIC at all: KVM's delivery returns -1, which the ioctl reports as EPERM.
    lo, hi = msi_address(0)
    assert errno_of(kvm_vm.ioctl, uapi.KVM_SIGNAL_MSI,
                    bytearray(uapi.pack_msi(lo, hi, 0x70))) == errno.EPERM
