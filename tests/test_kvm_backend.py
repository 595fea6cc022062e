"""The real-/dev/kvm backend (kvmirqfast.kvm): the model's API on a real VM and a real guest.

Everything here runs on the host's /dev/kvm and skips, with the reason, where it is unusable --
except the tests of the "unavailable" error itself.
"""

import errno
import os
import struct
import threading
import time

import pytest

from kvmirqfast import IrqchipEntry, MsiEntry, Vm, msi_address, msi_data, uapi
from kvmirqfast.kvm import KvmUnavailable, KvmVcpu, KvmVm, RoutingTableFull, measure_retarget
from realkvm import requires_kvm

IOAPIC = uapi.KVM_IRQCHIP_IOAPIC


def msi(dest, vector, level=False):
    return MsiEntry(*msi_address(dest), msi_data(vector, level_trigger=level))


def open_fds():
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def efds():
    made = []

    def make():
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        made.append(fd)
        return fd
    yield make
    for fd in made:
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.fixture
def vm():
    v = KvmVm(irqchip=True)
    yield v
    v.close()


def take(cpu, timeout=2.0):
    """wait + ack + eoi; the vector taken."""
    assert cpu.wait_interrupt(timeout=timeout)
    v = cpu.ack()
    assert cpu.eoi() == v
    return v


# --- availability (no /dev/kvm needed) --------------------------------------------------------
def test_missing_device_names_the_reason():
    with pytest.raises(KvmUnavailable) as ei:
        KvmVm(device="/nonexistent/kvm")
    assert ei.value.errno == errno.ENOENT
    assert "cannot open /nonexistent/kvm" in str(ei.value)
    assert "not loaded" in str(ei.value)


def test_wrong_device_names_the_reason():
    with pytest.raises(KvmUnavailable) as ei:
        KvmVm(device="/dev/null")
    assert "kvm backend unavailable" in str(ei.value)


def test_foreign_arch_is_refused_with_reason():
    with pytest.raises(KvmUnavailable) as ei:
        KvmVm("arm64")
    assert "arm64" in str(ei.value) and "backend='model'" in str(ei.value)




# --- delivery through the guest ---------------------------------------------------------------
@requires_kvm
def test_direct_msi_wait_ack_eoi(vm, efds):
    cpu = vm.create_vcpu(0)
    efd = efds()
    info = vm.irqfd_direct(efd, msi(0, 0x41))
    assert info.direct and info.gsi == 4095 == vm.direct_gsi(efd)
    assert vm.irqfd_count() == 1 and vm.gsi_routing == vm.gsi_routing  # user table unchanged
    os.eventfd_write(efd, 1)
    assert cpu.pending() == [0x41]                 # KVM delivers inside write(): IRR, now
    assert cpu.wait_interrupt(timeout=2)
    assert cpu.pending() == [0x41]                 # taken by the guest, not yet ack()ed
    assert cpu.ack() == 0x41
    assert cpu.pending() == [] and cpu.in_service() == [0x41]
    assert cpu.eoi() == 0x41
    assert cpu.in_service() == [] and cpu.eoi() is None and cpu.ack() is None
    assert vm.stats()["interrupts"] == 1 and vm.stats()["eois"] == 1


@requires_kvm
def test_every_vcpu_runs_and_takes_its_own(vm):
    cpus = [vm.create_vcpu(i) for i in range(4)]
    for i in range(4):
        assert vm.signal_msi(*msi_address(i), msi_data(0x50 + i)) == 1
    for i, c in enumerate(cpus):
        assert take(c) == 0x50 + i
    assert vm.signal_msi(*msi_address(9), msi_data(0x50)) == 0          # nobody there


@requires_kvm
def test_wait_times_out_and_ack_without_interrupt_is_none(vm):
    cpu = vm.create_vcpu(0)
    t0 = time.monotonic()
    assert cpu.wait_interrupt(timeout=0.2) is False
    assert 0.15 < time.monotonic() - t0 < 1.5
    assert cpu.wait_interrupt(timeout=0) is False
    assert cpu.ack() is None
    vm.signal_msi(*msi_address(0), msi_data(0x44))    # after a timeout the vCPU still works
    assert take(cpu) == 0x44


