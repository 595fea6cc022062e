"""Model tests for kvmirqfast.routing: entry value types, uapi parsing, the GSI routing table."""

import dataclasses
import errno
import struct

import pytest
from hypothesis import given, settings, strategies as st

from kvmirqfast import uapi
from kvmirqfast.arch.arm64 import Arm64Arch
from kvmirqfast.arch.x86 import X86Arch
from kvmirqfast.routing import (ENTRY_TYPES, GsiRoutingTable, HvSintEntry, InvalidRouting,
                                IrqchipEntry, MsiEntry, XenEvtchnEntry, default_routing,
                                entry_from_uapi)

X86 = X86Arch()
IOAPIC, PIC_M, PIC_S = 2, 0, 1


def einval(fn, *args, match=None):
    with pytest.raises(InvalidRouting, match=match) as ei:
        fn(*args)
    assert ei.value.errno == errno.EINVAL
    return ei.value


def raw_entry(gsi, type_, flags=0, u=b"", pad=0):
    return uapi.ROUTING_ENTRY.pack(gsi, type_, flags, pad, bytes(u))


# --- InvalidRouting -------------------------------------------------------------------------------
def test_invalid_routing_is_value_error_with_errno_and_message():
    e = InvalidRouting(errno.EINVAL, "entry 3 (gsi 5): IOAPIC pin 24 out of range 0..23")
    assert isinstance(e, ValueError)
    assert e.errno == errno.EINVAL
    assert str(e) == "entry 3 (gsi 5): IOAPIC pin 24 out of range 0..23"
    assert "EINVAL" in repr(e)


# --- value types ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda v: IrqchipEntry(v, 0), lambda v: IrqchipEntry(0, v),
    lambda v: MsiEntry(v), lambda v: MsiEntry(0, v), lambda v: MsiEntry(0, 0, v),
    lambda v: MsiEntry(0, 0, 0, v), lambda v: HvSintEntry(v, 0), lambda v: XenEvtchnEntry(v),
])
@pytest.mark.parametrize("bad", ["1", 1.0, True, b"\x01", [1]])
def test_non_int_field_is_type_error(make, bad):
    with pytest.raises(TypeError):
        make(bad)


@pytest.mark.parametrize("make", [
    lambda v: IrqchipEntry(v, 0), lambda v: IrqchipEntry(0, v),
    lambda v: MsiEntry(v), lambda v: MsiEntry(0, v), lambda v: MsiEntry(0, 0, v),
    lambda v: MsiEntry(0, 0, 0, v), lambda v: HvSintEntry(0, v), lambda v: XenEvtchnEntry(0, 0, v),
])
@pytest.mark.parametrize("bad", [-1, 2**32, 2**64])
def test_field_outside_u32_is_value_error(make, bad):
    with pytest.raises(ValueError):
        make(bad)


def test_u32_limits_are_accepted_by_value_types():
    assert IrqchipEntry(2**32 - 1, 0).irqchip == 2**32 - 1
    assert MsiEntry(2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1).devid == 2**32 - 1


