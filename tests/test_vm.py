"""The Python API of kvmirqfast.Vm / Vcpu: legacy and direct irqfds, routing, delivery, lifetime.

Every test asserts an observable outcome: which vCPU's IRR holds which vector, the eventfd
counter, an errno, the IOAPIC's line/remote-IRR state, a resamplefd's counter, the process's
threads and fds.  Asynchronous delivery is waited for with short polling timeouts.
"""

import errno
import os
import threading

import pytest

import kvmirqfast
from kvmirqfast import InvalidRouting, IrqchipEntry, MsiEntry, Vm, msi_address, msi_data, uapi
from helpers_irqfd import (WAIT, clear_irr, count, drain_vcpu, fdinfo_count, fds, lapic_tmr,  # noqa: F401
                           native_threads, open_fds, run_thread, set_ldr, stays, wait_until)

IOAPIC = uapi.KVM_IRQCHIP_IOAPIC


def msi(dest, vector, logical=False, level=False, dm=0):
    return MsiEntry(*msi_address(dest, logical), msi_data(vector, dm, level))


@pytest.fixture
def vm():
    v = Vm(irqchip=True)
    yield v
    v.close()


@pytest.fixture
def cpus(vm):
    return [vm.create_vcpu(i) for i in range(4)]


def pendings(cpus):
    return [c.pending() for c in cpus]


def expect(cpus, want):
    """Wait until the vCPUs' IRRs are exactly ``want`` ({index: [vectors]}), then assert it."""
    target = [sorted(want.get(i, [])) for i in range(len(cpus))]
    wait_until(lambda: pendings(cpus) == target)
    assert pendings(cpus) == target


def engine_events(vm, n):
    """Wait until the engine has taken at least ``n`` eventfd wakeups (batch published)."""
    return wait_until(lambda: vm.stats()["events"] >= n)


# --- construction, irqchip, vCPUs ---------------------------------------------------------------
class TestLifecycle:
    def test_irqfd_before_irqchip_is_einval(self, fds):
        with Vm() as vm:
            with pytest.raises(OSError) as ei:
                vm.irqfd(fds.eventfd(), 1)
            assert ei.value.errno == errno.EINVAL
            with pytest.raises(OSError) as ei:
                vm.irqfd_direct(fds.eventfd(), msi(0, 0x40))
            assert ei.value.errno == errno.EINVAL
            assert vm.irqfd_count() == 0

    def test_deassign_before_irqchip_is_not_an_error(self, fds):
        with Vm() as vm:
            assert vm.irqfd_deassign(fds.eventfd(), 1) is False

    def test_routing_msi_and_line_need_irqchip(self):
        with Vm() as vm:
            with pytest.raises(OSError) as ei:
                vm.set_gsi_routing([])
            assert ei.value.errno == errno.EINVAL
            with pytest.raises(OSError) as ei:
                vm.signal_msi(*msi_address(0), msi_data(0x40))
            assert ei.value.errno == errno.EINVAL
            with pytest.raises(OSError) as ei:
                vm.irq_line(4, 1)
            assert ei.value.errno == errno.ENXIO

    def test_create_irqchip_twice_is_eexist(self, vm):
        with pytest.raises(OSError) as ei:
            vm.create_irqchip()
        assert ei.value.errno == errno.EEXIST

    def test_create_irqchip_after_vcpu_is_einval(self):
        with Vm() as vm:
            vm.create_vcpu(0)
            with pytest.raises(OSError) as ei:
                vm.create_irqchip()
            assert ei.value.errno == errno.EINVAL
            assert not vm.has_irqchip

    def test_vcpu_ids(self, vm):
        vm.create_vcpu(0)
        with pytest.raises(OSError) as ei:
            vm.create_vcpu(0)
        assert ei.value.errno == errno.EEXIST
        with pytest.raises(OSError) as ei:
            vm.create_vcpu(5000)
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(TypeError):
            vm.create_vcpu("1")
        assert sorted(vm.vcpus) == [0]

    def test_default_routing_is_installed_by_create_irqchip(self, vm):
        gsis = vm.gsi_routing.gsis()
        assert gsis == list(range(24))
        assert IrqchipEntry(IOAPIC, 20) in vm.gsi_routing.entries_for(20)

    def test_operations_on_closed_vm_raise(self, fds):
        vm = Vm(irqchip=True)
        vm.close()
        vm.close()                                   # idempotent
        assert vm.closed
        with pytest.raises(ValueError):
            vm.irqfd(fds.eventfd(), 1)
        with pytest.raises(ValueError):
            vm.irqfd_direct(fds.eventfd(), msi(0, 0x40))
        with pytest.raises(ValueError):
            vm.set_gsi_routing([])


