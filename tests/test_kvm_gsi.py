"""The GSI allocator / table merger of the kvm backend (pure logic, no /dev/kvm)."""

import errno
import random

import pytest

from kvmirqfast.arch.x86 import X86Arch, msi_address, msi_data
from kvmirqfast.kvm_gsi import GsiAllocator, Move, RoutingTableFull
from kvmirqfast.routing import GsiRoutingTable, IrqchipEntry, MsiEntry

ARCH = X86Arch()


def msi(vector, dest=0):
    return MsiEntry(*msi_address(dest), msi_data(vector))


def table(pairs):
    return GsiRoutingTable.build(pairs, ARCH)


def parsed(alloc):
    """The merged table as KVM would parse it."""
    return GsiRoutingTable.from_uapi(alloc.table_bytes(), ARCH)


def test_direct_routes_take_the_highest_free_gsis():
    a = GsiAllocator()
    a.set_user_table(table(ARCH.default_routing_pairs()))
    assert [a.add(k, msi(0x40 + k)) for k in range(3)] == [4095, 4094, 4093]
    assert a.get(1).gsi == 4094 and a.get(1).entry == msi(0x41)
    assert a.route_count == 40 + 3
    assert parsed(a).entries == tuple(a.merged_pairs())
    a.check()


def test_merged_table_puts_direct_routes_first_so_user_gsi_keeps_the_chip_pin():
    a = GsiAllocator()
    a.set_user_table(table([(5, IrqchipEntry(2, 5))]))
    a.add("d", IrqchipEntry(2, 5))
    t = parsed(a)
    assert t.entries[0] == (4095, IrqchipEntry(2, 5))
    assert t.irqchip_gsi(2, 5) == 5              # KVM's last-wins chip map: the user's GSI


def test_tail_routes_go_after_the_user_entries_and_take_the_chip_pin():
    a = GsiAllocator()
    a.set_user_table(table([(5, IrqchipEntry(2, 5))]))
    a.add("plain", msi(0x40))
    a.add("resampling", IrqchipEntry(2, 5), tail=True)
    t = parsed(a)
    assert [g for g, _ in t.entries] == [4095, 5, 4094]
    assert t.irqchip_gsi(2, 5) == 4094
    a.remove("plain")
    a.modify("resampling", IrqchipEntry(2, 6))
    a.check()
    assert parsed(a).entries == ((5, IrqchipEntry(2, 5)), (4094, IrqchipEntry(2, 6)))


def test_user_table_claiming_a_direct_gsi_moves_the_route():
    a = GsiAllocator()
    for k in range(3):
        a.add(k, msi(0x40 + k))                  # 4095, 4094, 4093
    moves = a.set_user_table(table([(4094, msi(0x70)), (7, msi(0x71))]))
    assert moves == [Move(1, 4094, 4092)]
    assert a.get(1) == (4092, msi(0x41))
    assert a.get(0).gsi == 4095 and a.get(2).gsi == 4093
    merged = dict(parsed(a).entries)
    assert merged[4094] == msi(0x70) and merged[4092] == msi(0x41)
    a.check()
    # The user gives the GSI back: nothing moves, the GSI is free again.
    assert a.set_user_table(table([])) == []
    assert a.add(9, msi(0x49)) == 4094
    a.check()


def test_full_table_raises_einval_and_changes_nothing():
    a = GsiAllocator(max_routes=8)
    a.set_user_table(table([(0, msi(0x30)), (1, msi(0x31)), (1 + 1, IrqchipEntry(2, 2)),
                            (2, IrqchipEntry(0, 2)), (3, msi(0x33))]))       # 5 entries
    for k in range(3):
        a.add(k, msi(0x40 + k))
    before = bytes(a.table_bytes())
    with pytest.raises(RoutingTableFull) as ei:
        a.add(3, msi(0x43))
    assert ei.value.errno == errno.EINVAL
    assert "full" in str(ei.value) and "8" in str(ei.value)
    assert bytes(a.table_bytes()) == before and 3 not in a and len(a) == 3
    a.check()
    with pytest.raises(RoutingTableFull):
        a.set_user_table(table([(g, msi(0x50 + g)) for g in range(6)]))
    assert bytes(a.table_bytes()) == before
    a.remove(0)
    assert a.add(3, msi(0x43)) == 7
    a.check()


def test_gsis_exhausted_by_legacy_irqfds_is_full_too():
    a = GsiAllocator(max_routes=4)
    for g in range(3):
        assert a.reserve_legacy(g) == []         # irqfds on GSIs without routes
    a.add("x", msi(0x40))                         # GSI 3
    with pytest.raises(RoutingTableFull) as ei:
        a.add("y", msi(0x41))
    assert ei.value.errno == errno.EINVAL and "GSI" in str(ei.value)
    with pytest.raises(RoutingTableFull):
        a.reserve_legacy(3)                       # would have to move "x", nowhere to go
    assert a.get("x").gsi == 3
    a.check()
    a.release_legacy(1)
    assert a.reserve_legacy(3) == [Move("x", 3, 1)]
    a.check()


def test_legacy_reservation_outside_the_table_reserves_nothing():
    a = GsiAllocator()
    assert a.reserve_legacy(5000) == []
    a.release_legacy(5000)
    a.check()


def test_remove_and_modify_keep_packed_table_in_step():
    a = GsiAllocator()
    for k in range(5):
        a.add(k, msi(0x40 + k))
    a.remove(1)
    a.modify(4, msi(0x99, dest=1))
    a.check()
    assert sorted(parsed(a).entries) == sorted(a.merged_pairs())
    assert dict(a.merged_pairs())[a.get(4).gsi] == msi(0x99, dest=1)
    with pytest.raises(KeyError):
        a.remove(1)
    with pytest.raises(KeyError):
        a.add(0, msi(0x20))


def test_snapshot_restore():
    a = GsiAllocator()
    a.add("a", msi(0x40))
    snap = a.snapshot()
    before = bytes(a.table_bytes())
    a.set_user_table(table([(4095, msi(0x41))]))
    a.reserve_legacy(4094)
    a.restore(snap)
    assert bytes(a.table_bytes()) == before and a.get("a").gsi == 4095
    a.check()


def test_random_operations_keep_invariants():
    rnd = random.Random(7)
    a = GsiAllocator(max_routes=64)
    keys = set()
    legacy = []
    for step in range(3000):
        op = rnd.random()
        try:
            if op < 0.35:
                k = step
                a.add(k, msi(0x20 + step % 200), tail=rnd.random() < 0.3)
                keys.add(k)
            elif op < 0.55 and keys:
                k = rnd.choice(sorted(keys))
                a.remove(k)
                keys.discard(k)
            elif op < 0.65 and keys:
                a.modify(rnd.choice(sorted(keys)), msi(0x30 + step % 100))
            elif op < 0.75:
                gsis = rnd.sample(range(64), rnd.randint(0, 20))
                a.set_user_table(table([(g, msi(0x40)) for g in gsis]))
            elif op < 0.85:
                g = rnd.randrange(64)
                a.reserve_legacy(g)
                legacy.append(g)
            elif legacy:
                a.release_legacy(legacy.pop(rnd.randrange(len(legacy))))
        except RoutingTableFull:
            pass
        if step % 50 == 0:
            a.check()
            t = parsed(a)
            user = set(a.user_table.gsis())
            direct = [a.get(k).gsi for k in keys]
            assert len(set(direct)) == len(direct) and not user & set(direct)
            assert len(t) == a.route_count <= 64
    a.check()