def test_entries_are_frozen_and_hashable():
    e = IrqchipEntry(2, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.pin = 6
    assert {e, IrqchipEntry(2, 5), MsiEntry(1)} == {IrqchipEntry(2, 5), MsiEntry(1)}
    assert MsiEntry(1, devid=0) != MsiEntry(1)


def test_msi_devid_sets_valid_devid_flag():
    assert MsiEntry(0xFEE00000).flags == 0
    assert MsiEntry(0xFEE00000, devid=0).flags == uapi.KVM_MSI_VALID_DEVID
    assert MsiEntry(0xFEE00000, 1).address == 0x1_FEE00000


def test_irqchip_to_uapi_layout():
    b = IrqchipEntry(2, 17).to_uapi(9)
    assert len(b) == 48
    assert struct.unpack_from("<IIIIII", b) == (9, uapi.KVM_IRQ_ROUTING_IRQCHIP, 0, 0, 2, 17)
    assert b[24:] == bytes(24)


def test_msi_to_uapi_layout_with_devid():
    b = MsiEntry(0xFEE01000, 0x100, 0x41, devid=0x1234).to_uapi(4095)
    assert struct.unpack_from("<IIIIIIII", b) == (4095, uapi.KVM_IRQ_ROUTING_MSI, 1, 0,
                                                  0xFEE01000, 0x100, 0x41, 0x1234)


def test_hv_sint_and_xen_to_uapi_layout():
    assert struct.unpack_from("<IIIIII", HvSintEntry(3, 2).to_uapi(1)) == (1, 4, 0, 0, 3, 2)
    assert struct.unpack_from("<IIIIIII", XenEvtchnEntry(7, 1).to_uapi(1)) == \
        (1, 5, 0, 0, 7, 1, 0xFFFFFFFF)


# --- entry_from_uapi ------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", [
    IrqchipEntry(2, 23), IrqchipEntry(7, 99), MsiEntry(0xFEE00000, 0, 0x30),
    MsiEntry(1, 2, 3, devid=0), MsiEntry(1, 2, 3, devid=2**32 - 1), HvSintEntry(1, 15),
    XenEvtchnEntry(1023, 2, 0xFFFFFFFF), XenEvtchnEntry(5, 0, 0),
])
def test_entry_roundtrips_through_uapi(entry):
    assert entry_from_uapi(entry.to_uapi(77)) == (77, entry)


@pytest.mark.parametrize("type_", [0, 3, 6, 99, 2**32 - 1])
def test_unknown_type_is_einval(type_):
    einval(entry_from_uapi, raw_entry(1, type_), match="not supported")


def test_flags_on_irqchip_entry_is_einval():
    einval(entry_from_uapi, raw_entry(1, 1, 1, uapi.ROUTING_IRQCHIP.pack(2, 1)), match="flags")


@pytest.mark.parametrize("flags", [2, 3, 0x80000000])
def test_msi_flags_other_than_valid_devid_are_einval(flags):
    einval(entry_from_uapi, raw_entry(1, 2, flags, uapi.ROUTING_MSI.pack(0xFEE00000, 0, 0, 0)))


def test_flags_are_checked_before_the_type():
    einval(entry_from_uapi, raw_entry(1, 99, 1), match="flags")


def test_msi_devid_without_flag_is_dropped():
    gsi, e = entry_from_uapi(raw_entry(3, 2, 0, uapi.ROUTING_MSI.pack(1, 2, 3, 99)))
    assert e == MsiEntry(1, 2, 3, None)


def test_pad_and_union_tail_are_ignored():
    u = uapi.ROUTING_IRQCHIP.pack(2, 4)[:8] + b"\xff" * 24
    assert entry_from_uapi(raw_entry(3, 1, 0, u, pad=0xDEAD)) == (3, IrqchipEntry(2, 4))


@pytest.mark.parametrize("size", [0, 47, 49])
def test_entry_of_wrong_size_is_value_error(size):
    with pytest.raises(ValueError):
        entry_from_uapi(bytes(size))


@given(st.binary(min_size=48, max_size=48))
@settings(max_examples=500)
def test_random_entry_parses_or_raises_invalid_routing(buf):
    try:
        gsi, entry = entry_from_uapi(buf)
    except InvalidRouting as e:
        assert e.errno == errno.EINVAL
    else:
        assert 0 <= gsi < 2**32
        assert entry_from_uapi(entry.to_uapi(gsi)) == (gsi, entry)


@given(st.binary(max_size=8 + 48 * 4), st.integers(0, 6))
@settings(max_examples=300)
def test_random_table_buffer_parses_or_raises_invalid_routing(buf, nr):
    buf = bytearray(buf)
    if len(buf) >= 4:
        struct.pack_into("<I", buf, 0, nr)
    try:
        t = GsiRoutingTable.from_uapi(buf, X86)
    except InvalidRouting as e:
        assert e.errno in (errno.EINVAL, errno.EFAULT)
    else:
        assert len(t) == nr