# --- MSI delivery through a legacy irqfd ---------------------------------------------------------
class TestLegacyMsi:
    @pytest.mark.parametrize("dest", [0, 1, 2, 3])
    def test_physical_destination(self, vm, cpus, fds, dest):
        vector = 0x40 + dest * 0x11
        vm.set_gsi_routing([(40, msi(dest, vector))])
        efd = fds.eventfd()
        vm.irqfd(efd, 40)
        os.eventfd_write(efd, 1)
        expect(cpus, {dest: [vector]})
        assert cpus[dest].ack() == vector
        assert cpus[dest].in_service() == [vector]

    def test_logical_flat_destination_after_set_lapic_ldr(self, vm, cpus, fds):
        for i, c in enumerate(cpus):
            set_ldr(c, 1 << i)
        vm.set_gsi_routing([(7, msi(0b0101, 0x66, logical=True))])
        efd = fds.eventfd()
        vm.irqfd(efd, 7)
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [0x66], 2: [0x66]})

    def test_logical_destination_matches_nobody_without_ldr(self, vm, cpus, fds):
        vm.set_gsi_routing([(7, msi(0b0001, 0x66, logical=True))])
        efd = fds.eventfd()
        vm.irqfd(efd, 7)
        os.eventfd_write(efd, 1)
        assert wait_until(lambda: count(efd) == 0)
        engine_events(vm, 1)
        assert pendings(cpus) == [[], [], [], []]
        assert vm.stats()["no_target"] == 1

    def test_broadcast_reaches_every_vcpu(self, vm, cpus, fds):
        vm.set_gsi_routing([(3, msi(0xFF, 0x77))])
        efd = fds.eventfd()
        vm.irqfd(efd, 3)
        os.eventfd_write(efd, 1)
        expect(cpus, {i: [0x77] for i in range(4)})

    def test_software_disabled_lapic_drops_fixed_interrupts(self, vm, fds):
        on = vm.create_vcpu(0)
        off = vm.create_vcpu(1, lapic_enabled=False)
        vm.set_gsi_routing([(3, msi(0xFF, 0x77))])
        efd = fds.eventfd()
        vm.irqfd(efd, 3)
        os.eventfd_write(efd, 1)
        assert wait_until(lambda: on.pending() == [0x77])
        engine_events(vm, 1)
        assert off.pending() == []

    def test_level_triggered_msi_sets_tmr(self, vm, cpus, fds):
        vm.set_gsi_routing([(1, msi(1, 0x90, level=True)), (2, msi(1, 0x91))])
        e1, e2 = fds.eventfd(), fds.eventfd()
        vm.irqfd(e1, 1)
        vm.irqfd(e2, 2)
        os.eventfd_write(e1, 1)
        os.eventfd_write(e2, 1)
        expect(cpus, {1: [0x90, 0x91]})
        assert lapic_tmr(cpus[1]) == [0x90]

    def test_low_vectors_are_set_in_irr(self, vm, cpus, fds):
        vm.set_gsi_routing([(1, msi(0, 5))])
        efd = fds.eventfd()
        vm.irqfd(efd, 1)
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [5]})

    def test_delivery_consumes_the_eventfd_counter(self, vm, cpus, fds):
        vm.set_gsi_routing([(9, msi(2, 0x52))])
        efd = fds.eventfd()
        vm.irqfd(efd, 9)
        os.eventfd_write(efd, 5)
        expect(cpus, {2: [0x52]})
        assert wait_until(lambda: fdinfo_count(efd) == 0)
        assert fdinfo_count(efd) == 0

    def test_semaphore_eventfd_gives_up_one_count_per_wakeup(self, vm, cpus, fds):
        # eventfd_ctx_do_read takes 1 from an EFD_SEMAPHORE eventfd: 3 written, 2 left.
        vm.set_gsi_routing([(9, msi(2, 0x52))])
        efd = fds.eventfd(flags=os.EFD_SEMAPHORE)
        vm.irqfd(efd, 9)
        os.eventfd_write(efd, 3)
        expect(cpus, {2: [0x52]})
        engine_events(vm, 1)
        assert stays(lambda: fdinfo_count(efd) == 2)

    def test_every_write_is_delivered_again_after_eoi(self, vm, cpus, fds):
        vm.set_gsi_routing([(9, msi(0, 0x52))])
        efd = fds.eventfd()
        vm.irqfd(efd, 9)
        for _ in range(20):
            os.eventfd_write(efd, 1)
            assert cpus[0].wait_interrupt(timeout=WAIT)
            assert cpus[0].ack() == 0x52
            assert cpus[0].eoi() == 0x52
        assert cpus[0].pending() == []
        assert wait_until(lambda: vm.stats()["delivered"] == 20)

    def test_event_pending_at_assign_is_delivered_and_not_consumed(self, vm, cpus, fds):
        vm.set_gsi_routing([(9, msi(3, 0x59))])
        efd = fds.eventfd()
        os.eventfd_write(efd, 1)
        vm.irqfd(efd, 9)
        expect(cpus, {3: [0x59]})
        assert stays(lambda: fdinfo_count(efd) == 1)
        # A later write is a new event: consumed and delivered.
        drain_vcpu(cpus[3])
        os.eventfd_write(efd, 1)
        expect(cpus, {3: [0x59]})
        assert wait_until(lambda: fdinfo_count(efd) == 0)

    def test_msi_to_a_gsi_shared_by_nobody_else(self, vm, cpus, fds):
        # Two irqfds on two GSIs with different routes: each goes where its GSI says.
        vm.set_gsi_routing([(100, msi(0, 0x41)), (101, msi(1, 0x42))])
        a, b = fds.eventfd(), fds.eventfd()
        vm.irqfd(a, 100)
        vm.irqfd(b, 101)
        os.eventfd_write(b, 1)
        expect(cpus, {1: [0x42]})
        os.eventfd_write(a, 1)
        expect(cpus, {0: [0x41], 1: [0x42]})

    def test_two_irqfds_on_one_gsi_both_deliver(self, vm, cpus, fds):
        vm.set_gsi_routing([(100, msi(0, 0x41))])
        a, b = fds.eventfd(), fds.eventfd()
        vm.irqfd(a, 100)
        vm.irqfd(b, 100)
        os.eventfd_write(b, 1)
        expect(cpus, {0: [0x41]})
        drain_vcpu(cpus[0])
        os.eventfd_write(a, 1)
        expect(cpus, {0: [0x41]})


