"""Model tests for kvmirqfast.arch.arm64 (kernel-source rules; no arm64 host to compare with)."""

import errno

import pytest

from kvmirqfast.arch import get_arch
from kvmirqfast.arch import arm64
from kvmirqfast.arch.arm64 import Arm64Arch
from kvmirqfast.routing import (GsiRoutingTable, HvSintEntry, InvalidRouting, IrqchipEntry,
                                MsiEntry, XenEvtchnEntry)


def rejects(arch, entry, match=None):
    with pytest.raises(InvalidRouting, match=match) as ei:
        arch.validate_entry(entry)
    assert ei.value.errno == errno.EINVAL


def test_constants_match_the_vgic():
    assert arm64.KVM_IRQCHIP_NUM_PINS == 988
    assert arm64.DEFAULT_NR_SPIS == 224
    assert arm64.MAX_NR_SPIS == 960
    assert arm64.VGIC_NR_PRIVATE_IRQS == 32


def test_default_nr_spis_is_kvm_legacy_224():
    a = Arm64Arch()
    assert a.name == "arm64" and a.nr_spis == 224 and a.nr_irqs == 256


@pytest.mark.parametrize("n", [32, 64, 224, 960])
def test_valid_nr_spis(n):
    assert Arm64Arch(nr_spis=n).nr_spis == n


@pytest.mark.parametrize("n", [0, 31, 33, 992, 1024])
def test_invalid_nr_spis_is_value_error(n):
    with pytest.raises(ValueError):
        Arm64Arch(nr_spis=n)


def test_nr_spis_must_be_int():
    with pytest.raises(TypeError):
        Arm64Arch(nr_spis="32")


def test_irqchip_pin_987_is_accepted():
    assert Arm64Arch(nr_spis=32).validate_entry(IrqchipEntry(0, 987)) is None


def test_irqchip_pin_988_is_einval():
    rejects(Arm64Arch(), IrqchipEntry(0, 988), match="pin 0..987")


@pytest.mark.parametrize("chip", [1, 2, 2**32 - 1])
def test_irqchip_other_than_0_is_einval(chip):
    rejects(Arm64Arch(), IrqchipEntry(chip, 0), match="irqchip must be 0")


def test_pin_beyond_configured_spis_is_accepted_but_fails_at_injection():
    a = Arm64Arch(nr_spis=32)
    assert a.validate_entry(IrqchipEntry(0, 32)) is None
    assert a.injection_errno(IrqchipEntry(0, 32)) == errno.EINVAL
    assert a.injection_errno(IrqchipEntry(0, 31)) is None


@pytest.mark.parametrize("entry", [MsiEntry(0x8090040, 0, 5), MsiEntry(0x8090040, 0, 5, devid=0)])
def test_msi_with_and_without_devid_is_accepted_at_routing_time(entry):
    assert Arm64Arch().validate_entry(entry) is None


def test_msi_injection_needs_devid_and_its():
    a = Arm64Arch()
    assert a.injection_errno(MsiEntry(0x8090040, 0, 5, devid=1)) is None
    assert a.injection_errno(MsiEntry(0x8090040, 0, 5)) == errno.EINVAL
    assert Arm64Arch(has_its=False).injection_errno(MsiEntry(0, devid=1)) == errno.ENODEV


@pytest.mark.parametrize("entry", [HvSintEntry(0, 0), XenEvtchnEntry(1), object()])
def test_other_types_are_einval(entry):
    rejects(Arm64Arch(), entry, match="not supported on arm64")


def test_spi_intid_and_map_key():
    a = Arm64Arch()
    assert a.spi_intid(0) == 32
    assert a.irqchip_map_key(IrqchipEntry(0, 100)) == (0, 100)


def test_arm64_table_sharing_rules_are_the_generic_ones():
    a = Arm64Arch()
    with pytest.raises(InvalidRouting):
        GsiRoutingTable.build([(1, IrqchipEntry(0, 1)), (1, IrqchipEntry(0, 2))], a)
    t = GsiRoutingTable.build([(1, IrqchipEntry(0, 1)), (2, MsiEntry(0, devid=4))], a)
    assert t.irqchip_gsi(0, 1) == 1 and t.arch_name == "arm64"


def test_get_arch_arm64_with_nr_spis():
    a = get_arch("aarch64", nr_spis=64)
    assert isinstance(a, Arm64Arch) and a.nr_spis == 64
    with pytest.raises(ValueError):
        get_arch("arm64", nr_spis=10)
