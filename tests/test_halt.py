"""HLT with harvesting: a halted vCPU sleeps in epoll_wait on the engine's eventfds.

One vCPU at a time takes device writes itself (one thread wake-up per interrupt, as in KVM where
the write delivers and kicks the vCPU); the engine stands aside meanwhile and delivers for the
other vCPUs.  A delivery from anywhere else (the deferred worker, KVM_SIGNAL_MSI, another vCPU's
harvest) reaches a vCPU asleep in epoll_wait through the kick eventfd.  Outcomes are checked: the
interrupt landed on the right vCPU with the right vector, and the counters say who delivered it.
"""

import os
import threading
import time

import pytest

from kvmirqfast import MsiEntry, Vm, msi_address, msi_data
from helpers_irqfd import WAIT, fds, open_fds, run_thread, wait_until  # noqa: F401


def msi(dest, vector):
    return MsiEntry(*msi_address(dest), msi_data(vector))


def halted(vm, n=1):
    """True once n vCPU threads are asleep in wait_interrupt (in epoll_wait or on a futex)."""
    return wait_until(lambda: vm._engine.halted() >= n)


def halt_then(vm, cpu, fire):
    """HLT on ``cpu`` in a thread, call ``fire()`` once it sleeps; the vector it took, or None."""
    t, out = run_thread(cpu.wait_interrupt, WAIT)
    assert halted(vm)
    fire()
    t.join(WAIT)
    if out.get("value") is not True:
        return None
    vector = cpu.ack()
    cpu.eoi()
    return vector


@pytest.fixture
def vm():
    v = Vm(irqchip=True)
    yield v
    v.close()


def test_a_halted_vcpu_takes_the_device_write_itself(vm, fds):
    cpu = vm.create_vcpu(0)
    e = fds.eventfd()
    vm.irqfd_direct(e, msi(0, 0x41))
    for _ in range(20):
        assert halt_then(vm, cpu, lambda: os.eventfd_write(e, 1)) == 0x41
    st = vm.stats()
    assert st["delivered"] == 20
    assert st["vcpu_harvested"] == 20       # the engine thread delivered none of them
    assert st["kicks"] == 0                 # its own deliveries need no kick


def test_with_harvesting_off_the_engine_delivers(vm, fds):
    vm.vcpu_harvest = False
    cpu = vm.create_vcpu(0)
    e = fds.eventfd()
    vm.irqfd_direct(e, msi(0, 0x41))
    for _ in range(5):
        assert halt_then(vm, cpu, lambda: os.eventfd_write(e, 1)) == 0x41
    assert wait_until(lambda: vm.stats()["delivered"] == 5)
    assert vm.stats()["vcpu_harvested"] == 0
    with pytest.raises(TypeError):
        vm.vcpu_harvest = 1


@pytest.mark.parametrize("source", ["signal_msi", "irq_line", "irqfd via IOAPIC"])
def test_a_delivery_from_elsewhere_kicks_the_harvesting_vcpu(vm, fds, source):
    cpu = vm.create_vcpu(0)
    vm.ioapic.set_redirection(16, 0x56)
    e = fds.eventfd()
    vm.irqfd(e, 16)
    fire = {"signal_msi": lambda: vm.signal_msi(*msi_address(0), msi_data(0x56)),   # this thread
            "irq_line": lambda: (vm.irq_line(16, 1), vm.irq_line(16, 0)),   # -> IOAPIC -> LAPIC
            # the vCPU harvests the write, the deferred worker injects through the IOAPIC
            "irqfd via IOAPIC": lambda: os.eventfd_write(e, 1)}[source]
    for _ in range(3):
        assert halt_then(vm, cpu, fire) == 0x56
    if source != "irqfd via IOAPIC":        # there the worker may beat the vCPU back to sleep
        assert vm.stats()["kicks"] >= 3   # (the engine may see a kick too)


def test_one_vcpu_harvests_for_all(vm, fds):
    cpus = [vm.create_vcpu(i) for i in range(3)]
    efds = [fds.eventfd() for _ in cpus]
    for i, e in enumerate(efds):
        vm.irqfd_direct(e, msi(i, 0x60 + i))
    for rnd in range(5):
        waits = [run_thread(c.wait_interrupt, WAIT) for c in cpus]
        assert halted(vm, 3)
        for e in efds:
            os.eventfd_write(e, 1)
        for i, (t, out) in enumerate(waits):
            t.join(WAIT)
            assert out.get("value") is True, (rnd, i)
            assert cpus[i].ack() == 0x60 + i and cpus[i].eoi() == 0x60 + i
    assert wait_until(lambda: vm.stats()["delivered"] == 15)


def test_close_wakes_a_harvesting_vcpu_and_leaves_nothing_open(fds):
    before = open_fds()
    vm = Vm(irqchip=True)
    cpu = vm.create_vcpu(0)
    e = fds.eventfd()
    vm.irqfd_direct(e, msi(0, 0x41))
    t, out = run_thread(cpu.wait_interrupt, None)
    assert halted(vm)
    vm.close()
    t.join(WAIT)
    assert not t.is_alive() and out.get("value") is False
    assert open_fds() - before <= {str(e)}


