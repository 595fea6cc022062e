"""Model tests for kvmirqfast.arch.x86: entry rules, x2APIC API, MSI decoding and encoding."""

import errno

import pytest
from hypothesis import given, strategies as st

from kvmirqfast import uapi
from kvmirqfast.arch import get_arch
from kvmirqfast.arch import x86
from kvmirqfast.arch.x86 import MsiMessage, X86Arch, decode_msi, msi_address, msi_data
from kvmirqfast.routing import HvSintEntry, InvalidRouting, IrqchipEntry, MsiEntry, XenEvtchnEntry


def rejects(arch, entry, match=None, **kw):
    with pytest.raises(InvalidRouting, match=match) as ei:
        arch.validate_entry(entry, **kw)
    assert ei.value.errno == errno.EINVAL
    return ei.value


def accepts(arch, entry, **kw):
    assert arch.validate_entry(entry, **kw) is None


# --- irqchip entries ------------------------------------------------------------------------------
@pytest.mark.parametrize("chip,last", [(0, 7), (1, 7), (2, 23)])
def test_irqchip_pins_up_to_the_limit_are_accepted(chip, last):
    for pin in range(last + 1):
        accepts(X86Arch(), IrqchipEntry(chip, pin))


def test_pic_master_pin_8_is_einval():
    rejects(X86Arch(), IrqchipEntry(0, 8), match="PIC master pin 8 out of range 0..7")


def test_pic_slave_pin_8_is_einval():
    rejects(X86Arch(), IrqchipEntry(1, 8), match="PIC slave pin 8 out of range 0..7")


def test_ioapic_pin_24_is_einval():
    rejects(X86Arch(), IrqchipEntry(2, 24), match="IOAPIC pin 24 out of range 0..23")


@pytest.mark.parametrize("pin", [2**31, 2**32 - 1])
def test_huge_pin_is_einval(pin):
    rejects(X86Arch(), IrqchipEntry(2, pin))


@pytest.mark.parametrize("chip", [3, 4, 2**32 - 1])
def test_unknown_irqchip_is_einval(chip):
    rejects(X86Arch(), IrqchipEntry(chip, 0), match=f"unknown irqchip {chip}")


def test_split_irqchip_refuses_irqchip_entries_but_not_msi():
    arch = X86Arch(split_irqchip=True)
    rejects(arch, IrqchipEntry(2, 0), match="split")
    accepts(arch, MsiEntry(0xFEE00000))


def test_irqchip_map_key_puts_pic_slave_pins_at_8_to_15():
    arch = X86Arch()
    assert arch.irqchip_map_key(IrqchipEntry(1, 0)) == (1, 8)
    assert arch.irqchip_map_key(IrqchipEntry(1, 7)) == (1, 15)
    assert arch.irqchip_map_key(IrqchipEntry(0, 7)) == (0, 7)
    assert arch.irqchip_map_key(IrqchipEntry(2, 23)) == (2, 23)


# --- MSI entries ----------------------------------------------------------------------------------
def test_msi_any_address_and_data_accepted_without_x2apic_format():
    for hi in (0, 1, 0xFF, 0x100, 2**32 - 1):
        accepts(X86Arch(), MsiEntry(0x12345678, hi, 2**32 - 1))


def test_msi_with_devid_is_accepted_on_x86():
    accepts(X86Arch(), MsiEntry(0xFEE00000, 0, 0x30, devid=7))


@pytest.mark.parametrize("hi", [1, 0x80, 0xFF, 0x1FF, 2**32 - 1])
def test_x2apic_format_msi_with_address_hi_low_byte_is_einval(hi):
    rejects(X86Arch(x2apic_format=True), MsiEntry(0xFEE00000, hi), match="address_hi")


@pytest.mark.parametrize("hi", [0, 0x100, 0xFFFFFF00])
def test_x2apic_format_msi_with_clear_low_byte_is_accepted(hi):
    accepts(X86Arch(x2apic_format=True), MsiEntry(0xFEE00000, hi))


def test_x2apic_format_keyword_overrides_the_vm_setting():
    rejects(X86Arch(), MsiEntry(0, 1), x2apic_format=True)
    accepts(X86Arch(x2apic_format=True), MsiEntry(0, 1), x2apic_format=False)


def test_enable_x2apic_api_sets_sticky_32bit_ids():
    arch = X86Arch()
    arch.enable_x2apic_api(uapi.KVM_X2APIC_API_USE_32BIT_IDS)
    assert arch.x2apic_format
    arch.enable_x2apic_api(0)
    assert arch.x2apic_format
    arch.enable_x2apic_api(uapi.KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK)
    assert arch.x2apic_broadcast_quirk_disabled and arch.x2apic_format


@pytest.mark.parametrize("flags", [4, 8, 1 << 63])
def test_enable_x2apic_api_unknown_flag_is_einval(flags):
    arch = X86Arch()
    with pytest.raises(InvalidRouting) as ei:
        arch.enable_x2apic_api(flags)
    assert ei.value.errno == errno.EINVAL and not arch.x2apic_format


# --- Hyper-V and Xen ------------------------------------------------------------------------------
def test_hv_sint_is_einval_without_hyperv():
    rejects(X86Arch(), HvSintEntry(0, 2), match="Hyper-V")