# --- the vCPU side: ack, eoi, priority, waiting --------------------------------------------------
class TestVcpu:
    def fire(self, vm, cpu, vectors, fds):
        for v in vectors:
            vm.signal_msi(*msi_address(cpu.id), msi_data(v))

    def test_ack_takes_the_highest_vector_and_eoi_ends_it(self, vm, cpus, fds):
        c = cpus[0]
        self.fire(vm, c, [0x41, 0x81, 0x45], fds)
        assert c.pending() == [0x41, 0x45, 0x81]
        assert c.ack() == 0x81
        # 0x4x is a lower priority class than 0x81 in service: nothing deliverable.
        assert c.ack() is None
        assert not c.wait_interrupt(timeout=0.01)
        assert c.eoi() == 0x81
        assert c.ack() == 0x45
        assert c.ack() is None                       # same class as 0x45 in service
        assert c.eoi() == 0x45
        assert c.ack() == 0x41
        assert c.eoi() == 0x41
        assert c.eoi() is None
        assert c.pending() == [] and c.in_service() == []

    def test_higher_class_preempts_while_lower_in_service(self, vm, cpus, fds):
        c = cpus[0]
        self.fire(vm, c, [0x41], fds)
        assert c.ack() == 0x41
        self.fire(vm, c, [0x91], fds)
        assert c.wait_interrupt(timeout=0)
        assert c.ack() == 0x91
        assert c.in_service() == [0x41, 0x91]
        assert c.eoi() == 0x91                       # EOI ends the highest in service
        assert c.eoi() == 0x41

    def test_wait_interrupt_times_out_when_nothing_pending(self, vm, cpus):
        assert cpus[0].wait_interrupt(timeout=0.02) is False

    def test_wait_interrupt_wakes_a_blocked_vcpu_thread(self, vm, cpus, fds):
        vm.set_gsi_routing([(5, msi(2, 0x99))])
        efd = fds.eventfd()
        vm.irqfd(efd, 5)
        started = threading.Event()

        def vcpu_thread():
            started.set()
            ok = cpus[2].wait_interrupt(timeout=10)
            return ok, cpus[2].ack()

        t, out = run_thread(vcpu_thread)
        assert started.wait(WAIT)
        assert stays(t.is_alive, 0.05)               # it is blocked, not returning early
        os.eventfd_write(efd, 1)
        t.join(WAIT)
        assert not t.is_alive()
        assert out.get("value") == (True, 0x99)

    def test_wait_interrupt_with_polling(self, vm, cpus, fds):
        vm.poll_ns = 200_000
        vm.set_gsi_routing([(5, msi(0, 0x99))])
        efd = fds.eventfd()
        vm.irqfd(efd, 5)
        os.eventfd_write(efd, 1)
        assert cpus[0].wait_interrupt(timeout=WAIT, poll_ns=100_000)
        assert cpus[0].pending() == [0x99]

    def test_close_wakes_a_blocked_vcpu(self, fds):
        vm = Vm(irqchip=True)
        c = vm.create_vcpu(0)
        t, out = run_thread(c.wait_interrupt, 30)
        assert stays(t.is_alive, 0.05)
        vm.close()
        t.join(WAIT)
        assert not t.is_alive()
        assert out.get("value") is False

    def test_signal_msi_returns_how_many_lapics_accepted(self, vm, fds):
        cs = [vm.create_vcpu(i) for i in range(3)]
        off = vm.create_vcpu(3, lapic_enabled=False)
        assert vm.signal_msi(*msi_address(1), msi_data(0x30)) == 1
        assert vm.signal_msi(*msi_address(0xFF), msi_data(0x31)) == 3
        assert vm.signal_msi(*msi_address(9), msi_data(0x32)) == 0       # no such APIC ID
        assert vm.signal_msi(*msi_address(3), msi_data(0x33)) == 0       # disabled LAPIC
        assert [c.pending() for c in cs] == [[0x31], [0x30, 0x31], [0x31]]
        assert off.pending() == []

    def test_lowest_priority_physical_broadcast_goes_to_every_vcpu(self, vm, cpus):
        # KVM turns a physical-broadcast lowest-priority interrupt into a fixed one (verified
        # on /dev/kvm by test_irqfd_vs_kvm.py::lowest_priority_broadcast).
        assert vm.signal_msi(*msi_address(0xFF), msi_data(0x40, delivery_mode=1)) == 4
        assert pendings(cpus) == [[0x40]] * 4

    def test_lowest_priority_logical_picks_by_destination_bit(self, vm):
        # Vector hashing indexes the set bits of the logical destination: vector % 2 == 0 picks
        # logical bit 0, whoever was created first (test_irqfd_vs_kvm.py checks it on /dev/kvm).
        a, b = vm.create_vcpu(0), vm.create_vcpu(1)
        set_ldr(a, 0b10)
        set_ldr(b, 0b01)
        vm.signal_msi(*msi_address(0b11, logical=True), msi_data(0x40, delivery_mode=1))
        vm.signal_msi(*msi_address(0b11, logical=True), msi_data(0x41, delivery_mode=1))
        assert (a.pending(), b.pending()) == ([0x41], [0x40])

    def test_nmi_msi_is_pending_as_nmi_not_in_irr(self, vm, cpus, fds):
        vm.set_gsi_routing([(5, msi(1, 0, dm=4))])
        efd = fds.eventfd()
        vm.irqfd(efd, 5)
        os.eventfd_write(efd, 1)
        assert wait_until(lambda: cpus[1].lapic.nmi_pending == 1)
        assert cpus[1].take_nmi() is True
        assert cpus[1].take_nmi() is False
        assert pendings(cpus) == [[], [], [], []]


