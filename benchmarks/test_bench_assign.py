"""Assign + deassign N direct irqfds; ``extra_info`` has the cost per irqfd of each half."""
import pytest

from kvmirqfast import MsiEntry, Vm, msi_address, msi_data
from kvmirqfast.bench import _close_all, _eventfds, _vector
from kvmirqfast.bench.control import assign_cycle

ROUNDS = {16: 50, 1024: 5, 16384: 2}


@pytest.mark.parametrize("n", sorted(ROUNDS))
def test_assign_deassign(benchmark, n):
    fds = _eventfds(n)
    entries = [MsiEntry(*msi_address(0), msi_data(_vector(i))) for i in range(n)]
    halves = []
    try:
        with Vm(irqchip=True) as vm:
            vm.create_vcpu(0)

            benchmark.pedantic(lambda: halves.append(assign_cycle(vm, fds, entries)),
                               rounds=ROUNDS[n], iterations=1)
    finally:
        _close_all(fds)
    a = sorted(h[0] for h in halves)[len(halves) // 2]
    d = sorted(h[1] for h in halves)[len(halves) // 2]
    benchmark.extra_info.update({"n": n, "assign_s_per_irqfd": a, "deassign_s_per_irqfd": d})