def test_the_engine_sleeps_while_a_vcpu_harvests(vm, fds):
    # Standing aside must be a sleep, not a spin: the engine thread's CPU time barely moves
    # while a vCPU sits halted in epoll_wait for 0.3 s.
    cpu = vm.create_vcpu(0)
    e = fds.eventfd()
    vm.irqfd_direct(e, msi(0, 0x41))
    t, out = run_thread(cpu.wait_interrupt, WAIT)
    assert halted(vm)
    before = vm.stats()["cpu_ns"]
    time.sleep(0.3)
    used = vm.stats()["cpu_ns"] - before
    os.eventfd_write(e, 1)
    t.join(WAIT)
    assert out.get("value") is True
    assert used < 30_000_000, f"engine used {used / 1e6:.1f} ms of CPU in 300 ms"


def test_many_vcpu_threads_racing_for_the_harvester_token(vm, fds):
    # Eight vCPU threads halt and wake in a loop while a device writes their eventfds: at most
    # one of them harvests at a time, every write lands on its own vCPU, none is lost.
    cpus = [vm.create_vcpu(i) for i in range(8)]
    efds = [fds.eventfd() for _ in cpus]
    for i, e in enumerate(efds):
        vm.irqfd_direct(e, msi(i, 0x30 + i))
    rounds = 40
    got = [0] * len(cpus)
    errors = []

    def vcpu(i):
        c = cpus[i]
        while got[i] < rounds:
            if not c.wait_interrupt(WAIT):
                errors.append(f"vCPU {i} timed out after {got[i]}")
                return
            v = c.ack()
            if v != 0x30 + i:
                errors.append(f"vCPU {i} got {v}")
            c.eoi()
            got[i] += 1

    threads = [threading.Thread(target=vcpu, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for rnd in range(rounds):
        assert wait_until(lambda: all(g >= rnd for g in got)), got
        for e in efds:
            os.eventfd_write(e, 1)
    for t in threads:
        t.join(WAIT * 2)
    assert not errors and got == [rounds] * 8


def test_a_write_while_the_harvester_is_away_arrives_within_the_lease(vm, fds):
    # After the vCPU took an interrupt the engine stands aside, expecting it back (the lease,
    # at most 1 ms); when it does not come back, the engine takes the next write itself.
    cpu = vm.create_vcpu(0)
    a, b = fds.eventfd(), fds.eventfd()
    vm.irqfd_direct(a, msi(0, 0x41))
    vm.irqfd_direct(b, msi(0, 0x42))
    for _ in range(5):
        assert halt_then(vm, cpu, lambda: os.eventfd_write(a, 1)) == 0x41
    os.eventfd_write(b, 1)                  # nobody halts now: the engine must take it
    assert wait_until(lambda: 0x42 in cpu.pending(), timeout=0.3)


def test_ctrl_c_interrupts_a_halted_main_thread_and_leaves_the_engine_usable(vm, fds):
    # A vCPU loop run in the main thread must stay interruptible: SIGINT lands while it sleeps
    # in epoll_wait (harvesting); KeyboardInterrupt comes out, the harvester token is given back.
    import signal
    import threading as th
    if th.current_thread() is not th.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    cpu = vm.create_vcpu(0)
    e = fds.eventfd()
    vm.irqfd_direct(e, msi(0, 0x41))
    main = th.main_thread().ident
    timer = th.Timer(0.2, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            cpu.wait_interrupt()            # no timeout: only the signal ends it
    finally:
        timer.cancel()
    assert vm._engine.halted() == 0
    assert halt_then(vm, cpu, lambda: os.eventfd_write(e, 1)) == 0x41
    assert vm.stats()["vcpu_harvested"] == 1    # it harvested again: the token was released


def _engine_syscall(vm):
    """The system call the engine thread is in (/proc/.../syscall), or None if it runs."""
    with open(f"/proc/self/task/{vm._engine.thread_id}/syscall") as f:
        first = f.read().split()[0]
    return None if first == "running" else int(first)


X86_64_EPOLL_WAIT, X86_64_FUTEX = 232, 202


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="system call numbers are x86-64's")
def test_a_halt_polling_vcpu_sends_the_engine_out_of_epoll_wait():
    """An idle engine sleeps in epoll_wait; a vCPU coming to halt-poll harvests the eventfds
    itself, so the engine must leave epoll_wait and stand aside (on its futex) at once, with no
    write needed.  Left there, every device write would wake it too, and the spinning vCPU
    would take each event first: the engine never came out, preempting the vCPU on its CPU
    (in 1 poll-mode ping-pong run in 4, 6-11% of round trips over 10 us)."""
    with Vm(irqchip=True) as vm:
        cpu = vm.create_vcpu(0)
        assert wait_until(lambda: vm._engine.thread_id
                          and _engine_syscall(vm) == X86_64_EPOLL_WAIT)
        t, out = run_thread(cpu.wait_interrupt, 1.0, 300_000)
        assert wait_until(lambda: _engine_syscall(vm) == X86_64_FUTEX)
        t.join(WAIT)
        assert out.get("value") is False                 # no interrupt came: a timeout