# --- routing changes and legacy irqfds -----------------------------------------------------------
class TestRouting:
    def test_routing_change_retargets_an_existing_irqfd(self, vm, cpus, fds):
        vm.set_gsi_routing([(50, msi(0, 0x41))])
        efd = fds.eventfd()
        vm.irqfd(efd, 50)
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [0x41]})
        vm.set_gsi_routing([(50, msi(3, 0x43))])
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [0x41], 3: [0x43]})

    def test_event_written_before_the_change_goes_to_the_old_route(self, vm, cpus, fds):
        # set_gsi_routing's contract: a write made before the call is delivered with the old
        # route by the time the call returns; nothing of it reaches the new route.
        targets = [(0, 0x41), (1, 0x42), (2, 0x43)]
        vm.set_gsi_routing([(50, msi(*targets[0]))])
        efd = fds.eventfd()
        vm.irqfd(efd, 50)
        for i in range(60):
            old, new = targets[i % 3], targets[(i + 1) % 3]
            os.eventfd_write(efd, 1)
            vm.set_gsi_routing([(50, msi(*new))])
            assert pendings(cpus) == [[old[1]] if c == old[0] else [] for c in range(4)], i
            clear_irr(cpus[old[0]])
        assert stays(lambda: pendings(cpus) == [[], [], [], []])

    def test_gsi_without_route_delivers_nothing_until_a_route_appears(self, vm, cpus, fds):
        vm.set_gsi_routing([])
        efd = fds.eventfd()
        vm.irqfd(efd, 60)
        os.eventfd_write(efd, 1)
        assert wait_until(lambda: fdinfo_count(efd) == 0)     # consumed, as KVM's wakeup does
        assert stays(lambda: pendings(cpus) == [[], [], [], []])
        vm.set_gsi_routing([(60, msi(1, 0x61))])
        assert stays(lambda: pendings(cpus) == [[], [], [], []])   # the old event is gone
        os.eventfd_write(efd, 1)
        expect(cpus, {1: [0x61]})

    def test_removing_the_route_stops_delivery(self, vm, cpus, fds):
        vm.set_gsi_routing([(60, msi(1, 0x61))])
        efd = fds.eventfd()
        vm.irqfd(efd, 60)
        vm.set_gsi_routing([(61, msi(1, 0x62))])
        os.eventfd_write(efd, 1)
        assert wait_until(lambda: fdinfo_count(efd) == 0)
        assert stays(lambda: pendings(cpus) == [[], [], [], []])

    def test_set_gsi_routing_replaces_the_whole_table(self, vm, cpus):
        vm.ioapic.set_redirection(5, 0x35)
        assert vm.irq_line(5, 1) >= 1 and cpus[0].pending() == [0x35]
        vm.irq_line(5, 0)
        vm.set_gsi_routing([(100, msi(0, 0x41))])
        assert vm.irq_line(5, 1) == -1                 # GSI 5 has no route any more
        assert list(vm.gsi_routing.entries) == [(100, msi(0, 0x41))]

    def test_rejected_table_leaves_the_old_one_in_force(self, vm, cpus, fds):
        good = [(50, msi(0, 0x41))]
        vm.set_gsi_routing(good)
        efd = fds.eventfd()
        vm.irqfd(efd, 50)
        before = vm.gsi_routing
        bad_tables = [
            [(50, msi(1, 0x42)), (50, msi(2, 0x43))],          # two MSIs on one GSI
            [(50, msi(1, 0x42)), (4096, msi(2, 0x43))],        # gsi out of range
            [(50, msi(1, 0x42)), (51, IrqchipEntry(IOAPIC, 24))],   # no such pin
            [(50, msi(1, 0x42)), (51, IrqchipEntry(7, 0))],          # no such irqchip
            [(g, msi(1, 0x42)) for g in range(4097)],          # too many entries
        ]
        for bad in bad_tables:
            with pytest.raises(InvalidRouting) as ei:
                vm.set_gsi_routing(bad)
            assert ei.value.errno == errno.EINVAL
            assert vm.gsi_routing is before
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [0x41]})

    def test_bad_routing_types_are_typeerrors_and_change_nothing(self, vm):
        before = vm.gsi_routing
        for bad in ([("1", msi(0, 1))], [(1, (0xFEE00000, 0, 0x41))], [(1.0, msi(0, 1))]):
            with pytest.raises(TypeError):
                vm.set_gsi_routing(bad)
        assert vm.gsi_routing is before

    def test_irq_line_on_an_msi_gsi_delivers(self, vm, cpus):
        vm.set_gsi_routing([(70, msi(2, 0x72))])
        assert vm.irq_line(70, 1) == 1
        assert vm.irq_line(70, 0) == -1
        assert vm.irq_line(71, 1) == -1
        assert pendings(cpus) == [[], [], [0x72], []]


# --- IOAPIC pins, edge and level, and resampling -------------------------------------------------
class TestIoapicIrqfd:
    def test_edge_pin_via_irqfd_with_default_routing(self, vm, cpus, fds):
        vm.ioapic.set_redirection(18, 0x58, dest_id=1)
        efd = fds.eventfd()
        vm.irqfd(efd, 18)
        os.eventfd_write(efd, 1)
        expect(cpus, {1: [0x58]})
        assert vm.ioapic.line_level(18) is False      # irqfd pulses the line: 1 then 0
        drain_vcpu(cpus[1])
        os.eventfd_write(efd, 1)
        expect(cpus, {1: [0x58]})

    def test_edge_pin_below_16_also_reaches_the_ioapic(self, vm, cpus, fds):
        vm.ioapic.set_redirection(4, 0x34, dest_id=2)
        efd = fds.eventfd()
        vm.irqfd(efd, 4)
        os.eventfd_write(efd, 1)
        expect(cpus, {2: [0x34]})

    def test_masked_pin_delivers_nothing(self, vm, cpus, fds):
        vm.ioapic.set_redirection(19, 0x59, dest_id=0, masked=True)
        efd = fds.eventfd()
        vm.irqfd(efd, 19)
        os.eventfd_write(efd, 1)
        assert wait_until(lambda: fdinfo_count(efd) == 0)
        assert stays(lambda: pendings(cpus) == [[], [], [], []])

    def test_level_pin_with_resamplefd(self, vm, cpus, fds):
        io = vm.ioapic
        io.set_redirection(20, 0x60, dest_id=0, level_trigger=True)
        efd, rfd = fds.eventfd(), fds.eventfd()
        vm.irqfd(efd, 20, resamplefd=rfd)
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [0x60]})
        assert lapic_tmr(cpus[0]) == [0x60]
        # Asserted until the guest EOIs it.
        assert io.line_level(20) is True
        assert io.redirection(20).remote_irr is True
        # A second event while remote IRR is set delivers nothing more.
        os.eventfd_write(efd, 1)
        assert wait_until(lambda: fdinfo_count(efd) == 0)
        assert cpus[0].ack() == 0x60
        assert stays(lambda: cpus[0].pending() == [])
        assert fdinfo_count(rfd) == 0
        assert cpus[0].eoi() == 0x60
        # EOI: line lowered, remote IRR cleared, resamplefd signalled, nothing re-delivered.
        assert wait_until(lambda: fdinfo_count(rfd) == 1)
        assert io.line_level(20) is False
        assert io.redirection(20).remote_irr is False
        assert stays(lambda: cpus[0].pending() == [])
        # The device re-asserts: delivered again.
        os.read(rfd, 8)
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [0x60]})
        assert io.line_level(20) is True

    def test_deassigning_the_last_resampler_lowers_the_line(self, vm, cpus, fds):
        io = vm.ioapic
        io.set_redirection(21, 0x61, level_trigger=True)
        efd, rfd = fds.eventfd(), fds.eventfd()
        vm.irqfd(efd, 21, resamplefd=rfd)
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [0x61]})
        assert io.line_level(21) is True
        assert vm.irqfd_deassign(efd, 21) is True
        assert io.line_level(21) is False

    def test_resampler_shared_by_two_irqfds_on_one_gsi(self, vm, cpus, fds):
        io = vm.ioapic
        io.set_redirection(22, 0x62, level_trigger=True)
        e1, r1, e2, r2 = fds.eventfd(), fds.eventfd(), fds.eventfd(), fds.eventfd()
        vm.irqfd(e1, 22, resamplefd=r1)
        vm.irqfd(e2, 22, resamplefd=r2)
        os.eventfd_write(e1, 1)
        expect(cpus, {0: [0x62]})
        cpus[0].ack()
        cpus[0].eoi()
        assert wait_until(lambda: fdinfo_count(r1) == 1 and fdinfo_count(r2) == 1)
        assert vm.irqfd_deassign(e1, 22)
        assert io.line_level(22) is False
        os.eventfd_write(e2, 1)
        expect(cpus, {0: [0x62]})
        assert io.line_level(22) is True             # e2's resampler still holds it

    def test_resamplefd_errors(self, vm, fds):
        efd = fds.eventfd()
        r, _w = fds.pipe()
        with pytest.raises(OSError) as ei:
            vm.irqfd(efd, 20, resamplefd=fds.closed_fd())
        assert ei.value.errno == errno.EBADF
        with pytest.raises(OSError) as ei:
            vm.irqfd(efd, 20, resamplefd=r)
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(TypeError):
            vm.irqfd(efd, 20, resamplefd="3")
        assert vm.irqfd_count() == 0
        vm.irqfd(efd, 20)                           # nothing was left claimed