# --- GsiRoutingTable.build ------------------------------------------------------------------------
def test_empty_table():
    t = GsiRoutingTable()
    assert len(t) == 0 and t.entries == () and t.gsis() == [] and t.nr_rt_entries == 0
    assert t.to_uapi() == bytearray(8)
    assert GsiRoutingTable.build([], X86) == t


def test_table_lookups():
    t = GsiRoutingTable.build([(9, MsiEntry(0xFEE00000)), (3, IrqchipEntry(IOAPIC, 3)),
                               (3, IrqchipEntry(PIC_M, 3))], X86)
    assert len(t) == 3
    assert t.entries == ((9, MsiEntry(0xFEE00000)), (3, IrqchipEntry(IOAPIC, 3)),
                         (3, IrqchipEntry(PIC_M, 3)))
    assert t.entries_for(3) == (IrqchipEntry(IOAPIC, 3), IrqchipEntry(PIC_M, 3))
    assert t.entries_for(9) == (MsiEntry(0xFEE00000),)
    assert t.entries_for(4) == ()
    assert t.gsis() == [3, 9]
    assert t.nr_rt_entries == 10
    assert list(t) == list(t.entries)


def test_irqchip_gsi_uses_kvm_map_keys_with_pic_slave_plus_8():
    t = GsiRoutingTable.build([(20, IrqchipEntry(PIC_S, 3)), (21, IrqchipEntry(IOAPIC, 3))], X86)
    assert t.irqchip_gsi(PIC_S, 11) == 20
    assert t.irqchip_gsi(PIC_S, 3) is None
    assert t.irqchip_gsi(IOAPIC, 3) == 21
    assert t.irqchip_gsi(PIC_M, 3) is None


def test_irqchip_gsi_last_entry_for_a_pin_wins():
    t = GsiRoutingTable.build([(1, IrqchipEntry(IOAPIC, 5)), (2, IrqchipEntry(IOAPIC, 5))], X86)
    assert t.irqchip_gsi(IOAPIC, 5) == 2


def test_4096_entries_are_accepted():
    t = GsiRoutingTable.build([(g, MsiEntry(0xFEE00000)) for g in range(4096)], X86)
    assert len(t) == 4096 and t.nr_rt_entries == 4096


def test_4097_entries_are_einval():
    pairs = [(g, IrqchipEntry(IOAPIC, 0)) for g in range(4096)] * 2
    einval(GsiRoutingTable.build, pairs[:4097], X86, match="4097")


def test_gsi_4095_is_accepted_and_4096_is_einval():
    assert GsiRoutingTable.build([(4095, MsiEntry(0))], X86).nr_rt_entries == 4096
    einval(GsiRoutingTable.build, [(4096, MsiEntry(0))], X86, match="gsi 4096")


def test_negative_gsi_is_einval():
    einval(GsiRoutingTable.build, [(-1, MsiEntry(0))], X86)


def test_gsi_range_is_checked_before_any_entry():
    e = einval(GsiRoutingTable.build, [(1, IrqchipEntry(IOAPIC, 99)), (5000, MsiEntry(0))], X86)
    assert "gsi 5000" in str(e)


@pytest.mark.parametrize("pair", [("1", MsiEntry(0)), (1.0, MsiEntry(0)), (1, (2, 5)), (1, None)])
def test_build_with_non_entry_is_type_error(pair):
    with pytest.raises(TypeError):
        GsiRoutingTable.build([pair], X86)


def test_same_irqchip_twice_on_a_gsi_is_einval():
    einval(GsiRoutingTable.build, [(5, IrqchipEntry(IOAPIC, 5)), (5, IrqchipEntry(IOAPIC, 6))],
           X86, match="irqchip 2")


def test_different_irqchips_may_share_a_gsi():
    t = GsiRoutingTable.build([(5, IrqchipEntry(IOAPIC, 5)), (5, IrqchipEntry(PIC_M, 5)),
                               (5, IrqchipEntry(PIC_S, 5))], X86)
    assert len(t.entries_for(5)) == 3