@requires_kvm
def test_highest_vector_first(vm):
    cpu = vm.create_vcpu(0)
    for v in (0x41, 0x93, 0x62):
        vm.signal_msi(*msi_address(0), msi_data(v))
    assert [take(cpu) for _ in range(3)] == [0x93, 0x62, 0x41]


@requires_kvm
def test_pending_from_another_thread_while_guest_halts(vm):
    cpu = vm.create_vcpu(0)
    result = []
    t = threading.Thread(target=lambda: result.append(cpu.wait_interrupt(timeout=5)))
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    assert cpu.pending() == []                     # kicks the runner out of hlt, not a hang
    assert time.monotonic() - t0 < 1
    vm.signal_msi(*msi_address(0), msi_data(0x45))
    t.join(5)
    assert result == [True] and cpu.ack() == 0x45 and cpu.eoi() == 0x45


@requires_kvm
def test_close_wakes_blocked_wait_and_closes_every_fd(efds):
    before = open_fds()
    vm = KvmVm(irqchip=True)
    cpus = [vm.create_vcpu(i) for i in range(2)]
    efd = efds()
    vm.irqfd_direct(efd, msi(1, 0x40))
    result = []
    threads = [threading.Thread(target=lambda c=c: result.append(c.wait_interrupt()))
               for c in cpus]
    for t in threads:
        t.start()
    time.sleep(0.1)
    vm.close()
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert result == [False, False]
    assert open_fds() - before == {str(efd)}
    assert vm.closed
    with pytest.raises(ValueError):
        vm.irqfd_count() or vm.signal_msi(0xFEE00000)


# --- retarget, routing replacement, moves -----------------------------------------------------
@requires_kvm
def test_retarget_before_goes_old_after_goes_new(vm, efds):
    c0, c1 = vm.create_vcpu(0), vm.create_vcpu(1)
    efd = efds()
    vm.irqfd_direct(efd, msi(0, 0x40))
    os.eventfd_write(efd, 1)
    vm.irqfd_direct_modify(efd, msi(1, 0x41))
    os.eventfd_write(efd, 1)
    assert c0.pending() == [0x40] and c1.pending() == [0x41]
    assert take(c0) == 0x40 and take(c1) == 0x41
    assert vm.stats()["route_pushes"] == 2


@requires_kvm
def test_user_table_wins_and_direct_route_moves(vm, efds):
    cpu = vm.create_vcpu(0)
    efd = efds()
    vm.irqfd_direct(efd, msi(0, 0x40))
    assert vm.direct_gsi(efd) == 4095
    assert vm.irq_line(4095, 1) == -1              # not the user's GSI: no route for them
    vm.set_gsi_routing([(4095, msi(0, 0x70))])
    assert vm.direct_gsi(efd) == 4094
    assert vm.gsi_routing.entries == ((4095, msi(0, 0x70)),)
    assert vm.irq_line(4095, 1) == 1               # the user's route, the user's vector
    os.eventfd_write(efd, 1)                       # the direct irqfd followed its route
    assert cpu.pending() == [0x40, 0x70]
    assert take(cpu) == 0x70 and take(cpu) == 0x40
    assert vm.stats()["direct_moves"] == 1


@requires_kvm
def test_event_written_while_detached_for_a_move_is_not_lost(vm, efds):
    cpu = vm.create_vcpu(0)
    efd = efds()
    vm.irqfd_direct(efd, msi(0, 0x40))
    writer_done = threading.Event()

    def writer():
        for _ in range(200):
            os.eventfd_write(efd, 1)
        writer_done.set()
    t = threading.Thread(target=writer)
    t.start()
    for g in range(20):                             # moves while events fly
        vm.set_gsi_routing([(vm.direct_gsi(efd), msi(0, 0x70))])
    t.join()
    assert writer_done.is_set()
    got = set()
    while cpu.wait_interrupt(timeout=0.3):
        got.add(cpu.ack())
        cpu.eoi()
    assert 0x40 in got and got <= {0x40}
    assert cpu.pending() == []