# --- irqfd errors and eventfd identity ------------------------------------------------------------
class TestIrqfdErrors:
    def test_closed_fd_is_ebadf(self, vm, fds):
        bad = fds.closed_fd()
        for call in (lambda: vm.irqfd(bad, 1), lambda: vm.irqfd_deassign(bad, 1),
                     lambda: vm.irqfd_direct(bad, msi(0, 0x40)),
                     lambda: vm.irqfd_direct_deassign(bad),
                     lambda: vm.irqfd_direct_modify(bad, msi(0, 0x40))):
            with pytest.raises(OSError) as ei:
                call()
            assert ei.value.errno == errno.EBADF

    def test_pipe_is_einval(self, vm, fds):
        r, w = fds.pipe()
        for fd in (r, w):
            with pytest.raises(OSError) as ei:
                vm.irqfd(fd, 1)
            assert ei.value.errno == errno.EINVAL
            with pytest.raises(OSError) as ei:
                vm.irqfd_direct(fd, msi(0, 0x40))
            assert ei.value.errno == errno.EINVAL

    @pytest.mark.parametrize("second", ["same_gsi", "other_gsi", "dup", "direct", "dup_direct"])
    def test_same_eventfd_twice_is_busy(self, vm, cpus, fds, second):
        vm.set_gsi_routing([(1, msi(0, 0x41)), (2, msi(1, 0x42))])
        efd = fds.eventfd()
        vm.irqfd(efd, 1)
        fd = fds.dup(efd) if second.startswith("dup") else efd
        with pytest.raises(OSError) as ei:
            if second.endswith("direct"):
                vm.irqfd_direct(fd, msi(1, 0x42))
            else:
                vm.irqfd(fd, 2 if second == "other_gsi" else 1)
        assert ei.value.errno == errno.EBUSY
        assert vm.irqfd_count() == 1
        os.eventfd_write(efd, 1)                     # the first binding is intact
        expect(cpus, {0: [0x41]})

    def test_direct_then_legacy_is_busy(self, vm, fds):
        efd = fds.eventfd()
        vm.irqfd_direct(efd, msi(0, 0x41))
        with pytest.raises(OSError) as ei:
            vm.irqfd(efd, 1)
        assert ei.value.errno == errno.EBUSY

    def test_same_eventfd_in_two_vms_is_busy(self, fds):
        efd = fds.eventfd()
        with Vm(irqchip=True) as a, Vm(irqchip=True) as b:
            ca = a.create_vcpu(0)
            cb = b.create_vcpu(0)
            a.irqfd_direct(efd, msi(0, 0x41))
            for call in (lambda: b.irqfd_direct(efd, msi(0, 0x42)), lambda: b.irqfd(efd, 1),
                         lambda: b.irqfd_direct(fds.dup(efd), msi(0, 0x42))):
                with pytest.raises(OSError) as ei:
                    call()
                assert ei.value.errno == errno.EBUSY
            assert a.irqfd_direct_deassign(efd)
            b.irqfd_direct(efd, msi(0, 0x42))
            with pytest.raises(OSError) as ei:           # now b's: a's deassign left no claim
                a.irqfd_direct(efd, msi(0, 0x41))
            assert ei.value.errno == errno.EBUSY
            os.eventfd_write(efd, 1)
            assert wait_until(lambda: cb.pending() == [0x42])
            assert stays(lambda: ca.pending() == [])

    def test_closing_a_vm_releases_its_eventfds(self, fds):
        efd = fds.eventfd()
        with Vm(irqchip=True) as a:
            a.irqfd_direct(efd, msi(0, 0x41))
        with Vm(irqchip=True) as b:
            c = b.create_vcpu(0)
            b.irqfd_direct(efd, msi(0, 0x42))
            os.eventfd_write(efd, 1)
            assert wait_until(lambda: c.pending() == [0x42])

    def test_deassign_of_unknown_pair_is_false(self, vm, fds):
        efd = fds.eventfd()
        assert vm.irqfd_deassign(efd, 3) is False
        vm.irqfd(efd, 3)
        assert vm.irqfd_deassign(efd, 4) is False    # right eventfd, wrong GSI
        assert vm.irqfd_count() == 1
        assert vm.irqfd_deassign(efd, 3) is True
        assert vm.irqfd_deassign(efd, 3) is False
        assert vm.irqfd_count() == 0

    def test_legacy_deassign_stops_delivery(self, vm, cpus, fds):
        vm.set_gsi_routing([(1, msi(0, 0x41))])
        efd = fds.eventfd()
        vm.irqfd(efd, 1)
        assert vm.irqfd_deassign(fds.dup(efd), 1) is True     # a dup names the same eventfd
        os.eventfd_write(efd, 1)
        assert stays(lambda: pendings(cpus) == [[], [], [], []])
        assert fdinfo_count(efd) == 1                # nobody consumes it any more

    def test_gsi_beyond_the_table_is_accepted(self, vm, fds):
        efd = fds.eventfd()
        vm.irqfd(efd, 5000)
        assert vm.irqfd_count() == 1
        assert vm.irqfd_deassign(efd, 5000) is True

    @pytest.mark.parametrize("bad", ["3", 3.0, None, True])
    def test_bad_eventfd_types(self, vm, bad):
        with pytest.raises(TypeError):
            vm.irqfd(bad, 1)
        with pytest.raises(TypeError):
            vm.irqfd_direct(bad, msi(0, 0x40))
        with pytest.raises(TypeError):
            vm.irqfd_deassign(bad, 1)
        with pytest.raises(TypeError):
            vm.irqfd_direct_deassign(bad)

    def test_bad_gsi_values(self, vm, fds):
        efd = fds.eventfd()
        with pytest.raises(TypeError):
            vm.irqfd(efd, "1")
        with pytest.raises(TypeError):
            vm.irqfd(efd, 1.0)
        for bad in (-1, 1 << 32):
            with pytest.raises(ValueError):
                vm.irqfd(efd, bad)
        assert vm.irqfd_count() == 0

    def test_bad_entries_change_nothing(self, vm, cpus, fds):
        efd = fds.eventfd()
        for bad in (IrqchipEntry(IOAPIC, 24), IrqchipEntry(0, 8), IrqchipEntry(3, 0)):
            with pytest.raises(InvalidRouting) as ei:
                vm.irqfd_direct(efd, bad)
            assert ei.value.errno == errno.EINVAL
        for bad in ((0xFEE00000, 0, 0x41), None, 0x41):
            with pytest.raises(TypeError):
                vm.irqfd_direct(efd, bad)
        with pytest.raises(ValueError):
            MsiEntry(-1)
        with pytest.raises(ValueError):
            MsiEntry(0xFEE00000, data=1 << 32)
        with pytest.raises(TypeError):
            IrqchipEntry("2", 1)
        assert vm.irqfd_count() == 0
        vm.irqfd_direct(efd, msi(0, 0x41))           # the eventfd was never claimed
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [0x41]})

    def test_bad_entry_on_modify_keeps_the_old_target(self, vm, cpus, fds):
        efd = fds.eventfd()
        vm.irqfd_direct(efd, msi(0, 0x41))
        with pytest.raises(InvalidRouting):
            vm.irqfd_direct_modify(efd, IrqchipEntry(IOAPIC, 99))
        with pytest.raises(TypeError):
            vm.irqfd_direct_modify(efd, "msi")
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [0x41]})