@pytest.mark.parametrize("first,second", [
    (MsiEntry(0xFEE00000), IrqchipEntry(IOAPIC, 5)),
    (IrqchipEntry(IOAPIC, 5), MsiEntry(0xFEE00000)),
    (MsiEntry(0xFEE00000), MsiEntry(0xFEE00000, 0, 1)),
    (MsiEntry(0xFEE00000), MsiEntry(0xFEE00000)),
])
def test_non_irqchip_entry_must_be_alone_on_its_gsi(first, second):
    einval(GsiRoutingTable.build, [(5, first), (5, second)], X86, match="share")


def test_error_message_names_entry_index_and_gsi():
    e = einval(GsiRoutingTable.build,
               [(0, MsiEntry(0)), (1, MsiEntry(0)), (2, MsiEntry(0)),
                (5, IrqchipEntry(IOAPIC, 24))],
               X86)
    assert str(e) == "entry 3 (gsi 5): IOAPIC pin 24 out of range 0..23"


def test_arch_rules_apply_in_build():
    einval(GsiRoutingTable.build, [(1, IrqchipEntry(3, 0))], X86, match="unknown irqchip 3")
    assert len(GsiRoutingTable.build([(1, IrqchipEntry(0, 900))], Arm64Arch())) == 1


def test_table_is_immutable():
    t = GsiRoutingTable.build([(1, MsiEntry(0))], X86)
    with pytest.raises(AttributeError):
        t._entries = ()
    with pytest.raises(AttributeError):
        t.foo = 1
    with pytest.raises(AttributeError):
        del t._entries
    with pytest.raises(AttributeError):
        t.entries = ()


def test_failed_build_leaves_prior_table_unchanged():
    pairs = [(1, IrqchipEntry(IOAPIC, 1)), (2, MsiEntry(0xFEE00000))]
    t = GsiRoutingTable.build(pairs, X86)
    before = (t.entries, t.to_uapi(), t.nr_rt_entries, t.irqchip_gsi(IOAPIC, 1))
    bad = pairs + [(1, IrqchipEntry(IOAPIC, 2))]
    einval(GsiRoutingTable.build, bad, X86)
    einval(GsiRoutingTable.from_uapi, uapi.pack_routing(e.to_uapi(g) for g, e in bad), X86)
    assert (t.entries, t.to_uapi(), t.nr_rt_entries, t.irqchip_gsi(IOAPIC, 1)) == before
    assert len(pairs) == 2      # the caller's list is not consumed or modified either


def test_build_accepts_any_iterable_once():
    t = GsiRoutingTable.build(((g, IrqchipEntry(IOAPIC, g)) for g in range(3)), X86)
    assert t.gsis() == [0, 1, 2]


def test_tables_compare_by_content():
    a = GsiRoutingTable.build([(1, MsiEntry(0))], X86)
    b = GsiRoutingTable.build([(1, MsiEntry(0))], X86)
    assert a == b and hash(a) == hash(b)
    assert a != GsiRoutingTable.build([(1, MsiEntry(1))], X86)


# --- GsiRoutingTable.from_uapi --------------------------------------------------------------------
def test_to_uapi_from_uapi_roundtrip():
    pairs = [(0, IrqchipEntry(IOAPIC, 0)), (0, IrqchipEntry(PIC_M, 0)),
             (4095, MsiEntry(0xFEE01000, 0, 0x41, devid=3)), (7, MsiEntry(0xFEE00000))]
    t = GsiRoutingTable.build(pairs, X86)
    buf = t.to_uapi()
    assert isinstance(buf, bytearray) and len(buf) == 8 + 48 * 4
    assert struct.unpack_from("<II", buf) == (4, 0)
    assert GsiRoutingTable.from_uapi(buf, X86) == t
    assert GsiRoutingTable.from_uapi(bytes(buf), X86).entries == t.entries
    assert GsiRoutingTable.from_uapi(memoryview(buf), X86).entries == t.entries


def test_nr_zero_is_an_empty_table():
    assert len(GsiRoutingTable.from_uapi(bytes(8), X86)) == 0


@pytest.mark.parametrize("size", [0, 4, 7])
def test_short_header_is_efault(size):
    with pytest.raises(InvalidRouting) as ei:
        GsiRoutingTable.from_uapi(bytes(size), X86)
    assert ei.value.errno == errno.EFAULT


