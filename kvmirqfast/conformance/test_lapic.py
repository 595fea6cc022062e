"""KVM_GET_LAPIC / KVM_SET_LAPIC on a vCPU: the interrupt-routing registers round-trip and take
effect for delivery."""

import pytest

from kvmirqfast import uapi
from kvmirqfast.arch.x86 import msi_address

ENABLED = uapi.APIC_SPIV_APIC_ENABLED


def get_lapic(cpu):
    return bytearray(cpu.ioctl(uapi.KVM_GET_LAPIC, bytes(uapi.LAPIC_STATE_SIZE)))


def signal_msi(vm, dest, vector, logical=False):
    lo, hi = msi_address(dest, logical)
    return vm.ioctl(uapi.KVM_SIGNAL_MSI, bytearray(uapi.pack_msi(lo, hi, vector)))


def test_fresh_lapic_reports_its_id_and_reset_values(kvm_vm, kvm_vcpus):
    cpus = kvm_vcpus(3)
    for cpu in cpus:
        st = get_lapic(cpu)
        assert uapi.lapic_reg(st, uapi.APIC_ID) >> 24 == cpu.id
        assert uapi.lapic_reg(st, uapi.APIC_DFR) == 0xFFFFFFFF          # flat model
        assert uapi.lapic_reg(st, uapi.APIC_LDR) == 0
        assert uapi.lapic_reg(st, uapi.APIC_SPIV) & ENABLED             # the fixture enables it


@pytest.mark.parametrize("apic_id, ldr, dfr, spiv", [
    (1, 0x02000000, 0xFFFFFFFF, 0x1FF),          # flat logical, APIC enabled
    (1, 0x21000000, 0x0FFFFFFF, 0x1EF),          # cluster logical, another spurious vector
    (1, 0x00000000, 0xFFFFFFFF, 0x0FF),          # software-disabled
    (7, 0x80000000, 0xFFFFFFFF, 0x1FF),          # a new xAPIC ID
])
def test_set_lapic_round_trips_id_ldr_dfr_spiv(kvm_vm, kvm_vcpus, apic_id, ldr, dfr, spiv):
    _, cpu = kvm_vcpus(2)
    st = get_lapic(cpu)
    uapi.set_lapic_reg(st, uapi.APIC_ID, apic_id << 24)
    uapi.set_lapic_reg(st, uapi.APIC_LDR, ldr)
    uapi.set_lapic_reg(st, uapi.APIC_DFR, dfr)
    uapi.set_lapic_reg(st, uapi.APIC_SPIV, spiv)
    assert cpu.ioctl(uapi.KVM_SET_LAPIC, bytes(st)) == bytes(st)     # bytes in, bytes out
    got = get_lapic(cpu)
    assert [uapi.lapic_reg(got, r) for r in
            (uapi.APIC_ID, uapi.APIC_LDR, uapi.APIC_DFR, uapi.APIC_SPIV)] == \
        [apic_id << 24, ldr, dfr, spiv]


def test_get_lapic_into_a_bytearray_returns_zero(kvm_vm, kvm_vcpus):
    (cpu,) = kvm_vcpus(1)
    buf = bytearray(uapi.LAPIC_STATE_SIZE)
    assert cpu.ioctl(uapi.KVM_GET_LAPIC, buf) == 0
    assert uapi.lapic_reg(buf, uapi.APIC_SPIV) & ENABLED


def test_new_apic_id_takes_effect_for_physical_msis(kvm_vm, kvm_vcpus):
    cpu0, cpu1 = kvm_vcpus(2)
    st = get_lapic(cpu1)
    uapi.set_lapic_reg(st, uapi.APIC_ID, 5 << 24)
    cpu1.ioctl(uapi.KVM_SET_LAPIC, bytes(st))
    assert signal_msi(kvm_vm, 5, 0x73) == 1
    assert signal_msi(kvm_vm, 1, 0x74) == 0                  # nobody has ID 1 any more
    assert 0x73 in cpu1.pending() and 0x73 not in cpu0.pending()


def test_cluster_logical_destination(kvm_vm, kvm_vcpus):
    cpu0, cpu1 = kvm_vcpus(2)
    for cpu, ldr in ((cpu0, 0x11000000), (cpu1, 0x12000000)):   # cluster 1, members 1 and 2
        st = get_lapic(cpu)
        uapi.set_lapic_reg(st, uapi.APIC_DFR, 0x0FFFFFFF)
        uapi.set_lapic_reg(st, uapi.APIC_LDR, ldr)
        cpu.ioctl(uapi.KVM_SET_LAPIC, bytes(st))
    assert signal_msi(kvm_vm, 0x12, 0x75, logical=True) == 1
    assert 0x75 in cpu1.pending() and 0x75 not in cpu0.pending()


def test_software_disabled_lapic_accepts_nothing(kvm_vm, kvm_vcpus):
    cpu0, cpu1 = kvm_vcpus(2)
    st = get_lapic(cpu1)
    uapi.set_lapic_reg(st, uapi.APIC_SPIV, 0xFF)
    cpu1.ioctl(uapi.KVM_SET_LAPIC, bytes(st))
    assert signal_msi(kvm_vm, 1, 0x76) == 0
    assert signal_msi(kvm_vm, 0, 0x77) == 1
    assert 0x76 not in cpu1.pending()