# --- eventfd lifetime: the irqfd follows the eventfd, not the fd number --------------------------
class TestEventfdIdentity:
    def test_irqfd_keeps_working_when_only_a_dup_is_left(self, vm, cpus, fds):
        # KVM holds the eventfd itself: closing the fd number the irqfd was assigned with, while
        # a dup() keeps the eventfd open, changes nothing.
        efd = fds.eventfd()
        vm.irqfd_direct(efd, msi(1, 0x41))
        keep = fds.dup(efd)
        fds.close(efd)
        os.eventfd_write(keep, 1)
        expect(cpus, {1: [0x41]})
        assert wait_until(lambda: fdinfo_count(keep) == 0)

    def test_legacy_irqfd_keeps_working_when_only_a_dup_is_left(self, vm, cpus, fds):
        vm.set_gsi_routing([(8, msi(2, 0x48))])
        efd = fds.eventfd()
        vm.irqfd(efd, 8)
        keep = fds.dup(efd)
        fds.close(efd)
        os.eventfd_write(keep, 1)
        expect(cpus, {2: [0x48]})

    def test_routing_change_never_reads_an_unrelated_eventfd(self, vm, cpus, fds):
        # The irqfd's eventfd is closed (KVM detaches it on hang-up); its fd number is reused by
        # an unrelated eventfd with a count.  A routing change must not consume that count or
        # deliver anything for it.
        vm.set_gsi_routing([(30, msi(0, 0x41))])
        efd = fds.eventfd()
        vm.irqfd(efd, 30)
        fds.close(efd)
        other = fds.eventfd()
        assert other == efd                          # the lowest free number is reused
        os.eventfd_write(other, 1)
        vm.set_gsi_routing([(30, msi(0, 0x42))])
        assert stays(lambda: pendings(cpus) == [[], [], [], []])
        assert fdinfo_count(other) == 1

    def test_closed_eventfd_can_be_replaced_by_a_new_one(self, vm, cpus, fds):
        vm.set_gsi_routing([(30, msi(0, 0x41))])
        efd = fds.eventfd()
        vm.irqfd(efd, 30)
        fds.close(efd)
        new = fds.eventfd()
        vm.irqfd(new, 30)                            # a new eventfd, not EBUSY
        os.eventfd_write(new, 1)
        expect(cpus, {0: [0x41]})

    def test_deassign_through_a_dup_after_closing_the_original_leaves_others_alone(self, vm,
                                                                                    cpus, fds):
        # Deassigning by a dup must not unregister whatever now sits on the old fd number.
        a = fds.eventfd()
        vm.irqfd_direct(a, msi(0, 0x41))
        keep = fds.dup(a)
        fds.close(a)
        b = fds.eventfd()
        assert b == a
        vm.irqfd_direct(b, msi(1, 0x42))
        assert vm.irqfd_direct_deassign(keep) is True
        os.eventfd_write(b, 1)
        expect(cpus, {1: [0x42]})