def test_buffer_short_of_nr_entries_is_efault():
    buf = uapi.pack_routing([IrqchipEntry(IOAPIC, 1).to_uapi(1)] * 2)
    for cut in (1, 48, len(buf) - 8):
        with pytest.raises(InvalidRouting) as ei:
            GsiRoutingTable.from_uapi(buf[:-cut], X86)
        assert ei.value.errno == errno.EFAULT


def test_short_buffer_with_bad_entry_is_efault_not_einval():
    buf = uapi.pack_routing([IrqchipEntry(IOAPIC, 99).to_uapi(1)] * 2)
    with pytest.raises(InvalidRouting) as ei:
        GsiRoutingTable.from_uapi(buf[:-1], X86)
    assert ei.value.errno == errno.EFAULT


def test_header_nr_above_4096_is_einval_even_with_short_buffer():
    einval(GsiRoutingTable.from_uapi, struct.pack("<II", 4097, 0), X86, match="4097")


def test_header_flags_are_einval_even_with_short_buffer():
    einval(GsiRoutingTable.from_uapi, struct.pack("<II", 2, 1), X86, match="flags")


def test_bytes_after_the_last_entry_are_ignored():
    buf = uapi.pack_routing([MsiEntry(0).to_uapi(1)]) + b"\xff" * 100
    assert len(GsiRoutingTable.from_uapi(buf, X86)) == 1


def test_from_uapi_sharing_check_comes_before_type_check():
    buf = uapi.pack_routing([MsiEntry(0).to_uapi(1), raw_entry(1, 99)])
    einval(GsiRoutingTable.from_uapi, buf, X86, match="share")


def test_from_uapi_flags_check_comes_before_sharing_check():
    buf = uapi.pack_routing([MsiEntry(0).to_uapi(1), raw_entry(1, 2, 2)])
    einval(GsiRoutingTable.from_uapi, buf, X86, match="flags")


def test_from_uapi_gsi_prepass_comes_before_entry_checks():
    buf = uapi.pack_routing([raw_entry(1, 99, 7), MsiEntry(0).to_uapi(4096)])
    einval(GsiRoutingTable.from_uapi, buf, X86, match="gsi 4096")


def test_from_uapi_message_names_entry_index_and_gsi():
    buf = uapi.pack_routing([MsiEntry(0).to_uapi(1), IrqchipEntry(PIC_S, 8).to_uapi(12)])
    e = einval(GsiRoutingTable.from_uapi, buf, X86)
    assert str(e) == "entry 1 (gsi 12): PIC slave pin 8 out of range 0..7"


# --- default routing ------------------------------------------------------------------------------
def test_x86_default_routing_matches_kvm_create_irqchip():
    t = default_routing(X86)
    assert len(t) == 40 and t.gsis() == list(range(24)) and t.nr_rt_entries == 24
    for g in range(8):
        assert t.entries_for(g) == (IrqchipEntry(IOAPIC, g), IrqchipEntry(PIC_M, g))
    for g in range(8, 16):
        assert t.entries_for(g) == (IrqchipEntry(IOAPIC, g), IrqchipEntry(PIC_S, g - 8))
    for g in range(16, 24):
        assert t.entries_for(g) == (IrqchipEntry(IOAPIC, g),)
    assert [t.irqchip_gsi(PIC_S, p) for p in range(8, 16)] == list(range(8, 16))
    assert [t.irqchip_gsi(PIC_M, p) for p in range(8)] == list(range(8))


def test_default_routing_of_split_irqchip_is_empty():
    assert len(default_routing(X86Arch(split_irqchip=True))) == 0


def test_arm64_default_routing_is_one_spi_per_gsi():
    t = default_routing(Arm64Arch(nr_spis=64))
    assert t.entries == tuple((i, IrqchipEntry(0, i)) for i in range(64))
    assert t.irqchip_gsi(0, 63) == 63


def test_entry_types_registry():
    assert ENTRY_TYPES == {1: IrqchipEntry, 2: MsiEntry, 4: HvSintEntry, 5: XenEvtchnEntry}