@requires_kvm
def test_legacy_irqfd_on_a_direct_gsi_moves_the_direct_route(vm, efds):
    cpu = vm.create_vcpu(0)
    d, l = efds(), efds()
    vm.irqfd_direct(d, msi(0, 0x40))
    vm.irqfd(l, 4095)                              # no route for the user there: delivers nothing
    assert vm.direct_gsi(d) == 4094
    os.eventfd_write(l, 1)
    os.eventfd_write(d, 1)
    assert cpu.pending() == [0x40]
    vm.set_gsi_routing([(4095, msi(0, 0x71))])
    os.eventfd_write(l, 1)
    assert cpu.pending() == [0x40, 0x71]
    assert vm.irqfd_deassign(l, 4095) and not vm.irqfd_deassign(l, 4095)
    assert vm.irqfd_direct_deassign(d) and not vm.irqfd_direct_deassign(d)
    assert vm.irqfd_count() == 0


@requires_kvm
def test_table_full_fails_cleanly(vm, efds):
    vm.set_gsi_routing([(g, msi(0, 0x30)) for g in range(4090)])
    fds = [efds() for _ in range(7)]
    for fd in fds[:6]:
        vm.irqfd_direct(fd, msi(0, 0x40))
    pushes = vm.stats()["route_pushes"]
    with pytest.raises(RoutingTableFull) as ei:
        vm.irqfd_direct(fds[6], msi(0, 0x41))
    assert ei.value.errno == errno.EINVAL and "table full" in str(ei.value)
    assert vm.irqfd_count() == 6 and vm.direct_gsi(fds[6]) is None
    assert vm.stats()["route_pushes"] == pushes    # nothing sent to KVM
    with pytest.raises(RoutingTableFull):           # the user's bigger table does not fit either
        vm.set_gsi_routing([(g, msi(0, 0x30)) for g in range(4091)])
    assert len(vm.gsi_routing) == 4090
    vm.irqfd_direct_deassign(fds[0])
    vm.irqfd_direct(fds[6], msi(0, 0x41))          # the eventfd was not left claimed
    cpu = vm.create_vcpu(0)
    os.eventfd_write(fds[6], 1)
    assert take(cpu) == 0x41


# --- level-triggered, IOAPIC, resampler --------------------------------------------------------
@requires_kvm
def test_direct_ioapic_pin_with_resampler(vm, efds):
    cpu = vm.create_vcpu(0)
    st = bytearray(vm.ioctl(uapi.KVM_GET_IRQCHIP, uapi.IRQCHIP.pack(IOAPIC, 0, b"")))
    struct.pack_into("<Q", st, 8 + 24 + 8 * 20, 0x61 | 1 << 15)       # level, vector 0x61
    vm.ioctl(uapi.KVM_SET_IRQCHIP, bytes(st))
    efd, rfd = efds(), efds()
    vm.irqfd_direct(efd, IrqchipEntry(IOAPIC, 20), resamplefd=rfd)
    os.eventfd_write(efd, 1)
    deadline = time.monotonic() + 2
    while cpu.pending() != [0x61]:                  # KVM injects irqchip routes from a worker
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert take(cpu) == 0x61
    assert os.eventfd_read(rfd) == 1               # the EOI reached the IOAPIC's ack notifier
    assert cpu.wait_interrupt(timeout=0.2) is False   # line lowered by the resampler: no repeat


# --- errors: the same as the model ---------------------------------------------------------------
def _outcome(fn):
    try:
        r = fn()
    except (OSError, ValueError, TypeError) as e:
        return type(e).__name__, getattr(e, "errno", None)
    return "ok", r if isinstance(r, (bool, type(None))) else "value"