# --- direct irqfds ------------------------------------------------------------------------------
class TestDirect:
    def test_msi_delivery(self, vm, cpus, fds):
        efd = fds.eventfd()
        rec = vm.irqfd_direct(efd, msi(3, 0xA3))
        assert rec.direct and rec.entry == msi(3, 0xA3)
        os.eventfd_write(efd, 1)
        expect(cpus, {3: [0xA3]})
        assert wait_until(lambda: fdinfo_count(efd) == 0)

    def test_msi_with_devid_is_accepted_on_x86(self, vm, cpus, fds):
        efd = fds.eventfd()
        vm.irqfd_direct(efd, MsiEntry(*msi_address(2), msi_data(0xA2), devid=7))
        os.eventfd_write(efd, 1)
        expect(cpus, {2: [0xA2]})

    def test_ioapic_pin_entry(self, vm, cpus, fds):
        vm.set_gsi_routing([])                       # no GSI involved at all
        vm.ioapic.set_redirection(12, 0x4C, dest_id=3)
        efd = fds.eventfd()
        vm.irqfd_direct(efd, IrqchipEntry(IOAPIC, 12))
        os.eventfd_write(efd, 1)
        expect(cpus, {3: [0x4C]})

    def test_level_ioapic_pin_with_resamplefd(self, vm, cpus, fds):
        io = vm.ioapic
        io.set_redirection(17, 0x57, dest_id=1, level_trigger=True)
        efd, rfd = fds.eventfd(), fds.eventfd()
        vm.irqfd_direct(efd, IrqchipEntry(IOAPIC, 17), resamplefd=rfd)
        os.eventfd_write(efd, 1)
        expect(cpus, {1: [0x57]})
        assert io.line_level(17) is True
        assert cpus[1].ack() == 0x57
        assert cpus[1].eoi() == 0x57
        assert wait_until(lambda: fdinfo_count(rfd) == 1)
        assert io.line_level(17) is False
        assert stays(lambda: cpus[1].pending() == [])

    def test_resampling_irqfd_modified_to_another_pin_still_resamples(self, vm, cpus, fds):
        io = vm.ioapic
        io.set_redirection(17, 0x57, level_trigger=True)
        io.set_redirection(18, 0x58, level_trigger=True)
        efd, rfd = fds.eventfd(), fds.eventfd()
        vm.irqfd_direct(efd, IrqchipEntry(IOAPIC, 17), resamplefd=rfd)
        vm.irqfd_direct_modify(efd, IrqchipEntry(IOAPIC, 18))
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [0x58]})
        assert cpus[0].ack() == 0x58
        assert cpus[0].eoi() == 0x58
        # The EOI of the new line's vector must run the irqfd's resampler.
        assert wait_until(lambda: fdinfo_count(rfd) == 1)
        assert io.line_level(18) is False
        assert io.line_level(17) is False

    def test_modify_retargets(self, vm, cpus, fds):
        efd = fds.eventfd()
        vm.irqfd_direct(efd, msi(0, 0x41))
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [0x41]})
        drain_vcpu(cpus[0])
        vm.irqfd_direct_modify(efd, msi(2, 0x82))
        os.eventfd_write(efd, 1)
        expect(cpus, {2: [0x82]})
        assert stays(lambda: cpus[0].pending() == [])

    def test_modify_msi_to_ioapic_pin_and_back(self, vm, cpus, fds):
        vm.ioapic.set_redirection(13, 0x4D, dest_id=1)
        efd = fds.eventfd()
        vm.irqfd_direct(efd, msi(0, 0x41))
        vm.irqfd_direct_modify(efd, IrqchipEntry(IOAPIC, 13))
        os.eventfd_write(efd, 1)
        expect(cpus, {1: [0x4D]})
        vm.irqfd_direct_modify(efd, msi(3, 0x43))
        os.eventfd_write(efd, 1)
        expect(cpus, {1: [0x4D], 3: [0x43]})

    def test_old_target_gets_nothing_after_modify_returns(self, vm, cpus, fds):
        # A writer hammers the eventfd while the main thread retargets it.  Writes made before
        # modify returns may land on the old target; after it returns (and its IRR is cleared),
        # the old target never sees the old vector again.
        efd = fds.eventfd(flags=os.EFD_NONBLOCK)
        vm.irqfd_direct(efd, msi(0, 0x41))
        stop = threading.Event()

        def writer():
            n = 0
            while not stop.is_set():
                os.eventfd_write(efd, 1)
                n += 1
            return n

        t, out = run_thread(writer)
        try:
            assert wait_until(lambda: cpus[0].pending() == [0x41])
            vm.irqfd_direct_modify(efd, msi(1, 0x42))
            clear_irr(cpus[0])
            assert wait_until(lambda: cpus[1].pending() == [0x42])
            for _ in range(20):
                clear_irr(cpus[1])
                assert wait_until(lambda: cpus[1].pending() == [0x42])
            assert cpus[0].pending() == []
        finally:
            stop.set()
            t.join(WAIT)
        assert out.get("value", 0) > 0
        assert stays(lambda: cpus[0].pending() == [])

    def test_modify_of_unknown_or_legacy_eventfd_is_enoent(self, vm, fds):
        efd = fds.eventfd()
        with pytest.raises(OSError) as ei:
            vm.irqfd_direct_modify(efd, msi(0, 0x41))
        assert ei.value.errno == errno.ENOENT
        vm.irqfd(efd, 1)
        with pytest.raises(OSError) as ei:
            vm.irqfd_direct_modify(efd, msi(0, 0x41))
        assert ei.value.errno == errno.ENOENT
        assert vm.irqfd_direct_deassign(efd) is False         # a legacy irqfd is not direct
        assert vm.irqfd_count() == 1

    def test_deassign_by_eventfd_alone_stops_delivery(self, vm, cpus, fds):
        efd = fds.eventfd()
        vm.irqfd_direct(efd, msi(0, 0x41))
        assert vm.irqfd_direct_deassign(efd) is True
        assert vm.irqfd_direct_deassign(efd) is False
        os.eventfd_write(efd, 1)
        assert stays(lambda: pendings(cpus) == [[], [], [], []])
        assert fdinfo_count(efd) == 1
        assert vm.irqfd_count() == 0

    def test_deassign_through_a_dup(self, vm, cpus, fds):
        efd = fds.eventfd()
        vm.irqfd_direct(efd, msi(0, 0x41))
        assert vm.irqfd_direct_deassign(fds.dup(efd)) is True
        os.eventfd_write(efd, 1)
        assert stays(lambda: pendings(cpus) == [[], [], [], []])
        vm.irqfd_direct(efd, msi(1, 0x42))           # free to be assigned again
        os.eventfd_write(efd, 1)
        expect(cpus, {1: [0x42]})

    def test_legacy_deassign_does_not_touch_a_direct_irqfd(self, vm, cpus, fds):
        efd = fds.eventfd()
        vm.irqfd_direct(efd, msi(0, 0x41))
        assert vm.irqfd_deassign(efd, 0) is False
        os.eventfd_write(efd, 1)
        expect(cpus, {0: [0x41]})

    def test_direct_irqfd_ignores_routing_changes(self, vm, cpus, fds):
        efd = fds.eventfd()
        vm.irqfd_direct(efd, msi(1, 0x41))
        vm.set_gsi_routing([(0, msi(2, 0x42))])
        os.eventfd_write(efd, 1)
        expect(cpus, {1: [0x41]})

    def test_more_than_4096_direct_irqfds_while_a_4097_entry_table_is_refused(self, vm, cpus,
                                                                               fds):
        n = 5000
        efds = [fds.eventfd() for _ in range(n)]
        vectors = list(range(0x20, 0x100))           # 224 distinct vectors on vCPU 0
        for i, e in enumerate(efds):
            vm.irqfd_direct(e, msi(i % 4, vectors[(i // 4) % len(vectors)]))
        assert vm.irqfd_count() == n
        with pytest.raises(InvalidRouting) as ei:
            vm.set_gsi_routing([(g, msi(0, 0x41)) for g in range(4097)])
        assert ei.value.errno == errno.EINVAL
        vm.set_gsi_routing([(g, msi(0, 0x41)) for g in range(4096)])    # 4096 is fine
        # Fire every irqfd, in rounds where no two share a (vCPU, vector).
        per_round = 4 * len(vectors)
        for start in range(0, n, per_round):
            batch = range(start, min(n, start + per_round))
            want = {c: set() for c in range(4)}
            for i in batch:
                os.eventfd_write(efds[i], 1)
                want[i % 4].add(vectors[(i // 4) % len(vectors)])
            for c in range(4):
                assert wait_until(lambda: set(cpus[c].pending()) == want[c])
                assert set(cpus[c].pending()) == want[c]
                clear_irr(cpus[c])
        assert all(fdinfo_count(e) == 0 for e in efds[:50])


# --- lifetime: threads and fds --------------------------------------------------------------------
class TestClose:
    def test_close_leaves_no_threads_and_no_fds(self, fds):
        py_threads = set(threading.enumerate())
        tasks = native_threads()
        before = open_fds()
        vm = Vm(irqchip=True)
        cs = [vm.create_vcpu(i) for i in range(2)]
        vm.ioapic.set_redirection(20, 0x60, level_trigger=True)
        e = [os.eventfd(0) for _ in range(5)]
        vm.set_gsi_routing(list(vm.gsi_routing.entries) + [(30, msi(0, 0x41))])
        vm.irqfd(e[0], 30)
        vm.irqfd(e[1], 20, resamplefd=e[2])
        vm.irqfd_direct(e[3], msi(1, 0x42))
        vm.irqfd_direct(e[4], IrqchipEntry(IOAPIC, 20), resamplefd=e[2])
        for fd in (e[0], e[1], e[3]):
            os.eventfd_write(fd, 1)
        assert wait_until(lambda: cs[0].pending() == [0x41, 0x60] and cs[1].pending() == [0x42])
        assert native_threads() > tasks
        vm.close()
        for fd in e:
            os.close(fd)
        assert set(threading.enumerate()) == py_threads
        assert wait_until(lambda: native_threads() == tasks)
        assert open_fds() == before

    def test_close_with_writes_in_flight(self, fds):
        efds = [fds.eventfd(flags=os.EFD_NONBLOCK) for _ in range(8)]
        py_threads = set(threading.enumerate())
        vm = Vm(irqchip=True)
        vm.create_vcpu(0)
        vm.ioapic.set_redirection(16, 0x50)
        for i, e in enumerate(efds):
            if i % 2:
                vm.irqfd_direct(e, msi(0, 0x40 + i))
            else:
                vm.irqfd(e, 16)
        stop = threading.Event()

        def writer():
            while not stop.is_set():
                for e in efds:
                    os.eventfd_write(e, 1)

        t, _ = run_thread(writer)
        assert wait_until(lambda: vm.stats()["events"] > 100)
        vm.close()
        stop.set()
        t.join(WAIT)
        assert set(threading.enumerate()) == py_threads
        assert vm.errors == []

    def test_context_manager_closes(self):
        with Vm(irqchip=True) as vm:
            pass
        assert vm.closed


def test_public_names():
    for name in ("Vm", "Vcpu", "IrqchipEntry", "MsiEntry", "InvalidRouting", "msi_address",
                 "msi_data", "uapi"):
        assert hasattr(kvmirqfast, name)