def test_hv_sint_is_accepted_unchecked_with_hyperv():
    accepts(X86Arch(hyperv=True), HvSintEntry(2**32 - 1, 2**32 - 1))


def test_xen_evtchn_is_einval_without_xen():
    rejects(X86Arch(), XenEvtchnEntry(1), match="Xen")


def test_xen_evtchn_port_limit_depends_on_long_mode():
    accepts(X86Arch(xen=True), XenEvtchnEntry(1023))
    rejects(X86Arch(xen=True), XenEvtchnEntry(1024), match="port 1024")
    accepts(X86Arch(xen=True, xen_long_mode=True), XenEvtchnEntry(4095))
    rejects(X86Arch(xen=True, xen_long_mode=True), XenEvtchnEntry(4096))


def test_xen_evtchn_priority_must_be_2level():
    rejects(X86Arch(xen=True), XenEvtchnEntry(1, 0, 0), match="priority")


def test_non_entry_is_einval():
    rejects(X86Arch(), object())


# --- MSI decoding ---------------------------------------------------------------------------------
def test_decode_fixed_edge_physical_msi():
    assert decode_msi(0xFEE03000, 0, 0x4041) == MsiMessage(
        dest_id=3, dest_logical=False, delivery_mode=0, level_trigger=False, level_assert=True,
        vector=0x41, redirection_hint=False)


def test_decode_every_field():
    m = decode_msi(0xFEEAB00C, 0, 0x8000 | (4 << 8) | 0xFE)
    assert m.dest_id == 0xAB and m.dest_logical and m.redirection_hint
    assert m.delivery_mode == x86.DM_NMI and m.level_trigger and not m.level_assert
    assert m.vector == 0xFE


def test_decode_ignores_extended_destination_id_bits():
    # observed on 6.18: address bits 11:5 do not change the destination
    assert decode_msi(0xFEE00000 | (0x7F << 5), 0, 0x41).dest_id == 0
    assert decode_msi(0xFEE00000 | (0x7F << 5), 0, 0x41, x2apic_format=True).dest_id == 0


def test_decode_ignores_address_hi_without_x2apic_format():
    assert decode_msi(0xFEE01000, 0xFFFFFF00, 0).dest_id == 1


def test_decode_x2apic_format_uses_address_hi_bits_31_8():
    assert decode_msi(0xFEE01000, 0x100, 0, x2apic_format=True).dest_id == 0x101
    assert decode_msi(0xFEEFF000, 0xFFFFFF00, 0, x2apic_format=True).dest_id == 0xFFFFFFFF


def test_arch_decode_msi_uses_vm_x2apic_format():
    assert X86Arch(x2apic_format=True).decode_msi(0xFEE00000, 0x200, 0).dest_id == 0x200
    assert X86Arch().decode_msi(0xFEE00000, 0x200, 0).dest_id == 0


# --- MSI encoding ---------------------------------------------------------------------------------
def test_msi_address_values():
    assert msi_address(0) == (0xFEE00000, 0)
    assert msi_address(0xFF, logical=True, redirection_hint=True) == (0xFEEFF00C, 0)
    assert msi_address(0x12345, x2apic_format=True) == (0xFEE45000, 0x12300)


def test_msi_address_above_255_needs_x2apic_format():
    with pytest.raises(ValueError):
        msi_address(0x100)
    with pytest.raises(ValueError):
        msi_address(-1)


def test_msi_data_values():
    assert msi_data(0x30) == 0x4030
    assert msi_data(0x30, x86.DM_LOWEST, level_trigger=True, assert_=False) == 0x8130
    for bad in (-1, 256):
        with pytest.raises(ValueError):
            msi_data(bad)
    with pytest.raises(ValueError):
        msi_data(0x30, delivery_mode=8)


@given(dest=st.integers(0, 2**32 - 1), logical=st.booleans(), rh=st.booleans(),
       vector=st.integers(0, 255), dm=st.integers(0, 7), level=st.booleans(), asrt=st.booleans())
def test_encode_then_decode_roundtrips(dest, logical, rh, vector, dm, level, asrt):
    lo, hi = msi_address(dest, logical, rh, x2apic_format=True)
    m = decode_msi(lo, hi, msi_data(vector, dm, level, asrt), x2apic_format=True)
    assert m == MsiMessage(dest, logical, dm, level, asrt, vector, rh)
    accepts(X86Arch(x2apic_format=True), MsiEntry(lo, hi))


# --- get_arch -------------------------------------------------------------------------------------
def test_get_arch_x86_with_options():
    a = get_arch("x86", x2apic_format=True)
    assert isinstance(a, X86Arch) and a.name == "x86" and a.x2apic_format
    assert get_arch("x86_64").name == "x86"


@pytest.mark.parametrize("name", ["mips", "", None, "X86"])
def test_get_arch_unknown_is_value_error(name):
    with pytest.raises(ValueError):
        get_arch(name)


# --- the engine's route word, packed natively from the raw MSI ----------------------------------
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.booleans())
def test_native_route_word_is_decode_msi_then_pack(lo, hi, data, x2apic):
    from kvmirqfast._lapic import x86_msi_route_word
    from kvmirqfast.irqfd import msi_route_word
    assert x86_msi_route_word(lo, hi, data, x2apic) == \
        msi_route_word(decode_msi(lo, hi, data, x2apic_format=x2apic))