@requires_kvm
def test_bad_input_gets_the_models_errors(efds):
    bad_msi = MsiEntry(0xFEE00000, 0x1, 0x41)      # address_hi bits 7:0 with 32-bit ids
    cases = []
    with Vm(irqchip=True) as model, KvmVm(irqchip=True) as real:
        model.enable = real.enable = None
        for vm in (model, real):
            e1, e2 = efds(), efds()
            closed = efds()
            os.close(closed)
            notev = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            try:
                vm.ioctl(uapi.KVM_ENABLE_CAP, uapi.ENABLE_CAP.pack(
                    uapi.KVM_CAP_X2APIC_API, 0, uapi.KVM_X2APIC_API_USE_32BIT_IDS, 0, 0, 0))
                cases.append([
                    _outcome(lambda: vm.irqfd_direct(closed, msi(0, 0x40))),
                    _outcome(lambda: vm.irqfd_direct(notev, msi(0, 0x40))),
                    _outcome(lambda: vm.irqfd_direct("3", msi(0, 0x40))),
                    _outcome(lambda: vm.irqfd_direct(e1, IrqchipEntry(IOAPIC, 24))),
                    _outcome(lambda: vm.irqfd_direct(e1, bad_msi)),
                    _outcome(lambda: vm.irqfd_direct(e1, "entry")),
                    _outcome(lambda: vm.irqfd_direct_modify(e1, msi(0, 0x40))),
                    _outcome(lambda: vm.irqfd_direct_deassign(e1)),
                    _outcome(lambda: vm.irqfd_direct(e1, msi(0, 0x40)) and None),
                    _outcome(lambda: vm.irqfd_direct(e1, msi(0, 0x40))),
                    _outcome(lambda: vm.irqfd(e1, 3)),
                    _outcome(lambda: vm.irqfd(closed, 3)),
                    _outcome(lambda: vm.irqfd(e2, -1)),
                    _outcome(lambda: vm.irqfd_deassign(e2, 3)),
                    _outcome(lambda: vm.set_gsi_routing([(4096, msi(0, 0x40))])),
                    _outcome(lambda: vm.set_gsi_routing([(1, bad_msi)])),
                    _outcome(lambda: vm.signal_msi(-1)),
                    _outcome(lambda: vm.create_vcpu("0")),
                    # the uAPI: hostile structs, wrong sizes, int pointers
                    _outcome(lambda: vm.ioctl(uapi.KVM_IRQFD_DIRECT, uapi.IRQFD_DIRECT.pack(
                        e2, 0, 0, 1, msi(0, 0x40).to_uapi(0)))),
                    _outcome(lambda: vm.ioctl(uapi.KVM_IRQFD_DIRECT, uapi.IRQFD_DIRECT.pack(
                        e2, 0, 0, 0, msi(0, 0x40).to_uapi(7)))),
                    _outcome(lambda: vm.ioctl(uapi.KVM_IRQFD_DIRECT, 0)),
                    _outcome(lambda: vm.ioctl(uapi.KVM_IRQFD, uapi.pack_irqfd(e2, 3, 0x80))),
                    _outcome(lambda: vm.ioctl(uapi.KVM_SET_GSI_ROUTING,
                                              bytearray(uapi.ROUTING_HEADER.pack(4097, 0)))),
                    _outcome(lambda: vm.ioctl(uapi.KVM_SET_GSI_ROUTING,
                                              bytearray(uapi.ROUTING_HEADER.pack(2, 0)))),
                    _outcome(lambda: vm.ioctl(uapi.KVM_SIGNAL_MSI, 0)),
                    _outcome(lambda: vm.ioctl(uapi.KVM_CHECK_EXTENSION,
                                              uapi.KVM_CAP_IRQFD_DIRECT)),
                    _outcome(lambda: vm.ioctl(uapi.KVM_CREATE_IRQCHIP)),
                ])
            finally:
                os.close(notev)
        model.close()
        real.close()
        cases.append([_outcome(lambda: vm.ioctl(uapi.KVM_CHECK_EXTENSION, 0)) for vm in
                      (model, real)])
    model_cases, real_cases, closed_cases = cases
    assert real_cases == model_cases
    assert closed_cases[0] == closed_cases[1] == ("OSError", errno.EBADF)


@requires_kvm
def test_signal_msi_without_vcpus():
    with KvmVm(irqchip=True) as vm:
        assert vm.signal_msi(*msi_address(0), msi_data(0x41)) == 0     # the method's contract
        with pytest.raises(PermissionError):       # KVM's raw answer: -1, no LAPIC took part
            vm.ioctl(uapi.KVM_SIGNAL_MSI, bytearray(uapi.pack_msi(*msi_address(0), 0x41)))
        vm.create_vcpu(0)
        assert vm.ioctl(uapi.KVM_SIGNAL_MSI, bytearray(uapi.pack_msi(*msi_address(0), 0x41))) == 1


