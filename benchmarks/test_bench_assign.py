"""Assign + deassign N direct irqfds; ``extra_info`` has the cost per irqfd of each half."""
import time

import pytest

from kvmirqfast import MsiEntry, Vm, msi_address, msi_data
from kvmirqfast.bench import _close_all, _eventfds, _vector

ROUNDS = {16: 50, 1024: 5, 16384: 2}


@pytest.mark.parametrize("n", sorted(ROUNDS))
def test_assign_deassign(benchmark, n):
    fds = _eventfds(n)
    entries = [MsiEntry(*msi_address(0), msi_data(_vector(i))) for i in range(n)]
    halves = []
    try:
        with Vm(irqchip=True) as vm:
            vm.create_vcpu(0)

            def cycle():
                t0 = time.perf_counter()
                for fd, e in zip(fds, entries):
                    vm.irqfd_direct(fd, e)
                t1 = time.perf_counter()
                for fd in fds:
                    vm.irqfd_direct_deassign(fd)
                halves.append((t1 - t0, time.perf_counter() - t1))

            benchmark.pedantic(cycle, rounds=ROUNDS[n], iterations=1)
    finally:
        _close_all(fds)
    a = sorted(h[0] for h in halves)[len(halves) // 2] / n
    d = sorted(h[1] for h in halves)[len(halves) // 2] / n
    benchmark.extra_info.update({"n": n, "assign_s_per_irqfd": a, "deassign_s_per_irqfd": d})