@requires_kvm
def test_ioctl_uapi_on_real_vm(efds):
    with KvmVm() as vm:
        assert vm.ioctl(uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_IRQFD_DIRECT) == 1
        assert vm.ioctl(uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_IRQ_ROUTING) == 4096
        vm.ioctl(uapi.KVM_CREATE_IRQCHIP)
        assert vm.has_irqchip
        cpu = vm.ioctl(uapi.KVM_CREATE_VCPU, 0)
        assert isinstance(cpu, KvmVcpu)
        st = bytearray(uapi.LAPIC_STATE_SIZE)
        cpu.ioctl(uapi.KVM_GET_LAPIC, st)
        assert not uapi.lapic_reg(st, uapi.APIC_SPIV) & uapi.APIC_SPIV_APIC_ENABLED
        uapi.set_lapic_reg(st, uapi.APIC_SPIV, 0x1FF)
        cpu.ioctl(uapi.KVM_SET_LAPIC, bytes(st))
        efd = efds()
        vm.ioctl(uapi.KVM_IRQFD_DIRECT, uapi.pack_irqfd_direct(efd, msi(0, 0x42).to_uapi(0)))
        os.eventfd_write(efd, 1)
        assert take(cpu) == 0x42
        table = uapi.pack_routing([msi(0, 0x43).to_uapi(4095)])
        assert vm.ioctl(uapi.KVM_SET_GSI_ROUTING, table) == 0
        assert vm.direct_gsi(efd) == 4094
        out = vm.ioctl(uapi.KVM_IRQ_LINE_STATUS, uapi.pack_irq_level(4095, 1))
        assert uapi.IRQ_LEVEL.unpack(out)[0] == 1
        out = vm.ioctl(uapi.KVM_IRQ_LINE_STATUS, uapi.pack_irq_level(4094, 1))
        assert uapi.IRQ_LEVEL.unpack(out)[0] == -1    # the direct route's GSI is not the user's
        assert take(cpu) == 0x43 and cpu.pending() == []
        vm.ioctl(uapi.KVM_IRQFD_DIRECT, uapi.pack_irqfd_direct(
            efd, b"\0" * 48, uapi.KVM_IRQFD_FLAG_DEASSIGN))
        assert vm.irqfd_count() == 0
        with pytest.raises(OSError) as ei:
            cpu.ioctl(uapi.KVM_GET_LAPIC, 0)
        assert ei.value.errno == errno.EFAULT


# --- the selftest and the retarget measurement --------------------------------------------------
@requires_kvm
def test_kvm_selftest_small_run_passes():
    from kvmirqfast.selftest_kvm import format_kvm_report, kvm_selftest
    r = kvm_selftest(irqfds=500, vcpus=2, out=None, retarget_samples=8)
    assert r.ok and r.complete and r.stopped is None
    assert r.sent == r.delivered == 1000
    assert "PASS" in format_kvm_report(r, 2)


@requires_kvm
def test_kvm_selftest_shows_where_real_kvm_stops():
    from kvmirqfast.selftest_kvm import format_kvm_report, kvm_selftest
    r = kvm_selftest(irqfds=4100, vcpus=2, out=None, retarget_samples=0)
    assert r.ok and not r.complete
    assert r.assigned == 4096 and r.stopped["at"] == 4097
    assert r.stopped["errno"] == errno.EINVAL
    assert r.delivered == 2 * 4096
    text = format_kvm_report(r, 2)
    assert "irqfd 4097" in text and "table full" in text and "KVM cannot hold 4100" in text


@requires_kvm
def test_measure_retarget_both_backends():
    kvm_s, n = measure_retarget("kvm", routes=256, samples=20)
    model_s, _ = measure_retarget("model", routes=256, samples=20)
    assert n == 20 and kvm_s > 0 and model_s > 0
